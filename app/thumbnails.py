"""Gallery thumbnails: the only image files the app lets a browser fetch.

Serving gallery files straight from their dataset folders would expose whatever else lives there
(In-Shop keeps query, gallery and training photos in the same item folders), and Gradio's per-file
allow-list is a linear scan per request. Instead each result is rendered once into a private folder
as a small JPEG named by its gallery index; that folder is the app's single allowed path, so the
server can only ever hand out downscaled copies of gallery images.

A served index can be republished while the server runs (app.live_index), and gallery index `i` then
names another image. `VersionedThumbnails` keeps one store per index version, each in its own
sub-folder of the one allowed folder, so a result of version A never shows version B's image `i`;
the few most recent versions are kept, so tiles handed out just before a swap still load.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections import OrderedDict
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
        self.gallery_paths = gallery_paths  # converted to Path per use: a large gallery is not copied
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
            img = open_image(Path(self.gallery_paths[i]))
            img.thumbnail((self.max_side, self.max_side), Image.Resampling.BILINEAR)
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


KEPT_VERSIONS = 3  # the served version and the two before it (tiles of answers given just before a swap)


class VersionedThumbnails:
    """Thumbnail stores per index version, in `<folder>/v-<version id>/`; `folder` is the one allowed path.

    `path_for`, `is_placeholder` and `gallery_paths` answer for the version made current last (the one
    being served), so code written for one ThumbnailStore keeps working."""

    def __init__(
        self, folder: str | os.PathLike[str] | None = None, max_side: int = DEFAULT_MAX_SIDE, keep: int = KEPT_VERSIONS
    ) -> None:
        self._owns_folder = folder is None
        root = Path(tempfile.mkdtemp(prefix="retrieval-thumbs-")) if folder is None else Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        self.folder = root.resolve()
        self.max_side = int(max_side)
        self.keep = max(1, int(keep))
        self._stores: OrderedDict[str, ThumbnailStore] = OrderedDict()  # oldest first
        self._current: str | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_store(cls, store: ThumbnailStore) -> VersionedThumbnails:
        """Versioned stores in the folder (and at the size) of an existing store, which then owns nothing."""
        versioned = cls(store.folder, store.max_side)
        versioned._owns_folder, store._owns_folder = store._owns_folder, False
        return versioned

    def for_version(
        self, version_id: str, gallery_paths: Sequence[str | os.PathLike[str]] | None = None, current: bool = False
    ) -> ThumbnailStore | None:
        """The store of `version_id` (created from `gallery_paths` when new; None when unknown and no paths)."""
        with self._lock:
            store = self._stores.get(version_id)
            if store is None:
                if gallery_paths is None:
                    return None
                safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in version_id)
                store = ThumbnailStore(gallery_paths, self.folder / f"v-{safe}", self.max_side)
                self._stores[version_id] = store
            self._stores.move_to_end(version_id)
            if current:
                self._current = version_id
            while len(self._stores) > self.keep:  # never the current one: it was just moved to the end
                old_id = next(iter(self._stores))
                if old_id == self._current:
                    self._stores.move_to_end(old_id)
                    continue
                shutil.rmtree(self._stores.pop(old_id).folder, ignore_errors=True)
            return store

    def owner_of(self, path: str | os.PathLike[str]) -> tuple[str, ThumbnailStore] | None:
        """(version id, store) whose folder holds `path`; None when it is not a kept version's thumbnail."""
        parent = Path(path).parent.resolve()
        with self._lock:
            return next(((v, s) for v, s in self._stores.items() if s.folder == parent), None)

    @property
    def current(self) -> ThumbnailStore:
        with self._lock:
            if self._current is None:
                raise RuntimeError("no index version has been made current")
            return self._stores[self._current]

    @property
    def gallery_paths(self) -> Sequence[str | os.PathLike[str]]:
        return self.current.gallery_paths

    def path_for(self, gallery_index: int) -> Path:
        return self.current.path_for(gallery_index)

    def is_placeholder(self, gallery_index: int) -> bool:
        return self.current.is_placeholder(gallery_index)

    def cleanup(self) -> None:
        """Remove the folder if this object created it."""
        if self._owns_folder:
            shutil.rmtree(self.folder, ignore_errors=True)
