"""Which store an index folder keeps its vectors in, and opening or creating a folder of either kind.

    FAISS (default)   index.faiss or shard-NNN.faiss + items.json in the folder (retrieval.index.folder)
    Milvus            a collection on a Milvus server named by meta.json's `store` (retrieval.index.milvus_folder)

Everything that opens an index folder (search, evaluate, serve and its live reloads, --add / --remove) calls
`open_index`; builds hand their built index to `gallery_index`, which wraps it in the folder class of its store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.index.folder import GalleryIndex, ItemTable, StoredQueries
from retrieval.index.meta import META_FILE, IndexMeta, read_meta
from retrieval.index.milvus_folder import MilvusGalleryIndex
from retrieval.index.milvus_store import (
    MilvusCollection,
    MilvusStoreRecord,
    MilvusUpload,
)

STORES = ("faiss", "milvus")


def open_index(
    folder: str | os.PathLike[str],
    *,
    verify_checksums: bool = True,
    use_gpu: bool = True,
    data_root: str | os.PathLike[str] | None = None,
) -> GalleryIndex:
    """Open an index folder of any store (GalleryIndex.load's checks, and the Milvus collection's)."""
    meta_path = Path(folder) / META_FILE
    cls: Any = GalleryIndex
    if meta_path.is_file() and read_meta(meta_path).store:
        cls = MilvusGalleryIndex
    return cls.load(folder, verify_checksums=verify_checksums, use_gpu=use_gpu, data_root=data_root)


def gallery_index(
    index: Any,
    params: Any,
    items: ItemTable,
    meta: IndexMeta,
    queries: StoredQueries | None,
    gallery_vectors: np.ndarray | None,
    use_gpu: bool = True,
) -> GalleryIndex:
    """A built index (FAISS, or a Milvus collection from MilvusUpload) as the folder object of its store."""
    if isinstance(index, MilvusCollection):
        return MilvusGalleryIndex(index, params, items, meta, queries, use_gpu=use_gpu)
    return GalleryIndex(index, params, items, meta, queries, gallery_vectors, use_gpu=use_gpu)


def store_builder(
    record: MilvusStoreRecord | None,
    items: ItemTable,
    fingerprint: str,
    data_root: str | None,
    batch_size: int = 1000,
    progress: bool = True,
) -> Any:
    """The builder `build_calibrated` builds with: None (FAISS, in this process) or an upload into Milvus."""
    if record is None:
        return None
    return MilvusUpload(record, items, fingerprint, data_root, batch_size=batch_size, progress=progress)
