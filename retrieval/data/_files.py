"""Checks every loader shares: find the dataset folder, require its files, verify listed images exist.

Every failure is a DatasetLayoutError whose message names the offending file and repeats the
expected layout, so a user can fix the folder without reading the code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from retrieval.data.base import DatasetLayoutError, RetrievalDataset, Split


def layout_error(dataset: str, problem: str, layout: str) -> DatasetLayoutError:
    return DatasetLayoutError(f"{dataset}: {problem}\n\nExpected layout:\n{layout.rstrip()}")


def resolve_root(root: str | os.PathLike[str], marker: str, subdirs: Sequence[str], dataset: str, layout: str) -> Path:
    """The folder holding `marker`: `root` itself or one of the usual sub-folder names under it.

    Users point at either the extracted archive's folder or its parent; both work.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise layout_error(dataset, f"dataset folder not found: {root}", layout)
    for candidate in (root, *(root / s for s in subdirs)):
        if (candidate / marker).exists():
            return candidate
    tried = ", ".join(str(c / marker) for c in (root, *(root / s for s in subdirs)))
    raise layout_error(dataset, f"missing file {root / marker} (looked for: {tried})", layout)


def require_file(path: Path, dataset: str, layout: str) -> Path:
    if not path.is_file():
        raise layout_error(dataset, f"missing file {path}", layout)
    return path


def read_lines(path: Path, dataset: str, layout: str) -> list[str]:
    """Non-empty lines of a text annotation file, with layout errors for missing or undecodable files."""
    require_file(path, dataset, layout)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise layout_error(dataset, f"{path} is not a UTF-8 text file ({exc})", layout) from exc
    return [line for line in text.splitlines() if line.strip()]


def check_images_exist(paths: Iterable[Path], dataset: str, layout: str) -> None:
    """Fail on the first listed image that is not on disk (os.path.exists over 120k paths takes < 1 s)."""
    missing = 0
    first: Path | None = None
    for p in paths:
        if not os.path.exists(p):
            missing += 1
            if first is None:
                first = p
    if first is not None:
        raise layout_error(
            dataset,
            f"{missing} listed image file(s) are missing; first missing: {first}",
            layout,
        )


def dense_labels(raw: Sequence[int | str]) -> tuple[tuple[int, ...], list[int | str]]:
    """Map raw class ids to 0..C-1 in sorted order of the raw ids; returns (labels, sorted raw ids)."""
    classes = sorted(set(raw))
    index = {c: i for i, c in enumerate(classes)}
    return tuple(index[r] for r in raw), classes


def split_by_class(
    name: str,
    base: Path,
    images: Iterator[tuple[Path, int, str]],
    num_train_classes: int,
    num_classes: int,
    layout: str,
    recall_ks: tuple[int, ...],
    where: str = "",
) -> RetrievalDataset:
    """CUB and Cars: (path, class 1..num_classes, item id) -> classes 1..num_train_classes train, the rest test,
    evaluated all-vs-all. `where` prefixes the message when a split is empty (the annotation file)."""
    parts: dict[str, tuple[list[Path], list[int], list[str]]] = {"train": ([], [], []), "test": ([], [], [])}
    for path, cls, item in images:
        paths, raw, items = parts["train" if cls <= num_train_classes else "test"]
        paths.append(path)
        raw.append(cls)
        items.append(item)
    ranges = {"train": f"1-{num_train_classes}", "test": f"{num_train_classes + 1}-{num_classes}"}
    for split_name, (paths, _, _) in parts.items():
        if not paths:
            raise layout_error(name, f"{where}no {split_name} images (classes {ranges[split_name]})", layout)
    check_images_exist((p for paths, _, _ in parts.values() for p in paths), name, layout)
    splits = {s: Split(s, tuple(p), dense_labels(r)[0], tuple(i)) for s, (p, r, i) in parts.items()}
    return RetrievalDataset(name, base, splits["train"], "all-vs-all", recall_ks, test=splits["test"])
