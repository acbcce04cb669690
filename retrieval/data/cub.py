"""CUB-200-2011: 200 bird species, all-vs-all retrieval; classes 1-100 train, 101-200 test.

Read from the official `images.txt` (image_id path) and `image_class_labels.txt` (image_id class_id,
1-based); images under `images/`. Labels are remapped to 0..99 within each split; the species
folder name (e.g. `001.Black_footed_Albatross`) is kept as the item id for display.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from retrieval.data._files import layout_error, read_lines, resolve_root, split_by_class
from retrieval.data.base import RetrievalDataset

RECALL_KS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
NUM_TRAIN_CLASSES = 100  # classes 1..100 train, 101..200 test

LAYOUT = """\
<root>/                      (or its sub-folder CUB_200_2011/)
  images.txt                 <image_id> <path under images/>
  image_class_labels.txt     <image_id> <class_id 1..200>
  images/001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg ...
"""


def _two_columns(path, name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for lineno, line in enumerate(read_lines(path, name, LAYOUT), start=1):
        cols = line.split(maxsplit=1)
        if len(cols) != 2:
            raise layout_error(name, f"{path} line {lineno}: expected two columns, got {line!r}", LAYOUT)
        if cols[0] in out:
            raise layout_error(name, f"{path} line {lineno}: image id {cols[0]} listed twice", LAYOUT)
        out[cols[0]] = cols[1].strip()
    return out


def load_cub(root: str | os.PathLike[str]) -> RetrievalDataset:
    name = "cub"
    base = resolve_root(root, "images.txt", ("CUB_200_2011",), name, LAYOUT)
    images = _two_columns(base / "images.txt", name)
    class_file = base / "image_class_labels.txt"
    classes = _two_columns(class_file, name)

    def labelled() -> Iterator[tuple[Path, int, str]]:
        for image_id, rel in images.items():
            if image_id not in classes:
                raise layout_error(name, f"{class_file} has no class for image id {image_id} ({rel})", LAYOUT)
            try:
                cls = int(classes[image_id])
            except ValueError:
                raise layout_error(name, f"{class_file}: class of image {image_id} is not a number", LAYOUT) from None
            if not 1 <= cls <= 200:
                raise layout_error(name, f"{class_file}: class {cls} of image {image_id} is outside 1..200", LAYOUT)
            yield base / "images" / rel, cls, rel.split("/")[0] if "/" in rel else str(cls)

    return split_by_class(name, base, labelled(), NUM_TRAIN_CLASSES, 200, LAYOUT, RECALL_KS)
