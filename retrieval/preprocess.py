"""Test-time preprocessing in Pillow + NumPy (no torch): Resize(short side) -> CenterCrop -> normalise.

Bit-compatible with torchvision's Resize/CenterCrop on PIL images (both call Pillow's bilinear
resize), so an ONNX deployment sees the same pixels as the torch pipeline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from retrieval.config import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class Preprocessing:
    """The facts an embedder's input depends on; stored in checkpoints, indexes and ONNX metadata."""

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> "Preprocessing":
        return cls(
            image_size=int(raw["image_size"]),  # type: ignore[arg-type]
            resize_size=int(raw["resize_size"]),  # type: ignore[arg-type]
            mean=tuple(float(v) for v in raw["mean"]),  # type: ignore[union-attr,arg-type]
            std=tuple(float(v) for v in raw["std"]),  # type: ignore[union-attr,arg-type]
        )


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """torchvision.transforms.Resize(size) semantics for an int size."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision.transforms.CenterCrop(size) semantics (pads with zeros if the image is smaller)."""
    w, h = img.size
    if w < size or h < size:
        canvas = Image.new("RGB", (max(w, size), max(h, size)))
        canvas.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        img, (w, h) = canvas, canvas.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_chw_float(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """(3, S, S) float32, normalised."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(prep.mean, dtype=np.float32)) / np.asarray(prep.std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess_eval(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """The full test-time pipeline for one RGB image: (3, S, S) float32."""
    return to_chw_float(center_crop(resize_short_side(img, prep.resize_size), prep.image_size), prep)
