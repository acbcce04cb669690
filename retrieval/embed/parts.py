"""The embeddings folder: embeddings written in parts, each complete or absent, so a long job can resume.

    <dir>/manifest.json              embedder (fingerprint, size, normalisation, preprocessing, source),
                                     storage dtype, what was embedded (dataset, data root, protocol), the
                                     part plan per role (items, parts, hash of the item list) and, once
                                     complete, the images that could not be read
    <dir>/parts/<role>-NNNNN.npy     (n, D) embeddings of the part's readable images, in row order
    <dir>/parts/<role>-NNNNN.json    their rows (position in the split), paths (relative to the data root),
                                     labels and item ids, and the part's unreadable images
    <dir>/parts/<role>-NNNNN.done    completion marker, written last: fingerprint, counts, size and SHA-256
                                     of the two files above

Roles: "gallery" (what an index holds) and "query" (the stored queries of query/gallery datasets).
Format choice: NumPy + JSON rather than Parquet, so the local engine and index builds need nothing
beyond NumPy, embeddings are memory-mapped without a copy, and a part's files are plain to inspect.
Part contents are deterministic (no times, hosts or process ids), so a resumed job writes files
identical to those of an uninterrupted one. Every file is written atomically (retrieval.atomic).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.atomic import atomic_write_json, atomic_write_with, file_digest, read_json
from retrieval.errors import InputError, UsageError

PARTS_FORMAT = "metrix-retrieval/embeddings/1"
MANIFEST_FILE = "manifest.json"
PARTS_DIR = "parts"
DTYPES = ("float32", "float16")
ROLES = ("gallery", "query")


class PartsError(InputError):
    """An embeddings folder or part is missing, incomplete, corrupt or from another embedder; names the file."""


@dataclass(frozen=True)
class PartItems:
    """The items of one part that have an embedding (row = position in the split), plus its unreadable images."""

    rows: list[int]
    paths: list[str]  # relative to the manifest's data_root (absolute when outside it)
    labels: list[int]
    item_ids: list[str]
    bad: list[dict[str, Any]]  # [{"row": r, "path": p, "error": message}]
    attributes: list[dict[str, str]] | None = None  # per item (e.g. {"category": "Dresses"}), None = none recorded

    def to_dict(self, name: str) -> dict[str, Any]:
        out = {
            "part": name,
            "rows": self.rows,
            "paths": self.paths,
            "labels": self.labels,
            "item_ids": self.item_ids,
            "bad": self.bad,
        }
        if self.attributes and any(self.attributes):
            out["attributes"] = self.attributes
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PartItems:
        attributes = (
            [{str(k): str(v) for k, v in row.items()} for row in raw["attributes"]] if raw.get("attributes") else None
        )
        return cls(
            [int(r) for r in raw["rows"]],
            [str(p) for p in raw["paths"]],
            [int(v) for v in raw["labels"]],
            [str(v) for v in raw["item_ids"]],
            list(raw.get("bad", [])),
            attributes,
        )

    def attribute_rows(self) -> list[dict[str, str]]:
        return list(self.attributes) if self.attributes else [{} for _ in self.rows]

    @classmethod
    def concat(cls, parts: list[PartItems]) -> PartItems:
        """The items of several parts, one after another (attributes None when no part recorded any)."""
        attributes = [row for items in parts for row in items.attribute_rows()]
        return cls(
            [r for items in parts for r in items.rows],
            [p for items in parts for p in items.paths],
            [v for items in parts for v in items.labels],
            [v for items in parts for v in items.item_ids],
            [b for items in parts for b in items.bad],
            attributes if any(attributes) else None,
        )


def part_name(role: str, number: int) -> str:
    return f"{role}-{number:05d}"


def part_paths(folder: str | os.PathLike[str], name: str) -> tuple[Path, Path, Path]:
    """(embeddings .npy, items .json, completion marker .done) of part `name`."""
    base = Path(folder) / PARTS_DIR / name
    return base.with_suffix(".npy"), base.with_suffix(".json"), base.with_suffix(".done")


def write_part(
    folder: str | os.PathLike[str], name: str, emb: np.ndarray, items: PartItems, *, fingerprint: str, dtype: str
) -> None:
    """Write one part: embeddings, items, then the completion marker (each atomically, marker last).

    emb: (n, D) float32 L2-normalised rows of the readable items, in `items.rows` order.
    """
    if dtype not in DTYPES:
        raise UsageError(f"unknown embedding dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if len(emb) != len(items.rows):
        raise ValueError(f"part {name}: {len(emb)} embeddings for {len(items.rows)} items")
    npy, js, done = part_paths(folder, name)
    npy.parent.mkdir(parents=True, exist_ok=True)
    arr = np.ascontiguousarray(emb, dtype=np.dtype(dtype))

    def write_npy(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a handle, so np.save does not append ".npy" to the temporary name
            np.save(fh, arr, allow_pickle=False)

    atomic_write_with(npy, write_npy)
    atomic_write_json(js, items.to_dict(name))
    marker = {
        "part": name,
        "fingerprint": fingerprint,
        "dtype": dtype,
        "n": len(items.rows),
        "n_bad": len(items.bad),
        "files": {npy.name: file_digest(npy), js.name: file_digest(js)},
    }
    atomic_write_json(done, marker)


def part_is_done(folder: str | os.PathLike[str], name: str) -> bool:
    """Whether part `name` is complete: its marker exists and both files have the sizes it records."""
    npy, js, done = part_paths(folder, name)
    if not done.is_file():
        return False
    try:
        marker = json.loads(done.read_text(encoding="utf-8"))
        return all(
            (npy.parent / f).is_file() and (npy.parent / f).stat().st_size == d["bytes"]
            for f, d in marker["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


class EmbeddingsFolder:
    """An opened embeddings folder: its manifest, its part plan, and verified reads of its parts."""

    def __init__(self, folder: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.manifest = manifest

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> EmbeddingsFolder:
        folder = Path(folder)
        if not folder.is_dir():
            raise PartsError(f"embeddings folder not found: {folder}; create it with `retrieval embed --out {folder}`")
        path = folder / MANIFEST_FILE
        if not path.is_file():
            raise PartsError(f"{path} is missing: {folder} is not an embeddings folder written by `retrieval embed`")
        try:
            manifest = read_json(path, "embeddings manifest")
        except ValueError as exc:
            raise PartsError(str(exc)) from exc
        if not isinstance(manifest, dict) or manifest.get("format") != PARTS_FORMAT:
            raise PartsError(f"{path} is not a metrix-retrieval embeddings manifest (format {PARTS_FORMAT} expected)")
        return cls(folder, manifest)

    # -- facts ----------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def embedding_size(self) -> int:
        return int(self.manifest["embedding_size"])

    @property
    def data_root(self) -> str | None:
        return self.manifest.get("data_root") or None

    def roles(self) -> list[str]:
        return [r for r in ROLES if r in self.manifest.get("splits", {})]

    def part_names(self, role: str) -> list[str]:
        return [part_name(role, i) for i in range(int(self.manifest["splits"][role]["parts"]))]

    def all_part_names(self) -> list[str]:
        return [name for role in self.roles() for name in self.part_names(role)]

    def missing_parts(self) -> list[str]:
        return [name for name in self.all_part_names() if not part_is_done(self.folder, name)]

    def require_complete(self) -> None:
        """Refuse a folder whose job has not finished, saying how to finish it."""
        missing = self.missing_parts()
        if missing:
            raise PartsError(
                f"{self.folder} is incomplete: {len(missing)} of {len(self.all_part_names())} parts are missing "
                f"(first: {part_paths(self.folder, missing[0])[2]}); rerun the same `retrieval embed` command to "
                "embed only the missing parts"
            )

    def marker(self, name: str) -> dict[str, Any]:
        """The completion marker of part `name`, checked against the manifest (fingerprint, dtype)."""
        done = part_paths(self.folder, name)[2]
        if not done.is_file():
            raise PartsError(f"{done} is missing: part {name} is not complete; rerun `retrieval embed`")
        try:
            marker = read_json(done, "part marker")
        except ValueError as exc:
            raise PartsError(str(exc)) from exc
        if not isinstance(marker, dict) or "files" not in marker:
            raise PartsError(f"{done} is not a part completion marker; rerun `retrieval embed` after deleting it")
        if marker.get("fingerprint") != self.fingerprint:
            raise PartsError(
                f"{done}: part {name} was embedded by embedder {marker.get('fingerprint')} but {self.folder} holds "
                f"embeddings of {self.fingerprint}; parts from two embedders cannot be mixed. Delete the part's "
                "files and rerun `retrieval embed` with the folder's embedder, or use another --out"
            )
        if marker.get("dtype") != self.manifest["dtype"]:
            raise PartsError(
                f"{done}: part {name} is stored as {marker.get('dtype')} but the manifest says "
                f"{self.manifest['dtype']}; delete the part and rerun `retrieval embed`"
            )
        return marker

    def count(self, role: str) -> int:
        """Embedded (readable) items of `role`, from the markers (no embeddings read)."""
        return sum(int(self.marker(name)["n"]) for name in self.part_names(role))

    # -- reading --------------------------------------------------------------------------------
    def read_part(self, name: str, verify: bool = True) -> tuple[np.ndarray, PartItems]:
        """(emb (n, D) float32 L2-normalised, items) of one part; refuses corrupt or foreign parts naming the file."""
        marker = self.marker(name)
        npy, js, _ = part_paths(self.folder, name)
        for path in (npy, js):
            expected = marker["files"].get(path.name)
            if expected is None or not path.is_file():
                raise PartsError(
                    f"{path} is missing (part {name}); delete {path.with_suffix('.done')} and rerun "
                    "`retrieval embed` to embed the part again"
                )
            size = path.stat().st_size
            if size != expected["bytes"] or (verify and file_digest(path)["sha256"] != expected["sha256"]):
                raise PartsError(
                    f"{path} is corrupt (its size or SHA-256 differs from {path.with_suffix('.done').name}); delete "
                    f"{path.with_suffix('.done')} and rerun `retrieval embed` to embed part {name} again"
                )
        try:
            emb = np.load(npy, allow_pickle=False, mmap_mode="r")
            items = PartItems.from_dict(read_json(js, "part items"))
        except (ValueError, OSError, EOFError, KeyError, TypeError) as exc:
            raise PartsError(
                f"part {name} ({npy} / {js}) cannot be read ({exc}); delete its .done marker and "
                "rerun `retrieval embed`"
            ) from exc
        d = self.embedding_size
        if emb.ndim != 2 or emb.shape != (len(items.rows), d) or emb.dtype != np.dtype(self.manifest["dtype"]):
            raise PartsError(
                f"{npy} holds {emb.dtype} {emb.shape}, expected {self.manifest['dtype']} "
                f"({len(items.rows)}, {d}); delete its .done marker and rerun `retrieval embed`"
            )
        return as_unit_float32(emb), items

    def iter_parts(
        self, role: str, names: Sequence[str] | None = None, verify: bool = True
    ) -> Iterator[tuple[str, np.ndarray, PartItems]]:
        for name in names if names is not None else self.part_names(role):
            emb, items = self.read_part(name, verify)
            yield name, emb, items

    def load_role(self, role: str, verify: bool = True) -> tuple[np.ndarray, PartItems]:
        """All embeddings (N, D) float32 and items of `role`, in split order."""
        embs, parts = [], []
        for _, emb, items in self.iter_parts(role, verify=verify):
            embs.append(emb)
            parts.append(items)
        emb = np.concatenate(embs) if embs else np.zeros((0, self.embedding_size), np.float32)
        return emb, PartItems.concat(parts)


def as_unit_float32(emb: np.ndarray) -> np.ndarray:
    """float32 rows of unit norm: float16 storage is widened and re-normalised (its rounding moves norms ~1e-3)."""
    if emb.dtype == np.float32:
        return np.asarray(emb)
    out = np.asarray(emb, dtype=np.float32)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.float32(1e-12))
    return out


def absolute_paths(paths: Sequence[str], data_root: str | None) -> list[str]:
    """Part paths (relative to the data root, or absolute) as absolute paths."""
    return [p if os.path.isabs(p) or not data_root else os.path.join(data_root, *p.split("/")) for p in paths]
