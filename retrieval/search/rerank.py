"""Re-ranking of a search's shortlist: alpha query expansion, database-side augmentation, k-reciprocal.

Every method re-scores the `shortlist` best candidates of the index's own (optionally filtered)
search, so it composes with any index type and filter and costs O(shortlist) per query:

    qe           alpha-QE (Radenovic et al. 2018): q' = normalise(q + sum_{i<=n} s_i^alpha g_i) over the
                 query's top n candidates, candidates re-scored by q' . g.
    dba          database-side augmentation (the same weighting applied to every gallery vector with its
                 own n nearest gallery neighbours, itself first): candidates re-scored by q . g~.
                 Needs the gallery neighbour lists built at index time (`retrieval index --rerank-neighbours`,
                 retrieval.index.neighbours).
    kreciprocal  k-reciprocal encoding (Zhong et al. 2017, the re-identification / In-Shop re-ranking):
                 Jaccard distance of k-reciprocal neighbour sets (k1, k2 local query expansion), mixed
                 with the original distance by lambda, computed over the query and its shortlist (the
                 neighbourhoods of gallery items are those within that set). Score = 1 - distance.

Reported scores are those of the re-ranked order (higher is better). Ties keep the original order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from retrieval.index.errors import RerankError
from retrieval.index.neighbours import NeighbourLists

RERANK_METHODS = ("none", "qe", "dba", "kreciprocal")


@dataclass(frozen=True)
class RerankConfig:
    """Parameters of every method; the defaults are the papers' usual settings."""

    shortlist: int = 100  # candidates re-scored per query
    qe_n: int = 5  # alpha-QE: top candidates averaged into the query
    alpha: float = 3.0  # alpha-QE and DBA: similarity weights s^alpha
    dba_n: int = 5  # DBA: neighbours (self included) averaged into each gallery vector
    k1: int = 20  # k-reciprocal neighbourhood
    k2: int = 6  # k-reciprocal local query expansion
    lam: float = 0.3  # k-reciprocal weight of the original distance


def check_method(method: str | None) -> str:
    method = (method or "none").lower()
    if method not in RERANK_METHODS:
        raise RerankError(f"unknown re-ranking {method!r}; choose one of {', '.join(RERANK_METHODS)}")
    return method


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _weights(scores: np.ndarray, alpha: float) -> np.ndarray:
    return np.power(np.maximum(scores.astype(np.float64), 0.0), alpha)


def _reorder(values: np.ndarray, ids: np.ndarray, higher_better: bool = True) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-values if higher_better else values, kind="stable")
    return values[order], ids[order]


class Reranker:
    """Re-scores shortlists; gallery vectors (and neighbour lists for DBA) are read on first need."""

    def __init__(
        self,
        vectors: Callable[[], np.ndarray],
        neighbours: Callable[[], NeighbourLists],
        cfg: RerankConfig | None = None,
        fetch: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """`vectors()` gives every gallery vector (read once, kept); with `fetch(rows)` (a remote store such as
        Milvus) qe and kreciprocal instead read only the candidates' vectors of each batch."""
        self.cfg = cfg or RerankConfig()
        self._vectors_fn, self._neighbours_fn, self._fetch = vectors, neighbours, fetch
        self._vectors: np.ndarray | None = None
        self._neighbours: NeighbourLists | None = None

    @property
    def vectors(self) -> np.ndarray:
        if self._vectors is None:
            self._vectors = np.asarray(self._vectors_fn(), dtype=np.float32)
        return self._vectors

    @property
    def neighbours(self) -> NeighbourLists:
        if self._neighbours is None:
            self._neighbours = self._neighbours_fn()
        return self._neighbours

    def shortlist_size(self, k: int) -> int:
        return max(int(k), self.cfg.shortlist)

    def rerank(
        self, method: str, queries: np.ndarray, scores: np.ndarray, ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """queries (Q, D); scores/ids (Q, M) of the shortlist (-1 ids = none) -> re-ranked (Q, M), -1 padded."""
        method = check_method(method)
        if method == "none":
            return scores, ids
        if method == "dba":
            _ = self.neighbours  # refuse before any work when the lists are missing
        out_s = np.full(scores.shape, -np.inf, np.float32)
        out_i = np.full(ids.shape, -1, np.int64)
        fn = {"qe": self._qe, "dba": self._dba, "kreciprocal": self._kreciprocal}[method]
        table = self._candidate_vectors(ids) if method != "dba" else None
        for row in range(len(queries)):
            valid = ids[row] >= 0
            cand = ids[row][valid]
            if len(cand) == 0:
                continue
            g = table(cand) if table is not None else None
            new_s, new_i = fn(queries[row].astype(np.float64), scores[row][valid], cand, g)
            out_s[row, : len(new_i)] = new_s
            out_i[row, : len(new_i)] = new_i
        return out_s, out_i

    def _candidate_vectors(self, ids: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """rows -> their vectors for this batch's candidates: fetched once per batch, or from all vectors."""
        if self._fetch is None:
            return lambda rows: self.vectors[rows]
        unique = np.unique(ids[ids >= 0])
        fetched = np.asarray(self._fetch(unique), dtype=np.float32)
        return lambda rows: fetched[np.searchsorted(unique, rows)]

    # -- methods on one query (g: the candidates' vectors; DBA reads its own) -------------------------
    def _qe(
        self, q: np.ndarray, s: np.ndarray, cand: np.ndarray, g: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        assert g is not None
        g = g.astype(np.float64)
        n = min(self.cfg.qe_n, len(cand))
        expanded = _normalise(q + (_weights(s[:n], self.cfg.alpha)[:, None] * g[:n]).sum(axis=0))
        return _reorder(g @ expanded, cand)

    def _dba(
        self, q: np.ndarray, s: np.ndarray, cand: np.ndarray, g: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        lists = self.neighbours
        n = min(self.cfg.dba_n, lists.width)
        nbr_ids, nbr_s = lists.ids[cand, :n], lists.scores[cand, :n]
        w = _weights(nbr_s, self.cfg.alpha) * (nbr_ids >= 0)
        augmented = _normalise((w[:, :, None] * self.vectors[np.maximum(nbr_ids, 0)].astype(np.float64)).sum(axis=1))
        return _reorder(augmented @ q, cand)

    def _kreciprocal(
        self, q: np.ndarray, s: np.ndarray, cand: np.ndarray, g: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        assert g is not None
        points = np.concatenate([q[None, :], g.astype(np.float64)])
        dist = k_reciprocal_distance(points, self.cfg.k1, self.cfg.k2, self.cfg.lam)
        return _reorder((1.0 - dist).astype(np.float32), cand)


def k_reciprocal_distance(points: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """Final k-reciprocal distance of point 0 (the query) to points 1.. (its candidates), shape (n - 1,).

    points (n, D) L2-normalised; original distance = squared Euclidean = 2 - 2 cos, each row scaled
    by its maximum; neighbour sets as boolean matrices (row i: the k-reciprocal set of point i).
    """
    n = len(points)
    d = np.maximum(2.0 - 2.0 * (points @ points.T), 0.0)
    d = d / np.maximum(d.max(axis=1, keepdims=True), 1e-12)
    rank = np.argsort(d, axis=1, kind="stable")

    def reciprocal(k: int) -> np.ndarray:
        top = np.zeros((n, n), bool)
        np.put_along_axis(top, rank[:, : k + 1], True, axis=1)
        return top & top.T

    r_full, r_half = reciprocal(k1), reciprocal(int(np.around(k1 / 2.0)))
    overlap = r_half.astype(np.int64) @ r_full.T.astype(np.int64)  # [c, i] = |R_half(c) & R(i)|
    grows = r_full & (overlap.T > (2.0 / 3.0) * r_half.sum(axis=1)[None, :])  # [i, c]: c's set joins i's
    expanded = r_full | ((grows.astype(np.int64) @ r_half.astype(np.int64)) > 0)
    v = np.where(expanded, np.exp(-d), 0.0)
    v = v / v.sum(axis=1, keepdims=True)
    if k2 != 1:
        v = v[rank[:, :k2]].mean(axis=1)
    shared = np.minimum(v[0][None, :], v).sum(axis=1)
    jaccard = 1.0 - shared / (2.0 - shared)
    final = jaccard * (1.0 - lam) + d[0] * lam
    return final[1:]
