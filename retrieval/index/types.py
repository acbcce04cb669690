"""The index types, each declared once: how it is built, what it costs, how it searches and what it can do.

Build, search, calibration, removal, shard merging, the `--index-type` help and IndexConfig validation
all read INDEX_TYPES, so adding a type is one IndexType subclass registered there (and a test). The numbers
a type is built and searched with are knobs declared once in retrieval.index.knobs; each type names the
ones it reads, and IndexParams, IndexConfig and the `retrieval index` flags are generated from them.

    flat      IndexFlatIP: exact; the default up to a few hundred thousand items.
    ivf-flat  IVF with full vectors in the lists; `nprobe` of `nlist` lists scanned per query.
    ivf-sq8   IVF with 8-bit scalar-quantised vectors (D bytes each): a quarter of ivf-flat's memory.
    ivf-pq    IVF with product-quantised codes (pq_m bytes per vector at 8 bits): for galleries that
              do not fit the memory budget as float32.
    ivf-fastscan  IVF with 4-bit PQ codes scanned in SIMD registers (FAISS fast-scan), always re-ranked
              exactly (IndexRefineFlat): scanning a list costs a fraction of IVF-flat's, and the refine
              factor is calibrated with nprobe.
    hnsw      IndexHNSWFlat graph; `ef_search` trades speed for recall. Stays on the CPU (FAISS has no
              GPU HNSW).

Any approximate type takes `refine_factor` > 0 to re-rank k * factor candidates exactly (IndexRefineFlat,
which keeps the float32 vectors as well). Every IVF type takes `coarse_hnsw_m` > 0 to find lists with an
HNSW graph over the centroids ("IVF{nlist}_HNSW{M}") instead of comparing with all of them: the distances
computed to add a vector grow with log(nlist), not nlist (measured on 512-d: it only pays from tens of
thousands of lists, since brute force runs as one matrix product; see docs/scaling.md). PQ types take `opq` 1
to learn a rotation ("OPQ{m},") that balances the sub-vectors before coding. All types use METRIC_INNER_PRODUCT
over L2-normalised vectors.

FAISS and NumPy are imported inside the methods: the command line reads names and help from this
module and must start without loading them. IndexConfig (retrieval.index.config) checks its type against
this registry, so this module does not import it: `cfg` below is an IndexConfig, typed as IndexRequest.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from retrieval.errors import UsageError
from retrieval.index.errors import IndexBuildError
from retrieval.index.knobs import EF_SEARCH, NPROBE, Knob, KnobValues, knob_fields, knob_values

if TYPE_CHECKING:
    import faiss
    import numpy as np

# An IndexConfig (retrieval.index.config): the requested type, a value for every knob of INDEX_KNOBS, the memory budget.
IndexRequest = Any

MIN_POINTS_PER_CENTROID = 39  # below this FAISS k-means gives poor centroids (its own warning threshold)
TRAIN_POINTS_PER_LIST = 64  # default IVF training sample per list (FAISS itself subsamples above 256)
MAX_AUTO_NLIST = 65_536
EF_LADDER = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
COARSE_EF_CONSTRUCTION, COARSE_EF_SEARCH = 40, 64  # the HNSW coarse quantizer's graph: build and assignment beams
FASTSCAN_REFINE = 16  # ivf-fastscan's refine factor when none is given (calibration sweeps it anyway)


@dataclass(frozen=True)
@knob_fields(lambda knob: 0, after="index_type")
class IndexParams(KnobValues):
    """Concrete parameters of one built index (no "auto" left); stored in the index metadata.

    After `index_type`, one int field per knob of INDEX_KNOBS (nlist, nprobe, pq_m, ...): 0 where the type
    does not use it.
    """

    index_type: str

    @property
    def kind(self) -> IndexType:
        return index_type(self.index_type)

    @property
    def exact(self) -> bool:
        return self.kind.exact

    @property
    def stores_exact_vectors(self) -> bool:
        """Whether the exact float32 vectors can be read back from the index (else a folder keeps gallery.npy)."""
        return self.refine_factor > 0 or self.kind.stores_vectors

    def factory_string(self) -> str:
        """The faiss.index_factory description of this index."""
        return self.kind.factory(self) + (",RFlat" if self.refine_factor > 0 else "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> IndexParams:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


class IndexType:
    """One index type. Subclasses override what differs; the defaults describe an exact, GPU-capable type."""

    name: ClassVar[str]
    exact: ClassVar[bool] = False
    knobs: ClassVar[tuple[str, ...]] = ()  # the INDEX_KNOBS it is built or searched with (the others stay 0)
    knob: ClassVar[Knob | None] = None  # the setting calibration sweeps and --nprobe/--ef-search override
    sweeps_refine: ClassVar[bool] = False  # with refinement, calibration sweeps the refine factor under the knob
    held_out_calibration: ClassVar[bool] = False  # calibrated with queries it does not hold (graphs)
    gpu_unsupported: ClassVar[str] = ""  # why FAISS cannot run it on a GPU ("" = it can)
    removable: ClassVar[bool] = False
    mergeable: ClassVar[bool] = True  # shards can be merged into one index
    stores_vectors: ClassVar[bool] = True  # exact vectors can be read back without refinement
    milvus_type: ClassVar[str] = ""  # the Milvus index type of the same kind ("" = none)

    def milvus_build(self, params: IndexParams) -> dict[str, int]:
        """The Milvus index's build parameters (create_index `params`)."""
        return {}

    def milvus_search(self, params: IndexParams) -> dict[str, int]:
        """The Milvus search parameters carrying this type's search knob."""
        return {}

    def resolve(self, cfg: IndexRequest, n: int, d: int) -> IndexParams:
        """Concrete parameters for `n` vectors of size `d`, or IndexBuildError saying what to change."""
        raise NotImplementedError

    def factory(self, params: IndexParams) -> str:
        """The faiss.index_factory description, without refinement."""
        raise NotImplementedError

    def memory_bytes(self, n: int, d: int, cfg: IndexRequest) -> int:
        """Rough resident size of `n` vectors of dimension `d` (vectors + ids + graph/lists)."""
        return n * d * 4

    def gpu_refusal(self, params: IndexParams) -> str:
        """Why FAISS cannot build or search this index on a GPU ("" = it can)."""
        return self.gpu_unsupported

    def prepare(self, index: faiss.Index, params: IndexParams) -> None:
        """Build-time settings of a new, empty index."""

    def apply_search(self, index: faiss.Index, params: IndexParams) -> None:
        """Apply the knob's value in `params` to a built index."""

    def ladder(self, params: IndexParams, k: int, n: int) -> list[int]:
        """The knob values calibration tries, cheapest first, for top-`k` over `n` vectors."""
        return []

    def check_knob(self, params: IndexParams, value: int) -> None:
        """Refuse a knob value this index cannot search with (UsageError naming the flag)."""

    def gpu_options(self, options: Any) -> None:
        """Adjust the GpuClonerOptions a GPU copy of this index is made with."""

    def remove(self, index: faiss.Index, selector: Any, rows: np.ndarray) -> None:
        """Remove the sorted rows `rows` (also as an IDSelector); later rows move up (removable types only)."""
        raise IndexBuildError(f"a {self.name} index cannot remove items")

    def stored_vectors(self, index: faiss.Index, n: int) -> np.ndarray | None:
        """The stored float32 vectors (n, D) of an unrefined index, or None when it keeps codes only."""
        return index.reconstruct_n(0, n)

    def merge(self, merged: faiss.Index, shard: faiss.Index) -> None:
        """Append `shard` (the next id range) to `merged`."""
        merged.merge_from(shard, 0)  # flat rows append in order


class Flat(IndexType):
    name = "flat"
    exact = True
    removable = True
    milvus_type = "FLAT"

    def resolve(self, cfg: IndexRequest, n: int, d: int) -> IndexParams:
        return IndexParams(self.name)

    def factory(self, params: IndexParams) -> str:
        return "Flat"

    def remove(self, index: faiss.Index, selector: Any, rows: np.ndarray) -> None:
        index.remove_ids(selector)


def default_nlist(n: int) -> int:
    """About 4 * sqrt(N) lists, never more than the vectors can train (39 per centroid)."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_CENTROID, MAX_AUTO_NLIST)))


class Ivf(IndexType):
    """Inverted lists over a k-means coarse quantizer; `nprobe` lists are scanned per query.

    The quantizer compares a vector with every centroid (`coarse_hnsw_m` 0) or searches an HNSW graph over
    them; k-means training is the same either way (FAISS trains on a flat index, then builds the graph)."""

    knobs: ClassVar[tuple[str, ...]] = ("nlist", "nprobe", "coarse_hnsw_m", "refine_factor", "train_size")
    knob = NPROBE
    sweeps_refine = True  # nprobe sets the cost; re-ranking k x factor candidates is small beside it
    removable = True

    def _nlist(self, cfg: IndexRequest, n: int) -> int:
        if cfg.nlist <= 0:
            if n < MIN_POINTS_PER_CENTROID:
                raise IndexBuildError(
                    f"{self.name} needs at least {MIN_POINTS_PER_CENTROID} vectors to train its lists; the gallery "
                    f"has {n}. Use --index-type flat."
                )
            return default_nlist(n)
        if n < MIN_POINTS_PER_CENTROID * cfg.nlist:
            raise IndexBuildError(
                f"{self.name} with nlist={cfg.nlist} needs at least {MIN_POINTS_PER_CENTROID * cfg.nlist:,} vectors "
                f"to train ({MIN_POINTS_PER_CENTROID} per list); the gallery has {n:,}. Lower --nlist "
                f"(at most {max(1, n // MIN_POINTS_PER_CENTROID)}) or use --index-type flat."
            )
        return cfg.nlist

    def _params(self, cfg: IndexRequest, n: int, nlist: int, code_centroids: int = 0, **codes: int) -> IndexParams:
        """IVF parameters with a training sample large enough for the lists and the codes' `code_centroids`."""
        if cfg.coarse_hnsw_m == 1:
            raise IndexBuildError("coarse_hnsw_m must be 0 (brute-force assignment) or >= 2")
        floor = MIN_POINTS_PER_CENTROID * max(nlist, code_centroids)
        train_size = cfg.train_size if cfg.train_size > 0 else max(TRAIN_POINTS_PER_LIST * nlist, floor)
        train_size = int(min(n, max(train_size, floor)))
        return IndexParams(
            self.name,
            **knob_values(
                nlist=nlist,
                nprobe=max(1, min(cfg.nprobe, nlist)),
                coarse_hnsw_m=cfg.coarse_hnsw_m,
                refine_factor=cfg.refine_factor,
                train_size=train_size,
                **codes,
            ),
        )

    def resolve(self, cfg: IndexRequest, n: int, d: int) -> IndexParams:
        return self._params(cfg, n, self._nlist(cfg, n))

    @staticmethod
    def coarse(params: IndexParams) -> str:
        """The factory's coarse quantizer: "IVF{nlist}" or "IVF{nlist}_HNSW{M}"."""
        return f"IVF{params.nlist}" + (f"_HNSW{params.coarse_hnsw_m}" if params.coarse_hnsw_m > 0 else "")

    def gpu_refusal(self, params: IndexParams) -> str:
        if params.coarse_hnsw_m > 0:
            return "an HNSW coarse quantizer runs on the CPU (FAISS has no GPU HNSW)"
        return self.gpu_unsupported

    def prepare(self, index: faiss.Index, params: IndexParams) -> None:
        self._coarse_beams(index, params)

    @staticmethod
    def _coarse_beams(index: faiss.Index, params: IndexParams) -> None:
        import faiss

        if params.coarse_hnsw_m > 0:
            graph = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer).hnsw
            graph.efConstruction, graph.efSearch = COARSE_EF_CONSTRUCTION, COARSE_EF_SEARCH

    def apply_search(self, index: faiss.Index, params: IndexParams) -> None:
        import faiss

        faiss.extract_index_ivf(index).nprobe = params.nprobe
        self._coarse_beams(index, params)  # HNSW searches max(efSearch, nprobe) centroids

    def milvus_build(self, params: IndexParams) -> dict[str, int]:
        return {"nlist": params.nlist}

    def milvus_search(self, params: IndexParams) -> dict[str, int]:
        return {"nprobe": params.nprobe}

    def ladder(self, params: IndexParams, k: int, n: int) -> list[int]:
        return [p for p in (2**i for i in range(0, 20)) if p < params.nlist] + [params.nlist]

    def check_knob(self, params: IndexParams, value: int) -> None:
        if not 1 <= value <= params.nlist:
            raise UsageError(f"--nprobe must be in 1..{params.nlist} (the index has {params.nlist} lists)")

    def remove(self, index: faiss.Index, selector: Any, rows: np.ndarray) -> None:
        """IVF lists keep explicit ids: after removal the remaining ids are shifted down past the removed rows."""
        import faiss
        import numpy as np

        ivf = faiss.extract_index_ivf(index)
        ivf.remove_ids(selector)
        outer = faiss.downcast_index(index)
        if outer.ntotal != ivf.ntotal:  # an OPQ rotation (IndexPreTransform) keeps its own count
            outer.ntotal = ivf.ntotal
        lists = ivf.invlists
        for list_no in range(ivf.nlist):
            size = lists.list_size(list_no)
            if size == 0:
                continue
            ids = faiss.rev_swig_ptr(lists.get_ids(list_no), size).copy()
            new_ids = np.ascontiguousarray(ids - np.searchsorted(rows, ids), dtype=np.int64)
            codes = faiss.rev_swig_ptr(lists.get_codes(list_no), size * lists.code_size).copy()
            lists.update_entries(list_no, 0, size, faiss.swig_ptr(new_ids), faiss.swig_ptr(codes))

    def merge(self, merged: faiss.Index, shard: faiss.Index) -> None:
        import faiss

        a, b = faiss.downcast_index(merged), faiss.downcast_index(shard)
        if isinstance(a, faiss.IndexRefine):  # FAISS cannot merge refined indexes: lists and exact rows apart
            offset = a.ntotal
            faiss.downcast_index(a.base_index).merge_from(faiss.downcast_index(b.base_index), offset)
            faiss.downcast_index(a.refine_index).merge_from(faiss.downcast_index(b.refine_index), 0)
            a.ntotal = a.base_index.ntotal
            return
        merged.merge_from(shard, merged.ntotal)  # shard-local ids shifted to global ids


class IvfFlat(Ivf):
    name = "ivf-flat"
    milvus_type = "IVF_FLAT"

    def factory(self, params: IndexParams) -> str:
        return f"{self.coarse(params)},Flat"

    def memory_bytes(self, n: int, d: int, cfg: IndexRequest) -> int:
        return n * d * 4 + n * 8

    def stored_vectors(self, index: faiss.Index, n: int) -> np.ndarray | None:
        import faiss

        ivf = faiss.extract_index_ivf(index)
        ivf.make_direct_map()
        try:
            return ivf.reconstruct_n(0, n)
        finally:
            ivf.set_direct_map_type(faiss.DirectMap.NoMap)


class IvfSq8(Ivf):
    """IVF with 8-bit scalar-quantised vectors (one byte per dimension): a quarter of ivf-flat's memory, small loss."""

    name = "ivf-sq8"
    stores_vectors = False
    milvus_type = "IVF_SQ8"

    def factory(self, params: IndexParams) -> str:
        return f"{self.coarse(params)},SQ8"

    def memory_bytes(self, n: int, d: int, cfg: IndexRequest) -> int:
        return n * (d + 8) + (n * d * 4 if cfg.refine_factor > 0 else 0)

    def stored_vectors(self, index: faiss.Index, n: int) -> np.ndarray | None:
        return None


def _check_pq_m(pq_m: int, d: int) -> None:
    if pq_m <= 0 or d % pq_m != 0:
        hint = ", ".join(str(m) for m in (8, 16, 32, 48, 64, 96, 128) if d % m == 0) or "1"
        raise IndexBuildError(f"pq_m={pq_m} must divide the embedding size {d}; try {hint}")


def _opq(params: IndexParams) -> str:
    """The factory prefix of an OPQ rotation, when asked for."""
    return f"OPQ{params.pq_m}," if params.opq else ""


def _opq_codes(index: faiss.Index, params: IndexParams, nbits: int) -> None:
    """Let the OPQ rotation learn with the index's own code size (FAISS otherwise trains an 8-bit PQ inside it,
    16x the work of 4-bit codes). The quantizer is only read while training; the index holds it until then."""
    import faiss

    if not params.opq:
        return
    rotation = faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0))
    trainer = faiss.ProductQuantizer(rotation.d_out, params.pq_m, nbits)
    rotation.pq = trainer
    index.__dict__["_opq_trainer"] = trainer  # FAISS's proxies refuse new attributes; this keeps it alive


class IvfPq(Ivf):
    name = "ivf-pq"
    knobs: ClassVar[tuple[str, ...]] = (*Ivf.knobs, "pq_m", "pq_nbits", "opq")
    stores_vectors = False
    milvus_type = "IVF_PQ"

    def milvus_build(self, params: IndexParams) -> dict[str, int]:
        return {"nlist": params.nlist, "m": params.pq_m, "nbits": params.pq_nbits}

    def resolve(self, cfg: IndexRequest, n: int, d: int) -> IndexParams:
        nlist = self._nlist(cfg, n)
        pq_m, pq_nbits = cfg.pq_m, cfg.pq_nbits
        _check_pq_m(pq_m, d)
        if not 1 <= pq_nbits <= 16:
            raise IndexBuildError(f"pq_nbits must be in 1..16, got {pq_nbits}")
        needed = MIN_POINTS_PER_CENTROID * 2**pq_nbits
        if n < needed:
            raise IndexBuildError(
                f"ivf-pq with {pq_nbits}-bit codes needs at least {needed:,} vectors to train its "
                f"{2**pq_nbits} centroids per sub-quantizer; the gallery has {n:,}. Lower --pq-nbits "
                "or use --index-type ivf-flat / flat."
            )
        return self._params(cfg, n, nlist, 2**pq_nbits, pq_m=pq_m, pq_nbits=pq_nbits, opq=cfg.opq)

    def factory(self, params: IndexParams) -> str:
        # np: skip polysemous training (unused, slow)
        return f"{_opq(params)}{self.coarse(params)},PQ{params.pq_m}x{params.pq_nbits}np"

    def prepare(self, index: faiss.Index, params: IndexParams) -> None:
        super().prepare(index, params)
        _opq_codes(_unrefined(index), params, params.pq_nbits)

    def memory_bytes(self, n: int, d: int, cfg: IndexRequest) -> int:
        return n * (cfg.pq_m * cfg.pq_nbits // 8 + 8) + (n * d * 4 if cfg.refine_factor > 0 else 0)

    def gpu_options(self, options: Any) -> None:
        options.useFloat16 = True  # large pq_m needs half-precision lookup tables on the GPU

    def stored_vectors(self, index: faiss.Index, n: int) -> np.ndarray | None:
        return None


class IvfFastScan(Ivf):
    """IVF with 4-bit PQ codes laid out for SIMD scanning (FAISS "PQ{m}x4fs"), re-ranked exactly.

    4-bit codes alone rarely reach a high recall, so the index is always refined (IndexRefineFlat keeps the
    float32 vectors): with no refine factor given it starts at FASTSCAN_REFINE, and calibration picks
    nprobe and then the smallest factor. Removal is refused (refined indexes keep two id spaces);
    shards merge their lists and their exact rows."""

    name = "ivf-fastscan"
    knobs: ClassVar[tuple[str, ...]] = (*Ivf.knobs, "pq_m", "opq")
    gpu_unsupported = "FAISS has no GPU fast-scan index; it runs on the CPU"
    removable = False
    stores_vectors = True  # always refined: the exact rows are read back from the refinement

    def resolve(self, cfg: IndexRequest, n: int, d: int) -> IndexParams:
        nlist = self._nlist(cfg, n)
        _check_pq_m(cfg.pq_m, d)
        params = self._params(cfg, n, nlist, 2**4, pq_m=cfg.pq_m, opq=cfg.opq)
        return dataclasses.replace(params, **knob_values(refine_factor=cfg.refine_factor or FASTSCAN_REFINE))

    def factory(self, params: IndexParams) -> str:
        return f"{_opq(params)}{self.coarse(params)},PQ{params.pq_m}x4fs"

    def prepare(self, index: faiss.Index, params: IndexParams) -> None:
        super().prepare(index, params)
        _opq_codes(_unrefined(index), params, 4)

    def memory_bytes(self, n: int, d: int, cfg: IndexRequest) -> int:
        return n * (-(-cfg.pq_m // 2) + 8) + n * d * 4  # 4-bit codes, ids, and the exact rows of the refinement

    def stored_vectors(self, index: faiss.Index, n: int) -> np.ndarray | None:
        return None  # only reached without refinement, which this type never builds


class Hnsw(IndexType):
    name = "hnsw"
    knobs: ClassVar[tuple[str, ...]] = ("hnsw_m", "ef_construction", "ef_search", "refine_factor")
    knob = EF_SEARCH
    held_out_calibration = True  # a graph finds points it already holds far more easily than new queries
    gpu_unsupported = "FAISS has no GPU HNSW; it runs on the CPU"
    mergeable = False
    milvus_type = "HNSW"

    def milvus_build(self, params: IndexParams) -> dict[str, int]:
        return {"M": params.hnsw_m, "efConstruction": params.ef_construction}

    def milvus_search(self, params: IndexParams) -> dict[str, int]:
        return {"ef": params.ef_search}

    def resolve(self, cfg: IndexRequest, n: int, d: int) -> IndexParams:
        if cfg.hnsw_m < 2:
            raise IndexBuildError(f"hnsw_m must be >= 2, got {cfg.hnsw_m}")
        return IndexParams(
            self.name,
            **knob_values(
                hnsw_m=cfg.hnsw_m,
                ef_construction=max(cfg.ef_construction, cfg.hnsw_m),
                ef_search=cfg.ef_search,
                refine_factor=cfg.refine_factor,
            ),
        )

    def factory(self, params: IndexParams) -> str:
        return f"HNSW{params.hnsw_m}"

    def memory_bytes(self, n: int, d: int, cfg: IndexRequest) -> int:
        return int(n * d * 4 + n * cfg.hnsw_m * 2 * 4 * 1.1)

    def prepare(self, index: faiss.Index, params: IndexParams) -> None:
        _graph_of(index).efConstruction = params.ef_construction

    def apply_search(self, index: faiss.Index, params: IndexParams) -> None:
        _graph_of(index).efSearch = params.ef_search

    def ladder(self, params: IndexParams, k: int, n: int) -> list[int]:
        """efSearch values from k upwards, ending at the first one that covers the whole gallery."""
        ladder: list[int] = []
        for ef in EF_LADDER:
            if ef >= k:
                ladder.append(ef)
                if ef >= n:
                    break
        return ladder or [k]

    def check_knob(self, params: IndexParams, value: int) -> None:
        if value < 1:
            raise UsageError("--ef-search must be >= 1")


def _unrefined(index: faiss.Index) -> Any:
    """The index under an IndexRefineFlat, or the index itself."""
    import faiss

    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.base_index) if isinstance(index, faiss.IndexRefine) else index


def _graph_of(index: faiss.Index) -> Any:
    """The HNSW graph of an HNSW index, refined or not."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        index = faiss.downcast_index(index.base_index)
    return index.hnsw


INDEX_TYPES: dict[str, IndexType] = {t.name: t for t in (Flat(), IvfFlat(), IvfSq8(), IvfPq(), IvfFastScan(), Hnsw())}


def index_type(name: str) -> IndexType:
    """The registered type called `name`, or IndexBuildError listing the choices."""
    try:
        return INDEX_TYPES[name]
    except KeyError:
        raise IndexBuildError(f"unknown index type {name!r}; choose auto or one of {', '.join(INDEX_TYPES)}") from None
