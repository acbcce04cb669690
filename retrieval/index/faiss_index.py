"""FAISS indexes over L2-normalised embeddings: inner product is cosine similarity.

One place decides which index type fits a gallery (`resolve_params`), builds it (`build_faiss_index`),
sets its search-time knobs (`configure_search`), moves it to a GPU when FAISS sees one
(`to_search_device`) and reads/writes it with errors that name the file. The folder an index lives
in (items, metadata, stored queries) is `retrieval.index.folder`.

Index types, all with METRIC_INNER_PRODUCT:
    flat      IndexFlatIP: exact; the default up to a few hundred thousand items.
    ivf-flat  IVF with full vectors in the lists; `nprobe` of `nlist` lists scanned per query.
    ivf-pq    IVF with product-quantised codes (pq_m bytes per vector at 8 bits): for galleries that
              do not fit the memory budget as float32.
    hnsw      IndexHNSWFlat graph; `ef_search` trades speed for recall. Stays on the CPU (FAISS has no
              GPU HNSW).
Any approximate type takes `refine_factor` > 0 to re-rank k * factor candidates exactly (IndexRefineFlat,
which keeps the float32 vectors as well). Which nprobe / efSearch / refine factor an index searches with is
measured at build time by `retrieval.index.calibrate`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.config import IndexConfig
from retrieval.errors import UserError

INDEX_TYPES = ("flat", "ivf-flat", "ivf-pq", "hnsw")
MIN_POINTS_PER_CENTROID = 39  # below this FAISS k-means gives poor centroids (its own warning threshold)
TRAIN_POINTS_PER_LIST = 64  # default IVF training sample per list (FAISS itself subsamples above 256)
MAX_AUTO_NLIST = 65_536
NORM_TOLERANCE = 1e-3


class IndexBuildError(UserError, ValueError):
    """The requested index cannot be built from these vectors; the message says what to change."""


class IndexFileError(UserError, ValueError):
    """An index file is missing, truncated, corrupt or unreadable; the message names the file."""


@dataclass(frozen=True)
class IndexParams:
    """Concrete parameters of one built index (no "auto" left); stored in the index metadata."""

    index_type: str
    nlist: int = 0
    nprobe: int = 0
    pq_m: int = 0
    pq_nbits: int = 0
    hnsw_m: int = 0
    ef_construction: int = 0
    ef_search: int = 0
    refine_factor: int = 0
    train_size: int = 0

    @property
    def exact(self) -> bool:
        return self.index_type == "flat"

    def factory_string(self) -> str:
        """The faiss.index_factory description of this index."""
        if self.index_type == "flat":
            base = "Flat"
        elif self.index_type == "ivf-flat":
            base = f"IVF{self.nlist},Flat"
        elif self.index_type == "ivf-pq":
            base = f"IVF{self.nlist},PQ{self.pq_m}x{self.pq_nbits}np"  # np: skip polysemous training (unused, slow)
        elif self.index_type == "hnsw":
            base = f"HNSW{self.hnsw_m}"
        else:
            raise IndexBuildError(f"unknown index type {self.index_type!r}; choose one of {INDEX_TYPES}")
        return base + (",RFlat" if self.refine_factor > 0 else "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "IndexParams":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def estimate_memory_bytes(index_type: str, n: int, d: int, cfg: IndexConfig) -> int:
    """Rough resident size of an index of `n` vectors of dimension `d` (vectors + ids + graph/lists)."""
    vectors = n * d * 4
    if index_type == "flat":
        return vectors
    if index_type == "ivf-flat":
        return vectors + n * 8
    if index_type == "ivf-pq":
        return n * (cfg.pq_m * cfg.pq_nbits // 8 + 8) + (vectors if cfg.refine_factor > 0 else 0)
    if index_type == "hnsw":
        return int(vectors + n * cfg.hnsw_m * 2 * 4 * 1.1)
    raise IndexBuildError(f"unknown index type {index_type!r}; choose one of {INDEX_TYPES}")


def choose_index_type(n: int, d: int, cfg: IndexConfig) -> str:
    """"auto": exact search while the gallery is small enough and fits; otherwise IVF.

    IVF-flat keeps exact vectors (fast, high recall at modest nprobe, measured by
    benchmarks/index_speed.py); IVF-PQ when even float32 vectors exceed the memory budget.
    """
    budget = cfg.memory_budget_gb * 1024**3
    if n <= cfg.flat_max_items and estimate_memory_bytes("flat", n, d, cfg) <= budget:
        return "flat"
    if n < MIN_POINTS_PER_CENTROID * 4:
        return "flat"
    if estimate_memory_bytes("ivf-flat", n, d, cfg) <= budget:
        return "ivf-flat"
    return "ivf-pq"


def default_nlist(n: int) -> int:
    """About 4 * sqrt(N) lists, never more than the vectors can train (39 per centroid)."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_CENTROID, MAX_AUTO_NLIST)))


def resolve_params(cfg: IndexConfig, n: int, d: int) -> IndexParams:
    """Turn a (possibly "auto") IndexConfig into concrete parameters for `n` vectors of size `d`.

    Raises IndexBuildError when the vectors cannot train what was asked for.
    """
    if n <= 0:
        raise IndexBuildError("cannot build an index from 0 vectors")
    kind = cfg.index_type
    if kind == "auto":
        kind = choose_index_type(n, d, cfg)
    if kind not in INDEX_TYPES:
        raise IndexBuildError(f"unknown index type {kind!r}; choose auto or one of {', '.join(INDEX_TYPES)}")
    if cfg.refine_factor < 0:
        raise IndexBuildError("refine_factor must be >= 0")
    refine = cfg.refine_factor if kind != "flat" else 0
    if kind == "flat":
        return IndexParams("flat")
    if kind == "hnsw":
        if cfg.hnsw_m < 2:
            raise IndexBuildError(f"hnsw_m must be >= 2, got {cfg.hnsw_m}")
        return IndexParams("hnsw", hnsw_m=cfg.hnsw_m, ef_construction=max(cfg.ef_construction, cfg.hnsw_m),
                           ef_search=cfg.ef_search, refine_factor=refine)

    # IVF family
    if cfg.nlist > 0:
        nlist = cfg.nlist
        if n < MIN_POINTS_PER_CENTROID * nlist:
            raise IndexBuildError(
                f"{kind} with nlist={nlist} needs at least {MIN_POINTS_PER_CENTROID * nlist:,} vectors to train "
                f"({MIN_POINTS_PER_CENTROID} per list); the gallery has {n:,}. Lower --nlist "
                f"(at most {max(1, n // MIN_POINTS_PER_CENTROID)}) or use --index-type flat."
            )
    else:
        if n < MIN_POINTS_PER_CENTROID:
            raise IndexBuildError(
                f"{kind} needs at least {MIN_POINTS_PER_CENTROID} vectors to train its lists; the gallery has {n}. "
                "Use --index-type flat."
            )
        nlist = default_nlist(n)
    pq_m = pq_nbits = 0
    if kind == "ivf-pq":
        pq_m, pq_nbits = cfg.pq_m, cfg.pq_nbits
        if pq_m <= 0 or d % pq_m != 0:
            raise IndexBuildError(f"pq_m={pq_m} must divide the embedding size {d}; try {_divisors_hint(d)}")
        if not 1 <= pq_nbits <= 16:
            raise IndexBuildError(f"pq_nbits must be in 1..16, got {pq_nbits}")
        needed = MIN_POINTS_PER_CENTROID * 2**pq_nbits
        if n < needed:
            raise IndexBuildError(
                f"ivf-pq with {pq_nbits}-bit codes needs at least {needed:,} vectors to train its "
                f"{2**pq_nbits} centroids per sub-quantizer; the gallery has {n:,}. Lower --pq-nbits "
                "or use --index-type ivf-flat / flat."
            )
    floor = MIN_POINTS_PER_CENTROID * max(nlist, 2**pq_nbits if pq_nbits else 0)
    train_size = cfg.train_size if cfg.train_size > 0 else max(TRAIN_POINTS_PER_LIST * nlist, floor)
    train_size = int(min(n, max(train_size, floor)))
    return IndexParams(kind, nlist=nlist, nprobe=max(1, min(cfg.nprobe, nlist)), pq_m=pq_m, pq_nbits=pq_nbits,
                       refine_factor=refine, train_size=train_size)


def _divisors_hint(d: int) -> str:
    return ", ".join(str(m) for m in (8, 16, 32, 48, 64, 96, 128) if d % m == 0) or "1"


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


def _new_cpu_index(params: IndexParams, d: int) -> faiss.Index:
    index = faiss.index_factory(d, params.factory_string(), faiss.METRIC_INNER_PRODUCT)
    if params.index_type == "hnsw":
        _hnsw_of(index).hnsw.efConstruction = params.ef_construction
    return index


def _hnsw_of(index: faiss.Index) -> Any:
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        index = faiss.downcast_index(index.base_index)
    return index


def configure_search(index: faiss.Index, params: IndexParams) -> None:
    """Apply the search-time knobs (nprobe, efSearch, refinement k_factor) recorded in `params`."""
    if params.index_type in ("ivf-flat", "ivf-pq"):
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = params.nprobe
    elif params.index_type == "hnsw":
        _hnsw_of(index).hnsw.efSearch = params.ef_search
    if params.refine_factor > 0:
        down = faiss.downcast_index(index)
        if isinstance(down, faiss.IndexRefine):
            down.k_factor = float(params.refine_factor)


def gpu_available() -> bool:
    try:
        return faiss.get_num_gpus() > 0
    except AttributeError:  # a CPU-only FAISS build
        return False


def _gpu_supported(params: IndexParams) -> tuple[bool, str]:
    if params.index_type == "hnsw":
        return False, "FAISS has no GPU HNSW; it runs on the CPU"
    if params.refine_factor > 0:
        return False, "refined indexes (IndexRefineFlat) run on the CPU"
    return True, ""


class GpuIndex:
    """A GPU clone of a CPU index plus the resources that must outlive it."""

    def __init__(self, cpu_index: faiss.Index, params: IndexParams, device_id: int = 0) -> None:
        self.resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        if params.index_type == "ivf-pq":
            options.useFloat16 = True  # large pq_m needs half-precision lookup tables on the GPU
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


def to_search_device(cpu_index: faiss.Index, params: IndexParams, use_gpu: bool) -> tuple[Any, str, str]:
    """(searchable index, device, note): a GPU clone when asked for and possible, else the CPU index.

    The returned object has `.search(x, k)`; for GPU clones it keeps its resources alive.
    """
    configure_search(cpu_index, params)
    if not use_gpu:
        return cpu_index, "cpu", ""
    if not gpu_available():
        return cpu_index, "cpu", "FAISS sees no GPU"
    ok, why = _gpu_supported(params)
    if not ok:
        return cpu_index, "cpu", why
    try:
        gpu = GpuIndex(cpu_index, params)
        configure_search(gpu.index, params)
        return gpu, gpu.device, ""
    except Exception as exc:  # out of memory, unsupported parameters on this GPU...
        return cpu_index, "cpu", f"GPU clone failed ({exc}); searching on the CPU"


def build_faiss_index(
    vectors: np.ndarray, params: IndexParams, *, use_gpu: bool = True, seed: int = 0
) -> BuiltIndex:
    """Train (IVF/PQ, on a seeded sample of `params.train_size` vectors) and add `vectors` (N, D) L2-normalised.

    IVF types train and add on the GPU when FAISS sees one (k-means is the slow part); the returned
    index is always on the CPU so it can be saved, and `to_search_device` moves it for searching.
    """
    vectors = check_embeddings(vectors)
    n, d = vectors.shape
    cpu_index = _new_cpu_index(params, d)
    device, note = "cpu", ""
    work = cpu_index
    if cpu_index.is_trained:
        pass  # flat / HNSW: nothing to train, adding is a copy (HNSW has no GPU version)
    elif use_gpu and gpu_available():
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
        if params.train_size < n:
            rng = np.random.default_rng(seed)
            sample = vectors[np.sort(rng.choice(n, size=params.train_size, replace=False))]
        else:
            sample = vectors
        try:
            work.train(sample)
        except RuntimeError as exc:
            raise IndexBuildError(f"FAISS could not train {params.factory_string()} on {len(sample):,} vectors: {exc}") from exc
    t1 = time.perf_counter()
    for start in range(0, n, 65_536):
        work.add(vectors[start : start + 65_536])
    t2 = time.perf_counter()
    if work is not cpu_index:
        cpu_index = faiss.index_gpu_to_cpu(work)
    configure_search(cpu_index, params)
    return BuiltIndex(cpu_index, params, device, t1 - t0, t2 - t1, note)


def add_to_index(index: faiss.Index, vectors: np.ndarray) -> None:
    """Append (N, D) L2-normalised vectors; ids continue from index.ntotal."""
    vectors = check_embeddings(vectors, index.d, "new embeddings")
    if not index.is_trained:
        raise IndexBuildError("the index is not trained; rebuild it")
    for start in range(0, len(vectors), 65_536):
        index.add(vectors[start : start + 65_536])


REMOVABLE_TYPES = ("flat", "ivf-flat", "ivf-pq")


def remove_from_index(index: faiss.Index, params: IndexParams, rows: np.ndarray) -> None:
    """Remove rows `rows` (sorted, unique) in place; the remaining rows are renumbered 0..N'-1 in order.

    Flat storage compacts itself; IVF lists keep explicit ids, which are shifted down here. HNSW graphs
    (FAISS cannot delete from them) and refined indexes are refused with how to rebuild instead.
    """
    if params.index_type not in REMOVABLE_TYPES or params.refine_factor > 0:
        kind = f"{params.index_type} with refinement" if params.refine_factor > 0 else params.index_type
        raise IndexBuildError(
            f"a {kind} index cannot remove items (FAISS supports removal for {', '.join(REMOVABLE_TYPES)}); "
            "rebuild the index without them: `retrieval index --dataset ... --out DIR` over a dataset that no "
            "longer lists them, or with --index-type flat/ivf-flat, which support --remove"
        )
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return
    n_before = index.ntotal
    selector = faiss.IDSelectorBatch(rows)
    if params.index_type == "flat":
        index.remove_ids(selector)
    else:
        ivf = faiss.extract_index_ivf(index)
        ivf.remove_ids(selector)
        lists = ivf.invlists
        for list_no in range(ivf.nlist):
            size = lists.list_size(list_no)
            if size == 0:
                continue
            ids = faiss.rev_swig_ptr(lists.get_ids(list_no), size).copy()
            new_ids = np.ascontiguousarray(ids - np.searchsorted(rows, ids), dtype=np.int64)  # shift past removed rows
            codes = faiss.rev_swig_ptr(lists.get_codes(list_no), size * lists.code_size).copy()
            lists.update_entries(list_no, 0, size, faiss.swig_ptr(new_ids), faiss.swig_ptr(codes))
    if index.ntotal != n_before - len(rows):
        raise IndexBuildError(f"removal left {index.ntotal} vectors, expected {n_before - len(rows)}; rebuild the index")


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
    n = index.ntotal
    down = faiss.downcast_index(index)
    if isinstance(down, faiss.IndexRefine):
        return faiss.downcast_index(down.refine_index).reconstruct_n(0, n)
    if params.index_type == "ivf-pq":
        return None
    if params.index_type == "ivf-flat":
        ivf = faiss.extract_index_ivf(down)
        ivf.make_direct_map()
        try:
            return ivf.reconstruct_n(0, n)
        finally:
            ivf.set_direct_map_type(faiss.DirectMap.NoMap)
    return down.reconstruct_n(0, n)


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
    import platform

    import retrieval

    return {"faiss": faiss.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "metrix-retrieval": retrieval.__version__}
