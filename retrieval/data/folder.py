"""Bring-your-own images: one sub-folder per class, split by class, evaluated all-vs-all.

Split rule (deterministic, class-disjoint like the benchmarks): class folders are sorted by name;
the first ceil(C / 2) classes are the train split, the remaining classes the test split. Images are
files with a common image extension, sorted by path; hidden files and folders are ignored. Labels
are 0..C-1 within each split, and the class folder name is the item id.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from retrieval.data._files import layout_error
from retrieval.data.base import RetrievalDataset, Split
from retrieval.image_files import IMAGE_EXTENSIONS, image_files

RECALL_KS: tuple[int, ...] = (1, 2, 4, 8)

LAYOUT = f"""\
<root>/
  <class A>/img001.jpg, img002.png, ...   one folder per class
  <class B>/...                           ({" ".join(IMAGE_EXTENSIONS)})
  split: classes sorted by name, the first ceil(C/2) train, the rest test
"""


def item_attributes(parts: Sequence[str], item_id: str) -> dict[str, str]:
    """folder: the sub-folder path of the image (class_a, class_a/sub, ...)."""
    return {"folder": "/".join(parts[:-1])} if len(parts) >= 2 else {}


def load_folder(root: str | os.PathLike[str]) -> RetrievalDataset:
    name = "folder"
    base = Path(root).expanduser()
    if not base.is_dir():
        raise layout_error(name, f"dataset folder not found: {base}", LAYOUT)
    class_dirs = sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    members = [(d.name, image_files(d)) for d in class_dirs]
    empty = [n for n, imgs in members if not imgs]
    if empty:
        raise layout_error(name, f"class folder {base / empty[0]} holds no images", LAYOUT)
    if len(members) < 2:
        raise layout_error(name, f"{base} needs at least 2 class folders (found {len(members)})", LAYOUT)
    n_train = -(-len(members) // 2)

    def make(split_name: str, part: list[tuple[str, list[Path]]]) -> Split:
        paths = [p for _, imgs in part for p in imgs]
        labels = [i for i, (_, imgs) in enumerate(part) for _ in imgs]
        items = [c for c, imgs in part for _ in imgs]
        return Split(split_name, tuple(paths), tuple(labels), tuple(items))

    return RetrievalDataset(
        name, base, make("train", members[:n_train]), "all-vs-all", RECALL_KS, test=make("test", members[n_train:])
    )
