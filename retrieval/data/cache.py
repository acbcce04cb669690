"""Decoded-image cache: each split decoded once and stored as raw uint8.

Sizes: evaluation splits are stored at the test transform's short side (Resize(256) before the
centre crop), so evaluating from the cache is bit-exact with the files.  The training split is
stored at its ORIGINAL resolution, downscaled only where its short side exceeds a cap (512 by
default): RandomResizedCrop then samples the same boxes (as fractions of the image) from the same
pixels as the file pipeline, so small crops are as sharp as crops of the files.  A training cache
written at a fixed short side (the old layout) is still read, but its small crops are blurrier; the
trainer says so.

Why: decoding JPEGs with Pillow is what limits a GPU training step; reading already-decoded bytes
from a memory-mapped file costs a memcpy. `retrieval prepare` writes the cache; `CacheTrainLoader`
and `CacheEvalLoader` read it and do crop/flip/normalise on the device (retrieval.data.gpu_augment).

Layout of `<cache_dir>/<split>/` (published by one directory rename, so a reader sees all or nothing):
    images.u8   every kept image as (3, h, w) uint8 (CHW), back to back, no padding (variable size:
                padding every image to the largest would waste space on odd aspect ratios)
    index.npy   (N, 5) int64 rows: byte offset, h, w, label, index of the image in the source split
    meta.json   format version, dataset, split, short side, counts, source paths (relative to the
                dataset root) with sizes and mtimes, and every skipped image with its reason
Images are decoded with retrieval.images.open_image and resized with Pillow bilinear so the short
side is `short_side` (torchvision's Resize on PIL images does exactly this), so the cache holds the
pixels the file pipeline would see after its resize.

Writing is resumable: images are processed in chunks into `<cache_dir>/.<split>.partial/`; after
each chunk the data files are fsynced and `progress.json` is replaced atomically. A rerun of the
same job truncates anything written after the last recorded chunk and continues from there.
Corrupt source images are reported (path + reason) and skipped; labels and source indices are
stored per kept image, so a kept image can never pick up another image's label.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.atomic import atomic_write_json, fsync_dir, read_json, swap_in_folder
from retrieval.data.base import Split
from retrieval.data.samplers import SamplerDrivenLoader
from retrieval.errors import UserError
from retrieval.images import ImageLoadError, open_image
from retrieval.embed.preprocess import resize_short_side

CACHE_FORMAT_VERSION = 1
DEFAULT_SHORT_SIDE = 256
DEFAULT_MAX_SHORT_SIDE = 512  # training images: originals, short side capped here
CACHE_DIR_NAME = ".metrix-cache"
IMAGES_FILE = "images.u8"
INDEX_FILE = "index.npy"
META_FILE = "meta.json"
_PROGRESS_FILE = "progress.json"
_RECORDS_FILE = "records.i64"
_RECORD_FIELDS = ("offset", "height", "width", "label", "split_index")
_NUM_FIELDS = len(_RECORD_FIELDS)


class CacheError(UserError, RuntimeError):
    """A cache is missing, unreadable or does not belong to the data it is used with."""


def default_cache_dir(data_root: str | os.PathLike[str]) -> Path:
    """Where `retrieval prepare` writes unless told otherwise: next to the dataset."""
    return Path(data_root).expanduser() / CACHE_DIR_NAME


def split_dir(cache_dir: str | os.PathLike[str], split_name: str) -> Path:
    return Path(cache_dir) / split_name


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


# ----------------------------------------------------------------------------------------------
# Source bookkeeping
# ----------------------------------------------------------------------------------------------


def _relative(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return Path(path).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    return str(Path(path).resolve())


def _source_stats(paths: Sequence[Path]) -> tuple[list[int], list[int]]:
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


def _job_fingerprint(dataset: str, split: Split, short_side: int, rel_paths: list[str], sizes: list[int],
                     mtimes: list[int], capped: bool = False) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_FORMAT_VERSION, dataset, split.name, short_side] + (["cap"] if capped else [])).encode())
    for rel, label, size, mtime in zip(rel_paths, split.labels, sizes, mtimes):
        h.update(f"{rel}\0{label}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def cache_mismatch(meta: dict[str, Any], split: Split, check_files: bool = True) -> str | None:
    """Why a published cache does not belong to `split` (None when it does).

    Compares paths and labels; with `check_files`, also each source file's size and mtime, so an
    image edited after `prepare` is noticed.
    """
    sources = meta.get("sources", {})
    root = Path(meta["root"]) if meta.get("root") else None
    rel = [_relative(Path(p), root) for p in split.paths]
    stored = sources.get("paths", [])
    moved_root_matches = len(stored) == len(rel) and all(  # same layout under a moved dataset folder
        Path(p).resolve().as_posix().endswith("/" + r) for p, r in zip(split.paths, stored))
    if rel != stored and not moved_root_matches:
        return (f"the cache lists {len(sources.get('paths', []))} images for split {split.name!r} but the dataset has "
                f"{len(rel)} (or different paths)")
    if list(split.labels) != sources.get("labels"):
        return f"labels of split {split.name!r} differ from the cached ones"
    if check_files:
        sizes, mtimes = _source_stats(split.paths)
        for i, (s, m, cs, cm) in enumerate(zip(sizes, mtimes, sources["sizes"], sources["mtimes_ns"])):
            if (s, m) != (cs, cm):
                return f"{split.paths[i]} changed since the cache was written"
    return None


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def load_resized(path: str, short_side: int) -> np.ndarray:
    """Decode one image and resize its short side to `short_side`: (3, h, w) uint8, CHW."""
    img = resize_short_side(open_image(path), short_side)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def load_capped(path: str, max_short_side: int) -> np.ndarray:
    """Decode one image at its own resolution, downscaled (Pillow bilinear) only where its short side
    exceeds `max_short_side` (0 = never): (3, h, w) uint8, CHW."""
    img = open_image(path)
    if max_short_side > 0 and min(img.size) > max_short_side:
        img = resize_short_side(img, max_short_side)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def _decode_one(args: tuple[str, int, bool]) -> tuple[np.ndarray | None, str | None]:
    """Worker: (image, None) or (None, reason). Never raises for a bad image, so one file cannot stop the job."""
    path, size, capped = args
    try:
        return (load_capped(path, size) if capped else load_resized(path, size)), None
    except (ImageLoadError, OSError, ValueError) as exc:
        return None, str(exc)


@dataclass
class PrepareReport:
    """What `prepare_split` did."""

    split: str
    path: Path
    count: int  # images in the cache
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    total_bytes: int = 0
    seconds: float = 0.0
    resumed_from: int = 0  # source images already done by an interrupted earlier run
    up_to_date: bool = False  # nothing to do: a matching cache was already published


class _Progress:
    """The resumable state of one partial split, persisted atomically after each chunk."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.done = 0  # source images handled (written or skipped)
        self.image_bytes = 0
        self.records = 0
        self.skipped: list[dict[str, str]] = []

    @classmethod
    def load_or_start(cls, folder: Path, fingerprint: str) -> "_Progress":
        state = cls(folder, fingerprint)
        path = folder / _PROGRESS_FILE
        if path.is_file():
            try:
                raw = read_json(path, "cache progress")
            except ValueError:
                raw = {}
            if raw.get("fingerprint") == fingerprint:
                state.done, state.image_bytes, state.records = int(raw["done"]), int(raw["image_bytes"]), int(raw["records"])
                state.skipped = list(raw["skipped"])
                return state
        # A different job (or garbage) was here: start over.
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        state.save()
        return state

    def save(self) -> None:
        atomic_write_json(self.folder / _PROGRESS_FILE, {
            "fingerprint": self.fingerprint, "done": self.done, "image_bytes": self.image_bytes,
            "records": self.records, "skipped": self.skipped,
        })


def prepare_split(
    split: Split,
    cache_dir: str | os.PathLike[str],
    dataset: str,
    root: str | os.PathLike[str] | None = None,
    short_side: int = DEFAULT_SHORT_SIDE,
    chunk_size: int = 256,
    workers: int = 0,
    show_progress: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    max_short_side: int | None = None,
) -> PrepareReport:
    """Write (or finish writing) the cache of one split; returns what was done.

    Images are resized to `short_side` (evaluation splits), or, with `max_short_side` given, kept at their
    own resolution with the short side capped there (training splits; 0 = no cap).
    `root` makes stored source paths relative (so a moved dataset folder stays valid). `workers` > 0
    decodes in that many processes. An up-to-date published cache is left alone unless `overwrite`.
    """
    capped = max_short_side is not None
    size = int(max_short_side) if capped else int(short_side)
    started = time.perf_counter()
    cache_dir = Path(cache_dir)
    root_path = Path(root).expanduser() if root is not None else None
    final = split_dir(cache_dir, split.name)
    rel_paths = [_relative(Path(p), root_path) for p in split.paths]
    sizes, mtimes = _source_stats(split.paths)

    if not overwrite and has_cache(cache_dir, split.name):
        meta = read_json(final / META_FILE, "cache metadata")
        same_size = (meta.get("max_short_side") == size) if capped else (
            meta.get("short_side") == size and meta.get("max_short_side") is None)
        if same_size and meta.get("dataset") == dataset and cache_mismatch(meta, split) is None:
            return PrepareReport(split.name, final, int(meta["count"]), list(meta["skipped"]),
                                 int(meta["total_bytes"]), time.perf_counter() - started, up_to_date=True)

    fingerprint = _job_fingerprint(dataset, split, size, rel_paths, sizes, mtimes, capped)
    partial = cache_dir / f".{split.name}.partial"
    cache_dir.mkdir(parents=True, exist_ok=True)
    state = _Progress.load_or_start(partial, fingerprint)
    resumed_from = state.done
    if resumed_from and log:
        log(f"resuming split {split.name!r} at image {resumed_from:,} of {len(split):,}")

    images_path, records_path = partial / IMAGES_FILE, partial / _RECORDS_FILE
    with open(images_path, "ab") as fh:  # create, then cut whatever an interrupted chunk left behind
        pass
    with open(records_path, "ab"):
        pass
    os.truncate(images_path, state.image_bytes)
    os.truncate(records_path, state.records * _NUM_FIELDS * 8)

    executor: Executor | None = ProcessPoolExecutor(max_workers=workers) if workers > 0 else None
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(split), initial=state.done, unit="img", desc=f"cache {split.name}", dynamic_ncols=True)
    try:
        with open(images_path, "ab") as img_fh, open(records_path, "ab") as rec_fh:
            while state.done < len(split):
                lo, hi = state.done, min(state.done + chunk_size, len(split))
                jobs = [(str(split.paths[i]), size, capped) for i in range(lo, hi)]
                results: Iterable[tuple[np.ndarray | None, str | None]]
                if executor is not None:
                    results = executor.map(_decode_one, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
                else:
                    results = (_decode_one(job) for job in jobs)
                rows = []
                offset = state.image_bytes
                skipped = []
                for i, (arr, reason) in zip(range(lo, hi), results):
                    if arr is None:
                        skipped.append({"path": str(split.paths[i]), "reason": str(reason)})
                        if log:
                            name = str(split.paths[i])
                            log(f"skipped {reason if name in str(reason) else f'{name}: {reason}'}")
                        continue
                    img_fh.write(arr.data)
                    rows.append((offset, arr.shape[1], arr.shape[2], split.labels[i], i))
                    offset += arr.nbytes
                if rows:
                    rec_fh.write(np.asarray(rows, dtype=np.int64).tobytes())
                for fh in (img_fh, rec_fh):
                    fh.flush()
                    os.fsync(fh.fileno())
                state.done, state.image_bytes = hi, offset
                state.records += len(rows)
                state.skipped.extend(skipped)
                state.save()
                if bar is not None:
                    bar.update(hi - lo)
    finally:
        if bar is not None:
            bar.close()
        if executor is not None:
            executor.shutdown(cancel_futures=True)

    records = np.fromfile(records_path, dtype=np.int64).reshape(-1, _NUM_FIELDS)
    np.save(partial / INDEX_FILE, records, allow_pickle=False)
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "dataset": dataset,
        "split": split.name,
        "short_side": None if capped else size,  # every image's short side, when fixed
        "max_short_side": size if capped else None,  # originals, short side capped (0 = no cap)
        "layout": "CHW uint8, back to back; index.npy rows = " + ", ".join(_RECORD_FIELDS),
        "count": int(records.shape[0]),
        "num_sources": len(split),
        "num_skipped": len(state.skipped),
        "skipped": state.skipped,
        "total_bytes": state.image_bytes,
        "max_height": int(records[:, 1].max()) if len(records) else 0,
        "max_width": int(records[:, 2].max()) if len(records) else 0,
        "root": str(root_path.resolve()) if root_path is not None else None,
        "sources": {"paths": rel_paths, "labels": list(split.labels), "sizes": sizes, "mtimes_ns": mtimes},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(partial / META_FILE, meta)
    records_path.unlink()
    (partial / _PROGRESS_FILE).unlink()
    fsync_dir(partial)
    swap_in_folder(partial, final)
    return PrepareReport(split.name, final, meta["count"], state.skipped, state.image_bytes,
                         time.perf_counter() - started, resumed_from=resumed_from)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


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
        if self.records.ndim != 2 or self.records.shape[1] != _NUM_FIELDS or len(self.records) != self.meta["count"]:
            raise CacheError(f"{folder / INDEX_FILE} does not match {folder / META_FILE}; rerun `retrieval prepare`")
        size = os.path.getsize(folder / IMAGES_FILE)
        if size != self.meta["total_bytes"]:
            raise CacheError(f"{folder / IMAGES_FILE} has {size} bytes, expected {self.meta['total_bytes']}; "
                             "rerun `retrieval prepare --overwrite`")
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
            raise CacheError(f"image cache {self.folder} is stale: {reason}; rerun `retrieval prepare` "
                             "to rebuild it, or run without --cache")

    def substitute_records(self, split_indices: Sequence[int]) -> np.ndarray:
        """Records for source-split indices; a skipped (corrupt) image is replaced by a kept image of the same class.

        Keeps batch shapes and P x K class structure intact and labels correct; the choice is
        deterministic (the i-th kept image of that class, cyclically).
        """
        idx = np.asarray(split_indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_sources):
            raise IndexError(f"sampler index out of range for cached split {self.meta['split']!r} "
                             f"({self.num_sources} images); was the sampler built for another split?")
        rec = self.record_of_split_index[idx]
        missing = np.flatnonzero(rec < 0)
        for m in missing:
            label = self.meta["sources"]["labels"][int(idx[m])]
            same = np.flatnonzero(self.labels == label)
            if same.size == 0:
                raise CacheError(f"every image of class {label} in split {self.meta['split']!r} was unreadable; "
                                 "fix or remove them (see the skipped list in meta.json)")
            rec[m] = same[int(idx[m]) % same.size]
        return rec


class _PinnedSlot:
    """A reusable host buffer for one batch: padded images + (h, w, label, split index) rows."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.images = None  # flat uint8 torch tensor, grown on demand
        self.info = None  # (capacity, 4) int64
        self.copy_done = None  # torch.cuda.Event after the H2D copy was queued

    def ensure(self, n_bytes: int, batch: int):  # noqa: ANN201
        import torch

        if self.images is None or self.images.numel() < n_bytes:
            cap = max(n_bytes, 2 * (0 if self.images is None else self.images.numel()))
            self.images = torch.empty(cap, dtype=torch.uint8, pin_memory=self.pin)
        if self.info is None or self.info.shape[0] < batch:
            self.info = torch.empty((max(batch, 2 * (0 if self.info is None else self.info.shape[0])), 4),
                                    dtype=torch.int64, pin_memory=self.pin)


def _copy_padded(cached: CachedSplit, records: np.ndarray, batch: np.ndarray, rows: range) -> None:
    """Copy records[rows] into batch[rows] ((B, 3, Hmax, Wmax) view), each followed by its edge row/column."""
    hmax, wmax = batch.shape[2], batch.shape[3]
    for k in rows:
        src = cached.image_chw(int(records[k]))
        h, w = src.shape[1], src.shape[2]
        batch[k, :, :h, :w] = src
        if w < wmax:
            batch[k, :, :h, w] = src[:, :, w - 1]
        if h < hmax:
            batch[k, :, h, :w] = src[:, h - 1, :]
            if w < wmax:
                batch[k, :, h, w] = src[:, h - 1, w - 1]


def _fill_slot(cached: CachedSplit, records: np.ndarray, slot: _PinnedSlot,
               pool: ThreadPoolExecutor | None = None, threads: int = 1) -> tuple[int, int, int]:
    """Copy the records' bytes into the slot as a padded (B, 3, Hmax, Wmax) batch.

    With a pool, rows are copied by several threads (NumPy releases the GIL while copying; on a
    cold page cache the copies wait on the disk, and parallel reads hide that latency).
    """
    hs, ws = cached.heights[records], cached.widths[records]
    b, hmax, wmax = len(records), int(hs.max()), int(ws.max())
    slot.ensure(b * 3 * hmax * wmax, b)
    batch = slot.images[: b * 3 * hmax * wmax].numpy().reshape(b, 3, hmax, wmax)
    if pool is None or threads < 2 or b < 8:
        _copy_padded(cached, records, batch, range(b))
    else:
        list(pool.map(lambda t: _copy_padded(cached, records, batch, range(t, b, threads)), range(threads)))
    info = slot.info[:b].numpy()
    info[:, 0], info[:, 1] = hs, ws
    info[:, 2] = cached.labels[records]
    info[:, 3] = cached.split_indices[records]
    return b, hmax, wmax


class _CacheBatchStream:
    """Background thread that turns record lists into filled host slots, a few batches ahead.

    The slots (pinned on CUDA) belong to the loader and are reused across epochs; `close()` stops
    and joins the thread, after which the slots are free for the next stream.
    """

    _DONE = object()

    def __init__(
        self,
        cached: CachedSplit,
        record_batches: Iterator[np.ndarray],
        device,  # noqa: ANN001 - torch.device (torch is imported lazily)
        slots: list[_PinnedSlot],
        fill_threads: int = 1,
    ) -> None:
        self.device = device
        self.fill_threads = fill_threads
        self.free: queue.Queue = queue.Queue()
        for slot in slots:
            self.free.put(slot)
        self.ready: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(cached, record_batches), daemon=True)
        self.thread.start()

    def _run(self, cached: CachedSplit, record_batches: Iterator[np.ndarray]) -> None:
        pool = ThreadPoolExecutor(self.fill_threads) if self.fill_threads > 1 else None
        try:
            for records in record_batches:
                slot = self.free.get()
                if self.stop.is_set() or slot is None:
                    return
                if slot.copy_done is not None:
                    slot.copy_done.synchronize()  # the device has finished reading this buffer
                shape = _fill_slot(cached, records, slot, pool, self.fill_threads)
                self.ready.put((slot, shape))
            self.ready.put(self._DONE)
        except BaseException as exc:  # surfaced in the consuming thread
            self.ready.put(exc)
        finally:
            if pool is not None:
                pool.shutdown()

    def close(self) -> None:
        self.stop.set()
        self.free.put(None)  # wake the producer if it waits for a slot
        self.thread.join()

    def __iter__(self):  # noqa: ANN204
        import torch

        try:
            while True:
                item = self.ready.get()
                if item is self._DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                slot, (b, hmax, wmax) = item
                host_images = slot.images[: b * 3 * hmax * wmax].view(b, 3, hmax, wmax)
                if self.device.type == "cuda":
                    images = host_images.to(self.device, non_blocking=True)
                    info = slot.info[:b].to(self.device, non_blocking=True)
                    slot.copy_done = torch.cuda.Event()
                    slot.copy_done.record()  # the producer waits on this before refilling the slot
                    self.free.put(slot)
                    yield images, info
                else:
                    # Same memory on the host: the consumer turns the images into a new tensor
                    # before asking for the next batch, so the slot is handed back only then.
                    yield host_images.to(self.device), slot.info[:b].clone().to(self.device)
                    self.free.put(slot)
        finally:
            self.close()


class _StreamOwner:
    """Owns the reusable host slots and at most one live stream over them."""

    def _init_streams(self, device, prefetch: int, fill_threads: int | None) -> None:  # noqa: ANN001
        import torch

        pin = device.type == "cuda" and torch.cuda.is_available()
        self._slots = [_PinnedSlot(pin) for _ in range(max(1, prefetch) + 2)]
        self._stream: _CacheBatchStream | None = None
        # A GPU step eats batches faster than one thread copies them; a CPU needs its cores for the model.
        self._fill_threads = fill_threads if fill_threads is not None else (4 if device.type == "cuda" else 1)

    def _open_stream(
        self, cached: CachedSplit, record_batches: Iterator[np.ndarray], device  # noqa: ANN001
    ) -> _CacheBatchStream:
        if self._stream is not None:  # an earlier iteration was abandoned without being closed
            self._stream.close()
        self._stream = _CacheBatchStream(cached, record_batches, device, self._slots, self._fill_threads)
        return self._stream


def _resolve(device):  # noqa: ANN001, ANN202
    import torch

    return device if isinstance(device, torch.device) else torch.device(device)


class CacheTrainLoader(_StreamOwner, SamplerDrivenLoader):
    """Training batches from a decoded-image cache, augmented on `device`.

    Iterating yields `(images, labels)`: images (B, 3, S, S) float32, ImageNet-normalised, after
    RandomResizedCrop(S) + horizontal flip drawn per sample; labels (B,) int64; both on `device`.
    One batch per list of split indices from `batch_sampler`. `set_epoch(e)` forwards to the
    sampler and reseeds the augmentation from (seed, e), so a run is reproducible on one device.
    A skipped (corrupt) source image requested by the sampler is replaced by a kept image of the
    same class (see CachedSplit.substitute_records).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        split_name: str,
        batch_sampler: Iterable[Sequence[int]],
        image_size: int,
        device,  # noqa: ANN001
        seed: int = 0,
        prefetch: int = 2,
        channels_last: bool = False,
        fill_threads: int | None = None,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    ) -> None:
        from retrieval.data.gpu_augment import TrainAugment

        self.cached = CachedSplit(cache_dir, split_name)
        self.batch_sampler = batch_sampler
        self.device = _resolve(device)
        self.seed = int(seed)
        self.epoch = 0
        self.prefetch = int(prefetch)
        self.channels_last = channels_last
        self.augment = TrainAugment(image_size, scale=scale, ratio=ratio)
        self._init_streams(self.device, self.prefetch, fill_threads)

    def __iter__(self):  # noqa: ANN204
        import torch

        from retrieval.data.gpu_augment import derive_seed, make_generator

        gen = make_generator(self.device, derive_seed(self.seed, self.epoch))
        record_batches = (self.cached.substitute_records(list(b)) for b in self.batch_sampler)
        for images, info in self._open_stream(self.cached, record_batches, self.device):
            out = self.augment(images, info[:, :2], gen)
            if self.channels_last:
                out = out.contiguous(memory_format=torch.channels_last)
            yield out, info[:, 2]


class CacheEvalLoader(_StreamOwner):
    """Every cached image of a split in order, as Resize(resize_size) + CenterCrop(image_size) on `device`.

    Yields `(images, labels, split_indices)`: images (B, 3, S, S) float32 normalised, labels (B,)
    int64, split_indices (B,) int64 positions in the source split (skipped images are absent).
    Bit-exact with the file pipeline when resize_size equals the cache's short side (the default
    256); otherwise the cached image is resampled again, which is close but not identical.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        split_name: str,
        batch_size: int,
        image_size: int,
        device,  # noqa: ANN001
        resize_size: int | None = None,
        prefetch: int = 2,
        channels_last: bool = False,
        fill_threads: int | None = None,
    ) -> None:
        from retrieval.data.gpu_augment import EvalCrop

        self.cached = CachedSplit(cache_dir, split_name)
        self.batch_size = int(batch_size)
        self.device = _resolve(device)
        self.prefetch = int(prefetch)
        self.channels_last = channels_last
        resize_size = resize_size or self.cached.short_side
        if resize_size is None:
            raise CacheError(f"split {split_name!r} in {cache_dir} is stored at original resolution; pass resize_size")
        self.crop = EvalCrop(image_size, resize_size)
        self._init_streams(self.device, self.prefetch, fill_threads)

    def __len__(self) -> int:
        return (len(self.cached) + self.batch_size - 1) // self.batch_size

    def __iter__(self):  # noqa: ANN204
        import torch

        n = len(self.cached)
        record_batches = (np.arange(lo, min(lo + self.batch_size, n)) for lo in range(0, n, self.batch_size))
        for images, info in self._open_stream(self.cached, record_batches, self.device):
            out = self.crop(images, info[:, :2])
            if self.channels_last:
                out = out.contiguous(memory_format=torch.channels_last)
            yield out, info[:, 2], info[:, 3]
