"""The decoded-image cache: exact pixels, resumable writes, corrupt images, and the training loader reading it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.data.base import Split
from retrieval.data.cache import writer
from retrieval.data.cache.layout import CACHE_FORMAT_VERSION, CacheError, default_cache_dir
from retrieval.data.cache.loader import CacheTrainLoader
from retrieval.data.cache.reader import CachedSplit, has_cache
from retrieval.data.cache.writer import prepare_split
from retrieval.images import open_image
from retrieval.preprocess import resize_short_side

SHORT = 32


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth colour field + noise: compresses like a photo, differs at every pixel."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 3) % 256], axis=-1)
    return np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def _write_split(folder: Path, n: int = 12, corrupt: tuple[int, ...] = (), seed: int = 0) -> Split:
    """n images of mixed size/format/mode, labels i // 3; indices in `corrupt` are broken files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    shapes = [(48, 64), (70, 40), (40, 40), (33, 90), (64, 48), (41, 57)]
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        arr = _photo(rng, h, w)
        kind = i % 4
        if i in corrupt:
            path = folder / f"img{i:03d}.jpg"
            if i % 2:
                path.write_bytes(b"this is not an image")
            else:  # a JPEG cut in half
                Image.fromarray(arr).save(path, quality=90)
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
        elif kind == 0:
            path = folder / f"img{i:03d}.jpg"
            Image.fromarray(arr).save(path, quality=90)
        elif kind == 1:
            path = folder / f"img{i:03d}.png"
            Image.fromarray(arr).save(path)
        elif kind == 2:  # greyscale JPEG
            path = folder / f"img{i:03d}.jpg"
            Image.fromarray(arr[..., 0]).save(path, quality=85)
        else:  # RGBA PNG (composited on white by open_image)
            path = folder / f"img{i:03d}.png"
            alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
            Image.fromarray(np.concatenate([arr, alpha], axis=-1), "RGBA").save(path)
        paths.append(path)
        labels.append(100 + i // 3)
    return Split("train", tuple(paths), tuple(labels))


def _expected_chw(path: Path, short: int = SHORT) -> np.ndarray:
    return np.asarray(resize_short_side(open_image(path), short)).transpose(2, 0, 1)


class ListSampler:
    """A fixed list of batches with the sampler protocol (set_epoch, len)."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches, self.epochs = batches, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):  # noqa: ANN204
        return iter([list(b) for b in self.batches])


def test_round_trip_pixels_equal_decoded_source_after_the_same_resize(tmp_path: Path) -> None:
    split = _write_split(tmp_path / "images")
    out = tmp_path / "cache"
    report = prepare_split(split, out, dataset="folder", root=tmp_path, short_side=SHORT, chunk_size=5, show_progress=False)
    assert report.count == len(split) and report.skipped == [] and not report.up_to_date
    assert has_cache(out, "train") and has_cache(out, "train", split)

    cached = CachedSplit(out, "train")
    assert len(cached) == len(split)
    for r in range(len(cached)):
        i = int(cached.split_indices[r])
        assert i == r
        expected = _expected_chw(split.paths[i])
        got = cached.image_chw(r)
        assert min(got.shape[1:]) == SHORT
        np.testing.assert_array_equal(got, expected)
        assert int(cached.labels[r]) == split.labels[i]

    meta = json.loads((out / "train" / "meta.json").read_text())
    assert meta["format_version"] == CACHE_FORMAT_VERSION
    assert (meta["dataset"], meta["split"], meta["short_side"], meta["count"], meta["num_skipped"]) == (
        "folder", "train", SHORT, len(split), 0)
    assert meta["sources"]["paths"][0] == "images/img000.jpg"  # relative to the dataset root
    assert meta["sources"]["sizes"][0] == split.paths[0].stat().st_size
    # Variable-size storage: exactly the bytes of the images, no padding.
    assert meta["total_bytes"] == sum(3 * int(h) * int(w) for h, w in zip(cached.heights, cached.widths))
    assert not any(p.name.startswith(".") for p in out.iterdir()), "no partial/old folders left behind"


def test_second_prepare_is_a_no_op_and_a_changed_source_is_detected(tmp_path: Path) -> None:
    split = _write_split(tmp_path / "images", n=6)
    out = tmp_path / "cache"
    prepare_split(split, out, dataset="folder", root=tmp_path, short_side=SHORT, show_progress=False)
    again = prepare_split(split, out, dataset="folder", root=tmp_path, short_side=SHORT, show_progress=False)
    assert again.up_to_date

    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(split.paths[0], quality=90)  # edit a source image
    with pytest.raises(CacheError, match="img000.jpg changed"):
        CachedSplit(out, "train").check_matches(split)
    rebuilt = prepare_split(split, out, dataset="folder", root=tmp_path, short_side=SHORT, show_progress=False)
    assert not rebuilt.up_to_date
    np.testing.assert_array_equal(CachedSplit(out, "train").image_chw(0), np.zeros((3, SHORT, SHORT), np.uint8))

    # Moving the dataset folder together with its cache keeps the cache valid.
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    tmp_path.rename(moved)
    try:
        moved_split = Split("train", tuple(moved / p.relative_to(tmp_path) for p in split.paths), split.labels)
        assert has_cache(moved / "cache", "train", moved_split)
        CachedSplit(moved / "cache", "train").check_matches(moved_split)
    finally:
        moved.rename(tmp_path)

    other = Split("train", split.paths[:4], split.labels[:4])
    assert not has_cache(out, "train", other)
    assert not has_cache(out, "test") and not has_cache(None, "train")
    assert default_cache_dir(tmp_path) == tmp_path / ".metrix-cache"


def test_interrupted_prepare_resumes_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    split = _write_split(tmp_path / "images", n=12)
    reference = tmp_path / "reference"
    prepare_split(split, reference, dataset="folder", short_side=SHORT, show_progress=False)

    real = writer.load_resized
    calls: list[str] = []

    def crash_after_seven(path: str, short_side: int) -> np.ndarray:
        if len(calls) == 7:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the third chunk
        calls.append(path)
        return real(path, short_side)

    out = tmp_path / "cache"
    monkeypatch.setattr(writer, "load_resized", crash_after_seven)
    with pytest.raises(KeyboardInterrupt):
        prepare_split(split, out, dataset="folder", short_side=SHORT, chunk_size=3, show_progress=False)
    assert not has_cache(out, "train"), "an interrupted split must not be published"
    progress = json.loads((out / ".train.partial" / "progress.json").read_text())
    assert progress["done"] == 6  # two complete chunks of 3

    calls.clear()
    monkeypatch.setattr(writer, "load_resized", lambda p, s: (calls.append(p), real(p, s))[1])
    report = prepare_split(split, out, dataset="folder", short_side=SHORT, chunk_size=3, show_progress=False)
    assert report.resumed_from == 6
    assert calls == [str(p) for p in split.paths[6:]], "only the unfinished images are decoded again"
    for name in ("images.u8", "index.npy"):
        assert (out / "train" / name).read_bytes() == (reference / "train" / name).read_bytes()


def test_resume_of_a_different_job_starts_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    split = _write_split(tmp_path / "images", n=6)
    out = tmp_path / "cache"
    real = writer.load_resized
    count = [0]

    def crash(path: str, short_side: int) -> np.ndarray:
        count[0] += 1
        if count[0] > 3:
            raise RuntimeError("disk on fire")
        return real(path, short_side)

    monkeypatch.setattr(writer, "load_resized", crash)
    with pytest.raises(RuntimeError):
        prepare_split(split, out, dataset="folder", short_side=SHORT, chunk_size=2, show_progress=False)
    monkeypatch.setattr(writer, "load_resized", real)
    report = prepare_split(split, out, dataset="folder", short_side=SHORT + 8, chunk_size=2, show_progress=False)
    assert report.resumed_from == 0
    assert min(CachedSplit(out, "train").image_chw(0).shape[1:]) == SHORT + 8


def test_corrupt_images_are_reported_skipped_and_labels_stay_aligned(tmp_path: Path) -> None:
    split = _write_split(tmp_path / "images", n=12, corrupt=(4, 7))
    out = tmp_path / "cache"
    logged: list[str] = []
    report = prepare_split(split, out, dataset="folder", short_side=SHORT, chunk_size=5, show_progress=False,
                           log=logged.append)
    assert [s["path"] for s in report.skipped] == [str(split.paths[4]), str(split.paths[7])]
    assert all(s["reason"] for s in report.skipped)
    assert "not an image" in report.skipped[1]["reason"]
    assert any("img004.jpg" in line for line in logged)
    meta = json.loads((out / "train" / "meta.json").read_text())
    assert meta["num_skipped"] == 2 and meta["count"] == 10

    cached = CachedSplit(out, "train")
    kept = [i for i in range(len(split)) if i not in (4, 7)]
    assert cached.split_indices.tolist() == kept
    for r, i in enumerate(kept):
        assert int(cached.labels[r]) == split.labels[i]
        np.testing.assert_array_equal(cached.image_chw(r), _expected_chw(split.paths[i]))

    # A sampler built over the full split may pick a skipped image: it gets a same-class substitute.
    sampler = ListSampler([[3, 4, 5, 6], [7, 8, 0, 11]])
    loader = CacheTrainLoader(out, "train", sampler, image_size=24, device="cpu", seed=0)
    got = [labels.tolist() for _, labels in loader]
    assert got == [[split.labels[i] for i in b] for b in sampler.batches]
    rec = cached.substitute_records([4, 7])
    assert int(cached.labels[rec[0]]) == split.labels[4] and int(cached.labels[rec[1]]) == split.labels[7]
    with pytest.raises(IndexError, match="out of range"):
        cached.substitute_records([12])


def test_train_loader_batches_shapes_labels_and_determinism(tmp_path: Path) -> None:
    split = _write_split(tmp_path / "images", n=12)
    out = tmp_path / "cache"
    prepare_split(split, out, dataset="folder", short_side=SHORT, show_progress=False)
    sampler = ListSampler([[0, 5, 9, 2], [11, 1, 3, 4], [6, 7, 8, 10]])
    loader = CacheTrainLoader(out, "train", sampler, image_size=24, device=torch.device("cpu"), seed=3)
    assert len(loader) == 3

    def epoch(e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader.set_epoch(e)
        return list(loader)

    first = epoch(0)
    assert sampler.epochs == [0]
    for (images, labels), batch in zip(first, sampler.batches):
        assert images.shape == (4, 3, 24, 24) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and labels.tolist() == [split.labels[i] for i in batch]
        assert images.device.type == "cpu"
        # normalised pixel range of ImageNet statistics
        assert images.min() >= (0 - 0.485) / 0.229 - 1e-4 and images.max() <= (1 - 0.406) / 0.225 + 1e-4
    again = epoch(0)
    for (a, _), (b, _) in zip(first, again):
        assert torch.equal(a, b), "same (seed, epoch) must give the same augmentation"
    other = epoch(1)
    assert not torch.equal(first[0][0], other[0][0])
    assert sampler.epochs == [0, 0, 1]

    # Stopping early (max steps per epoch) must not hang or leak the producer thread.
    for step, _ in enumerate(loader):
        if step == 0:
            break

    loader_cl = CacheTrainLoader(out, "train", sampler, image_size=24, device="cpu", seed=3, channels_last=True)
    images, _ = next(iter(loader_cl))
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(images, first[0][0])

    # Copying a batch with several threads (the GPU default) assembles the same batch.
    big = ListSampler([list(range(12)), list(range(11, -1, -1))])
    one = list(CacheTrainLoader(out, "train", big, image_size=24, device="cpu", seed=3, fill_threads=1))
    three = list(CacheTrainLoader(out, "train", big, image_size=24, device="cpu", seed=3, fill_threads=3))
    for (a, la), (b, lb) in zip(one, three):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_missing_cache_error_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="retrieval prepare"):
        CachedSplit(tmp_path / "nowhere", "train")


def test_parallel_prepare_writes_the_same_bytes(tmp_path: Path) -> None:
    split = _write_split(tmp_path / "images", n=8, corrupt=(3,))
    prepare_split(split, tmp_path / "a", dataset="folder", short_side=SHORT, show_progress=False)
    prepare_split(split, tmp_path / "b", dataset="folder", short_side=SHORT, workers=2, chunk_size=3,
                  show_progress=False)
    for name in ("images.u8", "index.npy"):
        assert (tmp_path / "a" / "train" / name).read_bytes() == (tmp_path / "b" / "train" / name).read_bytes()


def test_prepare_command_caches_every_split_of_a_dataset(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from retrieval.cli import app

    root = tmp_path / "folder_ds"
    rng = np.random.default_rng(1)
    for c in range(4):
        (root / f"class{c}").mkdir(parents=True)
        for k in range(3):
            Image.fromarray(_photo(rng, 40 + 4 * k, 52)).save(root / f"class{c}" / f"{k}.jpg", quality=90)
    (root / "class1" / "broken.jpg").write_bytes(b"nope")
    runner = CliRunner(env={"COLUMNS": "400"})
    result = runner.invoke(app, ["prepare", "--dataset", "folder", "--data-root", str(root),
                                 "--short-side", "36", "--workers", "0"])
    assert result.exit_code == 0, result.output
    from retrieval.data import load_dataset

    ds = load_dataset("folder", root)
    cache_dir = root / ".metrix-cache"
    for split in (ds.train, ds.test):
        assert has_cache(cache_dir, split.name, split)
    assert "broken.jpg" in result.output and "--cache" in result.output
    again = runner.invoke(app, ["prepare", "--dataset", "folder", "--data-root", str(root),
                                     "--short-side", "36", "--workers", "0"])
    assert again.exit_code == 0 and "up to date" in again.output


# ---- training images at full resolution -----------------------------------------------------------

def test_training_split_is_stored_at_its_own_resolution_with_the_short_side_capped(tmp_path: Path) -> None:
    split = _write_split(tmp_path / "images", n=6)
    out = tmp_path / "cache"
    prepare_split(split, out, dataset="folder", max_short_side=45, show_progress=False)
    cached = CachedSplit(out, "train")
    assert cached.full_resolution and cached.short_side is None
    for r in range(len(cached)):
        original = open_image(split.paths[int(cached.split_indices[r])])
        expected = original if min(original.size) <= 45 else resize_short_side(original, 45)
        np.testing.assert_array_equal(cached.image_chw(r), np.asarray(expected).transpose(2, 0, 1))
    again = prepare_split(split, out, dataset="folder", max_short_side=45, show_progress=False)
    assert again.up_to_date
    assert not prepare_split(split, out, dataset="folder", max_short_side=40, show_progress=False).up_to_date


def test_cached_training_crops_match_crops_of_the_original_files(tmp_path: Path) -> None:
    """RandomResizedCrop draws a box as a fraction of the image; at the same box, the crop from the cache
    equals the crop the file pipeline (torchvision on the decoded file) takes, within resampling error.
    A cache at a fixed small short side (the old layout) makes small crops visibly blurrier."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from retrieval.data.gpu_augment import crop_resize, pad_batch

    rng = np.random.default_rng(5)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = (folder / "small.jpg", folder / "large.jpg")
    Image.fromarray(_photo(rng, 150, 200)).save(paths[0], quality=95)  # under the cap: stored as decoded
    Image.fromarray(_photo(rng, 300, 400)).save(paths[1], quality=95)  # over the cap: downscaled 2x
    split = Split("train", paths, (0, 1))
    prepare_split(split, tmp_path / "full", dataset="folder", max_short_side=150, show_progress=False)
    prepare_split(split, tmp_path / "old", dataset="folder", short_side=56, show_progress=False)
    full, old = CachedSplit(tmp_path / "full", "train"), CachedSplit(tmp_path / "old", "train")
    size = 48
    boxes = [(0.0, 0.0, 1.0, 1.0), (0.2, 0.3, 0.28, 0.25), (0.4, 0.5, 0.5, 0.45)]  # fractions: top, left, h, w

    def cached_crop(cached: CachedSplit, record: int, box: tuple[float, ...], height: int, width: int) -> np.ndarray:
        img = torch.from_numpy(np.array(cached.image_chw(record)))
        sy, sx = img.shape[1] / height, img.shape[2] / width
        top, left, h, w = box
        padded, _ = pad_batch([img])
        crop = crop_resize(padded, torch.tensor([[top * height * sy, left * width * sx, h * height * sy, w * width * sx]]), size)
        return crop[0].permute(1, 2, 0).numpy()

    for record, path in enumerate(paths):
        original = open_image(path)
        height, width = original.height, original.width
        for box in boxes:
            top, left, h, w = (round(v) for v in (box[0] * height, box[1] * width, box[2] * height, box[3] * width))
            ref = np.asarray(TF.resized_crop(original, top, left, h, w, [size, size], InterpolationMode.BILINEAR),
                             np.float32)
            exact_box = (top / height, left / width, h / height, w / width)
            err_full = np.abs(cached_crop(full, record, exact_box, height, width) - ref).mean()
            err_old = np.abs(cached_crop(old, record, exact_box, height, width) - ref).mean()
            print(f"{path.name} box {box}: mean |diff| full-resolution cache {err_full:.2f}, short side 56 {err_old:.2f}")
            assert err_full < 3.0, f"{path.name} {box}: cached crop differs from the file's by {err_full:.2f} grey levels"
            if box[2] < 0.3:  # a small crop: the downscaled copy has lost the detail the file has
                assert err_old > 2 * err_full
