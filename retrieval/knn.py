"""Exact k-nearest-neighbour search through FAISS flat indexes, chunked over queries.

Why chunked: an all-vs-all top-1000 search on SOP (60,502 x 512) would hold 60,502 x 1,001 scores and
indices (~730 MB) at once; searching a few thousand queries at a time keeps the working set small, and
callers such as `retrieval.metrics.neighbour_metrics` reduce each chunk to per-query numbers before
asking for the next one.

Ordering contract (relied on by the metrics):
- metric "ip" (inner product; cosine for L2-normalised embeddings): descending score;
  metric "l2" (squared Euclidean distance): ascending distance.
- Equal scores are ordered by ascending gallery index, and this holds for the returned *set* too: a
  group of exactly equal scores straddling the k-th place (duplicate images) is completed by a wider
  search of the affected rows, because FAISS itself keeps an arbitrary part of such a group. So every
  row is exactly the first k gallery items under (score, gallery index), on CPU and GPU alike.
- `exclude_self=True` (all-vs-all, the query set *is* the gallery): query i never gets gallery index i
  back. The search asks for k+1 and removes index i wherever it ranks, so exact duplicate vectors or
  ties (where another item may outrank the query itself) cannot leak the query into its own results.
- When fewer than k gallery items exist, rows are padded at the end with index -1 and score -inf
  ("ip") or +inf ("l2").
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np

from retrieval.devices import faiss_gpu_available

logger = logging.getLogger(__name__)

Metric = Literal["ip", "l2"]

# FAISS GPU k-selection supports at most this many neighbours per query.
GPU_MAX_K = 2048
# Query rows per FAISS call; FAISS's own BLAS path blocks queries by 4096, so this keeps it efficient.
DEFAULT_CHUNK_SIZE = 4096


def _faiss():
    import faiss  # heavy import kept local: this module is imported by light-weight code paths

    return faiss


def as_float32_matrix(x: np.ndarray, what: str) -> np.ndarray:
    """(N, D) C-contiguous float32 copy/view of `x`, rejecting wrong shapes and non-finite values."""
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (N, D) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinite values; check the model output")
    return arr


def knn_device(use_gpu: bool = True, k: int = 1) -> str:
    """The device a search for k neighbours (self included) will run on, as a human-readable string."""
    if use_gpu and k + 1 <= GPU_MAX_K and faiss_gpu_available():
        return "cuda:0 (faiss GPU flat index)"
    return f"cpu (faiss flat index, {_faiss().omp_get_max_threads()} threads)"


class FlatSearcher:
    """An exact FAISS index over one gallery; `search` may be called repeatedly with query chunks.

    `device` says where searches run ("cuda:0 ..." or "cpu ..."); GPU initialisation failures fall
    back to CPU with a warning, and the fallback is visible in `device`.
    """

    def __init__(self, gallery: np.ndarray, metric: Metric = "ip", use_gpu: bool = True, max_k: int = 1) -> None:
        if metric not in ("ip", "l2"):
            raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
        faiss = _faiss()
        self.gallery = as_float32_matrix(gallery, "gallery embeddings")
        self.metric: Metric = metric
        self.size, self.dim = self.gallery.shape
        self._gpu_res = None
        self._cpu_index: Any = None  # a faiss CPU index, built when first needed
        self.index: Any = None  # the faiss index (CPU or GPU), set below
        # +1: one extra neighbour is always fetched to detect ties at the cut-off
        if use_gpu and max_k + 1 <= GPU_MAX_K and faiss_gpu_available():
            try:
                self._gpu_res = faiss.StandardGpuResources()
                cls = faiss.GpuIndexFlatIP if metric == "ip" else faiss.GpuIndexFlatL2
                self.index = cls(self._gpu_res, self.dim)
                self.index.add(self.gallery)
                self.device = "cuda:0 (faiss GPU flat index)"
            except Exception as exc:  # out of memory, driver mismatch, ...
                logger.warning("FAISS GPU search unavailable (%s); searching on CPU instead", exc)
                self.index, self._gpu_res = None, None
        elif use_gpu and max_k + 1 > GPU_MAX_K and faiss_gpu_available():
            logger.info("k=%d exceeds the FAISS GPU limit of %d; searching on CPU", max_k, GPU_MAX_K)
        if self.index is None:
            self.index = faiss.IndexFlatIP(self.dim) if metric == "ip" else faiss.IndexFlatL2(self.dim)
            self.index.add(self.gallery)
            self.device = f"cpu (faiss flat index, {faiss.omp_get_max_threads()} threads)"
        logger.info("exact k-NN over %d x %d gallery on %s", self.size, self.dim, self.device)

    @property
    def pad_score(self) -> float:
        return -np.inf if self.metric == "ip" else np.inf

    def search(self, query: np.ndarray, k: int, self_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of `query` (Q, D) -> scores (Q, k) float32, gallery indices (Q, k) int64.

        `self_ids` (Q,) int: gallery index of each query to leave out (all-vs-all); see the module docstring.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        query = as_float32_matrix(query, "query embeddings")
        if query.shape[1] != self.dim:
            raise ValueError(f"query dimension {query.shape[1]} does not match gallery dimension {self.dim}")
        n_q = len(query)
        k_need = min(k + (0 if self_ids is None else 1), self.size)
        if n_q == 0 or k_need == 0:
            return self._pad(np.empty((n_q, 0), np.float32), np.empty((n_q, 0), np.int64), k)
        scores, indices = self._search_complete_ties(query, k_need)
        if self_ids is not None:
            scores, indices = drop_own(scores, indices, np.asarray(self_ids, dtype=np.int64))
        return self._pad(scores, indices, k)

    def _search_complete_ties(self, query: np.ndarray, k_need: int) -> tuple[np.ndarray, np.ndarray]:
        """First k_need gallery items per query under (score, ascending index), exactly.

        One extra neighbour is fetched: when it ties with the k_need-th, the tied group may continue
        past what FAISS returned (and FAISS picks an arbitrary part of it), so those rows are searched
        again with a doubled k until the whole group is in hand.
        """
        descending = self.metric == "ip"
        k_search = min(k_need + 1, self.size)
        scores, indices = self._index_for(k_search).search(query, k_search)
        scores = np.asarray(scores, dtype=np.float32)
        indices = np.asarray(indices, dtype=np.int64)
        if k_search > k_need:
            open_rows = np.flatnonzero(scores[:, k_need] == scores[:, k_need - 1])
            k_wide = k_search
            while len(open_rows):
                k_wide = min(2 * k_wide, self.size)
                wide_s, wide_i = self._index_for(k_wide).search(query[open_rows], k_wide)
                wide_s = np.asarray(wide_s, dtype=np.float32)
                wide_i = np.asarray(wide_i, dtype=np.int64)
                done = np.ones(len(open_rows), bool) if k_wide == self.size else wide_s[:, -1] != wide_s[:, k_need - 1]
                wide_s, wide_i = _order_ties_by_index(wide_s[done], wide_i[done], descending)
                scores[open_rows[done], :k_need] = wide_s[:, :k_need]
                indices[open_rows[done], :k_need] = wide_i[:, :k_need]
                open_rows = open_rows[~done]
        scores, indices = scores[:, :k_need], indices[:, :k_need]
        return _order_ties_by_index(scores, indices, descending)

    def _index_for(self, k: int):
        """The index to use for a k-wide search; GPU selection stops at GPU_MAX_K, so wider ones use CPU."""
        if self._gpu_res is None or k <= GPU_MAX_K:
            return self.index
        if self._cpu_index is None:
            faiss = _faiss()
            self._cpu_index = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
            self._cpu_index.add(self.gallery)
        return self._cpu_index

    def _pad(self, scores: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        missing = k - scores.shape[1]
        if missing <= 0:
            return scores[:, :k], indices[:, :k]
        n = len(scores)
        scores = np.concatenate([scores, np.full((n, missing), self.pad_score, np.float32)], axis=1)
        indices = np.concatenate([indices, np.full((n, missing), -1, np.int64)], axis=1)
        return scores, indices


def drop_own(scores: np.ndarray, indices: np.ndarray, self_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The self-exclusion rule of all-vs-all search: remove each row's own index wherever it ranks (so a
    duplicate or a tie can never put a query in its own results); rows without it lose their last column."""
    drop = indices == self_ids[:, None]
    has_self = drop.any(axis=1)
    drop[~has_self, -1] = True
    keep = ~drop
    n, k = indices.shape
    return scores[keep].reshape(n, k - 1), indices[keep].reshape(n, k - 1)


def _order_ties_by_index(scores: np.ndarray, indices: np.ndarray, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Within runs of exactly equal scores, order by ascending gallery index, in place.

    Only rows that contain a tie are re-sorted, which keeps this cheap for real-valued embeddings.
    """
    if scores.shape[1] < 2:
        return scores, indices
    tied_rows = np.flatnonzero((scores[:, 1:] == scores[:, :-1]).any(axis=1))
    if len(tied_rows) == 0:
        return scores, indices
    s, i = scores[tied_rows], indices[tied_rows]
    primary = -s if descending else s
    order = np.lexsort((i, primary), axis=-1)
    scores[tied_rows] = np.take_along_axis(s, order, axis=1)
    indices[tied_rows] = np.take_along_axis(i, order, axis=1)
    return scores, indices


def iter_knn_chunks(
    searcher: FlatSearcher,
    query: np.ndarray,
    k: int,
    exclude_self: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (first query row, scores (c, k), indices (c, k)) for consecutive query chunks."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if exclude_self and len(query) != searcher.size:
        raise ValueError(
            f"exclude_self needs the query set to be the gallery, got {len(query)} queries for {searcher.size} "
            "gallery items"
        )
    for start in range(0, len(query), chunk_size):
        stop = min(start + chunk_size, len(query))
        self_ids = np.arange(start, stop, dtype=np.int64) if exclude_self else None
        scores, indices = searcher.search(query[start:stop], k, self_ids)
        yield start, scores, indices


def exact_knn(
    query: np.ndarray,
    gallery: np.ndarray,
    k: int,
    exclude_self: bool = False,
    use_gpu: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    metric: Metric = "ip",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k: query (Q, D), gallery (N, D) -> scores (Q, k) float32, gallery indices (Q, k) int64.

    Inner product by default (cosine for L2-normalised embeddings), squared L2 with metric="l2".
    exclude_self=True requires `query` to be the gallery (all-vs-all) and removes each query's own
    index. Rows are padded with -1 when the gallery has fewer than k candidates. Ordering and ties:
    see the module docstring. The device used is logged; `knn_device()` reports it up front.
    """
    query = as_float32_matrix(query, "query embeddings")
    searcher = FlatSearcher(gallery, metric=metric, use_gpu=use_gpu, max_k=k + int(exclude_self))
    scores = np.empty((len(query), k), np.float32)
    indices = np.empty((len(query), k), np.int64)
    for start, s, i in iter_knn_chunks(searcher, query, k, exclude_self, chunk_size):
        scores[start : start + len(s)] = s
        indices[start : start + len(i)] = i
    return scores, indices
