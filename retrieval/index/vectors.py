"""Index folders from vectors embedded elsewhere: read and check an (N, D) array, its labels and ids,
and publish an index folder that `retrieval search` and `evaluate` open.

    vectors = load_vector_file("emb.npy")                       # memory-mapped; shape/dtype checked first
    vectors = checked_vectors(vectors, normalize=False, source="emb.npy")
    index, result = build_from_vectors(vectors, "indexes/mine", labels=..., ids=...)

Vectors must be finite and unit-norm (the index searches inner product as cosine similarity);
offending rows are refused by row number, or rescaled with `normalize=True` (rows of zeros or with
NaN/inf can never be normalised and are always refused). Checks run over chunks of the
memory-mapped file, so a bad file is refused before it is copied into memory.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.config import CalibrationConfig
from retrieval.errors import InputError
from retrieval.index.config import IndexConfig
from retrieval.index.faiss_index import NORM_TOLERANCE, library_versions
from retrieval.index.folder import GalleryIndex, ItemTable
from retrieval.index.meta import IndexMeta
from retrieval.index.milvus_store import MilvusStoreRecord
from retrieval.index.stores import gallery_index, store_builder
from retrieval.versions import now_iso

CHECK_CHUNK = 65_536  # rows checked / copied at a time
LISTED_ROWS = 10  # row numbers quoted in an error before "and N more"


class VectorFileError(InputError):
    """A vector, label or id file cannot be used; the message names the file and the rows."""


def _load_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise VectorFileError(f"{what} file not found: {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise VectorFileError(f"{path} is not a readable .npy array ({exc})") from exc


def load_vector_file(path: str | os.PathLike[str]) -> np.ndarray:
    """(N, D) floating-point array from a .npy file, memory-mapped (nothing read beyond its header yet)."""
    path = Path(path)
    arr = _load_npy(path, "embeddings")
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise VectorFileError(f"{path} holds an array of shape {arr.shape}; expected (N, D) embeddings, one row each")
    if arr.dtype.kind != "f":
        raise VectorFileError(f"{path} holds {arr.dtype} values; expected floating-point embeddings (float32)")
    return arr


def _rows_text(rows: np.ndarray) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:LISTED_ROWS])
    return shown + (f" and {len(rows) - LISTED_ROWS:,} more" if len(rows) > LISTED_ROWS else "")


def checked_vectors(vectors: np.ndarray, *, normalize: bool = False, source: str = "embeddings") -> np.ndarray:
    """A float32 in-memory copy of `vectors` (N, D) whose rows are finite and unit-norm.

    Rows with NaN/inf are refused by row number; so are rows whose norm is off by more than
    NORM_TOLERANCE, unless `normalize` (then they are rescaled; all-zero rows are still refused).
    """
    n, d = vectors.shape
    out = np.empty((n, d), np.float32)
    bad_finite: list[np.ndarray] = []
    bad_norm: list[np.ndarray] = []
    zero: list[np.ndarray] = []
    for start in range(0, n, CHECK_CHUNK):
        chunk: np.ndarray = np.asarray(vectors[start : start + CHECK_CHUNK], dtype=np.float32)
        finite: np.ndarray = np.isfinite(chunk).all(axis=1)
        norms = np.linalg.norm(np.where(finite[:, None], chunk, 0), axis=1)
        off = finite & (np.abs(norms - 1.0) > NORM_TOLERANCE)
        bad_finite.append(np.flatnonzero(~finite) + start)
        if normalize:
            zero.append(np.flatnonzero(finite & (norms == 0)) + start)
            chunk = (chunk / np.where(norms > 0, norms, 1)[:, None]).astype(np.float32)
        else:
            bad_norm.append(np.flatnonzero(off) + start)
        out[start : start + len(chunk)] = chunk
    problems = []
    rows = np.concatenate(bad_finite)
    if len(rows):
        problems.append(f"{len(rows):,} rows contain NaN or inf (rows {_rows_text(rows)})")
    rows = np.concatenate(zero) if zero else np.empty(0, np.int64)
    if len(rows):
        problems.append(f"{len(rows):,} rows are all zeros and cannot be normalised (rows {_rows_text(rows)})")
    rows = np.concatenate(bad_norm) if bad_norm else np.empty(0, np.int64)
    if len(rows):
        problems.append(
            f"{len(rows):,} rows are not unit-norm (rows {_rows_text(rows)}; pass --normalize to "
            "rescale them, since the index compares vectors by cosine similarity)"
        )
    if problems:
        raise VectorFileError(f"{source}: " + "; ".join(problems) + " (rows numbered from 0)")
    return out


def load_labels(path: str | os.PathLike[str], n: int) -> list[int]:
    """N integer labels (-1 = unlabelled) from a .npy file, one per vector."""
    path = Path(path)
    arr = _load_npy(path, "labels")
    if arr.ndim != 1 or len(arr) != n:
        raise VectorFileError(f"{path} holds shape {arr.shape}; expected ({n:,},): one label per embedding row")
    if arr.dtype.kind not in "iu":
        raise VectorFileError(f"{path} holds {arr.dtype} values; expected integer labels (-1 = unlabelled)")
    return [int(v) for v in arr]


def load_ids(path: str | os.PathLike[str], n: int) -> list[str]:
    """N item ids: a .npy of strings or integers, or a text file with one id per line."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        arr = _load_npy(path, "ids")
        if arr.ndim != 1 or arr.dtype.kind not in "iuU":
            raise VectorFileError(f"{path} holds {arr.dtype} {arr.shape}; expected a 1-D array of strings or integers")
        ids = [str(v) for v in arr]
    else:
        if not path.is_file():
            raise VectorFileError(f"ids file not found: {path}")
        try:
            ids = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise VectorFileError(f"{path} is not a readable UTF-8 text file ({exc})") from exc
    if len(ids) != n:
        raise VectorFileError(f"{path} holds {len(ids):,} ids for {n:,} embedding rows; give one id per row")
    return ids


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def build_from_vectors(
    vectors: np.ndarray,
    out_dir: str | os.PathLike[str],
    cfg: IndexConfig | None = None,
    calib: CalibrationConfig | None = None,
    *,
    labels: list[int] | None = None,
    ids: list[str] | None = None,
    source: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = False,
    store: MilvusStoreRecord | None = None,
    upload_batch: int = 1000,
) -> tuple[GalleryIndex, Any]:
    """Index checked vectors (N, D) float32 unit-norm and publish `out_dir`; returns (index, CalibratedBuild).

    Items: id = `ids[i]` (default the row number), label = `labels[i]` (default -1, unlabelled). The
    folder evaluates all-vs-all (each labelled vector against the others) and records `source`
    (e.g. {"kind": "vectors", "path": ...}) in place of an embedder. `store`: build into this Milvus
    collection (upserted in batches of `upload_batch` rows) instead of FAISS files.
    """
    from retrieval.index.calibrate import build_calibrated

    cfg = cfg or IndexConfig()
    t_start = time.perf_counter()
    n, d = vectors.shape
    ids = ids if ids is not None else [str(i) for i in range(n)]
    labels = labels if labels is not None else [-1] * n
    if len(ids) != n or len(labels) != n:
        raise ValueError(f"{n:,} vectors but {len(ids):,} ids and {len(labels):,} labels")
    source = source or {"kind": "vectors"}
    fingerprint = f"vectors:{source.get('sha256', '')[:16]}"
    items = ItemTable(list(ids), [int(v) for v in labels], list(ids))
    builder = store_builder(store, items, fingerprint, None, upload_batch, progress)
    result = build_calibrated(vectors, cfg, calib, seed=seed, progress=progress, builder=builder)
    built = result.built
    meta = IndexMeta(
        dataset="embeddings",
        data_root="",
        split=Path(str(source.get("path", "vectors"))).name,
        protocol="all-vs-all",
        fingerprint=fingerprint,
        embedding_size=d,
        embedder_source=source,
        index_device=built.device,
        index_note=built.note,
        index_config={"memory_budget_gb": cfg.memory_budget_gb, "requested_type": cfg.index_type},
        train_seconds=round(built.train_seconds, 3),
        add_seconds=round(built.add_seconds, 3),
        build_seconds=round(time.perf_counter() - t_start, 3),
        created_at=now_iso(),
        versions=library_versions(),
        history=[{"action": "build", "items": n, "at": now_iso()}],
        **result.meta(),
    )
    index = gallery_index(
        built.index,
        built.params,
        items,
        meta,
        None,
        None if built.params.stores_exact_vectors else vectors,
        use_gpu=cfg.use_gpu,
    )
    index.save(out_dir)
    return index, result


def build_from_vector_file(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: IndexConfig | None = None,
    calib: CalibrationConfig | None = None,
    *,
    labels_path: str | os.PathLike[str] | None = None,
    ids_path: str | os.PathLike[str] | None = None,
    normalize: bool = False,
    seed: int = 0,
    progress: bool = False,
    store: MilvusStoreRecord | None = None,
    upload_batch: int = 1000,
) -> tuple[GalleryIndex, Any]:
    """`retrieval index --from-embeddings FILE.npy`: check the files, then `build_from_vectors`."""
    path = Path(path)
    raw = load_vector_file(path)
    n = raw.shape[0]
    labels = load_labels(labels_path, n) if labels_path is not None else None
    ids = load_ids(ids_path, n) if ids_path is not None else None
    vectors = checked_vectors(raw, normalize=normalize, source=str(path))
    del raw
    source = {"kind": "vectors", "path": str(path.resolve()), "sha256": file_sha256(path), "normalized": normalize}
    return build_from_vectors(
        vectors,
        out_dir,
        cfg,
        calib,
        labels=labels,
        ids=ids,
        source=source,
        seed=seed,
        progress=progress,
        store=store,
        upload_batch=upload_batch,
    )
