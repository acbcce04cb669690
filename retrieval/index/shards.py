"""Sharded indexes: N FAISS indexes over consecutive id ranges of one gallery, searched as one.

This module is the shard store only (it knows nothing of index folders); the folder form, `ShardedGalleryIndex`, lives
in retrieval.index.folder, which opens either form. A sharded index folder lists its shards in meta.json ("shards":
file, items, first id) and, like any index file, each shard's size and SHA-256 ("files"), so `GalleryIndex.load`
verifies them the same way. `ShardSet` searches every shard in parallel threads (FAISS releases the GIL) and merges
the per-shard top-k into the global top-k with FAISS's own rule for equal scores (the smaller id is kept, ties are
listed larger id first). So for flat shards the merged results equal one flat index's exactly, and for IVF shards that
share one trained quantizer (same lists probed) they equal the merged index's.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np

from retrieval.index.errors import IndexBuildError, IndexFileError
from retrieval.index.faiss_index import configure_search, exact_vectors, read_index
from retrieval.index.meta import META_FILE, IndexMeta
from retrieval.index.types import IndexParams


def shard_file_name(number: int) -> str:
    return f"shard-{number:03d}.faiss"


def merge_results(scores: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-shard (Q, k_i) results with global ids (-1 = none) -> the global (Q, k) top-k.

    FAISS's own rule: among equal scores the item met first (the smaller id) is kept, and kept ties are
    listed larger id first; missing results last.
    """
    s = np.concatenate([np.asarray(x, np.float32) for x in scores], axis=1)
    i = np.concatenate([np.asarray(x, np.int64) for x in ids], axis=1)
    key = np.where(i >= 0, -s.astype(np.float64), np.inf)
    chosen = np.lexsort((np.where(i >= 0, i, np.iinfo(np.int64).max), key), axis=1)[:, :k]  # ties: smaller id kept
    s, i, key = (np.take_along_axis(a, chosen, axis=1) for a in (s, i, key))
    order = np.lexsort((-i, key), axis=1)  # and listed larger id first, as FAISS lists them
    out_s = np.take_along_axis(s, order, axis=1)
    out_i = np.take_along_axis(i, order, axis=1)
    out_s[out_i < 0] = -np.finfo(np.float32).max
    return out_s, out_i


class ShardSet:
    """Shard indexes holding consecutive id ranges (shard j holds ids offsets[j] ..), searched as one index.

    Shards are either in memory or files read on first use (a build hands over the files its workers
    wrote without loading them).
    """

    is_trained = True

    def __init__(
        self,
        shards: Sequence[faiss.Index | None],
        ntotals: Sequence[int],
        d: int,
        files: Sequence[Path | None] | None = None,
    ) -> None:
        if len(shards) != len(ntotals) or not shards:
            raise ValueError("a shard set needs one item count per shard and at least one shard")
        self._shards = list(shards)
        self.files: list[Path | None] = list(files) if files is not None else [None] * len(shards)
        self.ntotals = [int(n) for n in ntotals]
        self.offsets = np.concatenate([[0], np.cumsum(self.ntotals)[:-1]]).astype(np.int64)
        self.d = int(d)
        self.ntotal = int(sum(self.ntotals))
        self._params: IndexParams | None = None
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def from_indexes(cls, shards: Sequence[faiss.Index]) -> ShardSet:
        return cls(list(shards), [s.ntotal for s in shards], shards[0].d)

    @classmethod
    def from_files(cls, files: Sequence[Path], ntotals: Sequence[int], d: int) -> ShardSet:
        return cls([None] * len(files), ntotals, d, [Path(f) for f in files])

    def __len__(self) -> int:
        return len(self._shards)

    def shard(self, j: int) -> faiss.Index:
        """Shard j (read from its file on first use)."""
        if self._shards[j] is None:
            path = self.files[j]
            assert path is not None
            index = read_index(path)
            if index.ntotal != self.ntotals[j] or index.d != self.d:
                raise IndexFileError(
                    f"{path} holds {index.ntotal} {index.d}-d vectors, expected "
                    f"{self.ntotals[j]} {self.d}-d; rebuild the index"
                )
            if self._params is not None:
                configure_search(index, self._params)
            self._shards[j] = index
        return self._shards[j]

    def configure(self, params: IndexParams) -> None:
        """Apply the search-time knobs (nprobe, efSearch) to every shard."""
        self._params = params
        for s in self._shards:
            if s is not None:
                configure_search(s, params)

    # -- search ---------------------------------------------------------------------------------
    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """x (Q, D) float32 -> (scores (Q, k), ids (Q, k)) over all shards; ids are global."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        live = [j for j in range(len(self)) if self.ntotals[j] > 0]
        for j in live:
            self.shard(j)

        def one(j: int) -> tuple[np.ndarray, np.ndarray]:
            s, i = self.shard(j).search(x, min(k, self.ntotals[j]))
            return s, np.where(i >= 0, i + self.offsets[j], -1)

        if len(live) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(len(self), thread_name_prefix="shard-search")
            parts = list(self._pool.map(one, live))
        else:
            parts = [one(j) for j in live]
        if not parts:
            return np.zeros((len(x), 0), np.float32), np.zeros((len(x), 0), np.int64)
        return merge_results([p[0] for p in parts], [p[1] for p in parts], k)

    def exact_vectors(self, params: IndexParams) -> np.ndarray | None:
        """(N, D) float32 vectors in global id order, when every shard keeps them exactly."""
        vectors = []
        for j in range(len(self)):
            v = exact_vectors(self.shard(j), params)
            if v is None:
                return None
            vectors.append(v)
        return np.concatenate(vectors)

    def add(self, _vectors: np.ndarray) -> None:
        raise IndexBuildError(
            "a sharded index folder cannot be extended in place: embed the new images into the embeddings folder "
            "with `retrieval embed` and rebuild with `retrieval index --from-embeddings DIR`"
        )

    def merged(self, params: IndexParams) -> faiss.Index:
        """One index holding every shard's vectors in id order (IVF: inverted lists merged; flat: rows appended)."""
        return merge_shards([self.shard(j) for j in range(len(self))], params)


def merge_shards(shards: Sequence[faiss.Index], params: IndexParams) -> faiss.Index:
    """Merge shard indexes (consecutive id ranges, one trained quantizer) into one; refuses types that cannot merge."""
    if not params.kind.mergeable:
        raise IndexBuildError(
            f"{params.index_type} shards cannot be merged into one index; keep them as shards (no --merge)"
        )
    merged = faiss.clone_index(shards[0])
    for shard in shards[1:]:
        params.kind.merge(merged, faiss.clone_index(shard))
    configure_search(merged, params)
    return merged


def read_shard_set(folder: Path, meta: IndexMeta) -> ShardSet:
    """The shards listed in a sharded folder's meta.json (files already verified against their checksums)."""
    record = meta.shards or []
    try:
        files = [folder / str(r["file"]) for r in record]
        ntotals = [int(r["n_items"]) for r in record]
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexFileError(f"{folder / META_FILE} has an unreadable shard list ({exc}); rebuild the index") from exc
    shards = ShardSet.from_files(files, ntotals, meta.embedding_size)
    for j in range(len(shards)):
        shards.shard(j)
    return shards
