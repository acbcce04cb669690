"""Retrieval metrics (Recall@K, MAP@R, R-precision) and embedding-geometry metrics.

All values are fractions in [0, 1] (Recall, MAP@R, R-precision); code that prints percentages
multiplies by 100.

Protocol (Musgrave et al. 2020, "A Metric Learning Reality Check"; same definitions as
pytorch-metric-learning's AccuracyCalculator):
- Neighbours are ranked by cosine similarity (inner product of L2-normalised embeddings), ties by
  ascending gallery index (see `retrieval.knn`).
- One path: `neighbour_metrics` scores any k-NN search (exact here, or an index's in retrieval.search),
  with one self-exclusion rule (`retrieval.knn.drop_own`).
- All-vs-all (no gallery given): every query searches all other items; its own entry is removed by
  index, so duplicate images cannot make a query find itself.
- R of a query = number of gallery items with its label (excluding itself in all-vs-all).
  Queries with R = 0 cannot retrieve anything relevant; they are left out of every metric (as
  AccuracyCalculator does). Standard benchmarks have none.
- Recall@K = share of queries with at least one same-label item among their K nearest neighbours.
- MAP@R = mean over queries of (1/R) * sum_{i<=R} P@i * rel(i); R-precision = mean of (relevant in top R) / R.

Embedding geometry (Wang and Isola 2020; the spec's utilization):
- alignment = E over same-label pairs ||f(x) - f(x+)||^2 (every unordered pair weighs the same),
- uniformity = log E over distinct pairs exp(-t ||f(x) - f(y)||^2), t = 2,
- utilization = mean over test q of min over train x ||f(q) - f(x)||^2.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from retrieval.errors import InputError
from retrieval.knn import DEFAULT_CHUNK_SIZE, FlatSearcher, as_float32_matrix, drop_own, exact_knn

logger = logging.getLogger(__name__)

# Uniformity is exact up to this many distinct pairs and estimated from this many sampled pairs above.
UNIFORMITY_MAX_PAIRS = 2_000_000


# ----------------------------------------------------------------------------------------------
# Retrieval metrics on neighbour-label matrices
# ----------------------------------------------------------------------------------------------


def _match_matrix(neighbor_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    neighbor_labels = np.asarray(neighbor_labels)
    query_labels = np.asarray(query_labels)
    if neighbor_labels.ndim != 2 or query_labels.shape != (len(neighbor_labels),):
        raise ValueError(
            f"expected neighbor_labels (Q, K) and query_labels (Q,), got {neighbor_labels.shape} and "
            f"{query_labels.shape}"
        )
    return neighbor_labels == query_labels[:, None]


def _first_hit_rank(matches: np.ndarray) -> np.ndarray:
    """0-based rank of the first relevant neighbour per row; K (the width) when there is none."""
    first = matches.argmax(axis=1)
    first[~matches.any(axis=1)] = matches.shape[1]
    return first


def _recall_from_first_hit(first_hit: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    return {f"R@{k}": float(np.mean(first_hit < k)) for k in ks}


def _ap_and_rp_at_r(matches: np.ndarray, num_relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-query AP@R and R-precision from (Q, >= max R) matches and R (Q,) >= 1."""
    r_max = int(num_relevant.max())
    if matches.shape[1] < r_max:
        raise ValueError(f"need at least max R = {r_max} neighbours per query, got {matches.shape[1]}")
    ranks = np.arange(1, r_max + 1)
    relevant = matches[:, :r_max] & (ranks[None, :] <= num_relevant[:, None])
    hits_so_far = np.cumsum(relevant, axis=1, dtype=np.int32)
    ap = (hits_so_far * relevant / ranks).sum(axis=1) / num_relevant
    rp = relevant.sum(axis=1) / num_relevant
    return ap, rp


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of positive integers, got {ks}")
    return ks


def recall_at_k(neighbor_labels: np.ndarray, query_labels: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """{"R@k": share of queries with a same-label item among their first k neighbours}.

    neighbor_labels (Q, Kmax): labels of each query's neighbours, nearest first; query_labels (Q,).
    Every row counts (filter queries without any relevant gallery item beforehand if needed).
    """
    ks = _check_ks(ks)
    matches = _match_matrix(neighbor_labels, query_labels)
    if max(ks) > matches.shape[1]:
        raise ValueError(f"Recall@{max(ks)} needs {max(ks)} neighbours per query, got {matches.shape[1]}")
    return _recall_from_first_hit(_first_hit_rank(matches), ks)


def mean_average_precision_at_r(
    neighbor_labels: np.ndarray, query_labels: np.ndarray, num_relevant: np.ndarray
) -> float:
    """MAP@R; num_relevant (Q,) = R per query (>= 1), neighbor_labels must have >= max R columns."""
    num_relevant = np.asarray(num_relevant)
    if (num_relevant < 1).any():
        raise ValueError("MAP@R is undefined for queries with R = 0; leave them out")
    ap, _ = _ap_and_rp_at_r(_match_matrix(neighbor_labels, query_labels), num_relevant)
    return float(ap.mean())


def r_precision(neighbor_labels: np.ndarray, query_labels: np.ndarray, num_relevant: np.ndarray) -> float:
    """Mean R-precision; arguments as for `mean_average_precision_at_r`."""
    num_relevant = np.asarray(num_relevant)
    if (num_relevant < 1).any():
        raise ValueError("R-precision is undefined for queries with R = 0; leave them out")
    _, rp = _ap_and_rp_at_r(_match_matrix(neighbor_labels, query_labels), num_relevant)
    return float(rp.mean())


# ----------------------------------------------------------------------------------------------
# End-to-end evaluation of embeddings
# ----------------------------------------------------------------------------------------------


SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
"""search(queries (c, D), k) -> (scores (c, k), gallery ids (c, k) nearest first, -1 = no result)."""


def _label_codes(query_labels: np.ndarray, gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Map arbitrary (int or string) labels of both sets onto shared 0..C-1 codes; negative ints -> -1.

    A negative integer label means unlabelled (e.g. an image added to an index with --add): never relevant.
    """
    query_labels, gallery_labels = np.asarray(query_labels).ravel(), np.asarray(gallery_labels).ravel()
    both = np.concatenate([query_labels, gallery_labels])
    uniq, codes = np.unique(both, return_inverse=True)
    codes = codes.ravel().astype(np.int64)
    if np.issubdtype(both.dtype, np.integer):
        codes[both < 0] = -1
    return codes[: len(query_labels)], codes[len(query_labels) :], len(uniq)


def neighbour_metrics(
    search: SearchFn,
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    self_ids: np.ndarray | None = None,
    map_at_r: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
) -> dict[str, float]:
    """Recall@K (+ MAP@R and R-precision) of any k-NN search, exact or an index's, as fractions in [0, 1].

    Every retrieval metric in the product comes from here. query_emb (Q, D), query_labels (Q,),
    gallery_labels (N,) for the rows `search` returns. `self_ids` (Q,): each query's own gallery row
    (all-vs-all), removed wherever it ranks (one more neighbour is asked for; see retrieval.knn). R of a
    query counts the labelled gallery items with its label, minus itself; queries with R = 0 are left out.
    Queries are searched chunk by chunk, so memory stays bounded. Returns {"R@k", "MAP@R", "RP"}.
    """
    ks = _check_ks(ks)
    query_labels = np.asarray(query_labels).ravel()
    if len(query_labels) != len(query_emb):
        raise ValueError(
            f"embeddings and labels differ in length: {len(query_emb)} queries vs {len(query_labels)} labels"
        )
    q_codes, g_codes, n_classes = _label_codes(query_labels, gallery_labels)
    extra = 0 if self_ids is None else 1
    counts = np.bincount(g_codes[g_codes >= 0], minlength=n_classes)
    num_relevant = np.where(q_codes >= 0, counts[np.maximum(q_codes, 0)], 0) - extra
    rows = np.flatnonzero(num_relevant > 0)
    if len(rows) == 0:
        raise InputError("no query has a same-label item in the gallery; check the labels and the split")
    if len(rows) < len(query_labels):
        logger.warning(
            "%d of %d queries have no same-label gallery item and are left out",
            len(query_labels) - len(rows),
            len(query_labels),
        )
    width = max(max(ks), int(num_relevant[rows].max()) if map_at_r else 0)
    k_search = min(width + extra, len(g_codes))
    first_hit = np.empty(len(rows), np.int64)
    ap, rp = np.empty(len(rows), np.float64), np.empty(len(rows), np.float64)
    starts = range(0, len(rows), chunk_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="k-NN search", unit="chunk")
    for start in starts:
        chunk = rows[start : start + chunk_size]
        scores, ids = search(np.ascontiguousarray(query_emb[chunk]), k_search)
        if self_ids is not None:
            scores, ids = drop_own(np.asarray(scores), np.asarray(ids), np.asarray(self_ids)[chunk])
        hit_codes = np.where(ids >= 0, g_codes[np.maximum(ids, 0)], -1)
        matches = (hit_codes == q_codes[chunk, None]) & (hit_codes >= 0)
        if matches.shape[1] < width:  # fewer results than asked for: the rest are misses
            matches = np.pad(matches, ((0, 0), (0, width - matches.shape[1])))
        stop = start + len(chunk)
        first_hit[start:stop] = _first_hit_rank(matches)
        if map_at_r:
            ap[start:stop], rp[start:stop] = _ap_and_rp_at_r(matches, num_relevant[chunk])
    result = _recall_from_first_hit(first_hit, ks)
    if map_at_r:
        result["MAP@R"] = float(ap.mean())
        result["RP"] = float(rp.mean())
    return result


def evaluate_embeddings(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    gallery_emb: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    map_at_r: bool = True,
    use_gpu: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
) -> dict[str, float]:
    """`neighbour_metrics` of exact search over L2-normalised embeddings (training, references, benchmarks).

    With gallery_emb/gallery_labels None the protocol is all-vs-all (CUB, Cars, SOP) with each query's
    own row excluded; otherwise query/gallery (In-Shop).
    """
    all_vs_all = gallery_emb is None
    if all_vs_all != (gallery_labels is None):
        raise ValueError("pass gallery_emb and gallery_labels together (or neither, for all-vs-all)")
    query_emb = as_float32_matrix(query_emb, "query embeddings")
    gallery_emb = query_emb if gallery_emb is None else as_float32_matrix(gallery_emb, "gallery embeddings")
    gallery_labels = np.asarray(query_labels if all_vs_all else gallery_labels).ravel()
    if len(gallery_labels) != len(gallery_emb):
        raise ValueError(
            f"embeddings and labels differ in length: gallery {len(gallery_emb)} vs {len(gallery_labels)} labels"
        )
    if query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(f"query dimension {query_emb.shape[1]} != gallery dimension {gallery_emb.shape[1]}")
    max_r = int(np.unique(gallery_labels, return_counts=True)[1].max()) if map_at_r else 0
    flat = FlatSearcher(gallery_emb, metric="ip", use_gpu=use_gpu, max_k=max(max(_check_ks(ks)), max_r) + 1)
    logger.info("evaluating %d queries against %d gallery items on %s", len(query_emb), len(gallery_emb), flat.device)
    self_ids = np.arange(len(query_emb)) if all_vs_all else None
    return neighbour_metrics(
        flat.search,
        query_emb,
        query_labels,
        gallery_labels,
        ks,
        self_ids=self_ids,
        map_at_r=map_at_r,
        chunk_size=chunk_size,
        progress=progress,
    )


# ----------------------------------------------------------------------------------------------
# Embedding geometry
# ----------------------------------------------------------------------------------------------


def alignment(emb: np.ndarray, labels: np.ndarray) -> float:
    """Mean ||f(x) - f(x+)||^2 over all unordered same-label pairs (exact, O(N D)).

    Uses sum_{i<j in class} ||x_i - x_j||^2 = n_c * sum_i ||x_i||^2 - ||sum_i x_i||^2 per class.
    """
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"expected emb (N, D) and labels (N,), got {x.shape} and {np.shape(labels)}")
    _, codes, counts = np.unique(np.asarray(labels).ravel(), return_inverse=True, return_counts=True)
    codes = codes.ravel()
    n_pairs = float((counts * (counts - 1) // 2).sum())
    if n_pairs == 0:
        raise ValueError("alignment needs at least one label with two or more embeddings")
    order = np.argsort(codes, kind="stable")
    class_starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    class_sums = np.add.reduceat(x[order], class_starts, axis=0)
    class_sq_norms = np.bincount(codes, weights=(x * x).sum(axis=1), minlength=len(counts))
    total = (counts * class_sq_norms - (class_sums * class_sums).sum(axis=1)).sum()
    return float(max(total, 0.0) / n_pairs)


def _log_mean_exp(a: np.ndarray) -> float:
    top = a.max()
    return float(top + np.log(np.mean(np.exp(a - top))))


def uniformity(emb: np.ndarray, t: float = 2.0, max_pairs: int = UNIFORMITY_MAX_PAIRS, seed: int = 0) -> float:
    """log E over distinct pairs exp(-t ||f(x) - f(y)||^2).

    Exact over all N(N-1)/2 pairs when that is at most `max_pairs`; otherwise estimated from
    `max_pairs` pairs (i != j) drawn uniformly with numpy's default_rng(seed), so the value is
    reproducible for a given seed.
    """
    x = np.asarray(emb, dtype=np.float64)
    n = len(x)
    if x.ndim != 2 or n < 2:
        raise ValueError(f"uniformity needs (N >= 2, D) embeddings, got shape {x.shape}")
    if n * (n - 1) // 2 <= max_pairs:
        sq = (x * x).sum(axis=1)
        parts = []
        for start in range(0, n - 1, 1024):
            block = x[start : start + 1024]
            d2 = sq[start : start + 1024, None] + sq[None, :] - 2.0 * block @ x.T
            rows, cols = np.nonzero(np.arange(start, start + len(block))[:, None] < np.arange(n)[None, :])
            parts.append(np.maximum(d2[rows, cols], 0.0))
        d2 = np.concatenate(parts)
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, n, size=max_pairs)
        j = rng.integers(0, n - 1, size=max_pairs)
        j += j >= i  # uniform over j != i
        d2 = np.empty(max_pairs)
        for start in range(0, max_pairs, 65536):
            diff = x[i[start : start + 65536]] - x[j[start : start + 65536]]
            d2[start : start + 65536] = (diff * diff).sum(axis=1)
    return _log_mean_exp(-t * d2)


def utilization(test_emb: np.ndarray, train_emb: np.ndarray, use_gpu: bool = True) -> float:
    """Mean over test embeddings of the squared L2 distance to the nearest training embedding.

    Exact (FAISS flat L2 search, k = 1); valid for any vectors, e.g. unnormalised mixed embeddings.
    """
    scores, _ = exact_knn(test_emb, train_emb, k=1, use_gpu=use_gpu, metric="l2")
    return float(np.maximum(scores[:, 0].astype(np.float64), 0.0).mean())


def embedding_geometry(emb: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """{"alignment", "uniformity"} of L2-normalised embeddings (Wang and Isola 2020, as the Metrix paper
    analyses them): lower alignment = tighter classes, lower uniformity = more evenly spread.  Alignment
    is left out when no label has two embeddings."""
    out: dict[str, float] = {}
    labels = np.asarray(labels).ravel()
    if len(labels) and np.unique(labels, return_counts=True)[1].max() > 1:
        out["alignment"] = alignment(emb, labels)
    out["uniformity"] = uniformity(emb)
    return out
