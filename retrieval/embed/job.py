"""`retrieval embed`: what to embed, cut into parts, and the local engine that embeds the missing ones.

A job is (what: dataset roles or image files) x (embedder) x (options) -> an embeddings folder
(retrieval.embed.parts). Opening a job writes the manifest, or checks that an existing folder was
made by the same embedder from the same items; then only the parts without a completion marker are
embedded, by this process (engine "local", `run_local`) or by a Ray actor pool (retrieval.embed.ray_engine).
Both engines embed a part with `embed_part`, so they produce the same numbers. The choice between
them is made one level up, in retrieval.embed.engines (`embed_to_parts`), so neither engine module
imports the other's.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.atomic import atomic_write_json
from retrieval.embed.backend import EmbeddingBackend
from retrieval.embed.parts import (
    DTYPES,
    MANIFEST_FILE,
    PARTS_FORMAT,
    EmbeddingsFolder,
    PartItems,
    PartsError,
    part_name,
    write_part,
)
from retrieval.embed.spec import embedder_record
from retrieval.errors import UsageError
from retrieval.image_files import list_images
from retrieval.images import ImageLoadError, open_image
from retrieval.versions import now_iso, software_versions

MAX_DECODE_THREADS = 8


@dataclass(frozen=True)
class EmbedOptions:
    """How parts are cut, stored and batched."""

    part_size: int = 4096  # images per part: the unit of resumption and of work handed to a worker
    dtype: str = "float32"  # storage of embeddings in parts: float32 (exact) or float16 (half the disk)
    batch_size: int = 64  # images per forward pass
    decode_threads: int = 0  # threads decoding images per process (0 = CPU count, at most 8)

    def __post_init__(self) -> None:
        if self.part_size < 1:
            raise UsageError(f"part size must be >= 1, got {self.part_size}")
        if self.dtype not in DTYPES:
            raise UsageError(f"unknown embedding dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class RoleItems:
    """The images of one role ("gallery" / "query"), in split order: absolute paths, labels, item ids."""

    role: str
    split: str
    paths: list[str]
    labels: list[int]
    item_ids: list[str]
    attributes: list[dict[str, str]] | None = None  # the dataset's attributes per image (filters), if any


@dataclass(frozen=True)
class EmbedSource:
    """What a job embeds and the facts an index built from it records (dataset, root, protocol, Recall@K)."""

    kind: str  # "dataset" | "images"
    dataset: str
    data_root: str | None
    protocol: str
    recall_ks: list[int]
    roles: list[RoleItems]

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dataset": self.dataset,
            "protocol": self.protocol,
            "recall_ks": self.recall_ks,
            "splits": {r.role: r.split for r in self.roles},
        }


def source_from_dataset(ds: Any) -> EmbedSource:
    """What `retrieval index` embeds: the gallery (test split for all-vs-all) and, for query/gallery datasets,
    the stored queries, so an index built from the parts evaluates like one built directly."""
    from retrieval.data import item_attributes

    def role(name: str, split: Any) -> RoleItems:
        attributes = item_attributes(ds, split)
        return RoleItems(
            name,
            split.name,
            [os.path.abspath(p) for p in split.paths],
            [int(v) for v in split.labels],
            [split.item_id(i) for i in range(len(split.paths))],
            attributes if any(attributes) else None,
        )

    gallery = ds.gallery_split()
    roles = [role("gallery", gallery)]
    if ds.protocol == "query-gallery":
        roles.append(role("query", ds.eval_splits()[0]))
    return EmbedSource(
        "dataset", ds.name, str(Path(ds.root).resolve()), ds.protocol, [int(k) for k in ds.recall_ks], roles
    )


def source_from_images(sources: Sequence[str | os.PathLike[str]]) -> EmbedSource:
    """Image files and folders (searched recursively): unlabelled items (label -1, id = parent folder name)."""
    paths = [str(p.resolve()) for p in list_images(sources)]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return EmbedSource(
        "images",
        "images",
        root,
        "all-vs-all",
        [],
        [RoleItems("gallery", "images", paths, [-1] * len(paths), [Path(p).parent.name for p in paths])],
    )


@dataclass(frozen=True)
class PartTask:
    """Everything a worker needs to embed one part (JSON-serialisable, so it travels to Ray actors)."""

    name: str
    rows: list[int]
    paths: list[str]  # absolute, to read
    stored_paths: list[str]  # as recorded in the part (relative to the data root)
    labels: list[int]
    item_ids: list[str]
    attributes: list[dict[str, str]] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PartTask:
        return cls(**json.loads(text))


@dataclass
class PartResult:
    """What embedding one part did (for progress and reports; never written into the part)."""

    name: str
    n: int
    n_bad: int
    seconds: float
    worker: str


def _relative(path: str, data_root: str | None) -> str:
    prefix = os.path.join(data_root, "") if data_root else None
    return Path(path[len(prefix) :]).as_posix() if prefix and path.startswith(prefix) else path


def plan_tasks(source: EmbedSource, part_size: int) -> list[PartTask]:
    """All parts of all roles, in order: part i of a role holds rows [i * part_size, (i + 1) * part_size)."""
    tasks = []
    for r in source.roles:
        for number, start in enumerate(range(0, len(r.paths), part_size)):
            stop = min(len(r.paths), start + part_size)
            paths = r.paths[start:stop]
            tasks.append(
                PartTask(
                    part_name(r.role, number),
                    list(range(start, stop)),
                    paths,
                    [_relative(p, source.data_root) for p in paths],
                    r.labels[start:stop],
                    r.item_ids[start:stop],
                    r.attributes[start:stop] if r.attributes else None,
                )
            )
    return tasks


def _plan_hash(r: RoleItems, data_root: str | None) -> str:
    text = json.dumps(
        [[_relative(p, data_root) for p in r.paths], r.labels, r.item_ids] + ([r.attributes] if r.attributes else []),
        sort_keys=True,
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def open_job(
    out: str | os.PathLike[str], source: EmbedSource, backend: EmbeddingBackend, options: EmbedOptions
) -> EmbeddingsFolder:
    """Write the manifest of a new job, or check that the folder's job is this one (resume).

    Refuses a folder made by another embedder (parts of two embedders are never mixed), from other
    items, or cut into other parts, naming the folder and what differs.
    """
    out = Path(out)
    splits = {
        r.role: {
            "split": r.split,
            "items": len(r.paths),
            "parts": (len(r.paths) + options.part_size - 1) // options.part_size,
            "plan_sha256": _plan_hash(r, source.data_root),
        }
        for r in source.roles
    }
    manifest: dict[str, Any] = {
        "format": PARTS_FORMAT,
        "fingerprint": backend.fingerprint,
        "embedding_size": int(backend.embedding_size),
        "normalisation": getattr(backend, "normalisation", "l2"),
        "preprocessing": backend.preprocessing.to_dict(),
        "backend": backend.name,
        "embedder_source": embedder_record(backend),
        "dtype": options.dtype,
        "part_size": options.part_size,
        "source": source.describe(),
        "data_root": source.data_root,
        "splits": splits,
        "versions": {**software_versions(), **backend.runtime_versions()},
        "complete": False,
    }
    if (out / MANIFEST_FILE).is_file():
        existing = EmbeddingsFolder.open(out).manifest
        problems = []
        if existing["fingerprint"] != manifest["fingerprint"]:
            problems.append(
                f"it holds embeddings of embedder {existing['fingerprint']}, this run's embedder is "
                f"{manifest['fingerprint']} (parts from two embedders cannot be mixed)"
            )
        for key in ("embedding_size", "normalisation", "dtype", "part_size"):
            if existing.get(key) != manifest[key]:
                problems.append(f"{key} {existing.get(key)} != {manifest[key]}")
        if existing.get("splits", {}).keys() != splits.keys() or any(
            existing["splits"][k]["plan_sha256"] != v["plan_sha256"] for k, v in splits.items()
        ):
            problems.append("it was made from other images (the dataset or the image list changed)")
        if problems:
            raise PartsError(
                f"{out / MANIFEST_FILE}: cannot resume this job in {out}: "
                + "; ".join(problems)
                + ". Use another --out, or delete the folder to start over"
            )
        return EmbeddingsFolder(out, existing)
    out.mkdir(parents=True, exist_ok=True)
    manifest["created_at"] = now_iso()
    atomic_write_json(out / MANIFEST_FILE, manifest)
    return EmbeddingsFolder(out, manifest)


def embed_part(
    backend: EmbeddingBackend,
    task: PartTask,
    batch_size: int,
    decode_threads: int = 0,
    on_images: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, PartItems]:
    """Embed one part: (emb (n, D) float32 of the readable images, their items + the unreadable ones).

    Unreadable images (corrupt, truncated, too large, missing) are recorded with the reason and skipped.
    """
    threads = decode_threads or min(os.cpu_count() or 1, MAX_DECODE_THREADS)
    embs: list[np.ndarray] = []
    keep: list[int] = []
    bad: list[dict[str, Any]] = []

    def decode(i: int) -> Any:
        try:
            return open_image(task.paths[i])
        except ImageLoadError as exc:
            return exc

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode") as pool:
        for start in range(0, len(task.paths), batch_size):
            idx = list(range(start, min(len(task.paths), start + batch_size)))
            images = []
            for i, img in zip(idx, pool.map(decode, idx)):
                if isinstance(img, ImageLoadError):
                    bad.append({"row": task.rows[i], "path": task.stored_paths[i], "error": str(img)})
                else:
                    images.append(img)
                    keep.append(i)
            if images:
                embs.append(np.asarray(backend.embed_images(images), dtype=np.float32))
            if on_images is not None:
                on_images(len(idx))
    emb = np.concatenate(embs) if embs else np.zeros((0, int(backend.embedding_size)), np.float32)
    items = PartItems(
        [task.rows[i] for i in keep],
        [task.stored_paths[i] for i in keep],
        [task.labels[i] for i in keep],
        [task.item_ids[i] for i in keep],
        bad,
        [task.attributes[i] for i in keep] if task.attributes else None,
    )
    return emb, items


def run_part(
    folder: str | os.PathLike[str],
    backend: EmbeddingBackend,
    task: PartTask,
    options: EmbedOptions,
    on_images: Callable[[int], None] | None = None,
) -> PartResult:
    """Embed and write one part (atomically, marker last)."""
    t0 = time.perf_counter()
    emb, items = embed_part(backend, task, options.batch_size, options.decode_threads, on_images)
    write_part(folder, task.name, emb, items, fingerprint=backend.fingerprint, dtype=options.dtype)
    return PartResult(
        task.name, len(items.rows), len(items.bad), time.perf_counter() - t0, f"{socket.gethostname()}:{os.getpid()}"
    )


class Progress:
    """Images done, images/s and ETA over the whole job (tqdm)."""

    def __init__(self, total: int, enabled: bool, desc: str = "embedding") -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="img", desc=desc, disable=not enabled, smoothing=0.1)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def run_local(
    folder: EmbeddingsFolder,
    backend: EmbeddingBackend,
    tasks: Sequence[PartTask],
    options: EmbedOptions,
    progress: bool = True,
    on_part: Callable[[PartResult], None] | None = None,
) -> list[PartResult]:
    """The local engine: embed `tasks` one after another in this process."""
    bar = Progress(sum(len(t.rows) for t in tasks), progress)
    results = []
    try:
        for task in tasks:
            result = run_part(folder.folder, backend, task, options, bar.update)
            results.append(result)
            if on_part is not None:
                on_part(result)
    finally:
        bar.close()
    return results


def finalize(folder: EmbeddingsFolder) -> dict[str, Any]:
    """Once every part is complete: count embedded and unreadable images per role and list the unreadable ones
    in the manifest (marked complete). Returns the manifest."""
    folder.require_complete()
    manifest = dict(folder.manifest)
    embedded: dict[str, int] = {}
    bad: list[dict[str, Any]] = []
    for role in folder.roles():
        n = 0
        for name in folder.part_names(role):
            marker = folder.marker(name)
            n += int(marker["n"])
            if int(marker.get("n_bad", 0)):
                from retrieval.atomic import read_json
                from retrieval.embed.parts import part_paths

                items = PartItems.from_dict(read_json(part_paths(folder.folder, name)[1], "part items"))
                bad += [{"role": role, **b} for b in items.bad]
        embedded[role] = n
    manifest.update(
        {"complete": True, "embedded": embedded, "n_bad": len(bad), "bad_images": bad, "completed_at": now_iso()}
    )
    atomic_write_json(folder.folder / MANIFEST_FILE, manifest)
    folder.manifest = manifest
    return manifest


def write_arrays(
    out: str | os.PathLike[str],
    roles: dict[str, tuple[np.ndarray, list[int], list[str]]],
    *,
    fingerprint: str,
    part_size: int = 4096,
    dtype: str = "float32",
    preprocessing: dict[str, Any] | None = None,
    dataset: str = "arrays",
) -> EmbeddingsFolder:
    """An embeddings folder from embeddings already in memory: role -> (emb (N, D) L2-normalised, labels, item ids).

    For synthetic benchmarks and for embeddings computed elsewhere; the items get placeholder paths
    ("<role>/<row>"). The result is a complete folder any index build accepts.
    """
    from retrieval.preprocess import Preprocessing

    out = Path(out)
    if (out / MANIFEST_FILE).exists():
        raise PartsError(f"{out} already holds an embeddings folder; choose another folder")
    d = int(next(iter(roles.values()))[0].shape[1])
    splits = {
        role: {"split": role, "items": len(emb), "parts": (len(emb) + part_size - 1) // part_size, "plan_sha256": ""}
        for role, (emb, _, _) in roles.items()
    }
    manifest: dict[str, Any] = {
        "format": PARTS_FORMAT,
        "fingerprint": fingerprint,
        "embedding_size": d,
        "normalisation": "l2",
        "preprocessing": preprocessing or Preprocessing().to_dict(),
        "backend": "none",
        "embedder_source": {"kind": "arrays"},
        "dtype": dtype,
        "part_size": part_size,
        "source": {
            "kind": "arrays",
            "dataset": dataset,
            "protocol": "query-gallery" if "query" in roles else "all-vs-all",
            "recall_ks": [1, 10],
            "splits": {r: r for r in roles},
        },
        "data_root": None,
        "splits": splits,
        "versions": {},
        "complete": False,
        "created_at": now_iso(),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / MANIFEST_FILE, manifest)
    for role, (emb, labels, ids) in roles.items():
        for number, start in enumerate(range(0, len(emb), part_size)):
            stop = min(len(emb), start + part_size)
            rows = list(range(start, stop))
            items = PartItems(
                rows,
                [f"{role}/{r}" for r in rows],
                [int(v) for v in labels[start:stop]],
                [str(v) for v in ids[start:stop]],
                [],
            )
            write_part(out, part_name(role, number), emb[start:stop], items, fingerprint=fingerprint, dtype=dtype)
    folder = EmbeddingsFolder(out, manifest)
    finalize(folder)
    return folder
