"""FAISS indexes over L2-normalised embeddings: inner product is cosine similarity.

One place decides which index type fits a gallery (`resolve_params`), builds it (`build_faiss_index`),
sets its search-time knobs (`configure_search`), moves it to a GPU when FAISS sees one
(`to_search_device`) and reads/writes it with errors that name the file. What differs between index
types is declared in `retrieval.index.types`; the folder an index lives in (items, metadata, stored
queries) is `retrieval.index.folder`. Which nprobe / efSearch / refine factor an index searches with is
measured at build time by `retrieval.index.calibrate`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.devices import faiss_gpu_available
from retrieval.index.config import IndexConfig
from retrieval.index.errors import IndexBuildError, IndexFileError
from retrieval.index.types import INDEX_TYPES, MIN_POINTS_PER_CENTROID, IndexParams, index_type
from retrieval.versions import software_versions

NORM_TOLERANCE = 1e-3


def choose_index_type(n: int, d: int, cfg: IndexConfig) -> str:
    """ "auto"'s size rule: exact search while the gallery is small enough and fits; otherwise IVF.

    Above the rule, the build measures instead (retrieval.index.calibrate.build_auto: each candidate type
    calibrated on a sample, the fastest reaching the target kept); this answer is only its starting point
    and what a build checks its parameters with before embedding. IVF-PQ when even float32 vectors exceed
    the memory budget.
    """
    budget = cfg.memory_budget_gb * 1024**3
    if n <= cfg.flat_max_items and INDEX_TYPES["flat"].memory_bytes(n, d, cfg) <= budget:
        return "flat"
    if n < MIN_POINTS_PER_CENTROID * 4:
        return "flat"
    if INDEX_TYPES["ivf-flat"].memory_bytes(n, d, cfg) <= budget:
        return "ivf-flat"
    return "ivf-pq"


def resolve_params(cfg: IndexConfig, n: int, d: int) -> IndexParams:
    """Turn a (possibly "auto") IndexConfig into concrete parameters for `n` vectors of size `d`.

    Raises IndexBuildError when the vectors cannot train what was asked for.
    """
    if n <= 0:
        raise IndexBuildError("cannot build an index from 0 vectors")
    kind = index_type(choose_index_type(n, d, cfg) if cfg.index_type == "auto" else cfg.index_type)
    if cfg.refine_factor < 0:
        raise IndexBuildError("refine_factor must be >= 0")
    return kind.resolve(cfg, n, d)


def check_embeddings(vectors: np.ndarray, d: int | None = None, what: str = "embeddings") -> np.ndarray:
    """(N, D) float32 C-contiguous, L2-normalised rows, else a ValueError saying what is wrong."""
    arr = np.ascontiguousarray(vectors, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (N, D) array, got shape {arr.shape}")
    if d is not None and arr.shape[1] != d:
        raise ValueError(f"{what} have {arr.shape[1]} dimensions; the index holds {d}-d embeddings")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contain NaN or inf values")
    if len(arr):
        norms = np.linalg.norm(arr, axis=1)
        worst = float(np.abs(norms - 1.0).max())
        if worst > NORM_TOLERANCE:
            raise ValueError(
                f"{what} are not L2-normalised (a row norm is off by {worst:.3g}); the index uses inner product "
                "as cosine similarity, so normalise rows first"
            )
    return arr


@dataclass
class BuiltIndex:
    """A freshly built CPU index and how it was built."""

    index: faiss.Index
    params: IndexParams
    device: str  # where training/adding ran: "cpu" or "cuda:0 (faiss)"
    train_seconds: float
    add_seconds: float
    note: str = ""  # why a GPU was not used, when one was asked for


def new_cpu_index(params: IndexParams, d: int) -> faiss.Index:
    """An empty (untrained) CPU index of `params`' type for `d`-dimensional vectors."""
    index = faiss.index_factory(d, params.factory_string(), faiss.METRIC_INNER_PRODUCT)
    params.kind.prepare(index, params)
    return index


def configure_search(index: faiss.Index, params: IndexParams) -> None:
    """Apply the search-time knobs (nprobe, efSearch, refinement k_factor) recorded in `params`.

    A store that is not one FAISS index (a Milvus collection) takes them through its own `configure`."""
    if not isinstance(index, faiss.Index) and hasattr(index, "configure"):
        index.configure(params)
        return
    params.kind.apply_search(index, params)
    if params.refine_factor > 0:
        down = faiss.downcast_index(index)
        if isinstance(down, faiss.IndexRefine):
            down.k_factor = float(params.refine_factor)


def _gpu_supported(params: IndexParams) -> tuple[bool, str]:
    why = params.kind.gpu_refusal(params)
    if why:
        return False, why
    if params.refine_factor > 0:
        return False, "refined indexes (IndexRefineFlat) run on the CPU"
    return True, ""


class GpuIndex:
    """A GPU clone of a CPU index plus the resources that must outlive it."""

    def __init__(self, cpu_index: faiss.Index, params: IndexParams, device_id: int = 0) -> None:
        self.resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        params.kind.gpu_options(options)
        self.index = faiss.index_cpu_to_gpu(self.resources, device_id, cpu_index, options)
        self.device = f"cuda:{device_id} (faiss)"

    @property
    def d(self) -> int:
        return self.index.d

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(x, k)


def to_search_device(cpu_index: faiss.Index, params: IndexParams, use_gpu: bool) -> tuple[Any, str]:
    """(searchable index, device): a GPU clone when asked for and possible, else the CPU index.

    The returned object has `.search(x, k)`; for GPU clones it keeps its resources alive.
    """
    configure_search(cpu_index, params)
    if not use_gpu or not faiss_gpu_available() or not _gpu_supported(params)[0]:
        return cpu_index, "cpu"
    try:
        gpu = GpuIndex(cpu_index, params)
        configure_search(gpu.index, params)
        return gpu, gpu.device
    except Exception:  # out of memory, unsupported parameters on this GPU...: search on the CPU
        return cpu_index, "cpu"


def build_faiss_index(vectors: np.ndarray, params: IndexParams, *, use_gpu: bool = True, seed: int = 0) -> BuiltIndex:
    """Train (IVF/PQ, on a seeded sample of `params.train_size` vectors) and add `vectors` (N, D) L2-normalised.

    IVF types train and add on the GPU when FAISS sees one (k-means is the slow part); the returned
    index is always on the CPU so it can be saved, and `to_search_device` moves it for searching.
    """
    vectors = check_embeddings(vectors)
    n, d = vectors.shape
    cpu_index = new_cpu_index(params, d)
    device, note = "cpu", ""
    work = cpu_index
    if cpu_index.is_trained:
        pass  # flat / HNSW: nothing to train, adding is a copy (HNSW has no GPU version)
    elif use_gpu and faiss_gpu_available():
        ok, why = _gpu_supported(params)
        if ok:
            try:
                gpu = GpuIndex(cpu_index, params)
                work, device = gpu.index, gpu.device
            except Exception as exc:
                note = f"GPU build failed ({exc}); built on the CPU"
        else:
            note = why
    elif use_gpu:
        note = "FAISS sees no GPU"

    t0 = time.perf_counter()
    if not work.is_trained:
        train_index(work, vectors[training_rows(n, params, seed)] if params.train_size < n else vectors, params)
    t1 = time.perf_counter()
    for start in range(0, n, 65_536):
        work.add(vectors[start : start + 65_536])
    t2 = time.perf_counter()
    if work is not cpu_index:
        cpu_index = faiss.index_gpu_to_cpu(work)
    configure_search(cpu_index, params)
    return BuiltIndex(cpu_index, params, device, t1 - t0, t2 - t1, note)


def training_rows(n: int, params: IndexParams, seed: int) -> np.ndarray:
    """Sorted rows of the seeded training sample of `n` vectors (all of them when train_size covers them):
    a build from one array and a build from embedding parts draw the same sample."""
    if params.train_size < n:
        return np.sort(np.random.default_rng(seed).choice(n, size=params.train_size, replace=False))
    return np.arange(n)


def train_index(index: faiss.Index, sample: np.ndarray, params: IndexParams) -> None:
    try:
        index.train(sample)
    except RuntimeError as exc:
        raise IndexBuildError(
            f"FAISS could not train {params.factory_string()} on {len(sample):,} vectors: {exc}"
        ) from exc


def add_to_index(index: faiss.Index, vectors: np.ndarray) -> None:
    """Append (N, D) L2-normalised vectors; ids continue from index.ntotal."""
    vectors = check_embeddings(vectors, index.d, "new embeddings")
    if not index.is_trained:
        raise IndexBuildError("the index is not trained; rebuild it")
    for start in range(0, len(vectors), 65_536):
        index.add(vectors[start : start + 65_536])


def remove_from_index(index: faiss.Index, params: IndexParams, rows: np.ndarray) -> None:
    """Remove rows `rows` (sorted, unique) in place; the remaining rows are renumbered 0..N'-1 in order.

    Types that cannot remove (FAISS cannot delete from HNSW graphs) and refined indexes are refused with
    how to rebuild instead.
    """
    if not params.kind.removable or params.refine_factor > 0:
        kind = f"{params.index_type} with refinement" if params.refine_factor > 0 else params.index_type
        removable = [t.name for t in INDEX_TYPES.values() if t.removable]
        raise IndexBuildError(
            f"a {kind} index cannot remove items (FAISS supports removal for {', '.join(removable)}); "
            "rebuild the index without them: `retrieval index --dataset ... --out DIR` over a dataset that no "
            f"longer lists them, or with --index-type {'/'.join(removable)}, which support --remove"
        )
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return
    n_before = index.ntotal
    params.kind.remove(index, faiss.IDSelectorBatch(rows), rows)
    if index.ntotal != n_before - len(rows):
        raise IndexBuildError(
            f"removal left {index.ntotal} vectors, expected {n_before - len(rows)}; rebuild the index"
        )


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """queries (Q, D) L2-normalised -> (scores (Q, k) float32 descending, ids (Q, k) int64; -1 = no result)."""
    queries = check_embeddings(queries, index.d, "query embeddings")
    k = int(min(k, index.ntotal))
    if k <= 0 or len(queries) == 0:
        return np.zeros((len(queries), max(k, 0)), np.float32), np.zeros((len(queries), max(k, 0)), np.int64)
    scores, ids = index.search(queries, k)
    return scores, ids


def exact_vectors(index: faiss.Index, params: IndexParams) -> np.ndarray | None:
    """The stored float32 vectors (N, D) when the index keeps them exactly, else None (IVF-PQ without refinement)."""
    down = faiss.downcast_index(index)
    if isinstance(down, faiss.IndexRefine):
        return faiss.downcast_index(down.refine_index).reconstruct_n(0, index.ntotal)
    return params.kind.stored_vectors(down, index.ntotal)


def write_index(index: faiss.Index, path: Path) -> None:
    """Write `index` to `path` (the caller provides an atomic temporary path)."""
    try:
        faiss.write_index(index, os.fspath(path))
    except RuntimeError as exc:
        raise IndexFileError(f"could not write index file {path}: {exc}") from exc


def read_index(path: Path) -> faiss.Index:
    """Read an index file, turning FAISS's C++ errors into IndexFileError naming the file."""
    if not path.is_file():
        raise IndexFileError(f"index file not found: {path}")
    if path.stat().st_size == 0:
        raise IndexFileError(f"index file {path} is empty; rebuild the index with `retrieval index`")
    try:
        return faiss.read_index(os.fspath(path))
    except (RuntimeError, MemoryError, OverflowError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IndexFileError(
            f"index file {path} is corrupt or truncated (FAISS: {first_line}); rebuild the index with `retrieval index`"
        ) from exc


def library_versions() -> dict[str, str]:
    """What an index records about the software that built it (the embedder's runtime is added by the build)."""
    return software_versions("faiss")
