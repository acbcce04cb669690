"""Schemathesis hooks for the API contract test (loaded with SCHEMATHESIS_HOOKS=tests.contract_hooks).

A JSON Schema cannot say "these bytes are a decodable image", so the fuzzer is taught the two image
formats the document names, and draws real images for them: small JPEG, PNG, WebP, GIF, BMP and TIFF
files whose size, colour mode and pixels come from the drawn data.

- `binary` (the multipart `image` part): the file's bytes;
- `image-base64` (the JSON `image`): the same files in base64, bare or as a `data:` URL.

Only the generator learns this: every check runs with its defaults, negative cases still break the
image field (types, patterns), and the server's own answers to broken images (413/415/422) are
covered by tests/test_api.py.

With CONTRACT_REQUEST_COUNT set to a file name, the number of requests sent is written there at exit.
"""

from __future__ import annotations

import atexit
import base64
import io
import os
from pathlib import Path

import schemathesis
from hypothesis import strategies as st
from PIL import Image

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
MODES = ("RGB", "L", "RGBA", "P")
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif",
               "BMP": "image/bmp", "TIFF": "image/tiff"}


def _encode(fmt: str, mode: str, width: int, height: int, seed: bytes) -> tuple[str, bytes]:
    pixels = (seed * (width * height * 4 // max(1, len(seed)) + 1))[: width * height * 3]
    image = Image.frombytes("RGB", (width, height), pixels)
    if mode != "RGB" and not (fmt == "JPEG" and mode in ("RGBA", "P")):
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return fmt, buf.getvalue()


IMAGES = st.builds(_encode, st.sampled_from(FORMATS), st.sampled_from(MODES), st.integers(1, 48),
                   st.integers(1, 48), st.binary(min_size=1, max_size=64))


def _as_text(image: tuple[str, bytes], data_url: bool) -> str:
    fmt, data = image
    text = base64.b64encode(data).decode("ascii")
    return f"data:{MEDIA_TYPES[fmt]};base64,{text}" if data_url else text


schemathesis.openapi.format("binary", IMAGES.map(lambda image: image[1]))
schemathesis.openapi.format("image-base64", st.builds(_as_text, IMAGES, st.booleans()))


_sent = [0]


@schemathesis.hook
def after_call(context: schemathesis.HookContext, case: schemathesis.Case, response: schemathesis.Response) -> None:
    _sent[0] += 1


def _write_count() -> None:
    target = os.environ.get("CONTRACT_REQUEST_COUNT")
    if target:
        Path(target).write_text(str(_sent[0]))


atexit.register(_write_count)
