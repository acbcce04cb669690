"""What the cache writer and reader agree on: folder and file names, record fields, source identity."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from retrieval.errors import UserError

CACHE_FORMAT_VERSION = 1
DEFAULT_SHORT_SIDE = 256  # evaluation images: the test transform's resize
DEFAULT_MAX_SHORT_SIDE = 512  # training images: originals, short side capped here
CACHE_DIR_NAME = ".metrix-cache"
IMAGES_FILE = "images.u8"
INDEX_FILE = "index.npy"
META_FILE = "meta.json"
RECORD_FIELDS = ("offset", "height", "width", "label", "split_index")
NUM_FIELDS = len(RECORD_FIELDS)


class CacheError(UserError, RuntimeError):
    """A cache is missing, unreadable or does not belong to the data it is used with."""


def default_cache_dir(data_root: str | os.PathLike[str]) -> Path:
    """Where `retrieval prepare` writes unless told otherwise: next to the dataset."""
    return Path(data_root).expanduser() / CACHE_DIR_NAME


def split_dir(cache_dir: str | os.PathLike[str], split_name: str) -> Path:
    return Path(cache_dir) / split_name


def relative_source(path: Path, root: Path | None) -> str:
    """A source path as stored: relative to the dataset root when inside it, so a moved dataset stays valid."""
    if root is not None:
        try:
            return Path(path).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    return str(Path(path).resolve())


def source_stats(paths: Sequence[Path]) -> tuple[list[int], list[int]]:
    """Sizes and mtimes (ns); -1 for files that are missing (they will be reported as skipped)."""
    sizes, mtimes = [], []
    for p in paths:
        try:
            st = os.stat(p)
            sizes.append(int(st.st_size))
            mtimes.append(int(st.st_mtime_ns))
        except OSError:
            sizes.append(-1)
            mtimes.append(-1)
    return sizes, mtimes
