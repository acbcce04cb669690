"""Batched device augmentation: same crop distribution as torchvision, real pixels only, flips, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from scipy.stats import ks_2samp

from retrieval.config import IMAGENET_MEAN, IMAGENET_STD
from retrieval.data.gpu_augment import (
    BatchNormalize,
    TrainAugment,
    crop_resize,
    derive_seed,
    make_generator,
    pad_batch,
    sample_crop_boxes,
)

N_DRAWS = 20_000


def _torchvision_params(h: int, w: int, n: int, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    img = torch.empty((3, h, w), dtype=torch.uint8)
    return np.array([T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)], dtype=np.float64)


def _ours(h: int, w: int, n: int, seed: int) -> np.ndarray:
    sizes = torch.tensor([[h, w]] * n)
    return sample_crop_boxes(sizes, make_generator("cpu", seed)).numpy().astype(np.float64)


@pytest.mark.parametrize("h, w", [(256, 341), (256, 900), (48, 40)])
def test_crop_scale_aspect_and_position_match_torchvision(h: int, w: int) -> None:
    ref = _torchvision_params(h, w, N_DRAWS, seed=0)  # rows (top, left, h, w)
    ours = _ours(h, w, N_DRAWS, seed=1)
    assert (ours[:, 2] >= 1).all() and (ours[:, 3] >= 1).all()
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= h).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= w).all()

    def stats(p: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "area fraction": p[:, 2] * p[:, 3] / (h * w),
            "log aspect": np.log(p[:, 3] / p[:, 2]),
            "relative top": (p[:, 0] + p[:, 2] / 2) / h,
            "relative left": (p[:, 1] + p[:, 3] / 2) / w,
        }

    # Two-sample KS at alpha = 1e-4 for 20k vs 20k draws: critical statistic 0.0215.
    for name, ref_vals in stats(ref).items():
        ks = ks_2samp(stats(ours)[name], ref_vals)
        assert ks.statistic < 0.0215, f"{name}: KS statistic {ks.statistic:.4f} (p={ks.pvalue:.2g})"
    # The centre-crop fallback happens as often as in torchvision (it matters for odd aspect ratios).
    fallback = sample_crop_boxes(torch.tensor([[h, w]]), make_generator("cpu", 0), tries=0).numpy()[0]
    rate_ref = np.mean((ref == fallback).all(1))
    rate_ours = np.mean((ours == fallback).all(1))
    assert abs(rate_ref - rate_ours) < 0.01 + 0.1 * rate_ref


@pytest.mark.parametrize("h, w", [(100, 400), (400, 100), (120, 130), (1, 50)])
def test_fallback_is_torchvision_centre_crop(h: int, w: int) -> None:
    """With no successful try, the exact torchvision rule applies (checked by forcing zero tries)."""
    boxes = sample_crop_boxes(torch.tensor([[h, w]]), make_generator("cpu", 0), tries=0)[0].tolist()
    in_ratio = w / h
    if in_ratio < 3 / 4:
        cw, ch = w, int(round(w / (3 / 4)))
    elif in_ratio > 4 / 3:
        ch, cw = h, int(round(h * (4 / 3)))
    else:
        cw, ch = w, h
    assert boxes == [(h - ch) // 2, (w - cw) // 2, ch, cw]


def test_crop_resize_sees_only_real_pixels_of_a_padded_batch() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (3, 60, 30), dtype=torch.uint8, generator=g)
    padded, sizes = pad_batch([a, b])
    assert padded.shape == (2, 3, 60, 50) and sizes.tolist() == [[40, 50], [60, 30]]
    dirty = padded.clone()  # garbage beyond each image's edge copy must not matter
    dirty[0, :, 41:, :] = 255
    dirty[1, :, :, 31:] = 255
    boxes = torch.tensor([[0, 0, 40, 50], [5, 2, 55, 28]])  # touching the right/bottom edges
    out = crop_resize(dirty, boxes, 23)
    alone_a = crop_resize(a[None], boxes[:1], 23)
    alone_b = crop_resize(b[None], boxes[1:], 23)
    torch.testing.assert_close(out[0], alone_a[0], atol=1e-3, rtol=0)
    torch.testing.assert_close(out[1], alone_b[0], atol=1e-3, rtol=0)


def test_crop_resize_is_an_exact_copy_at_scale_one_and_close_to_pillow_when_scaling() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:90, 0:120]
    smooth = np.stack([xx * 2, yy * 2, (xx + yy)], -1) + rng.integers(-8, 9, (90, 120, 3))
    arr = np.clip(smooth, 0, 255).astype(np.uint8)
    img = torch.from_numpy(arr.transpose(2, 0, 1).copy())
    padded, _ = pad_batch([img])
    exact = crop_resize(padded, torch.tensor([[7, 11, 32, 32]]), 32)[0]
    assert torch.equal(exact, img[:, 7:39, 11:43].float())

    pil = Image.fromarray(arr)
    for box, size in [((10, 20, 70, 80), 32), ((30, 40, 20, 24), 48)]:  # downscale, upscale
        top, left, h, w = box
        ref = np.asarray(pil.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR), np.float32)
        got = crop_resize(padded, torch.tensor([box]), size)[0].permute(1, 2, 0).numpy()
        assert np.abs(got - ref).mean() < 2.5, "antialiasing differs from Pillow only slightly"


def test_flip_rate_flip_semantics_and_determinism() -> None:
    torch.manual_seed(0)
    n = 4000
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8)
    sizes = torch.tensor([[16, 16]] * n)
    aug = TrainAugment(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # the whole image: isolates the flip
    out = aug(images, sizes, make_generator("cpu", 5))
    plain = BatchNormalize()(images.float())
    flipped = torch.isclose(out, plain.flip(3), atol=1e-4).flatten(1).all(1)
    same = torch.isclose(out, plain, atol=1e-4).flatten(1).all(1)
    assert bool((flipped ^ same).all()), "every sample is either mirrored or untouched"
    assert abs(flipped.float().mean().item() - 0.5) < 0.03

    again = aug(images, sizes, make_generator("cpu", 5))
    assert torch.equal(out, again)
    assert not torch.equal(out, aug(images, sizes, make_generator("cpu", 6)))
    assert derive_seed(1, 0) != derive_seed(1, 1) and derive_seed(1, 0) == derive_seed(1, 0)


def test_normalisation_uses_imagenet_statistics() -> None:
    colour = torch.tensor([10, 128, 250], dtype=torch.uint8)
    images = colour.view(1, 3, 1, 1).expand(2, 3, 37, 29).contiguous()
    out = TrainAugment(20)(images, torch.tensor([[37, 29]] * 2), make_generator("cpu", 0))
    expected = (colour.float() / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert out.shape == (2, 3, 20, 20) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand_as(out), atol=1e-5, rtol=0)


def test_runs_on_cuda_when_available() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the same code is exercised on CPU tensors above")
    sizes = torch.tensor([[256, 341]] * 64, device="cuda")
    images = torch.randint(0, 256, (64, 3, 256, 341), dtype=torch.uint8, device="cuda")
    out = TrainAugment(224)(images, sizes, make_generator("cuda", 0))
    assert out.device.type == "cuda" and out.shape == (64, 3, 224, 224)
    boxes = sample_crop_boxes(torch.tensor([[256, 341]] * N_DRAWS, device="cuda"), make_generator("cuda", 1)).cpu()
    ref = _torchvision_params(256, 341, N_DRAWS, seed=0)
    area = (boxes[:, 2] * boxes[:, 3]).double().numpy() / (256 * 341)
    assert ks_2samp(area, ref[:, 2] * ref[:, 3] / (256 * 341)).statistic < 0.0215
