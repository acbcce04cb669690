"""Which files count as images when a folder is scanned: dataset folders, galleries, export samples.

Apart from retrieval.images (which decodes) so that listing files imports neither NumPy nor Pillow:
the command line reads these names when it starts.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted; hidden files and folders (".name") are skipped."""
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )  # fmt: skip
