"""Batched JPEG decoding with its Pillow fallback: same orientation, mode and (nearly) pixels as open_image."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.data.base import Split
from benchmarks.gpu_decode import DecodeTrainLoader, decode_images, decode_paths, jpeg_fast_path_ok
from retrieval.images import ImageLoadError, open_image


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx * yy) % 256], -1)
    return np.clip(base + rng.integers(-15, 16, (h, w, 3)), 0, 255).astype(np.uint8)


def _encode(img: Image.Image, fmt: str = "JPEG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _pillow_chw(data: bytes) -> np.ndarray:
    return np.asarray(open_image(data)).transpose(2, 0, 1)


def test_torchvision_jpeg_decode_matches_pillow_within_tolerance(monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmarks.gpu_decode as gpu_decode

    data = _encode(Image.fromarray(_photo(75, 100)), quality=90)
    assert jpeg_fast_path_ok(data)
    monkeypatch.setattr(gpu_decode, "_pillow_decode", lambda *a: pytest.fail("JPEG took the Pillow fallback"))
    got = decode_images([data], "cpu")[0]
    monkeypatch.undo()
    ref = _pillow_chw(data)
    assert got.dtype == torch.uint8 and tuple(got.shape) == ref.shape
    diff = np.abs(got.numpy().astype(int) - ref.astype(int))
    assert diff.max() <= 8 and diff.mean() < 1.0  # libjpeg builds may round differently; usually identical


def test_non_jpeg_and_special_jpegs_fall_back_to_pillow_exactly() -> None:
    arr = _photo(40, 60, seed=1)
    rgba = Image.fromarray(np.concatenate([arr, np.full((40, 60, 1), 90, np.uint8)], -1), "RGBA")
    cmyk = Image.fromarray(arr).convert("CMYK")
    rotated = Image.fromarray(arr)
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    blobs = {
        "png": _encode(rgba, "PNG"),
        "cmyk jpeg": _encode(cmyk, quality=90),
        "exif-rotated jpeg": _encode(rotated, quality=90, exif=exif.tobytes()),
        "webp": _encode(Image.fromarray(arr), "WEBP", lossless=True),
    }
    decoded = decode_images(list(blobs.values()), "cpu", names=list(blobs))
    for (name, data), got in zip(blobs.items(), decoded):
        assert not jpeg_fast_path_ok(data), name
        np.testing.assert_array_equal(got.numpy(), _pillow_chw(data), err_msg=name)
    assert decoded[2].shape == (3, 60, 40), "EXIF orientation applied like open_image"


def test_greyscale_jpeg_becomes_rgb_and_batches_keep_order() -> None:
    grey = _encode(Image.fromarray(_photo(30, 50)[..., 0]), quality=90)
    colour = _encode(Image.fromarray(_photo(64, 48, seed=2)), quality=90)
    out = decode_images([colour, grey, colour], "cpu")
    assert [tuple(t.shape) for t in out] == [(3, 64, 48), (3, 30, 50), (3, 64, 48)]
    assert torch.equal(out[1][0], out[1][1]) and torch.equal(out[1][1], out[1][2])
    assert torch.equal(out[0], out[2])


def test_unreadable_file_raises_an_error_naming_it(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    Image.fromarray(_photo(20, 20)).save(good, quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ImageLoadError, match="truncated.jpg"):
        decode_paths([good, truncated], "cpu")
    with pytest.raises(ImageLoadError, match="missing.jpg"):
        decode_paths([tmp_path / "missing.jpg"], "cpu")


class _Batches:
    def __init__(self, batches: list[list[int]]) -> None:
        self.batches, self.epoch = batches, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):  # noqa: ANN204
        return iter(self.batches)


def test_decode_loader_yields_augmented_batches_with_their_labels(tmp_path: Path) -> None:
    paths = []
    for i in range(6):
        p = tmp_path / (f"{i}.jpg" if i % 3 else f"{i}.png")
        Image.fromarray(_photo(40 + 8 * i, 56, seed=i)).save(p)
        paths.append(p)
    split = Split("train", tuple(paths), (7, 7, 8, 8, 9, 9))
    sampler = _Batches([[0, 3, 5], [1, 2, 4]])
    loader = DecodeTrainLoader(split, sampler, image_size=32, device="cpu", seed=0, threads=2)
    loader.set_epoch(2)
    assert sampler.epoch == 2 and len(loader) == 2
    batches = list(loader)
    assert [labels.tolist() for _, labels in batches] == [[7, 8, 9], [7, 8, 9]]
    assert all(images.shape == (3, 3, 32, 32) for images, _ in batches)
    assert torch.equal(batches[0][0], list(loader)[0][0]), "deterministic per (seed, epoch)"
    # The batched route (the one CUDA takes) decodes the same pixels as the threaded CPU route.
    batched = DecodeTrainLoader(split, sampler, image_size=32, device="cpu", seed=0, threads=2, batched_decode=True)
    batched.set_epoch(2)
    for (a, la), (b, lb) in zip(batches, batched):
        assert torch.equal(a, b) and torch.equal(la, lb)
