"""A Milvus-backed index folder: meta.json (+ stored queries) here, vectors and item table in a Milvus collection.

    <dir>/meta.json      as any index folder's (embedder record, preprocessing, calibration, index parameters),
                         plus `store`: {"kind": "milvus", "uri", "collection", "token_env"}; no token
    <dir>/queries.npy, queries.json   the stored queries of query/gallery datasets, as in a FAISS folder

`MilvusGalleryIndex` is a GalleryIndex whose store is a retrieval.index.milvus_store.MilvusCollection: the
Searcher, `evaluate`, the live server and `--add` / `--remove` use it as they use a FAISS or sharded folder.
Filters go to Milvus as escaped boolean expressions (retrieval.index.milvus_filters); re-ranking reads the
candidates' vectors from the collection. `--add` / `--remove` write through to the collection and republish
the folder, so a server watching it (app.live_index) loads the new version. A folder is opened only when its
collection agrees with meta.json (fingerprint, dimension, metric, row count).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.index.errors import IndexFileError, RerankError
from retrieval.index.faiss_index import check_embeddings
from retrieval.index.folder import (
    QUERIES_FILE,
    GalleryIndex,
    ItemTable,
    StoredQueries,
    _load_queries,
    _missing_folder_message,
    _verify_file,
)
from retrieval.index.meta import META_FILE, IndexMeta, read_meta
from retrieval.index.milvus_filters import keys_expression, where_expression
from retrieval.index.milvus_store import MilvusCollection, MilvusStoreRecord
from retrieval.index.types import IndexParams
from retrieval.versions import now_iso


def keys_digest(keys: np.ndarray) -> str:
    """SHA-256 of the collection's keys in row order: which rows a folder version serves."""
    return hashlib.sha256(np.ascontiguousarray(keys, dtype="<i8").tobytes()).hexdigest()


class MilvusGalleryIndex(GalleryIndex):
    """A GalleryIndex whose vectors and items live in a Milvus collection (see the module docstring)."""

    index: MilvusCollection
    fetches_vectors = True

    def __init__(
        self,
        index: MilvusCollection,
        params: IndexParams,
        items: ItemTable,
        meta: IndexMeta,
        queries: StoredQueries | None = None,
        gallery_vectors: np.ndarray | None = None,
        use_gpu: bool = True,
    ) -> None:
        super().__init__(index, params, items, meta, queries, None, use_gpu)
        self._record_store()
        self._all_vectors: np.ndarray | None = None

    def _configure_search(self) -> None:
        self.index.configure(self.params)

    def _target(self) -> Any:
        self.search_device = self.index.device
        return self.index

    def search_subset(
        self, queries: np.ndarray, k: int, ids: np.ndarray, where: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The filter as a Milvus expression over the item attributes (the rows when no filter is given)."""
        queries = check_embeddings(queries, self.embedding_size, "query embeddings")
        ids = np.asarray(ids, dtype=np.int64)
        expression = where_expression(where) if where else keys_expression(self.index.keys[ids].tolist())
        return self.index.search(queries, int(min(k, len(ids))), expression)

    def exact_gallery_vectors(self) -> np.ndarray:
        if self._all_vectors is None:
            self._all_vectors = self.index.all_vectors()
        return self._all_vectors

    def vectors_of(self, rows: np.ndarray) -> np.ndarray:
        if self._all_vectors is not None:
            return self._all_vectors[np.asarray(rows, dtype=np.int64)]
        return self.index.vectors_of(rows)

    def add(self, vectors: np.ndarray, items: ItemTable) -> None:
        """Upsert the new items into the collection under keys after the largest (`save` republishes the folder)."""
        if len(vectors) != len(items):
            raise ValueError(f"{len(vectors)} embeddings for {len(items)} items")
        vectors = check_embeddings(vectors, self.embedding_size, "new embeddings")
        n_before = len(self)
        first = int(self.index.keys[-1]) + 1 if len(self.index.keys) else 0
        keys = np.arange(first, first + len(vectors), dtype=np.int64)
        self.index.upsert(keys, vectors, items, self.meta.data_root or None, progress=False, what="adding")
        self.index.keys = np.concatenate([self.index.keys, keys])
        self.items.extend(items)
        self._all_vectors = None
        self.meta.history.append({"action": "add", "items": len(items), "from": n_before, "at": now_iso()})

    def remove(self, rows: Sequence[int]) -> None:
        """Delete the rows' keys from the collection; later rows move up (`save` republishes the folder)."""
        drop = np.unique(np.asarray(list(rows), dtype=np.int64))
        if len(drop) and (drop[0] < 0 or drop[-1] >= len(self)):
            raise ValueError(f"row {int(drop[-1])} is not in the index (it holds {len(self)} items)")
        self.index.delete_keys(self.index.keys[drop])
        keep = np.setdiff1d(np.arange(len(self.items)), drop)
        self.index.keys = self.index.keys[keep]
        self.items = self.items.select(keep.tolist())
        self._all_vectors = None
        self.meta.history.append({"action": "remove", "items": len(drop), "at": now_iso()})

    def build_neighbours(self, n: int = 0) -> None:
        raise RerankError(
            "gallery neighbour lists (--rerank dba) are not stored for Milvus-backed index folders; "
            "use --rerank qe or kreciprocal, which read the candidates' vectors from the collection"
        )

    def _record_store(self) -> None:
        """meta.store: the store record and which rows this version serves (part of the served version's id)."""
        self.meta.store = {**self.index.record.to_dict(), "keys_sha256": keys_digest(self.index.keys)}

    def save(self, folder: str | os.PathLike[str]) -> Path:
        self._record_store()  # a build may have replaced the metadata, add/remove changed the keys
        return super().save(folder)

    def _write_index_files(self, tmp: Path) -> list[str]:
        return []  # the vectors are in the collection

    def _write_table_files(self, tmp: Path) -> list[str]:
        return []  # so is the item table: one copy, shared by every server of the collection

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike[str],
        *,
        verify_checksums: bool = True,
        use_gpu: bool = True,
        data_root: str | os.PathLike[str] | None = None,
    ) -> MilvusGalleryIndex:
        """Open a Milvus-backed folder: its files verified, its collection checked against meta.json."""
        folder = Path(folder)
        meta_path = folder / META_FILE
        if not folder.is_dir():
            raise IndexFileError(_missing_folder_message(folder))
        if not meta_path.is_file():
            raise IndexFileError(
                f"{meta_path} is missing: {folder} is not a complete index folder; rebuild it with `retrieval index`"
            )
        meta = read_meta(meta_path)
        record = MilvusStoreRecord.from_dict(meta.store, str(meta_path))
        for name, expected in meta.files.items():
            _verify_file(folder / name, expected, verify_checksums)
        if data_root is not None:
            meta.data_root = os.path.abspath(data_root)
        root = meta.data_root or None
        params = meta.index_params
        if params is None:
            raise IndexFileError(f"{meta_path} records no index parameters; rebuild the index")
        collection, items = MilvusCollection.open(
            record, meta.fingerprint, meta.embedding_size, meta.n_items, params, root, str(meta_path)
        )
        recorded = meta.store.get("keys_sha256") if meta.store else None
        if recorded and recorded != keys_digest(collection.keys):
            raise IndexFileError(
                f"{record.describe()} holds other rows than {meta_path} records (same count, other "
                "keys): it was changed by another folder; rebuild this one or open that folder"
            )
        queries = _load_queries(folder, meta.embedding_size, root) if QUERIES_FILE in meta.files else None
        meta.folder = str(folder)
        return cls(collection, params, items, meta, queries, use_gpu=use_gpu)
