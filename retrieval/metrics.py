"""Retrieval metrics (Recall@K, MAP@R, R-precision) and embedding-geometry metrics.

All values are fractions in [0, 1] (Recall, MAP@R, R-precision); code that prints percentages
multiplies by 100.

Protocol (Musgrave et al. 2020, "A Metric Learning Reality Check"; same definitions as
pytorch-metric-learning's AccuracyCalculator):
- Neighbours are ranked by cosine similarity (inner product of L2-normalised embeddings), ties by
  ascending gallery index (see `retrieval.knn`).
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
from collections.abc import Sequence

import numpy as np

from retrieval.knn import DEFAULT_CHUNK_SIZE, FlatSearcher, as_float32_matrix, exact_knn

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
            f"expected neighbor_labels (Q, K) and query_labels (Q,), got {neighbor_labels.shape} and {query_labels.shape}"
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


def _label_codes(query_labels: np.ndarray, gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Map arbitrary (int or string) labels of both sets onto shared 0..C-1 codes."""
    both = np.concatenate([np.asarray(query_labels).ravel(), np.asarray(gallery_labels).ravel()])
    uniq, codes = np.unique(both, return_inverse=True)
    codes = codes.ravel().astype(np.int64)
    return codes[: len(query_labels)], codes[len(query_labels) :], len(uniq)


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
    """Recall@K (+ MAP@R and R-precision) of L2-normalised embeddings, as fractions in [0, 1].

    query_emb (Q, D), query_labels (Q,). With gallery_emb/gallery_labels None the protocol is
    all-vs-all (CUB, Cars, SOP) with each query's own index excluded; otherwise query/gallery
    (In-Shop). Returns {"R@k" for k in ks, "MAP@R", "RP"} (the last two only with map_at_r).
    One exact k-NN search with k = max(max(ks), max R), processed chunk by chunk so memory stays
    bounded; queries without any relevant gallery item are left out (see module docstring).
    """
    ks = _check_ks(ks)
    all_vs_all = gallery_emb is None
    if all_vs_all != (gallery_labels is None):
        raise ValueError("pass gallery_emb and gallery_labels together (or neither, for all-vs-all)")
    query_emb = as_float32_matrix(query_emb, "query embeddings")
    gallery_emb = query_emb if all_vs_all else as_float32_matrix(gallery_emb, "gallery embeddings")
    query_labels = np.asarray(query_labels).ravel()
    gallery_labels = query_labels if all_vs_all else np.asarray(gallery_labels).ravel()
    if len(query_labels) != len(query_emb) or len(gallery_labels) != len(gallery_emb):
        raise ValueError(
            f"embeddings and labels differ in length: queries {len(query_emb)} vs {len(query_labels)} labels, "
            f"gallery {len(gallery_emb)} vs {len(gallery_labels)} labels"
        )
    if query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(f"query dimension {query_emb.shape[1]} != gallery dimension {gallery_emb.shape[1]}")

    q_codes, g_codes, n_classes = _label_codes(query_labels, gallery_labels)
    num_relevant = np.bincount(g_codes, minlength=n_classes)[q_codes] - int(all_vs_all)
    rows = np.flatnonzero(num_relevant > 0)
    if len(rows) == 0:
        raise ValueError("no query has a same-label item in the gallery; check the labels and the split")
    if len(rows) < len(query_emb):
        logger.warning("%d of %d queries have no same-label gallery item and are left out", len(query_emb) - len(rows), len(query_emb))

    available = len(gallery_emb) - int(all_vs_all)
    k_search = max(ks)
    if map_at_r:
        k_search = max(k_search, int(num_relevant[rows].max()))
    k_search = min(k_search, available)

    searcher = FlatSearcher(gallery_emb, metric="ip", use_gpu=use_gpu, max_k=k_search + int(all_vs_all))
    logger.info("evaluating %d queries against %d gallery items, k=%d, on %s", len(rows), len(gallery_emb), k_search, searcher.device)
    first_hit = np.empty(len(rows), np.int64)
    ap = np.empty(len(rows), np.float64)
    rp = np.empty(len(rows), np.float64)
    starts = range(0, len(rows), chunk_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="k-NN search", unit="chunk")
    for start in starts:
        chunk = rows[start : start + chunk_size]
        _, indices = searcher.search(query_emb[chunk], k_search, self_ids=chunk if all_vs_all else None)
        # k_search <= available, so no -1 padding reaches this gather
        matches = g_codes[indices] == q_codes[chunk, None]
        first_hit[start : start + len(chunk)] = _first_hit_rank(matches)
        if map_at_r:
            ap_c, rp_c = _ap_and_rp_at_r(matches, num_relevant[chunk])
            ap[start : start + len(chunk)] = ap_c
            rp[start : start + len(chunk)] = rp_c

    result = _recall_from_first_hit(first_hit, ks)
    if map_at_r:
        result["MAP@R"] = float(ap.mean())
        result["RP"] = float(rp.mean())
    return result


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
