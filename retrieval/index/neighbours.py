"""Gallery neighbour lists: each gallery item's nearest gallery items, computed once at build time.

They are part of what an index folder holds (neighbours.npy, neighbour_scores.npy, see
retrieval.index.folder) and feed database-side augmentation at query time (retrieval.search.rerank),
so they live here, below search.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_NEIGHBOURS = 10  # width of stored gallery neighbour lists (self included)


@dataclass
class NeighbourLists:
    """Each gallery item's nearest gallery items (itself included), from exact search: ids (N, n), scores (N, n)."""

    ids: np.ndarray
    scores: np.ndarray

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])


def gallery_neighbours(vectors: np.ndarray, n: int = DEFAULT_NEIGHBOURS, use_gpu: bool = True) -> NeighbourLists:
    """Exact top-n neighbour lists of the gallery against itself (row i usually starts with i)."""
    from retrieval.knn import exact_knn

    n = int(min(n, len(vectors)))
    scores, ids = exact_knn(vectors, vectors, n, use_gpu=use_gpu)
    return NeighbourLists(ids.astype(np.int64), scores.astype(np.float32))
