"""In-Shop Clothes Retrieval: train items, and a query set searched against a gallery set.

`Eval/list_eval_partition.txt`: line 1 is the row count, line 2 the header
`image_name item_id evaluation_status`, then one row per image with status train, query or gallery.
Image paths in the list are relative to `Img/`. Query and gallery share one label space (the same
item id gets the same label in both), so a query's matches are the gallery images of its item.
The demo dataset is written in this same layout and read by this loader.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from retrieval.data._files import check_images_exist, dense_labels, layout_error, read_lines, resolve_root
from retrieval.data.base import RetrievalDataset, Split

RECALL_KS: tuple[int, ...] = (1, 10, 20, 30, 40, 50)
PARTITION_FILE = "Eval/list_eval_partition.txt"
STATUSES = ("train", "query", "gallery")

LAYOUT = """\
<root>/                      (or its sub-folder Inshop_Clothes/)
  Eval/list_eval_partition.txt
      line 1: number of rows; line 2: image_name item_id evaluation_status
      rows:   img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 query
              (evaluation_status is train, query or gallery)
  Img/img/WOMEN/Dresses/id_00000002/02_1_front.jpg ...   (image_name under Img/)
"""


def item_attributes(parts: Sequence[str], item_id: str) -> dict[str, str]:
    """gender and category from the image path: Img/img/WOMEN/Dresses/id_00000002/02_1_front.jpg
    (the demo: img/DEMO/<family>/<item>/...)."""
    if "img" in parts:
        i = len(parts) - 1 - parts[::-1].index("img")
        rest = parts[i + 1 :]
        if len(rest) >= 3:
            return {"gender": rest[0], "category": rest[1]}
    return {}


def _read_partition(part_file: Path, name: str) -> dict[str, list[tuple[str, str]]]:
    """(image_name, item_id) rows per status, after checking the count line, header and every row."""
    lines = read_lines(part_file, name, LAYOUT)
    if len(lines) < 2:
        raise layout_error(name, f"{part_file} is too short: expected a count line and a header line", LAYOUT)
    try:
        declared = int(lines[0].strip())
    except ValueError:
        raise layout_error(name, f"{part_file} line 1 should be the number of rows, got {lines[0]!r}", LAYOUT) from None
    header = lines[1].split()
    if header[:3] != ["image_name", "item_id", "evaluation_status"]:
        raise layout_error(
            name, f"{part_file} line 2 should be 'image_name item_id evaluation_status', got {lines[1]!r}", LAYOUT
        )
    rows: dict[str, list[tuple[str, str]]] = {s: [] for s in STATUSES}
    for lineno, line in enumerate(lines[2:], start=3):
        cols = line.split()
        if len(cols) != 3 or cols[2] not in rows:
            raise layout_error(
                name,
                f"{part_file} line {lineno}: expected 'image_name item_id train|query|gallery', got {line!r}",
                LAYOUT,
            )
        rows[cols[2]].append((cols[0], cols[1]))
    found = sum(len(r) for r in rows.values())
    if found != declared:
        raise layout_error(
            name, f"{part_file} declares {declared} rows on line 1 but holds {found}; the file may be truncated", LAYOUT
        )
    for status in STATUSES:
        if not rows[status]:
            raise layout_error(name, f"{part_file} has no rows with status {status!r}", LAYOUT)
    return rows


def load_inshop(
    root: str | os.PathLike[str], name: str = "inshop", recall_ks: tuple[int, ...] = RECALL_KS
) -> RetrievalDataset:
    """Read an In-Shop-layout folder; `name` lets the demo dataset reuse the loader under its own name."""
    base = resolve_root(root, PARTITION_FILE, ("Inshop_Clothes", "In-shop Clothes Retrieval Benchmark"), name, LAYOUT)
    rows = _read_partition(base / PARTITION_FILE, name)
    img_dir = base / "Img"
    paths = {s: tuple(img_dir / image for image, _ in rows[s]) for s in STATUSES}
    check_images_exist((p for s in STATUSES for p in paths[s]), name, LAYOUT)

    train_items = [item for _, item in rows["train"]]
    train_labels, _ = dense_labels(train_items)
    eval_items = [item for _, item in rows["query"]] + [item for _, item in rows["gallery"]]
    eval_labels, _ = dense_labels(eval_items)
    nq = len(rows["query"])
    return RetrievalDataset(
        name=name,
        root=base,
        train=Split("train", paths["train"], train_labels, tuple(train_items)),
        protocol="query-gallery",
        recall_ks=recall_ks,
        query=Split("query", paths["query"], eval_labels[:nq], tuple(eval_items[:nq])),
        gallery=Split("gallery", paths["gallery"], eval_labels[nq:], tuple(eval_items[nq:])),
    )
