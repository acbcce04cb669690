"""Training batches from a cached split: a background thread fills reusable (pinned) host buffers,
the device crops, flips and normalises.

Why a thread and pinned buffers: a GPU step eats batches faster than a Python loop copies them;
copying a few batches ahead into page-locked memory lets the host-to-device copy overlap the step.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from retrieval.data.cache.reader import CachedSplit
from retrieval.data.gpu_augment import (
    DEFAULT_RATIO,
    DEFAULT_SCALE,
    TrainAugment,
    derive_seed,
    make_generator,
    paste_padded,
)
from retrieval.data.samplers import SamplerDrivenLoader


class _PinnedSlot:
    """A reusable host buffer for one batch: padded images + (h, w, label, split index) rows."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.images: torch.Tensor | None = None  # flat uint8, grown on demand
        self.info: torch.Tensor | None = None  # (capacity, 4) int64
        self.copy_done: torch.cuda.Event | None = None  # recorded after the H2D copy was queued

    def ensure(self, n_bytes: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Grow the buffers to hold `n_bytes` of images and `batch` info rows; returns (images, info)."""
        if self.images is None or self.images.numel() < n_bytes:
            cap = max(n_bytes, 2 * (0 if self.images is None else self.images.numel()))
            self.images = torch.empty(cap, dtype=torch.uint8, pin_memory=self.pin)
        if self.info is None or self.info.shape[0] < batch:
            self.info = torch.empty(
                (max(batch, 2 * (0 if self.info is None else self.info.shape[0])), 4),
                dtype=torch.int64,
                pin_memory=self.pin,
            )
        return self.images, self.info


def _copy_padded(cached: CachedSplit, records: np.ndarray, batch: np.ndarray, rows: range) -> None:
    """Copy records[rows] into batch[rows] ((B, 3, Hmax, Wmax) view), each followed by its edge row/column."""
    for k in rows:
        paste_padded(batch, k, cached.image_chw(int(records[k])))


def _fill_slot(
    cached: CachedSplit,
    records: np.ndarray,
    slot: _PinnedSlot,
    pool: ThreadPoolExecutor | None = None,
    threads: int = 1,
) -> tuple[int, int, int]:
    """Copy the records' bytes into the slot as a padded (B, 3, Hmax, Wmax) batch.

    With a pool, rows are copied by several threads (NumPy releases the GIL while copying; on a
    cold page cache the copies wait on the disk, and parallel reads hide that latency).
    """
    hs, ws = cached.heights[records], cached.widths[records]
    b, hmax, wmax = len(records), int(hs.max()), int(ws.max())
    images, info_rows = slot.ensure(b * 3 * hmax * wmax, b)
    batch = images[: b * 3 * hmax * wmax].numpy().reshape(b, 3, hmax, wmax)
    if pool is None or threads < 2 or b < 8:
        _copy_padded(cached, records, batch, range(b))
    else:
        list(pool.map(lambda t: _copy_padded(cached, records, batch, range(t, b, threads)), range(threads)))
    info = info_rows[:b].numpy()
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
        device: torch.device,
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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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


class CacheTrainLoader(SamplerDrivenLoader):
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
        device: torch.device | str,
        seed: int = 0,
        prefetch: int = 2,
        channels_last: bool = False,
        fill_threads: int | None = None,
        scale: tuple[float, float] = DEFAULT_SCALE,
        ratio: tuple[float, float] = DEFAULT_RATIO,
    ) -> None:
        self.cached = CachedSplit(cache_dir, split_name)
        self.batch_sampler = batch_sampler
        self.device = device if isinstance(device, torch.device) else torch.device(device)
        self.seed = int(seed)
        self.epoch = 0
        self.prefetch = int(prefetch)
        self.channels_last = channels_last
        self.augment = TrainAugment(image_size, scale=scale, ratio=ratio)
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._slots = [_PinnedSlot(pin) for _ in range(max(1, self.prefetch) + 2)]
        self._stream: _CacheBatchStream | None = None
        # A GPU step eats batches faster than one thread copies them; a CPU needs its cores for the model.
        self._fill_threads = fill_threads if fill_threads is not None else (4 if self.device.type == "cuda" else 1)

    def _open_stream(self, record_batches: Iterator[np.ndarray]) -> _CacheBatchStream:
        if self._stream is not None:  # an earlier iteration was abandoned without being closed
            self._stream.close()
        self._stream = _CacheBatchStream(self.cached, record_batches, self.device, self._slots, self._fill_threads)
        return self._stream

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = make_generator(self.device, derive_seed(self.seed, self.epoch))
        record_batches = (self.cached.substitute_records(list(b)) for b in self.batch_sampler)
        for images, info in self._open_stream(record_batches):
            out = self.augment(images, info[:, :2], gen)
            if self.channels_last:
                out = out.contiguous(memory_format=torch.channels_last)
            yield out, info[:, 2]
