"""Embed a dataset's gallery (and its queries) and publish an index folder; add new images to one.

The folder records which embedder made it (`embedder_source`, from retrieval.embed.spec), so search
re-opens the same embedder without being told, and refuses any other.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.config import CalibrationConfig
from retrieval.embed.backend import EmbeddingBackend
from retrieval.embed.bad_images import DEFAULT_MAX_BAD_FRACTION, embed_skipping_bad
from retrieval.embed.spec import embedder_record
from retrieval.errors import InputError
from retrieval.image_files import list_images
from retrieval.index.config import IndexConfig
from retrieval.index.faiss_index import library_versions, resolve_params
from retrieval.index.folder import GalleryIndex, ItemTable, StoredQueries, items_from_paths
from retrieval.index.meta import IndexMeta
from retrieval.index.milvus_store import MilvusStoreRecord
from retrieval.index.stores import gallery_index, open_index, store_builder
from retrieval.versions import now_iso


def build_versions(backend: EmbeddingBackend) -> dict[str, str]:
    """What an index or embeddings folder records about the software that made it."""
    return {**library_versions(), **backend.runtime_versions()}


# -- build / add -----------------------------------------------------------------------------------


def build_index(
    dataset: Any,
    backend: EmbeddingBackend,
    out_dir: str | os.PathLike[str],
    cfg: IndexConfig | None = None,
    *,
    batch_size: int = 64,
    progress: bool = True,
    seed: int = 0,
    calib: CalibrationConfig | None = None,
    rerank_neighbours: int = 0,
    strict: bool = False,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    store: MilvusStoreRecord | None = None,
    upload_batch: int = 1000,
) -> GalleryIndex:
    """Embed `dataset.gallery_split()` (and the query split of query/gallery datasets), index it, publish `out_dir`.

    `dataset` is a retrieval.data RetrievalDataset. The previous folder at `out_dir` stays in place
    until the new one is complete. Items carry the dataset's attributes (retrieval.index.filters);
    `rerank_neighbours` > 0 also stores gallery neighbour lists of that width (for DBA re-ranking).
    Images that cannot be used are skipped and listed in the metadata (`bad_images`), unless there are
    more than `max_bad_fraction` of them; `strict` stops at the first. `store`: build into this Milvus
    collection instead of FAISS files (upserted in batches of `upload_batch` rows).
    """
    cfg = cfg or IndexConfig()
    if store is not None and rerank_neighbours > 0:
        raise InputError(
            "--rerank-neighbours stores neighbour lists in FAISS folders only; Milvus-backed folders "
            "re-rank with qe or kreciprocal (drop --rerank-neighbours)"
        )
    source = embedder_record(backend)  # before any work: an embedder the index cannot re-open is refused
    t_start = time.perf_counter()
    gallery = dataset.gallery_split()
    if len(gallery) == 0:
        raise InputError(f"{dataset.name}: the {gallery.name} split is empty; nothing to index")
    d = int(backend.embedding_size)
    resolve_params(cfg, len(gallery), d)  # fail on impossible parameters before embedding

    t0 = time.perf_counter()
    skip = dict(batch_size=batch_size, progress=progress, strict=strict, max_bad_fraction=max_bad_fraction)
    gallery_emb, gallery, queries, bad_images = _embed_splits(dataset, gallery, backend, skip)
    embed_seconds = time.perf_counter() - t0

    from retrieval.index.calibrate import build_calibrated

    items = _items_with_attributes(dataset, gallery)
    data_root = str(Path(dataset.root).resolve())
    builder = store_builder(store, items, backend.fingerprint, data_root, upload_batch, progress)
    result = build_calibrated(gallery_emb, cfg, calib, seed=seed, progress=progress, builder=builder)
    built = result.built
    meta = IndexMeta(
        dataset=dataset.name,
        data_root=str(Path(dataset.root).resolve()),
        split=gallery.name,
        protocol=dataset.protocol,
        recall_ks=[int(k) for k in dataset.recall_ks],
        fingerprint=backend.fingerprint,
        embedding_size=d,
        preprocessing=backend.preprocessing.to_dict(),
        backend=backend.name,
        embed_device=backend.device,
        embedder_source=source,
        index_device=built.device,
        index_note=built.note,
        index_config={"memory_budget_gb": cfg.memory_budget_gb, "requested_type": cfg.index_type},
        embed_seconds=round(embed_seconds, 3),
        train_seconds=round(built.train_seconds, 3),
        add_seconds=round(built.add_seconds, 3),
        build_seconds=round(time.perf_counter() - t_start, 3),
        created_at=now_iso(),
        versions=build_versions(backend),
        history=[{"action": "build", "items": len(gallery), "at": now_iso()}],
        **result.meta(),
        bad_images=bad_images,
    )
    index = gallery_index(
        built.index,
        built.params,
        items,
        meta,
        queries,
        None if built.params.stores_exact_vectors else gallery_emb,
        use_gpu=cfg.use_gpu,
    )
    if rerank_neighbours > 0:
        index.build_neighbours(rerank_neighbours)
    index.save(out_dir)
    return index


def _embed_splits(
    dataset: Any, gallery: Any, backend: EmbeddingBackend, skip: dict[str, Any]
) -> tuple[np.ndarray, Any, StoredQueries | None, list[dict[str, Any]]]:
    """(gallery embeddings, the gallery split without the images that cannot be used, the stored queries of
    query/gallery datasets, the images skipped in either)."""
    embedded = embed_skipping_bad(backend, list(gallery.paths), what=f"{gallery.name} images", **skip)
    gallery_emb, gallery, bad_images = embedded.emb, _subset(gallery, embedded.kept), embedded.bad
    if len(gallery) == 0:
        raise InputError(f"{dataset.name}: none of the {gallery.name} images can be used; nothing to index")
    queries = None
    if dataset.protocol == "query-gallery":
        q_split, _ = dataset.eval_splits()
        q_embedded = embed_skipping_bad(backend, list(q_split.paths), what=f"{q_split.name} images", **skip)
        queries = StoredQueries(q_embedded.emb, _items_with_attributes(dataset, _subset(q_split, q_embedded.kept)))
        bad_images += q_embedded.bad
    return gallery_emb, gallery, queries, bad_images


def _subset(split: Any, kept: Any) -> Any:
    """The split restricted to the images at positions `kept` (all of them: the split itself)."""
    if len(kept) == len(split):
        return split
    from retrieval.data.base import Split

    idx = [int(i) for i in kept]
    item_ids = None if split.item_ids is None else tuple(split.item_ids[i] for i in idx)
    return Split(split.name, tuple(split.paths[i] for i in idx), tuple(split.labels[i] for i in idx), item_ids)


def add_images(
    index_dir: str | os.PathLike[str],
    sources: Sequence[str | os.PathLike[str]],
    backend: EmbeddingBackend,
    *,
    batch_size: int = 64,
    progress: bool = True,
    strict: bool = False,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
) -> tuple[GalleryIndex, int]:
    """Embed images (files or folders) and add them to the index at `index_dir`; returns (index, added).

    Refuses a backend whose embedder differs from the index's. Added items are unlabelled (label -1,
    item id = parent folder name). The folder is republished atomically.
    """
    index = open_index(index_dir)
    index.check_embedder(backend.fingerprint, backend.embedding_size, getattr(backend, "normalisation", "l2"))
    paths = list_images(sources)
    embedded = embed_skipping_bad(
        backend,
        paths,
        batch_size=batch_size,
        progress=progress,
        strict=strict,
        max_bad_fraction=max_bad_fraction,
        what="added images",
    )
    kept = [paths[int(i)] for i in embedded.kept]
    if not kept:
        raise InputError(f"none of the {len(paths)} images to add can be used: {embedded.bad[0]['reason']}")
    index.add(embedded.emb, items_from_paths(kept))
    index.meta.updated_at = now_iso()
    if embedded.bad:
        index.meta.bad_images = list(index.meta.bad_images or []) + embedded.bad
    index.save(index_dir)
    return index, len(kept)


def _items_with_attributes(dataset: Any, split: Any) -> ItemTable:
    from retrieval.data import item_attributes

    items = ItemTable.from_split(split)
    items.attributes = item_attributes(dataset, split)
    return items


def rows_to_remove(
    index: GalleryIndex, item_ids: Sequence[str] = (), paths: Sequence[str | os.PathLike[str]] = ()
) -> list[int]:
    """Gallery rows of the given item ids (every image of the item) and image paths; ValueError naming any not found."""
    by_id: dict[str, list[int]] = {}
    for row, item in enumerate(index.items.item_ids):
        by_id.setdefault(item, []).append(row)
    by_path = {os.path.realpath(p): row for row, p in enumerate(index.items.paths)}
    root = index.meta.data_root or ""
    rows: set[int] = set()
    missing: list[str] = []
    for item in item_ids:
        if str(item) in by_id:
            rows.update(by_id[str(item)])
        else:
            missing.append(f"item id {item}")
    for path in paths:
        candidates = [os.path.realpath(path)] + ([os.path.realpath(os.path.join(root, path))] if root else [])
        found = next((by_path[c] for c in candidates if c in by_path), None)
        if found is None:
            missing.append(f"path {path}")
        else:
            rows.add(found)
    if missing:
        raise InputError(
            f"not in the index {index.meta.folder}: {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            + "; nothing was removed"
        )
    return sorted(rows)


def remove_items(
    index_dir: str | os.PathLike[str], item_ids: Sequence[str] = (), paths: Sequence[str | os.PathLike[str]] = ()
) -> tuple[GalleryIndex, int]:
    """Remove the gallery rows of `item_ids` and `paths` from the index at `index_dir`, republished atomically."""
    index = open_index(index_dir, use_gpu=False)
    rows = rows_to_remove(index, item_ids, paths)
    index.remove(rows)
    if len(index) == 0:
        raise ValueError("removing these items would leave the index empty; delete the folder instead")
    index.meta.updated_at = now_iso()
    index.save(index_dir)
    return index, len(rows)


def add_neighbour_lists(index_dir: str | os.PathLike[str], width: int) -> GalleryIndex:
    """Compute and store the gallery neighbour lists of an existing index (republished atomically)."""
    index = open_index(index_dir, use_gpu=False)
    index.build_neighbours(width)
    index.meta.updated_at = now_iso()
    index.save(index_dir)
    return index
