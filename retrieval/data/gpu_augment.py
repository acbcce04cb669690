"""Training augmentation applied to a whole batch on the device: RandomResizedCrop, flip, normalise.

Why on the device: a ResNet-50 step on a modern GPU consumes thousands of images per second, more
than CPU workers can crop and resize. Here the CPU only copies bytes; every per-pixel operation is
one batched kernel on the same device as the model, and random parameters come from a device
`torch.Generator`, so nothing forces a host-device sync.

Batch convention (`pad_batch` builds it): `images: (B, 3, Hmax, Wmax) uint8`, where sample b holds
its real pixels in `[:, :h_b, :w_b]` and, when padded, a copy of its last row/column just outside
them; `sizes: (B, 2) int64` holds each `(h_b, w_b)`. The edge copy makes bilinear sampling at the
border behave exactly like an unpadded image (border clamp), so the crop only ever sees real pixels.

Resampling: crops are resized with `torchvision.ops.roi_align(aligned=True, sampling_ratio=-1)`:
one kernel for the whole batch with per-sample boxes. It uses the same half-pixel geometry as
Pillow/torchvision. Upscaling is plain bilinear (as Pillow's bilinear); when downscaling by r it
averages a ceil(r) x ceil(r) grid of bilinear samples per output pixel, a box-style antialias,
where Pillow's bilinear uses a triangle filter of support r. The two differ by a few grey levels
on fine texture (see tests); the distribution of crops is exactly torchvision's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision.ops import roi_align

from retrieval.config import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_SCALE: tuple[float, float] = (0.08, 1.0)
DEFAULT_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)


def derive_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for (seed, epoch), so consecutive epochs get unrelated streams."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def make_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A generator living on `device` (draws differ between CPU and CUDA generators; each is deterministic)."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(seed)
    return gen


def pad_batch(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (3, h, w) uint8 images on one device -> padded (B, 3, Hmax, Wmax) + sizes (B, 2) int64.

    Each image is followed by a copy of its last row and column (see module docstring).
    """
    if not images:
        raise ValueError("pad_batch needs at least one image")
    device = images[0].device
    hs = [int(im.shape[-2]) for im in images]
    ws = [int(im.shape[-1]) for im in images]
    hmax, wmax = max(hs), max(ws)
    out = torch.zeros((len(images), 3, hmax, wmax), dtype=images[0].dtype, device=device)
    for b, im in enumerate(images):
        if im.dim() != 3 or im.shape[0] != 3:
            raise ValueError(f"image {b} has shape {tuple(im.shape)}; expected (3, h, w)")
        paste_padded(out, b, im)
    return out, to_device(torch.tensor(list(zip(hs, ws)), dtype=torch.int64), device)


def paste_padded(batch: Any, b: int, image: Any) -> None:
    """Write a (3, h, w) image into sample b of a padded (B, 3, Hmax, Wmax) batch, followed by a copy of
    its last row and column (see module docstring); tensors and NumPy arrays alike (hence Any: the type
    checker cannot express "a tensor with a tensor, an array with an array")."""
    h, w = image.shape[1], image.shape[2]
    hmax, wmax = batch.shape[2], batch.shape[3]
    batch[b, :, :h, :w] = image
    if w < wmax:
        batch[b, :, :h, w] = image[:, :, w - 1]
    if h < hmax:
        batch[b, :, h, :w] = image[:, h - 1, :]
        if w < wmax:
            batch[b, :, h, w] = image[:, h - 1, w - 1]


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without stalling the host: a pageable CUDA copy would wait for the stream to drain."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def sample_crop_boxes(
    sizes: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    tries: int = 10,
) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for every sample at once.

    sizes: (B, 2) int64 (h, w) on the generator's device. Returns (B, 4) int64 (top, left, h, w).
    Same algorithm: up to `tries` draws of (area fraction ~ U(scale), log-aspect ~ U(log ratio)); the
    first draw that fits wins and its offset is uniform; otherwise the centre crop clamped to `ratio`.
    All tries are drawn for all samples (fixed-shape work, no data-dependent control flow).
    """
    device = sizes.device
    n = sizes.shape[0]
    height = sizes[:, 0].to(torch.float64)
    width = sizes[:, 1].to(torch.float64)
    area = (height * width)[:, None]
    log_lo, log_hi = float(np.log(ratio[0])), float(np.log(ratio[1]))

    u = torch.rand((n, max(tries, 1), 4), generator=generator, device=device, dtype=torch.float32).to(torch.float64)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w_try = torch.round(torch.sqrt(target_area * aspect))
    h_try = torch.round(torch.sqrt(target_area / aspect))
    fits = (w_try > 0) & (w_try <= width[:, None]) & (h_try > 0) & (h_try <= height[:, None])
    if tries <= 0:
        fits = torch.zeros_like(fits)
    any_fit = fits.any(dim=1)
    first = torch.argmax(fits.to(torch.int8), dim=1, keepdim=True)  # index of the first True (0 if none)
    h_rand = h_try.gather(1, first).squeeze(1)
    w_rand = w_try.gather(1, first).squeeze(1)
    u_top = u[..., 2].gather(1, first).squeeze(1)
    u_left = u[..., 3].gather(1, first).squeeze(1)
    top_rand = torch.floor(u_top * (height - h_rand + 1)).clamp(max=height - h_rand)
    left_rand = torch.floor(u_left * (width - w_rand + 1)).clamp(max=width - w_rand)

    # Fallback: centre crop, clamped to the ratio range (torchvision's exact rule).
    in_ratio = width / height
    too_tall = in_ratio < min(ratio)
    too_wide = in_ratio > max(ratio)
    w_fb = torch.where(too_wide, torch.round(height * max(ratio)), width)
    h_fb = torch.where(too_tall, torch.round(width / min(ratio)), height)
    top_fb = torch.div(height - h_fb, 2, rounding_mode="floor")
    left_fb = torch.div(width - w_fb, 2, rounding_mode="floor")

    top = torch.where(any_fit, top_rand, top_fb)
    left = torch.where(any_fit, left_rand, left_fb)
    h = torch.where(any_fit, h_rand, h_fb)
    w = torch.where(any_fit, w_rand, w_fb)
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, out_size: int) -> torch.Tensor:
    """Crop each sample's box and resize it to out_size x out_size in one kernel.

    images: (B, 3, H, W) uint8 or float (padded batch); boxes: (B, 4) (top, left, h, w) in pixels,
    integer or fractional. Returns (B, 3, out_size, out_size) float32 on the 0..255 scale.
    """
    n = images.shape[0]
    boxes = boxes.to(device=images.device, dtype=torch.float32)
    top, left, h, w = boxes.unbind(1)
    batch_index = torch.arange(n, device=images.device, dtype=torch.float32)
    rois = torch.stack([batch_index, left, top, left + w, top + h], dim=1)
    src = images if images.dtype == torch.float32 else images.to(torch.float32)
    return roi_align(src, rois, output_size=(out_size, out_size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


class BatchNormalize:
    """(x / 255 - mean) / std on a (B, 3, S, S) float batch, as one fused affine op."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device not in self._cache:
            scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], dtype=torch.float32, device=x.device)
            shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)], dtype=torch.float32, device=x.device)
            self._cache[x.device] = (scale.view(1, 3, 1, 1), shift.view(1, 3, 1, 1))
        scale, shift = self._cache[x.device]
        return torch.addcmul(shift, x, scale)


class TrainAugment:
    """RandomResizedCrop(image_size, scale, ratio) + RandomHorizontalFlip(flip_p) + normalise, per sample.

    `__call__(images, sizes, generator) -> (B, 3, S, S) float32 normalised` on the images' device.
    """

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float] = DEFAULT_SCALE,
        ratio: tuple[float, float] = DEFAULT_RATIO,
        flip_p: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.image_size = int(image_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_p = float(flip_p)
        self.normalize = BatchNormalize(mean, std)

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        boxes = sample_crop_boxes(sizes, generator, self.scale, self.ratio)
        flip = torch.rand((images.shape[0],), generator=generator, device=images.device) < self.flip_p
        out = crop_resize(images, boxes, self.image_size)
        out = torch.where(flip.view(-1, 1, 1, 1), out.flip(3), out)
        return self.normalize(out)
