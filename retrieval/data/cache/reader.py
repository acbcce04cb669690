"""Reading a published split: is it there, does it belong to the dataset, and a memory-mapped view of it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.atomic import read_json
from retrieval.data.base import Split
from retrieval.data.cache.layout import (
    CACHE_FORMAT_VERSION,
    IMAGES_FILE,
    INDEX_FILE,
    META_FILE,
    NUM_FIELDS,
    CacheError,
    relative_source,
    source_stats,
    split_dir,
)


def has_cache(cache_dir: str | os.PathLike[str] | None, split_name: str, split: Split | None = None) -> bool:
    """True when a complete cache of `split_name` is published in `cache_dir` (and matches `split`, if given)."""
    if cache_dir is None:
        return False
    folder = split_dir(cache_dir, split_name)
    if not all((folder / name).is_file() for name in (IMAGES_FILE, INDEX_FILE, META_FILE)):
        return False
    try:
        meta = read_json(folder / META_FILE, "cache metadata")
    except (OSError, ValueError):
        return False
    if meta.get("format_version") != CACHE_FORMAT_VERSION:
        return False
    return split is None or cache_mismatch(meta, split, check_files=False) is None


def cache_mismatch(meta: dict[str, Any], split: Split, check_files: bool = True) -> str | None:
    """Why a published cache does not belong to `split` (None when it does).

    Compares paths and labels; with `check_files`, also each source file's size and mtime, so an
    image edited after `prepare` is noticed.
    """
    sources = meta.get("sources", {})
    root = Path(meta["root"]) if meta.get("root") else None
    rel = [relative_source(Path(p), root) for p in split.paths]
    stored = sources.get("paths", [])
    moved_root_matches = len(stored) == len(rel) and all(  # same layout under a moved dataset folder
        Path(p).resolve().as_posix().endswith("/" + r) for p, r in zip(split.paths, stored)
    )
    if rel != stored and not moved_root_matches:
        return (
            f"the cache lists {len(sources.get('paths', []))} images for split {split.name!r} but the dataset has "
            f"{len(rel)} (or different paths)"
        )
    if list(split.labels) != sources.get("labels"):
        return f"labels of split {split.name!r} differ from the cached ones"
    if check_files:
        sizes, mtimes = source_stats(split.paths)
        for i, (s, m, cs, cm) in enumerate(zip(sizes, mtimes, sources["sizes"], sources["mtimes_ns"])):
            if (s, m) != (cs, cm):
                return f"{split.paths[i]} changed since the cache was written"
    return None


class CachedSplit:
    """Read-only, memory-mapped view of one published split.

    Records are the kept images in source order; `split_indices[r]` is record r's index in the
    source split, `record_of_split_index[i]` the record of source image i (-1 if it was skipped).
    """

    def __init__(self, cache_dir: str | os.PathLike[str], split_name: str) -> None:
        folder = split_dir(cache_dir, split_name)
        if not has_cache(cache_dir, split_name):
            raise CacheError(
                f"no complete image cache for split {split_name!r} in {folder}; "
                f"run `retrieval prepare --dataset NAME --data-root PATH --out {cache_dir}` or train without --cache"
            )
        self.folder = folder
        self.meta: dict[str, Any] = read_json(folder / META_FILE, "cache metadata")
        self.records: np.ndarray = np.load(folder / INDEX_FILE, allow_pickle=False)
        if self.records.ndim != 2 or self.records.shape[1] != NUM_FIELDS or len(self.records) != self.meta["count"]:
            raise CacheError(f"{folder / INDEX_FILE} does not match {folder / META_FILE}; rerun `retrieval prepare`")
        size = os.path.getsize(folder / IMAGES_FILE)
        if size != self.meta["total_bytes"]:
            raise CacheError(
                f"{folder / IMAGES_FILE} has {size} bytes, expected {self.meta['total_bytes']}; "
                "rerun `retrieval prepare --overwrite`"
            )
        self.data = np.memmap(folder / IMAGES_FILE, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        self.offsets = self.records[:, 0]
        self.heights = self.records[:, 1]
        self.widths = self.records[:, 2]
        self.labels = self.records[:, 3]
        self.split_indices = self.records[:, 4]
        self.num_sources = int(self.meta["num_sources"])
        self.record_of_split_index = np.full(self.num_sources, -1, dtype=np.int64)
        self.record_of_split_index[self.split_indices] = np.arange(len(self.records))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def short_side(self) -> int | None:
        """Every stored image's short side, or None for a split stored at original resolution."""
        value = self.meta.get("short_side")
        return None if value is None else int(value)

    @property
    def full_resolution(self) -> bool:
        """Whether images are stored at their own resolution (short side capped), as training crops need."""
        return self.meta.get("max_short_side") is not None

    def image_chw(self, record: int) -> np.ndarray:
        """(3, h, w) uint8 view into the memory map (no copy)."""
        off, h, w = (int(v) for v in self.records[record, :3])
        return self.data[off : off + 3 * h * w].reshape(3, h, w)

    def check_matches(self, split: Split, check_files: bool = True) -> None:
        """Raise CacheError when this cache was written for other images than `split`."""
        reason = cache_mismatch(self.meta, split, check_files=check_files)
        if reason is not None:
            raise CacheError(
                f"image cache {self.folder} is stale: {reason}; rerun `retrieval prepare` "
                "to rebuild it, or run without --cache"
            )

    def substitute_records(self, split_indices: Sequence[int]) -> np.ndarray:
        """Records for source-split indices; a skipped (corrupt) image is replaced by a kept image of the same class.

        Keeps batch shapes and P x K class structure intact and labels correct; the choice is
        deterministic (the i-th kept image of that class, cyclically).
        """
        idx = np.asarray(split_indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_sources):
            raise IndexError(
                f"sampler index out of range for cached split {self.meta['split']!r} "
                f"({self.num_sources} images); was the sampler built for another split?"
            )
        rec = self.record_of_split_index[idx]
        missing = np.flatnonzero(rec < 0)
        for m in missing:
            label = self.meta["sources"]["labels"][int(idx[m])]
            same = np.flatnonzero(self.labels == label)
            if same.size == 0:
                raise CacheError(
                    f"every image of class {label} in split {self.meta['split']!r} was unreadable; "
                    "fix or remove them (see the skipped list in meta.json)"
                )
            rec[m] = same[int(idx[m]) % same.size]
        return rec
