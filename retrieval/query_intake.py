"""One intake for query images: the JSON API, the web UI and `retrieval search` take them in here.

A query arrives as encoded bytes (an upload), a file (a path on disk, or Gradio's copy of an upload)
or base64 text (JSON, a pasted `data:` URL). Each is bounded before it costs memory, by one set of
limits (`QueryLimits`) and one size rule:
- encoded size: at most `max_bytes` bytes, checked before anything is read or decoded (an upload's
  length, a file's size on disk, or the byte count base64 text's length stands for: 3 per 4 characters);
- header: pixel count and aspect ratio (retrieval.images.size_problem), before any pixel is decoded;
- then decoding to an upright RGB image (retrieval.images.open_image).

Every refusal is a `QueryRejected`: a stable code and HTTP status from `REFUSALS` plus a one-line
reason. The API answers it as {"error": code, "message": "<subject>: <reason>"}, the UI as its status
line "Cannot use <subject>: <reason>.", and the command line as `error: <path>: <reason>`. URLs are
refused, never fetched. Pillow and NumPy only: the torch-free serving path imports it.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError

from retrieval.errors import InputError
from retrieval.images import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    file_problem,
    open_image,
    size_problem,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 25 * 1024 * 1024
DATA_URL_HEADER_MAX = 256  # `data:<media type>;<params>;base64,` is looked for in this many characters
BASE64_TAIL = 16  # trailing whitespace (a newline, CRLF) in this many last characters is not counted as data


@dataclass(frozen=True)
class QueryLimits:
    """What one query image may cost: encoded bytes, decoded pixels, and long side / short side."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO

    @property
    def max_base64_chars(self) -> int:
        """Longest base64 text (without a data: URL header) that can hold `max_bytes` bytes."""
        return 4 * -(-int(self.max_bytes) // 3)

    def size_text(self) -> str:
        """The byte limit for messages: "26,214,400 bytes (25 MB)"."""
        n = int(self.max_bytes)
        if n < 1024:
            return f"{n:,} bytes"
        return f"{n:,} bytes ({n / 2**20:.3g} MB)" if n >= 2**20 else f"{n:,} bytes ({n / 1024:.3g} KB)"


@dataclass(frozen=True)
class Refusal:
    """One kind of refused query: its stable code, its HTTP status, and what it covers."""

    code: str
    status: int
    meaning: str


REFUSALS: dict[str, Refusal] = {
    r.code: r
    for r in (
        Refusal(
            "bad_request",
            400,
            "no image bytes: an empty upload, a path that is not a readable file, text that "
            "is not base64, or a URL (never fetched)",
        ),
        Refusal("too_large", 413, "over the upload size limit (encoded bytes) or the pixel limit (from the header)"),
        Refusal("not_an_image", 415, "not an image format that can be read (JPEG, PNG, WebP, GIF, BMP, TIFF)"),
        Refusal(
            "undecodable_image",
            422,
            "an image that cannot be decoded (corrupt or truncated) or used (zero size, an extreme aspect ratio)",
        ),
    )
}

_SIZE_PROBLEM_CODES = {"pixels": "too_large", "aspect": "undecodable_image", "empty": "undecodable_image"}
_FETCHABLE_URL = re.compile(r"^\s*(https?|ftp|file)://", re.IGNORECASE)
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)


class QueryRejected(InputError):
    """A query image that is refused: `code` and `status` from REFUSALS, and a one-line `reason` that
    does not name the image (`subject` does: "the upload", a file name, a path)."""

    def __init__(self, code: str, reason: str, subject: str = "the image") -> None:
        self.refusal = REFUSALS[code]
        self.reason, self.subject = reason, subject
        super().__init__(f"{subject}: {reason}")

    @property
    def code(self) -> str:
        return self.refusal.code

    @property
    def status(self) -> int:
        return self.refusal.status


@dataclass(frozen=True)
class QueryIntake:
    """Reads, bounds and decodes query images under one set of limits (see the module docstring)."""

    limits: QueryLimits = field(default_factory=QueryLimits)

    # --- encoded bytes -------------------------------------------------------------------------------

    def check_encoded_size(self, n_bytes: int, subject: str = "the image") -> None:
        """Refuse (413) an encoded image of `n_bytes` over the limit: call it as soon as the size is known."""
        if n_bytes > self.limits.max_bytes:
            raise QueryRejected(
                "too_large", f"{n_bytes:,} bytes is over the upload size limit of {self.limits.size_text()}", subject
            )

    def check_bytes(self, data: bytes, subject: str = "the image") -> None:
        """Refuse empty (400) or oversized (413) encoded bytes."""
        if not data:
            raise QueryRejected("bad_request", "empty (0 bytes)", subject)
        self.check_encoded_size(len(data), subject)

    # --- files ---------------------------------------------------------------------------------------

    def read_file(self, path: str | os.PathLike[str], subject: str | None = None) -> bytes:
        """A query file's bytes: a regular file (a FIFO is never opened), size-checked before it is read."""
        subject = str(path) if subject is None else subject
        problem = file_problem(path)
        if problem is not None:
            raise QueryRejected("bad_request", problem, subject)
        try:
            self.check_encoded_size(os.stat(path).st_size, subject)
            with open(path, "rb") as f:
                data = f.read(self.limits.max_bytes + 1)  # a file that grew since: still bounded
        except OSError as exc:
            raise QueryRejected(
                "bad_request", f"cannot be read ({exc.strerror or type(exc).__name__})", subject
            ) from None
        self.check_bytes(data, subject)
        return data

    # --- base64 text ---------------------------------------------------------------------------------

    def base64_bytes(self, text: Any, subject: str = "the image") -> bytes:
        """Base64 text or a `data:...;base64,` URL -> bytes, its length checked before decoding. URLs of
        other schemes are refused, never fetched."""
        if not isinstance(text, str):
            raise QueryRejected("bad_request", "must be base64-encoded image bytes or a data: URL", subject)
        self.refuse_url(text, subject)
        header = _DATA_URL.match(text[:DATA_URL_HEADER_MAX])
        start = header.end() if header else 0
        self.check_encoded_size(_base64_size(text, start), subject)  # before any copy or decoding
        try:
            data = base64.b64decode(text[start:].strip(), validate=True)
        except (binascii.Error, ValueError):
            raise QueryRejected("bad_request", "not valid base64 image data", subject) from None
        self.check_bytes(data, subject)
        return data

    def refuse_url(self, text: str, subject: str = "the image") -> None:
        """Refuse (400) text that is a URL to fetch (http, https, ftp, file): it is never fetched."""
        if _FETCHABLE_URL.match(text[:DATA_URL_HEADER_MAX]):
            raise QueryRejected("bad_request", "a URL: the server never fetches URLs; send the image's bytes", subject)

    # --- decoding ------------------------------------------------------------------------------------

    def check_header(self, data: bytes, subject: str = "the image") -> tuple[int, int]:
        """(width, height) from the header alone, or a refusal: not an image (415), too many pixels or a
        decompression bomb (413), a corrupt header, zero size or an extreme aspect ratio (422)."""
        try:
            with Image.open(io.BytesIO(data)) as probe:  # reads the header only
                width, height = probe.size
        except UnidentifiedImageError:
            raise QueryRejected(
                "not_an_image",
                "not an image file in a format that can be read (JPEG, PNG, WebP, GIF, BMP, TIFF)",
                subject,
            ) from None
        except Image.DecompressionBombError as exc:
            raise QueryRejected("too_large", f"refused as a decompression bomb ({exc})", subject) from None
        except Exception as exc:
            raise QueryRejected("undecodable_image", f"corrupt image header ({type(exc).__name__})", subject) from None
        problem = size_problem(width, height, self.limits.max_pixels, self.limits.max_aspect_ratio)
        if problem is not None:
            kind, reason = problem
            raise QueryRejected(_SIZE_PROBLEM_CODES[kind], reason, subject)
        return width, height

    def decode(self, data: bytes, subject: str = "the image") -> Image.Image:
        """Encoded bytes -> upright RGB image, after the size and header checks; never another exception."""
        self.check_bytes(data, subject)
        self.check_header(data, subject)
        try:
            return open_image(data, max_pixels=self.limits.max_pixels, max_aspect_ratio=self.limits.max_aspect_ratio)
        except ImageLoadError as exc:
            raise QueryRejected("undecodable_image", str(exc).removeprefix("<bytes>: "), subject) from None
        except Exception as exc:
            log.exception("unexpected error decoding %s", subject)
            raise QueryRejected("undecodable_image", f"could not be decoded ({type(exc).__name__})", subject) from None

    def open_file(self, path: str | os.PathLike[str], subject: str | None = None) -> Image.Image:
        """A query file -> upright RGB image (`read_file`, then `decode`)."""
        subject = str(path) if subject is None else subject
        return self.decode(self.read_file(path, subject), subject)


def _base64_size(text: str, start: int) -> int:
    """How many bytes the base64 text `text[start:]` decodes to, from its length (exact for valid base64)."""
    tail = text[max(start, len(text) - BASE64_TAIL) :]
    data_tail = tail.rstrip()
    end = len(text) - (len(tail) - len(data_tail))
    padding = min(2, len(data_tail) - len(data_tail.rstrip("=")))
    return max(0, (end - start) * 3 // 4 - padding)
