"""What every dataset loader returns: labelled splits plus the evaluation protocol to apply to them."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from retrieval.errors import UserError

Protocol = Literal["all-vs-all", "query-gallery"]
AttributeRule = Callable[[Sequence[str], str], dict[str, str]]
"""(path parts relative to the dataset root, item id) -> the item's filterable string attributes."""


def class_attribute(parts: Sequence[str], item_id: str) -> dict[str, str]:
    """For datasets whose only attribute is the class (CUB, Cars)."""
    return {"class": item_id}


def split_attributes(rule: AttributeRule | None, root: str | os.PathLike[str], split: Split) -> list[dict[str, str]]:
    """Attributes of each image of `split` by a dataset's rule; {} for every image without a rule."""
    if rule is None:
        return [{} for _ in split.paths]
    base = Path(os.path.abspath(root))
    out = []
    for i, path in enumerate(split.paths):
        path = Path(os.path.abspath(path))
        try:
            parts = path.relative_to(base).parts
        except ValueError:  # outside the root (a moved dataset): the last folders still say enough
            parts = path.parts[-4:]
        out.append(rule(parts, split.item_id(i)))
    return out


class DatasetLayoutError(UserError, FileNotFoundError):
    """A dataset folder does not match the official layout; the message names the file and the layout."""


@dataclass(frozen=True)
class Split:
    """One split: image paths with integer class labels (and optional original item ids for display)."""

    name: str
    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    item_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError(f"split {self.name}: {len(self.paths)} paths but {len(self.labels)} labels")
        if self.item_ids is not None and len(self.item_ids) != len(self.paths):
            raise ValueError(f"split {self.name}: item_ids length differs from paths")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(set(self.labels))

    def item_id(self, i: int) -> str:
        return self.item_ids[i] if self.item_ids is not None else str(self.labels[i])


@dataclass(frozen=True)
class RetrievalDataset:
    """A dataset as the protocol sees it.

    all-vs-all (CUB, Cars, SOP, folder): every `test` image queries all other test images.
    query-gallery (In-Shop, demo): `query` images search the `gallery`.
    """

    name: str
    root: Path
    train: Split
    protocol: Protocol
    recall_ks: tuple[int, ...]
    test: Split | None = None
    query: Split | None = None
    gallery: Split | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.protocol == "all-vs-all" and self.test is None:
            raise ValueError(f"{self.name}: all-vs-all protocol needs a test split")
        if self.protocol == "query-gallery" and (self.query is None or self.gallery is None):
            raise ValueError(f"{self.name}: query-gallery protocol needs query and gallery splits")

    def eval_splits(self) -> tuple[Split, Split]:
        """(queries, gallery); identical objects for all-vs-all, where self-matches are excluded by index."""
        if self.protocol == "all-vs-all":
            assert self.test is not None
            return self.test, self.test
        assert self.query is not None and self.gallery is not None
        return self.query, self.gallery

    def gallery_split(self) -> Split:
        """What `retrieval index` indexes: the gallery, or the test split for all-vs-all datasets."""
        return self.eval_splits()[1]

    def split(self, name: str) -> Split:
        for s in (self.train, self.test, self.query, self.gallery):
            if s is not None and s.name == name:
                return s
        raise KeyError(f"{self.name} has no split {name!r}")
