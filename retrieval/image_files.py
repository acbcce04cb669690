"""Which files count as images when a folder is scanned: dataset folders, galleries, export samples,
and the image files a command names (files and folders mixed).

Apart from retrieval.images (which decodes) so that listing files imports neither NumPy nor Pillow:
the command line reads these names when it starts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted; hidden files and folders (".name") are skipped."""
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )  # fmt: skip


def list_images(sources: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in folders; refuses missing paths."""
    found: list[Path] = []
    for src in sources:
        path = Path(src)
        if path.is_dir():
            inside = image_files(path)
            if not inside:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {path}")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"image or folder not found: {path}")
    return found
