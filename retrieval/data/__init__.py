"""Datasets in their official layouts, the embedded demo, and (in submodules) the image cache, transforms and samplers.

`DATASETS` declares every supported dataset once: `load_dataset`, `retrieval datasets` and the
commands' dataset choices all read it, so a new dataset is its loader module plus one entry here
(and preset values in retrieval.config where the generic ones do not suit it).

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
from retrieval.data.base import (
    AttributeRule,
    DatasetLayoutError,
    Protocol,
    RetrievalDataset,
    Split,
    class_attribute,
    split_attributes,
)
from retrieval.errors import UsageError

Loader = Callable[[str | os.PathLike[str]], RetrievalDataset]


@dataclass(frozen=True)
class DatasetSpec:
    """One supported dataset: what `retrieval datasets` shows about it and how to read it."""

    name: str
    title: str
    protocol: Protocol
    recall_ks: tuple[int, ...]
    layout: str
    load: Loader
    attributes: AttributeRule | None = None  # the items' filterable attributes (retrieval.index.filters)


_DEMO_LAYOUT = """\
<root>/                      drawn by `retrieval demo` in the In-Shop layout
  Eval/list_eval_partition.txt   (as In-Shop: count line, header, rows)
  Img/img/DEMO/<shape>/id_00000001/01_<pattern>.jpg ...
  demo.json                  generator parameters and the class catalogue
"""


def _load_demo(root: str | os.PathLike[str]) -> RetrievalDataset:
    """Load the demo folder, drawing it first (default parameters) if it is not there yet."""
    from retrieval.data.demo import MARKER_FILE, generate_demo

    if not (Path(root).expanduser() / MARKER_FILE).is_file():
        generate_demo(root, progress=True)
    return inshop.load_inshop(root, name="demo", recall_ks=inshop.RECALL_KS)


DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("cub", "CUB-200-2011 (birds; classes 1-100 train, 101-200 test)", "all-vs-all", cub.RECALL_KS, cub.LAYOUT, cub.load_cub, class_attribute),
    DatasetSpec("cars", "Cars196 (car models; classes 1-98 train, 99-196 test)", "all-vs-all", cars.RECALL_KS, cars.LAYOUT, cars.load_cars, class_attribute),
    DatasetSpec("sop", "Stanford Online Products (11,318 train / 11,316 test products)", "all-vs-all", sop.RECALL_KS, sop.LAYOUT, sop.load_sop, sop.item_attributes),
    DatasetSpec("inshop", "In-Shop Clothes Retrieval (train items; query vs gallery)", "query-gallery", inshop.RECALL_KS, inshop.LAYOUT, inshop.load_inshop, inshop.item_attributes),
    DatasetSpec("folder", "Your images, one folder per class (first half of classes by name train)", "all-vs-all", folder.RECALL_KS, folder.LAYOUT, folder.load_folder, folder.item_attributes),
    DatasetSpec("demo", "Embedded demo: procedurally drawn products (In-Shop layout)", "query-gallery", inshop.RECALL_KS, _DEMO_LAYOUT, _load_demo, inshop.item_attributes),
)}  # fmt: skip


def dataset_choices() -> str:
    """The dataset names as a help text says them: "cub, cars, ... or demo"."""
    *head, last = DATASETS
    return f"{', '.join(head)} or {last}"


def dataset_spec(name: str) -> DatasetSpec:
    """The registry entry of `name` (any case); a UsageError lists the choices."""
    spec = DATASETS.get(name.lower())
    if spec is None:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return spec


def item_attributes(dataset: RetrievalDataset, split: Split) -> list[dict[str, str]]:
    """The filterable attributes of each image of one of `dataset`'s splits, by its registry entry's rule."""
    spec = DATASETS.get(dataset.name)
    return split_attributes(spec.attributes if spec else None, dataset.root, split)


def load_dataset(name: str, root: str | os.PathLike[str]) -> RetrievalDataset:
    """Read dataset `name` (a key of DATASETS) from `root`.

    Raises DatasetLayoutError naming the missing or malformed file and showing the expected layout.
    """
    return dataset_spec(name).load(root)


__all__ = [
    "DATASETS",
    "DatasetLayoutError",
    "DatasetSpec",
    "RetrievalDataset",
    "Split",
    "dataset_choices",
    "dataset_spec",
    "item_attributes",
    "load_dataset",
]
