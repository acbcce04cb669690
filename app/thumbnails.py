"""Gallery thumbnails: the only image files the app lets a browser fetch.

Serving gallery files straight from their dataset folders would expose whatever else lives there
(In-Shop keeps query, gallery and training photos in the same item folders), and Gradio's per-file
allow-list is a linear scan per request. Instead each result is rendered once into a private folder
as a small JPEG named by its gallery index; that folder is the app's single allowed path, so the
server can only ever hand out downscaled copies of gallery images.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from retrieval.atomic import atomic_path
from retrieval.images import ImageLoadError, open_image

DEFAULT_MAX_SIDE = 384


class ThumbnailStore:
    """Lazily renders gallery image `i` to `<folder>/<i>.jpg` (longest side <= max_side)."""

    def __init__(
        self,
        gallery_paths: Sequence[str | os.PathLike[str]],
        folder: str | os.PathLike[str] | None = None,
        max_side: int = DEFAULT_MAX_SIDE,
    ) -> None:
        self.gallery_paths = [Path(p) for p in gallery_paths]
        self.max_side = int(max_side)
        self._owns_folder = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="retrieval-thumbs-")) if folder is None else Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder = self.folder.resolve()
        self._lock = threading.Lock()
        self._missing: set[int] = set()

    def path_for(self, gallery_index: int) -> Path:
        """The thumbnail file of gallery image `gallery_index` (created on first use).

        A gallery file that cannot be read any more (moved, corrupt) gets a grey placeholder, so one
        broken gallery file never breaks a search; `is_placeholder` tells which.
        """
        i = int(gallery_index)
        if not 0 <= i < len(self.gallery_paths):
            raise IndexError(f"gallery index {i} out of range (gallery has {len(self.gallery_paths)} images)")
        target = self.folder / f"{i}.jpg"
        if target.is_file():
            return target
        try:
            img = open_image(self.gallery_paths[i])
            img.thumbnail((self.max_side, self.max_side), Image.BILINEAR)
        except ImageLoadError:
            img = _placeholder(self.max_side)
            with self._lock:
                self._missing.add(i)
        with atomic_path(target) as tmp:
            img.save(tmp, format="JPEG", quality=90)
        return target

    def is_placeholder(self, gallery_index: int) -> bool:
        with self._lock:
            return int(gallery_index) in self._missing

    def cleanup(self) -> None:
        """Remove the folder if this store created it."""
        if self._owns_folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def _placeholder(side: int) -> Image.Image:
    img = Image.new("RGB", (side, side), (200, 200, 200))
    draw = ImageDraw.Draw(img)
    draw.line((0, 0, side, side), fill=(150, 150, 150), width=3)
    draw.line((0, side, side, 0), fill=(150, 150, 150), width=3)
    return img
