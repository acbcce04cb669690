"""Datasets in their official layouts, the embedded demo, and (in submodules) transforms and samplers.

`load_dataset(name, root)` returns a RetrievalDataset: labelled train split, the evaluation splits,
the protocol (all-vs-all or query-gallery) and the Recall@K list to report. Importing this package
is light (no torch, no scipy); transforms, loading and samplers import torch when used.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from retrieval.data import cars, cub, folder, inshop, sop
from retrieval.data.base import DatasetLayoutError, Protocol, RetrievalDataset, Split
from retrieval.errors import UsageError

DEMO_RECALL_KS: tuple[int, ...] = inshop.RECALL_KS
DEMO_LAYOUT = """\
<root>/                      drawn by `retrieval demo` in the In-Shop layout
  Eval/list_eval_partition.txt   (as In-Shop: count line, header, rows)
  Img/img/DEMO/<shape>/id_00000001/01_<pattern>.jpg ...
  demo.json                  generator parameters and the class catalogue
"""


@dataclass(frozen=True)
class DatasetInfo:
    """What `retrieval datasets` shows for one supported dataset."""

    name: str
    title: str
    protocol: Protocol
    recall_ks: tuple[int, ...]
    layout: str


DATASETS: dict[str, DatasetInfo] = {
    "cub": DatasetInfo("cub", "CUB-200-2011 (birds; classes 1-100 train, 101-200 test)", "all-vs-all", cub.RECALL_KS, cub.LAYOUT),
    "cars": DatasetInfo("cars", "Cars196 (car models; classes 1-98 train, 99-196 test)", "all-vs-all", cars.RECALL_KS, cars.LAYOUT),
    "sop": DatasetInfo("sop", "Stanford Online Products (11,318 train / 11,316 test products)", "all-vs-all", sop.RECALL_KS, sop.LAYOUT),
    "inshop": DatasetInfo("inshop", "In-Shop Clothes Retrieval (train items; query vs gallery)", "query-gallery", inshop.RECALL_KS, inshop.LAYOUT),
    "folder": DatasetInfo("folder", "Your images, one folder per class (first half of classes by name train)", "all-vs-all", folder.RECALL_KS, folder.LAYOUT),
    "demo": DatasetInfo("demo", "Embedded demo: procedurally drawn products (In-Shop layout)", "query-gallery", DEMO_RECALL_KS, DEMO_LAYOUT),
}  # fmt: skip

DATASET_LAYOUTS: dict[str, str] = {name: info.layout for name, info in DATASETS.items()}


def _load_demo(root: str | os.PathLike[str]) -> RetrievalDataset:
    """Load the demo folder, drawing it first (default parameters) if it is not there yet."""
    from retrieval.data.demo import MARKER_FILE, generate_demo

    if not (Path(root).expanduser() / MARKER_FILE).is_file():
        generate_demo(root, progress=True)
    return inshop.load_inshop(root, name="demo", recall_ks=DEMO_RECALL_KS)


_LOADERS: dict[str, Callable[[str | os.PathLike[str]], RetrievalDataset]] = {
    "cub": cub.load_cub,
    "cars": cars.load_cars,
    "sop": sop.load_sop,
    "inshop": inshop.load_inshop,
    "folder": folder.load_folder,
    "demo": _load_demo,
}


def load_dataset(name: str, root: str | os.PathLike[str]) -> RetrievalDataset:
    """Read dataset `name` (cub | cars | sop | inshop | folder | demo) from `root`.

    Raises DatasetLayoutError naming the missing or malformed file and showing the expected layout.
    """
    key = name.lower()
    if key not in _LOADERS:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(_LOADERS)}")
    return _LOADERS[key](root)


__all__ = [
    "DATASETS",
    "DATASET_LAYOUTS",
    "DatasetInfo",
    "DatasetLayoutError",
    "RetrievalDataset",
    "Split",
    "load_dataset",
]
