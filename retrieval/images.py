"""Image decoding that survives what users actually upload.

Handles grayscale, RGBA/LA (composited on white), palette (with transparency), CMYK, 16-bit and
32-bit integer/float modes, and EXIF orientation; refuses corrupt files and decompression bombs with
an error that names the file. Pillow and NumPy only: the torch-free serving path uses it too.

Every path that decodes a user's image (search, UI, index build, prepare, training loaders) goes
through `open_image`, which bounds the work before it is done, from the header alone:
- the decoded image: at most `max_pixels` pixels;
- what the pipelines make of it: each one resizes the short side to a fixed size S, so an image's
  resized size is S^2 times its aspect ratio; a 60000x1 PNG of 1 KB would become 15,360,000x256
  pixels (12 GB as floats). Aspect ratios above `max_aspect_ratio` are refused, which bounds any
  resize to at most that many S x S squares. `resized_size` + `check_resize` guard the resize itself
  for images that did not come from a file.
"""

from __future__ import annotations

import io
import os
import stat

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from retrieval.errors import UserError

DEFAULT_MAX_PIXELS = 64_000_000  # ~ 8000 x 8000; larger inputs are refused before decoding
DEFAULT_MAX_ASPECT_RATIO = 64.0  # long side / short side; a resize to short side S then makes <= 64 S^2 pixels


class ImageLoadError(UserError, ValueError):
    """An image could not be used; the message says which file and why."""


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr8 = ((arr - lo) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


_NOT_REGULAR = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (lambda m: stat.S_ISCHR(m) or stat.S_ISBLK(m), "a device node"),
    (stat.S_ISSOCK, "a socket"),
)


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why `path` cannot be read as an image file, without naming it (callers say which file), or None.

    Checked without opening it: opening a FIFO would block until someone writes to it.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    for is_kind, kind in _NOT_REGULAR:
        if is_kind(mode):
            return f"is {kind}, not an image file"
    return "is not a regular file"


def not_a_file_reason(path: str | os.PathLike[str]) -> str | None:
    """Why `path` cannot be read as an image file (missing, a folder, a FIFO, a device), naming it, or None."""
    problem = file_problem(path)
    if problem is None:
        return None
    if problem == "file not found":
        return f"image file not found: {path}"
    return f"{path}: {problem}" if problem.startswith("cannot") else f"{path} {problem}"


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) after torchvision's Resize(short_side) (int size: the short side becomes `short_side`)."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def size_problem(
    width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
) -> tuple[str, str] | None:
    """(kind, reason) when a size would cost unbounded memory to decode or resize, else None.

    kind: "empty" (zero size), "pixels" (over `max_pixels`) or "aspect" (over `max_aspect_ratio`); the
    reason does not name the image, so each caller can say which one it means."""
    if width <= 0 or height <= 0:
        return "empty", "image has zero size"
    if width * height > max_pixels:
        return "pixels", (
            f"{width}x{height} pixels exceeds the limit of {max_pixels:,}; downscale the image before using it"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        w, h = resized_size(width, height, 256)
        return "aspect", (
            f"{width}x{height} pixels has an aspect ratio of {ratio:,.0f}:1, above the limit of "
            f"{max_aspect_ratio:g}:1 (resizing its short side to 256 px would make {w:,}x{h:,} "
            "pixels); crop it to the part to search for"
        )
    return None


def check_size(
    name: str,
    width: int,
    height: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> None:
    """Refuse, naming the image, sizes whose decoding or short-side resize would cost unbounded memory."""
    problem = size_problem(width, height, max_pixels, max_aspect_ratio)
    if problem is not None:
        raise ImageLoadError(f"{name}: {problem[1]}")


def check_resize(
    width: int, height: int, short_side: int, max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO, name: str = "image"
) -> tuple[int, int]:
    """The resized (w, h), or ImageLoadError when the aspect ratio makes the resize unbounded."""
    check_size(name, width, height, max_pixels=width * height, max_aspect_ratio=max_aspect_ratio)
    return resized_size(width, height, short_side)


def probe_image(
    path: str | os.PathLike[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> str | None:
    """Why `path` cannot be used as an image, judged from its header alone (cheap), or None.

    Catches what open_image refuses before decoding (missing, not a file, not an image, too large,
    too elongated); a file whose pixel data is corrupt passes here and fails in open_image.
    """
    reason = not_a_file_reason(path)
    if reason is not None:
        return reason
    try:
        with Image.open(path) as img:
            check_size(str(path), *img.size, max_pixels, max_aspect_ratio)
    except ImageLoadError as exc:
        return str(exc)
    except UnidentifiedImageError:
        return f"{path}: not an image file Pillow can read"
    except Image.DecompressionBombError as exc:
        return f"{path}: refused as a decompression bomb ({exc})"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"{path}: corrupt or truncated image ({exc})"
    return None


def open_image(
    source: str | os.PathLike[str] | bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> Image.Image:
    """Decode `source` (a path or raw bytes) into an upright RGB image, or raise ImageLoadError.

    The size limits (see the module docstring) are checked on the header, before any pixel is decoded.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes):
        reason = not_a_file_reason(source)
        if reason is not None:
            raise ImageLoadError(reason)
    try:
        fh = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
        with fh:
            with Image.open(fh) as img:
                width, height = img.size
                check_size(name, width, height, max_pixels, max_aspect_ratio)
                img.load()
                return _to_rgb(ImageOps.exif_transpose(img))
    except ImageLoadError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{name}: not an image file Pillow can read") from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{name}: refused as a decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"{name}: corrupt or truncated image ({exc})") from exc
