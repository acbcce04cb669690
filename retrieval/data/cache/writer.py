"""Writing the cache of one split (`retrieval prepare`): decode every image once, store it, publish the split.

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
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from retrieval.atomic import atomic_write_json, fsync_dir, read_json, swap_in_folder
from retrieval.data.base import Split
from retrieval.data.cache.layout import (
    CACHE_FORMAT_VERSION,
    DEFAULT_SHORT_SIDE,
    IMAGES_FILE,
    INDEX_FILE,
    META_FILE,
    NUM_FIELDS,
    RECORD_FIELDS,
    relative_source,
    source_stats,
    split_dir,
)
from retrieval.data.cache.reader import cache_mismatch, has_cache
from retrieval.images import ImageLoadError, open_image
from retrieval.preprocess import resize_short_side

_PROGRESS_FILE = "progress.json"
_RECORDS_FILE = "records.i64"

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------
# Decoding one image
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


# ----------------------------------------------------------------------------------------------
# The job and its resumable progress
# ----------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class _Job:
    """One split cached at one size: its sources as stored (relative paths, sizes, mtimes) and its folders."""

    split: Split
    dataset: str
    cache_dir: Path
    root: Path | None
    size: int  # the short side (fixed size) or the short-side cap (capped)
    capped: bool  # originals with the short side capped at `size` (training splits)
    rel_paths: list[str]
    sizes: list[int]
    mtimes: list[int]

    @classmethod
    def describe(
        cls,
        split: Split,
        cache_dir: str | os.PathLike[str],
        dataset: str,
        root: str | os.PathLike[str] | None,
        short_side: int,
        max_short_side: int | None,
    ) -> _Job:
        root_path = Path(root).expanduser() if root is not None else None
        sizes, mtimes = source_stats(split.paths)
        capped = max_short_side is not None
        return cls(
            split,
            dataset,
            Path(cache_dir),
            root_path,
            int(max_short_side if max_short_side is not None else short_side),
            capped,
            [relative_source(Path(p), root_path) for p in split.paths],
            sizes,
            mtimes,
        )

    @property
    def final(self) -> Path:
        return split_dir(self.cache_dir, self.split.name)

    @property
    def partial(self) -> Path:
        return self.cache_dir / f".{self.split.name}.partial"

    def fingerprint(self) -> str:
        """Names the job, so a rerun resumes only its own partial output."""
        h = hashlib.sha256()
        head = [CACHE_FORMAT_VERSION, self.dataset, self.split.name, self.size] + (["cap"] if self.capped else [])
        h.update(json.dumps(head).encode())
        for rel, label, size, mtime in zip(self.rel_paths, self.split.labels, self.sizes, self.mtimes):
            h.update(f"{rel}\0{label}\0{size}\0{mtime}\n".encode())
        return h.hexdigest()

    def published_meta(self) -> dict[str, Any] | None:
        """The metadata of the published split when it already holds what this job would write."""
        if not has_cache(self.cache_dir, self.split.name):
            return None
        meta = read_json(self.final / META_FILE, "cache metadata")
        same_size = (
            (meta.get("max_short_side") == self.size)
            if self.capped
            else (meta.get("short_side") == self.size and meta.get("max_short_side") is None)
        )
        if same_size and meta.get("dataset") == self.dataset and cache_mismatch(meta, self.split) is None:
            return meta
        return None

    def meta(self, records: np.ndarray, skipped: list[dict[str, str]], total_bytes: int) -> dict[str, Any]:
        return {
            "format_version": CACHE_FORMAT_VERSION,
            "dataset": self.dataset,
            "split": self.split.name,
            "short_side": None if self.capped else self.size,  # every image's short side, when fixed
            "max_short_side": self.size if self.capped else None,  # originals, short side capped (0 = no cap)
            "layout": "CHW uint8, back to back; index.npy rows = " + ", ".join(RECORD_FIELDS),
            "count": int(records.shape[0]),
            "num_sources": len(self.split),
            "num_skipped": len(skipped),
            "skipped": skipped,
            "total_bytes": total_bytes,
            "max_height": int(records[:, 1].max()) if len(records) else 0,
            "max_width": int(records[:, 2].max()) if len(records) else 0,
            "root": str(self.root.resolve()) if self.root is not None else None,
            "sources": {
                "paths": self.rel_paths,
                "labels": list(self.split.labels),
                "sizes": self.sizes,
                "mtimes_ns": self.mtimes,
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


class _Progress:
    """The resumable state of one partial split, persisted atomically after each chunk."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.done = 0  # source images handled (written or skipped)
        self.image_bytes = 0
        self.records = 0
        self.skipped: list[dict[str, str]] = []

    @property
    def images_path(self) -> Path:
        return self.folder / IMAGES_FILE

    @property
    def records_path(self) -> Path:
        return self.folder / _RECORDS_FILE

    @classmethod
    def load_or_start(cls, folder: Path, fingerprint: str) -> _Progress:
        state = cls(folder, fingerprint)
        path = folder / _PROGRESS_FILE
        if path.is_file():
            try:
                raw = read_json(path, "cache progress")
            except ValueError:
                raw = {}
            if raw.get("fingerprint") == fingerprint:
                state.done, state.image_bytes, state.records = (
                    int(raw["done"]),
                    int(raw["image_bytes"]),
                    int(raw["records"]),
                )
                state.skipped = list(raw["skipped"])
                return state
        # A different job (or garbage) was here: start over.
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        state.save()
        return state

    def rewind_files(self) -> None:
        """Create the data files, then cut whatever an interrupted chunk wrote after the last save."""
        for path, length in ((self.images_path, self.image_bytes), (self.records_path, self.records * NUM_FIELDS * 8)):
            with open(path, "ab"):
                pass
            os.truncate(path, length)

    def save(self) -> None:
        atomic_write_json(
            self.folder / _PROGRESS_FILE,
            {
                "fingerprint": self.fingerprint,
                "done": self.done,
                "image_bytes": self.image_bytes,
                "records": self.records,
                "skipped": self.skipped,
            },
        )

    def finish(self) -> None:
        """Drop the resume bookkeeping once the index and metadata are written."""
        self.records_path.unlink()
        (self.folder / _PROGRESS_FILE).unlink()


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _decode_chunk(
    job: _Job, lo: int, hi: int, executor: Executor | None, workers: int
) -> Iterable[tuple[np.ndarray | None, str | None]]:
    jobs = [(str(job.split.paths[i]), job.size, job.capped) for i in range(lo, hi)]
    if executor is not None:
        return executor.map(_decode_one, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
    return (_decode_one(j) for j in jobs)


def _append_chunk(
    job: _Job,
    lo: int,
    hi: int,
    results: Iterable[tuple[np.ndarray | None, str | None]],
    img_fh: IO[bytes],
    rec_fh: IO[bytes],
    state: _Progress,
    log: Log | None,
) -> None:
    """Append the chunk's kept images and their records, make them durable, then record the progress."""
    rows = []
    offset = state.image_bytes
    skipped = []
    for i, (arr, reason) in zip(range(lo, hi), results):
        if arr is None:
            name = str(job.split.paths[i])
            skipped.append({"path": name, "reason": str(reason)})
            if log:
                log(f"skipped {reason if name in str(reason) else f'{name}: {reason}'}")
            continue
        img_fh.write(arr.data)
        rows.append((offset, arr.shape[1], arr.shape[2], job.split.labels[i], i))
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


def _write_remaining(
    job: _Job, state: _Progress, chunk_size: int, workers: int, show_progress: bool, log: Log | None
) -> None:
    """Decode and append the images not done yet, chunk by chunk (`workers` > 0: in that many processes)."""
    state.rewind_files()
    total = len(job.split)
    executor: Executor | None = ProcessPoolExecutor(max_workers=workers) if workers > 0 else None
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=state.done, unit="img", desc=f"cache {job.split.name}", dynamic_ncols=True)
    try:
        with open(state.images_path, "ab") as img_fh, open(state.records_path, "ab") as rec_fh:
            while state.done < total:
                lo, hi = state.done, min(state.done + chunk_size, total)
                _append_chunk(job, lo, hi, _decode_chunk(job, lo, hi, executor, workers), img_fh, rec_fh, state, log)
                if bar is not None:
                    bar.update(hi - lo)
    finally:
        if bar is not None:
            bar.close()
        if executor is not None:
            executor.shutdown(cancel_futures=True)


def _publish(job: _Job, state: _Progress) -> dict[str, Any]:
    """Write the index and metadata, then swap the partial folder in place of the published split."""
    records = np.fromfile(state.records_path, dtype=np.int64).reshape(-1, NUM_FIELDS)
    np.save(job.partial / INDEX_FILE, records, allow_pickle=False)
    meta = job.meta(records, state.skipped, state.image_bytes)
    atomic_write_json(job.partial / META_FILE, meta)
    state.finish()
    fsync_dir(job.partial)
    swap_in_folder(job.partial, job.final)
    return meta


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
    log: Log | None = None,
    max_short_side: int | None = None,
) -> PrepareReport:
    """Write (or finish writing) the cache of one split; returns what was done.

    Images are resized to `short_side` (evaluation splits), or, with `max_short_side` given, kept at their
    own resolution with the short side capped there (training splits; 0 = no cap).
    `root` makes stored source paths relative (so a moved dataset folder stays valid). `workers` > 0
    decodes in that many processes. An up-to-date published cache is left alone unless `overwrite`.
    """
    started = time.perf_counter()
    job = _Job.describe(split, cache_dir, dataset, root, short_side, max_short_side)
    published = None if overwrite else job.published_meta()
    if published is not None:
        return PrepareReport(
            split.name,
            job.final,
            int(published["count"]),
            list(published["skipped"]),
            int(published["total_bytes"]),
            time.perf_counter() - started,
            up_to_date=True,
        )

    job.cache_dir.mkdir(parents=True, exist_ok=True)
    state = _Progress.load_or_start(job.partial, job.fingerprint())
    resumed_from = state.done
    if resumed_from and log:
        log(f"resuming split {split.name!r} at image {resumed_from:,} of {len(split):,}")
    _write_remaining(job, state, chunk_size, workers, show_progress, log)
    meta = _publish(job, state)
    return PrepareReport(
        split.name,
        job.final,
        meta["count"],
        state.skipped,
        state.image_bytes,
        time.perf_counter() - started,
        resumed_from=resumed_from,
    )
