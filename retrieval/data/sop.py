"""Stanford Online Products: 22,634 products, all-vs-all retrieval on 11,316 unseen test products.

`Ebay_train.txt` / `Ebay_test.txt`: header line, then `image_id class_id super_class_id path`
with paths relative to the dataset folder. Labels are class ids remapped to 0..C-1 per split;
the class id is kept as the item id.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from retrieval.data._files import check_images_exist, dense_labels, layout_error, read_lines, resolve_root
from retrieval.data.base import RetrievalDataset, Split

RECALL_KS: tuple[int, ...] = (1, 10, 100, 1000)
HEADER = ["image_id", "class_id", "super_class_id", "path"]

LAYOUT = """\
<root>/                      (or its sub-folder Stanford_Online_Products/)
  Ebay_train.txt             header: image_id class_id super_class_id path
  Ebay_test.txt              rows:   1 1 1 bicycle_final/111085122871_0.JPG
  bicycle_final/111085122871_0.JPG ...   (paths relative to <root>)
"""


def item_attributes(parts: Sequence[str], item_id: str) -> dict[str, str]:
    """super_category from the image folder (bicycle_final/... -> bicycle)."""
    return {"super_category": parts[0].removesuffix("_final")} if len(parts) >= 2 else {}


def _read_split(base, file_name: str, split_name: str) -> Split:
    name = "sop"
    path = base / file_name
    lines = read_lines(path, name, LAYOUT)
    if not lines or lines[0].split() != HEADER:
        got = lines[0] if lines else "an empty file"
        raise layout_error(name, f"{path} line 1 should be the header '{' '.join(HEADER)}', got {got!r}", LAYOUT)
    paths, raw = [], []
    for lineno, line in enumerate(lines[1:], start=2):
        cols = line.split()
        if len(cols) != 4 or not cols[1].isdigit():
            raise layout_error(
                name, f"{path} line {lineno}: expected 'image_id class_id super_class_id path', got {line!r}", LAYOUT
            )
        paths.append(base / cols[3])
        raw.append(int(cols[1]))
    if not paths:
        raise layout_error(name, f"{path} lists no images", LAYOUT)
    labels, _ = dense_labels(raw)
    return Split(split_name, tuple(paths), labels, tuple(str(r) for r in raw))


def load_sop(root: str | os.PathLike[str]) -> RetrievalDataset:
    name = "sop"
    base = resolve_root(root, "Ebay_train.txt", ("Stanford_Online_Products",), name, LAYOUT)
    train = _read_split(base, "Ebay_train.txt", "train")
    test = _read_split(base, "Ebay_test.txt", "test")
    overlap = set(train.item_ids or ()) & set(test.item_ids or ())
    if overlap:
        raise layout_error(name, f"Ebay_train.txt and Ebay_test.txt share class ids (e.g. {min(overlap)})", LAYOUT)
    check_images_exist((*train.paths, *test.paths), name, LAYOUT)
    return RetrievalDataset(name, base, train, "all-vs-all", RECALL_KS, test=test)
