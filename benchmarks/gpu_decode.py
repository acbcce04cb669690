"""Batched JPEG decoding on the device (nvJPEG through torchvision): the input path that
benchmarks/input_pipeline.py measures against the file loader and the decoded-image cache.

Why: Pillow decoding on the CPU delivers ~1.5-2k images/s with 8-16 workers, a fraction of what a
GPU trains on; nvJPEG decodes a batch of JPEGs on the GPU roughly an order of magnitude faster.
Training itself reads files or the cache (retrieval.data.cache), so this stays with the benchmarks.

Routing, per image (a lazy Pillow header read decides, no pixel decoding):
- baseline/progressive RGB or greyscale JPEG without EXIF rotation -> torchvision.io.decode_jpeg,
  batched, on `device` (nvJPEG on CUDA; libjpeg-turbo on CPU);
- anything else (PNG, WebP, CMYK JPEG, EXIF-rotated JPEG, or a JPEG the fast path rejects) ->
  retrieval.images.open_image (Pillow), the same decoder as the rest of the product;
- unreadable files raise ImageLoadError naming the file.
Decoders differ slightly (nvJPEG and libjpeg versions use different IDCT/upsampling), so pixels may
differ from Pillow by a few grey levels; orientation, colour mode and size always match open_image.

torchvision >= 0.29 marks its image decoders deprecated (TorchCodec supersedes them); the warning
is silenced here because the functions still work and the fallback covers their removal.
"""

from __future__ import annotations

import io
import os
import queue
import threading
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from retrieval.data.base import Split
from retrieval.data.samplers import SamplerDrivenLoader
from retrieval.images import DEFAULT_MAX_PIXELS, ImageLoadError, check_size, not_a_file_reason, open_image

_JPEG_MAGIC = b"\xff\xd8\xff"
_EXIF_ORIENTATION = 0x0112


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    reason = not_a_file_reason(path)
    if reason is not None:
        raise ImageLoadError(reason)
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ImageLoadError(f"cannot read image file {path}: {exc}") from exc


def jpeg_fast_path_ok(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """Whether torchvision's JPEG decoder gives what open_image would (RGB/L, upright, within size limits)."""
    if not data.startswith(_JPEG_MAGIC):
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return False
            w, h = img.size
            try:
                check_size("", w, h, max_pixels)
            except ImageLoadError:
                return False  # let open_image produce its error
            return int(img.getexif().get(_EXIF_ORIENTATION, 1)) == 1
    except Exception:  # noqa: BLE001 - an unreadable header goes to open_image, which names the problem
        return False


def _pillow_decode(data: bytes, name: str, device: torch.device) -> torch.Tensor:
    try:
        img = open_image(data)
    except ImageLoadError as exc:
        raise ImageLoadError(f"{name}: {exc}") from exc
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(device)


def _torchvision_decode(blobs: list[bytes], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    return list(out)


def decode_images(
    blobs: Sequence[bytes],
    device: torch.device | str = "cpu",
    names: Sequence[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fast_path: Sequence[bool] | None = None,
) -> list[torch.Tensor]:
    """Decode encoded images into (3, h, w) uint8 RGB tensors on `device`, JPEGs in one batched call.

    `names` (e.g. file paths) only label errors. `fast_path`: precomputed `jpeg_fast_path_ok` flags
    (a loader computes them in its reader threads). Raises ImageLoadError for an unreadable image.
    """
    device = torch.device(device)
    names = list(names) if names is not None else [f"image {i}" for i in range(len(blobs))]
    out: list[torch.Tensor | None] = [None] * len(blobs)
    if fast_path is None:
        fast_path = [jpeg_fast_path_ok(b, max_pixels) for b in blobs]
    fast = [i for i, ok in enumerate(fast_path) if ok]
    if fast:
        try:
            decoded = _torchvision_decode([blobs[i] for i in fast], device)
            for i, t in zip(fast, decoded):
                out[i] = t
        except RuntimeError:
            for i in fast:  # one bad file fails the whole batch; retry one by one
                try:
                    out[i] = _torchvision_decode([blobs[i]], device)[0]
                except RuntimeError:
                    pass
    for i, t in enumerate(out):
        if t is None or t.dim() != 3 or t.shape[0] != 3:
            out[i] = _pillow_decode(blobs[i], names[i], device)
    return out  # type: ignore[return-value]


def decode_paths(paths: Sequence[str | os.PathLike[str]], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Read and decode files (see decode_images)."""
    return decode_images([read_bytes(p) for p in paths], device, names=[str(p) for p in paths])


def _read_and_probe(path: str | os.PathLike[str]) -> tuple[bytes, bool]:
    data = read_bytes(path)
    return data, jpeg_fast_path_ok(data)


class DecodeTrainLoader(SamplerDrivenLoader):
    """Training batches straight from image files: bytes read by CPU threads, decoded and augmented on `device`.

    Same interface and output as retrieval.data.cache.loader.CacheTrainLoader (`(images, labels)`,
    `set_epoch`, `len`), for runs without a cache. On CUDA, JPEGs decode with nvJPEG; on a CPU the
    same code decodes with libjpeg-turbo/Pillow in `threads` threads.
    """

    def __init__(
        self,
        split: Split,
        batch_sampler: Iterable[Sequence[int]],
        image_size: int,
        device: torch.device | str,
        seed: int = 0,
        threads: int = 4,
        prefetch: int = 2,
        channels_last: bool = False,
        batched_decode: bool | None = None,
    ) -> None:
        """batched_decode: decode each batch in one call on `device` (default: on CUDA, where nvJPEG
        batches pay off); otherwise the batch is split over `threads` CPU threads."""
        from retrieval.data.gpu_augment import TrainAugment

        self.split = split
        self.batch_sampler = batch_sampler
        self.device = torch.device(device)
        self.seed = int(seed)
        self.epoch = 0
        self.threads = max(1, int(threads))
        self.prefetch = max(1, int(prefetch))
        self.channels_last = channels_last
        self.augment = TrainAugment(image_size)
        self.labels = torch.as_tensor(np.asarray(split.labels, dtype=np.int64))
        self.batched_decode = self.device.type == "cuda" if batched_decode is None else bool(batched_decode)

    def _decode_batch(self, pool: ThreadPoolExecutor, indices: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        paths = [self.split.paths[i] for i in indices]
        if self.batched_decode:
            read = list(pool.map(_read_and_probe, paths))
            images = decode_images([b for b, _ in read], self.device, names=[str(p) for p in paths],
                                   fast_path=[ok for _, ok in read])
        else:  # split the batch over the threads; decoders release the GIL
            chunks = [paths[k :: self.threads] for k in range(self.threads)]
            parts = list(pool.map(lambda ps: decode_paths(ps, self.device), chunks))
            images = [None] * len(paths)
            for k, part in enumerate(parts):
                images[k :: self.threads] = part
        labels = self.labels[torch.as_tensor(indices, dtype=torch.int64)]
        return images, labels  # type: ignore[return-value]

    def _next_batch(self, pool: ThreadPoolExecutor, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode, pad and move one batch (runs in the producer thread, ahead of the training step)."""
        from retrieval.data.gpu_augment import pad_batch, to_device

        images, labels = self._decode_batch(pool, indices)
        padded, sizes = pad_batch(images)
        return padded, sizes, to_device(labels, self.device)

    def __iter__(self):  # noqa: ANN204
        from retrieval.data.gpu_augment import derive_seed, make_generator

        gen = make_generator(self.device, derive_seed(self.seed, self.epoch))
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def produce() -> None:
            try:
                with ThreadPoolExecutor(self.threads) as pool:
                    for batch in self.batch_sampler:
                        if stop.is_set():
                            return
                        ready.put(self._next_batch(pool, list(batch)))
                ready.put(done)
            except BaseException as exc:  # surfaced in the consuming thread
                ready.put(exc)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                padded, sizes, labels = item
                out = self.augment(padded, sizes, gen)
                if self.channels_last:
                    out = out.contiguous(memory_format=torch.channels_last)
                yield out, labels
        finally:
            stop.set()
            while thread.is_alive():  # drain so a blocked producer can see `stop`
                try:
                    ready.get(timeout=0.1)
                except queue.Empty:
                    pass
