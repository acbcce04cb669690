"""Build-time calibration of approximate indexes: measure recall on the gallery itself, keep the cheapest
search setting that reaches the target.

A fixed nprobe / efSearch gives very different recall on different data (well-separated classes vs
a real catalogue where neighbourhoods overlap), so the setting is measured, not assumed:

1. a seeded sample of gallery vectors serves as queries; their exact top-k (each query's own row
   excluded) comes from chunked exact search (`retrieval.knn.FlatSearcher`, on a GPU when present).
   A graph (HNSW) finds points it already holds far more easily than new queries (measured: efSearch
   16 gave Recall@10 0.95 for gallery points and 0.55 for new ones), so HNSW is calibrated with the
   gallery's last rows held out of the graph, and adds them afterwards;
2. the built index is searched with each setting of its knob ladder (IVF `nprobe`, HNSW `efSearch`,
   IVF-PQ with refinement: `nprobe` then the refine factor), recording Recall@k against exact and
   queries/s in batches of 256 on the CPU;
3. the smallest setting whose Recall@k reaches the target is applied to the index (so it is written
   into the index file) and recorded with the whole curve in the folder's metadata.

For `--index-type auto` above the size rule (`flat_max_items`), `build_calibrated` measures instead of
assuming: each candidate type (IVF-flat, IVF fast-scan + refinement, HNSW; IVF-PQ when flat does not fit)
whose memory estimate fits the budget is built and calibrated on a seeded sample of at most
AUTO_SAMPLE_ITEMS gallery vectors, beside exact search on the same queries. `choose_fastest` (a pure
function of those measurements) keeps the fastest that reaches the target at least AUTO_MIN_SPEEDUP x
faster than flat, else flat when it fits; the winner is then built on the whole gallery and calibrated
again. Every candidate's speed, recall and memory, and why auto chose, go to the folder's metadata. Build
time stays bounded: the sample size, sweeps that stop once slower than AUTO_MIN_SPEEDUP x flat, and
AUTO_TIME_CAP_S after which the remaining candidates are skipped (and recorded as skipped).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from retrieval.config import CalibrationConfig
from retrieval.errors import UsageError
from retrieval.index.config import IndexConfig
from retrieval.index.errors import IndexBuildError
from retrieval.index.faiss_index import BuiltIndex, add_to_index, build_faiss_index, configure_search, resolve_params
from retrieval.index.knobs import EF_SEARCH, NPROBE, knob_label, knob_values
from retrieval.index.meta import IndexMeta
from retrieval.index.types import INDEX_TYPES, IndexParams, default_nlist

TIMING_BATCH = 256  # queries per search call when timing (the batch size speed targets are stated at)
REFINE_LADDER = (1, 2, 4, 8, 16, 32, 64)
# Larger re-rankings, tried only when REFINE_LADDER's largest reaches the target at no knob value: codes too coarse
# for the data (4-bit fast-scan codes on a hard 1M catalogue stopped at Recall@10 0.87 with 64, reached 0.96 with 512).
REFINE_EXTENSION = (128, 256, 512)
PLATEAU_GAIN = 0.001  # two doublings in a row gaining less than this: recall has stopped improving
MIN_TIMING_SECONDS, MAX_TIMING_PASSES = 0.25, 20
AUTO_MIN_SPEEDUP = 1.5  # auto keeps an approximate index only when it is at least this much faster than exact
MAX_HELD_OUT_FRACTION = 5  # a graph (HNSW) holds out at most 1/5 of the gallery while it is calibrated
AUTO_CANDIDATES = ("ivf-flat", "ivf-fastscan", "hnsw", "ivf-pq")  # what auto measures beside flat, cheapest first
AUTO_MEMORY_ONLY = ("ivf-pq",)  # measured only when flat exceeds the memory budget (they exist to save memory)
AUTO_SAMPLE_ITEMS = 100_000  # auto measures its candidates on a seeded sample of at most this many vectors
AUTO_TIME_CAP_S = 900.0  # candidates not started after this many seconds of measuring are skipped
COARSE_HNSW_FROM = 16_384  # auto's IVF indexes with at least this many lists assign with an HNSW graph
AUTO_COARSE_HNSW_M = 32


@dataclass
class CurvePoint:
    """One measured search setting: its knob values, Recall@k against exact search and CPU queries/s."""

    setting: dict[str, int]
    recall: float
    qps: float


@dataclass
class Calibration:
    """What calibration measured for one built index, and what it chose."""

    index_type: str
    target_recall: float
    k: int
    n_queries: int
    seed: int
    chosen: dict[str, int]
    recall: float  # Recall@k of the chosen setting
    qps: float  # its queries/s (CPU, batches of TIMING_BATCH)
    flat_qps: float  # exact search, same queries, same conditions
    reached: bool  # whether the chosen setting reaches target_recall
    curve: list[CurvePoint] = field(default_factory=list)
    swept: bool = True  # False: only the given setting was measured
    device: str = ""  # where the speeds were measured
    exact_device: str = ""  # where the exact top-k ran
    seconds: float = 0.0
    applied: bool = True  # False when auto replaced this index by flat
    held_out: bool = False  # queries were rows kept out of the index while measuring (HNSW)

    @property
    def speedup(self) -> float:
        return self.qps / self.flat_qps if self.flat_qps > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["speedup"] = round(self.speedup, 3)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Calibration:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in names}
        values["curve"] = [CurvePoint(**p) for p in raw.get("curve", [])]
        return cls(**values)

    def summary(self) -> str:
        """One line: the chosen setting, its recall against exact search and its speed against exact."""
        setting = _setting_words(self.chosen)
        how = "calibrated" if self.swept else "measured"
        verdict = (
            f">= target {self.target_recall:g}"
            if self.reached
            else f"below target {self.target_recall:g}: the best this index reached"
        )
        queries = "held-out gallery vectors" if self.held_out else "gallery vectors as queries"
        return (
            f"{setting} ({how} on {self.n_queries:,} {queries}: Recall@{self.k} vs exact "
            f"{self.recall:.3f}, {verdict}; {self.speedup:.1f}x exact search speed on {self.device})"
        )


def _setting_words(setting: dict[str, int]) -> str:
    return ", ".join(f"{knob_label(k)} {v}" for k, v in setting.items())


# -- measuring -------------------------------------------------------------------------------------


def sample_queries(n: int, count: int, seed: int) -> np.ndarray:
    """Sorted, seeded sample of min(count, n) gallery row numbers to use as calibration queries."""
    count = int(min(count, n))
    return np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False))


def exact_neighbours(
    vectors: np.ndarray, queries: np.ndarray, rows: np.ndarray | None, k: int, use_gpu: bool
) -> tuple[np.ndarray, float, str]:
    """(ids (Q, k) of the exact top-k of `queries` among `vectors`, each query's own row `rows[i]` excluded
    when given; CPU queries/s of exact search; device the exact search ran on). The CPU speed is timed
    separately when a GPU did the work."""
    from retrieval.knn import FlatSearcher

    def exact(searcher: FlatSearcher) -> np.ndarray:
        return np.concatenate(
            [
                searcher.search(
                    queries[s : s + TIMING_BATCH], k, self_ids=None if rows is None else rows[s : s + TIMING_BATCH]
                )[1]
                for s in range(0, len(queries), TIMING_BATCH)
            ]
        )

    searcher = FlatSearcher(vectors, metric="ip", use_gpu=use_gpu, max_k=k + 1)
    device = searcher.device
    if device.startswith("cpu"):  # the exact search is itself the CPU timing of flat
        on_cpu = searcher
        ids, seconds = _timed_passes(lambda: exact(on_cpu))
        return ids, len(queries) / seconds, device
    ids = exact(searcher)
    del searcher  # free the GPU copy before timing the CPU one
    cpu = FlatSearcher(vectors, metric="ip", use_gpu=False, max_k=k + 1)
    timed = queries[: 2 * TIMING_BATCH]
    _, seconds = _timed_passes(
        lambda: [cpu.index.search(timed[s : s + TIMING_BATCH], k + 1) for s in range(0, len(timed), TIMING_BATCH)]
    )
    return ids, len(timed) / seconds, device


def _timed_passes(run: Callable[[], Any]) -> tuple[Any, float]:
    """(result of the first pass, seconds of the fastest pass): passes repeat until MIN_TIMING_SECONDS
    have gone by (at most MAX_TIMING_PASSES), so small galleries are not timed by noise."""
    first, best, spent, passes = None, float("inf"), 0.0, 0
    while passes < MAX_TIMING_PASSES and (passes == 0 or spent < MIN_TIMING_SECONDS):
        t0 = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - t0
        first = out if first is None else first
        best, spent, passes = min(best, seconds), spent + seconds, passes + 1
    return first, max(best, 1e-9)


def _search_without_self(index: faiss.Index, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Top-k ids of each query with its own row removed (k+1 searched), and queries/s in batches."""

    def run() -> np.ndarray:
        return np.concatenate(
            [index.search(queries[s : s + TIMING_BATCH], k + 1)[1] for s in range(0, len(queries), TIMING_BATCH)]
        )

    ids, seconds = _timed_passes(run)
    own = (ids == rows[:, None]) & (rows[:, None] >= 0)  # row -1: a query the index does not hold
    own[~own.any(axis=1), -1] = True  # rows that did not find themselves drop their last result
    return ids[~own].reshape(len(ids), k), len(queries) / seconds


def recall_against(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k (ids -1 never count)."""
    k = exact.shape[1]
    hits = (approx[:, :, None] == exact[:, None, :]) & (approx[:, :, None] >= 0)
    return float(hits.any(axis=2).sum(axis=1).mean() / k)


def _plateaued(points: list[CurvePoint]) -> bool:
    if len(points) < 3:
        return False
    a, b, c = (p.recall for p in points[-3:])
    return b - a < PLATEAU_GAIN and c - b < PLATEAU_GAIN


# -- choosing --------------------------------------------------------------------------------------


class _Sweep:
    """Measures settings of one index against the exact neighbours, remembering every point."""

    def __init__(
        self,
        index: faiss.Index,
        params: IndexParams,
        queries: np.ndarray,
        rows: np.ndarray,
        exact: np.ndarray,
        k: int,
        progress: bool = False,
    ) -> None:
        from tqdm.auto import tqdm

        self.index, self.params, self.queries, self.rows, self.exact, self.k = index, params, queries, rows, exact, k
        self.points: list[CurvePoint] = []
        self.bar = tqdm(desc="calibrating", unit="setting", disable=not progress)

    def measure(self, **setting: int) -> CurvePoint:
        configure_search(self.index, dataclasses.replace(self.params, **knob_values(**setting)))
        ids, qps = _search_without_self(self.index, self.queries, self.rows, self.k)
        point = CurvePoint(dict(setting), round(recall_against(ids, self.exact), 5), round(qps, 1))
        self.points.append(point)
        self.bar.set_postfix_str(f"{_setting_words(point.setting)}: Recall@{self.k} {point.recall:.3f}")
        self.bar.update()
        return point


def _sweep_ladder(
    sweep: _Sweep, key: str, ladder: list[int], target: float, min_qps: float, **fixed: int
) -> CurvePoint | None:
    """Walk `ladder` upwards; the first point reaching `target`, else None (stops at a plateau, or once
    slower than `min_qps`)."""
    walked: list[CurvePoint] = []
    for value in ladder:
        point = sweep.measure(**fixed, **{key: value})
        walked.append(point)
        if point.recall >= target:
            return point
        if _plateaued(walked) or point.qps < min_qps:
            return None
    return None


def calibrate(
    index: faiss.Index,
    params: IndexParams,
    vectors: np.ndarray,
    cfg: CalibrationConfig,
    *,
    use_gpu: bool = True,
    min_speedup: float = 0.0,
    holdout: np.ndarray | None = None,
    progress: bool = False,
) -> tuple[IndexParams, Calibration]:
    """Choose the search setting of the built CPU `index` (over `vectors` (N, D), L2-normalised) and apply it.

    Queries are a seeded sample of `vectors` (own row excluded), or `holdout` (Q, D): vectors the index
    does not hold, for graphs (HNSW), where a point already in the graph is found far more easily
    than a new query. Returns the parameters with the chosen setting and the measurements.
    `min_speedup` > 0 stops a sweep once a setting is slower than that multiple of exact search (the
    caller would not keep it).
    """
    if params.exact:
        raise ValueError("flat indexes are exact; there is nothing to calibrate")
    check_calibration_config(cfg)
    t_start = time.perf_counter()
    n = index.ntotal
    k = int(min(cfg.k, n - 1))
    if k < 1:
        raise ValueError("calibration needs at least 2 gallery vectors")
    if holdout is None:
        rows = sample_queries(n, cfg.queries, cfg.seed)
        queries = np.ascontiguousarray(vectors[rows])
        exact, flat_qps, exact_device = exact_neighbours(vectors, queries, rows, k, use_gpu)
    else:  # new points: no row of the index is their own (-1 never matches an id)
        queries = np.ascontiguousarray(holdout, dtype=np.float32)
        rows = np.full(len(queries), -1, np.int64)
        exact, flat_qps, exact_device = exact_neighbours(vectors, queries, None, k, use_gpu)
    min_qps = min_speedup * flat_qps
    sweep = _Sweep(index, params, queries, rows, exact, k, progress)
    target = cfg.target_recall
    if cfg.sweep:
        found = _search_ladders(sweep, params, target, min_qps, n)
    else:
        found = sweep.measure(**_current_setting(params))
    reached = found is not None and found.recall >= target
    if found is None:  # the best recall measured; the cheaper setting on ties
        found = max(sweep.points, key=lambda p: (p.recall, p.qps))
    sweep.bar.close()
    chosen = dataclasses.replace(params, **knob_values(**found.setting))
    configure_search(index, chosen)
    result = Calibration(
        index_type=params.index_type,
        target_recall=target,
        k=k,
        n_queries=len(queries),
        seed=cfg.seed,
        chosen=dict(found.setting),
        recall=found.recall,
        qps=found.qps,
        flat_qps=round(flat_qps, 1),
        reached=bool(reached),
        curve=sweep.points,
        swept=cfg.sweep,
        device=getattr(index, "device", None) or f"cpu, {faiss.omp_get_max_threads()} threads",
        exact_device=exact_device,
        seconds=round(time.perf_counter() - t_start, 3),
        held_out=holdout is not None,
    )
    return chosen, result


def _search_ladders(sweep: _Sweep, params: IndexParams, target: float, min_qps: float, n: int) -> CurvePoint | None:
    """The cheapest setting of the index type's knob (and refine factor) that reaches `target`, else None."""
    kind = params.kind
    assert kind.knob is not None  # every approximate type has a knob
    knob, ladder = kind.knob.field, kind.ladder(params, sweep.k, n)
    if params.refine_factor <= 0 or not kind.sweeps_refine:
        return _sweep_ladder(
            sweep,
            knob,
            ladder,
            target,
            min_qps,
            **({"refine_factor": params.refine_factor} if params.refine_factor > 0 else {}),
        )
    # Re-ranking k x factor candidates costs k x factor dot products, small beside the knob's cost (lists scanned):
    # first the usual factors; only when none reaches the target, the larger ones.
    point = _walk_refined(sweep, knob, ladder, target, min_qps, REFINE_LADDER)
    if point is None:
        point = _walk_refined(sweep, knob, ladder, target, min_qps, REFINE_EXTENSION)
    return point


def _walk_refined(
    sweep: _Sweep, knob: str, ladder: list[int], target: float, min_qps: float, factors: tuple[int, ...]
) -> CurvePoint | None:
    """The smallest knob value that reaches `target` with the largest of `factors`, then the smallest factor
    there. A factor that misses at the largest value misses at all."""
    walked: list[CurvePoint] = []
    for value in ladder:
        top = sweep.measure(**{knob: value, "refine_factor": factors[-1]})
        walked.append(top)
        if top.recall >= target:
            for rf in factors[:-1]:
                point = sweep.measure(**{knob: value, "refine_factor": rf})
                if point.recall >= target:
                    return point
            return top
        if _plateaued(walked) or top.qps < min_qps:
            return None
    return None


def _current_setting(params: IndexParams) -> dict[str, int]:
    knob = params.kind.knob
    setting: dict[str, int] = {knob.field: getattr(params, knob.field)} if knob is not None else {}
    if params.refine_factor > 0:
        setting["refine_factor"] = params.refine_factor
    return setting


# -- building with calibration ---------------------------------------------------------------------


@dataclass
class Candidate:
    """One index type auto considered: its calibrated speed and recall on the sample, and its memory estimate
    for the whole gallery. `measured` False: skipped (memory budget, time cap, parameters), `note` says why."""

    name: str
    memory_bytes: int
    measured: bool = True
    factory: str = ""
    setting: dict[str, int] = field(default_factory=dict)
    recall: float = 0.0
    qps: float = 0.0
    flat_qps: float = 0.0  # exact search on the same sample and queries, in the same run
    reached: bool = False
    seconds: float = 0.0
    sample: int = 0
    note: str = ""
    k: int = 10

    @property
    def speedup(self) -> float:
        return self.qps / self.flat_qps if self.flat_qps > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["speedup"] = round(self.speedup, 3)
        return out

    def summary(self) -> str:
        if not self.measured:
            return f"not measured: {self.note}"
        setting = _setting_words(self.setting) or "exact"
        return (
            f"{self.factory} at {setting}: Recall@{self.k} {self.recall:.3f}, {self.speedup:.1f}x flat "
            f"({self.qps:,.0f} vs {self.flat_qps:,.0f} q/s on {self.sample:,} vectors), "
            f"{self.memory_bytes / 1024**3:.3g} GB for the gallery" + (f"; {self.note}" if self.note else "")
        )


def choose_fastest(
    candidates: list[Candidate],
    flat_memory: int,
    budget: int,
    target: float,
    k: int = 10,
    min_speedup: float = AUTO_MIN_SPEEDUP,
) -> tuple[str, str]:
    """(index type, why): auto's choice from measured candidates, a pure function of what was measured.

    Flat fits the budget: the fastest candidate that fits, reaches `target` and is at least `min_speedup` x
    faster than flat, else flat. Flat does not fit: the fastest fitting candidate that reaches the target,
    else the fitting one with the best recall, else the smallest."""
    fitting = [c for c in candidates if c.measured and c.memory_bytes <= budget]
    meeting = [c for c in fitting if c.reached]
    gb = f"{budget / 1024**3:g} GB"

    def others(chosen: str) -> str:
        rest = [
            f"{c.name} {c.speedup:.1f}x" + ("" if c.reached else f" (Recall@{k} {c.recall:.3f})")
            for c in candidates
            if c.measured and c.name != chosen
        ]
        return f"; measured: {', '.join(rest)}" if rest else ""

    if flat_memory <= budget:
        faster = [c for c in meeting if c.speedup >= min_speedup]
        if not faster:
            best = (
                max(meeting, key=lambda c: c.qps)
                if meeting
                else (max(fitting, key=lambda c: (c.recall, c.qps)) if fitting else None)
            )
            seen = (
                f" (best measured: {best.name} Recall@{k} {best.recall:.3f} at {best.speedup:.1f}x)"
                if best is not None
                else ""
            )
            return "flat", (
                f"auto built flat (exact search): no candidate reaches Recall@{k} {target:g} at >= "
                f"{min_speedup:g}x the speed of exact search{seen}, and flat fits the memory budget "
                f"of {gb}{others('flat')}"
            )
        best = max(faster, key=lambda c: c.qps)
        return best.name, (
            f"auto chose {best.name}: the fastest index reaching Recall@{k} {target:g} "
            f"({best.recall:.3f} at {best.speedup:.1f}x exact search, measured on {best.sample:,} "
            f"vectors){others(best.name)}"
        )
    if meeting:
        best = max(meeting, key=lambda c: c.qps)
        return best.name, (
            f"auto chose {best.name}: flat exceeds the memory budget of {gb}; the fastest fitting "
            f"index reaching Recall@{k} {target:g} ({best.recall:.3f} at {best.speedup:.1f}x){others(best.name)}"
        )
    if fitting:
        best = max(fitting, key=lambda c: (c.recall, c.qps))
        return best.name, (
            f"auto chose {best.name}: flat exceeds the memory budget of {gb} and no fitting index "
            f"reaches Recall@{k} {target:g}; {best.name} came closest ({best.recall:.3f}){others(best.name)}"
        )
    smallest = min(candidates, key=lambda c: c.memory_bytes) if candidates else None
    name = smallest.name if smallest is not None else "ivf-pq"
    return name, (f"auto chose {name}: nothing fits the memory budget of {gb}; {name} needs the least memory")


@dataclass
class CalibratedBuild:
    """A built index, its calibration (None for flat or when switched off) and why auto chose its type."""

    built: BuiltIndex
    calibration: Calibration | None
    decision: str = ""  # auto's reason for its choice, when it is not the plain size rule
    rejected: Calibration | None = None  # the approximate index auto measured and replaced by flat
    candidates: list[Candidate] = field(default_factory=list)  # what auto measured

    def meta(self) -> dict[str, Any]:
        """The IndexMeta fields this build fills (calibration, what auto measured or rejected, and why)."""
        out: dict[str, Any] = {}
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_dict()
        if self.rejected is not None:
            out["calibration_rejected"] = self.rejected.to_dict()
        if self.decision:
            out["index_decision"] = self.decision
        if self.candidates:
            out["auto_candidates"] = [c.to_dict() for c in self.candidates]
        return out


class FaissBuilder:
    """Builds FAISS indexes in this process: the default store of `build_calibrated`.

    Another store (retrieval.index.milvus_store.MilvusUpload) offers the same two methods. `local`: its searches
    run in this process, so comparing their speed with exact search here is meaningful (auto's flat fallback)."""

    local = True

    def build(self, vectors: np.ndarray, params: IndexParams, *, use_gpu: bool = True, seed: int = 0) -> BuiltIndex:
        return build_faiss_index(vectors, params, use_gpu=use_gpu, seed=seed)

    def add(self, index: Any, vectors: np.ndarray) -> None:
        add_to_index(index, vectors)


def held_out_count(params: IndexParams, calib: CalibrationConfig, n: int) -> int:
    """How many of the last gallery rows a build adds only after calibrating (0 = none).

    A graph finds points it already holds far more easily than new queries: HNSW is calibrated with its last
    rows held out of the graph (added afterwards), IVF with a sample of its own rows."""
    if params.exact or calib.target_recall <= 0 or not params.kind.held_out_calibration:
        return 0
    return min(calib.queries, n // MAX_HELD_OUT_FRACTION)


def _build_and_calibrate(
    vectors: np.ndarray,
    params: IndexParams,
    cfg: IndexConfig,
    calib: CalibrationConfig,
    min_speedup: float,
    seed: int,
    progress: bool,
    builder: Any = None,
) -> tuple[BuiltIndex, Calibration]:
    """Build `params` over `vectors` in the builder's store (default FaissBuilder()) and calibrate it (HNSW: with
    its last rows held out, added afterwards)."""
    builder = builder or FaissBuilder()
    n = len(vectors)
    held = held_out_count(params, calib, n)
    built = builder.build(vectors[: n - held] if held else vectors, params, use_gpu=cfg.use_gpu, seed=seed)
    chosen, result = calibrate(
        built.index,
        params,
        vectors[: n - held] if held else vectors,
        calib,
        use_gpu=cfg.use_gpu,
        min_speedup=min_speedup,
        holdout=vectors[n - held :] if held else None,
        progress=progress,
    )
    if held:
        t0 = time.perf_counter()
        builder.add(built.index, vectors[n - held :])
        built.add_seconds += time.perf_counter() - t0
    built.params = chosen
    return built, result


def _not_reached(cfg: IndexConfig, result: Calibration, why: str = "") -> str:
    return (
        f"{why}{result.index_type} reaches at most Recall@{result.k} {result.recall:.3f}, below the target "
        f"{result.target_recall:g} (more lists, a larger HNSW M or IVF-PQ refinement may reach it)"
    )


def build_calibrated(
    vectors: np.ndarray,
    cfg: IndexConfig,
    calib: CalibrationConfig | None = None,
    *,
    seed: int = 0,
    progress: bool = False,
    builder: Any = None,
) -> CalibratedBuild:
    """Resolve, build and (for approximate types) calibrate an index over `vectors` (N, D) L2-normalised.

    `--index-type auto` keeps flat by the size rule; above it (or when flat exceeds the memory budget) it
    measures its candidates and builds the fastest that reaches the target (`build_auto`). `builder` builds the
    index in its store (default FaissBuilder()); calibration measures whatever it built. A store whose searches do
    not run in this process (Milvus) cannot be compared with exact search here, so there auto keeps the size
    rule's type and calibrates it.
    """
    builder = builder or FaissBuilder()
    calib = calib or CalibrationConfig()
    check_calibration_config(calib)
    n, d = vectors.shape
    params = resolve_params(cfg, n, d)
    calibrating = not params.exact and calib.target_recall > 0
    if cfg.index_type == "auto" and calibrating and getattr(builder, "local", False):  # the size rule did not settle
        return build_auto(vectors, cfg, calib, seed=seed, progress=progress)
    if not calibrating:
        return CalibratedBuild(builder.build(vectors, params, use_gpu=cfg.use_gpu, seed=seed), None)
    built, result = _build_and_calibrate(vectors, params, cfg, calib, 0.0, seed, progress, builder)
    return CalibratedBuild(built, result, "" if result.reached else _not_reached(cfg, result))


def _candidate_config(cfg: IndexConfig, name: str, n: int, d: int) -> IndexConfig:
    """The IndexConfig auto builds candidate `name` with for `n` vectors: its lists sized for `n` (an HNSW
    coarse quantizer from COARSE_HNSW_FROM lists), fast-scan codes that divide `d`."""
    nlist = cfg.nlist if cfg.nlist > 0 else default_nlist(n)
    changes: dict[str, Any] = {"index_type": name}
    if name.startswith("ivf"):
        changes["coarse_hnsw_m"] = cfg.coarse_hnsw_m or (AUTO_COARSE_HNSW_M if nlist >= COARSE_HNSW_FROM else 0)
    if name == "ivf-fastscan" and d % 4 == 0:
        changes["pq_m"] = d // 4  # 4-bit codes of 4 dimensions each (PQ64x4 plateaued at Recall@10 0.80 on 512-d)
    elif name == "ivf-pq" and d % cfg.pq_m != 0:
        changes["pq_m"] = max(m for m in range(1, d // 4 + 1) if d % m == 0)
    return dataclasses.replace(cfg, **changes)


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def build_auto(
    vectors: np.ndarray, cfg: IndexConfig, calib: CalibrationConfig, *, seed: int = 0, progress: bool = False
) -> CalibratedBuild:
    """`--index-type auto` by measurement: calibrate each candidate on a sample, keep the fastest that reaches
    the target (`choose_fastest`), build it on the whole gallery. See the module docstring for the bounds."""
    n, d = vectors.shape
    budget = int(cfg.memory_budget_gb * 1024**3)
    flat_memory = INDEX_TYPES["flat"].memory_bytes(n, d, cfg)
    rows = sample_queries(n, AUTO_SAMPLE_ITEMS, seed) if n > AUTO_SAMPLE_ITEMS else np.arange(n)
    sample = np.ascontiguousarray(vectors[rows])
    whole = len(sample) == n
    names = [c for c in AUTO_CANDIDATES if flat_memory > budget or c not in AUTO_MEMORY_ONLY]
    candidates: list[Candidate] = []
    builds: dict[str, tuple[BuiltIndex, Calibration]] = {}
    t_start = time.perf_counter()
    for number, name in enumerate(names, 1):
        full_cfg = _candidate_config(cfg, name, n, d)
        memory = INDEX_TYPES[name].memory_bytes(n, d, full_cfg)
        if memory > budget:
            candidates.append(
                Candidate(
                    name,
                    memory,
                    False,
                    note=f"needs {memory / 1024**3:.3g} GB, over the memory budget of {cfg.memory_budget_gb:g} GB",
                )
            )
            continue
        if time.perf_counter() - t_start > AUTO_TIME_CAP_S:
            candidates.append(Candidate(name, memory, False, note=f"skipped: measuring passed {AUTO_TIME_CAP_S:g}s"))
            continue
        try:
            params = resolve_params(_candidate_config(cfg, name, len(sample), d), len(sample), d)
        except IndexBuildError as exc:
            candidates.append(Candidate(name, memory, False, note=str(exc)))
            continue
        _say(
            progress,
            f"auto: measuring {name} ({params.factory_string()}) on {len(sample):,} of {n:,} vectors "
            f"[{number}/{len(names)}]",
        )
        t0 = time.perf_counter()
        min_speedup = AUTO_MIN_SPEEDUP if flat_memory <= budget else 0.0
        built, result = _build_and_calibrate(sample, params, cfg, calib, min_speedup, seed, False)
        candidate = Candidate(
            name,
            memory,
            True,
            params.factory_string(),
            dict(result.chosen),
            result.recall,
            result.qps,
            result.flat_qps,
            result.reached,
            round(time.perf_counter() - t0, 3),
            len(sample),
            k=result.k,
        )
        candidates.append(candidate)
        _say(progress, f"auto:   {candidate.summary()}")
        if whole:
            builds[name] = (built, result)
        else:
            del built
    choice, decision = choose_fastest(candidates, flat_memory, budget, calib.target_recall, calib.k)
    _say(progress, decision)
    if choice == "flat":
        flat = build_faiss_index(vectors, IndexParams("flat"), use_gpu=cfg.use_gpu, seed=seed)
        measured = [c for c in candidates if c.measured]
        rejected = None
        if measured and whole:
            best = max(measured, key=lambda c: (c.reached, c.qps))
            rejected = builds[best.name][1]
            rejected.applied = False
        return CalibratedBuild(flat, None, decision, rejected=rejected, candidates=candidates)
    if choice in builds:
        built, result = builds[choice]
    else:
        params = resolve_params(_candidate_config(cfg, choice, n, d), n, d)
        _say(progress, f"auto: building {params.factory_string()} on all {n:,} vectors")
        built, result = _build_and_calibrate(vectors, params, cfg, calib, 0.0, seed, progress)
    if not result.reached:
        decision = f"{decision}; {_not_reached(cfg, result)}"
    return CalibratedBuild(built, result, decision, candidates=candidates)


# -- search-time overrides -------------------------------------------------------------------------


def override_search_params(params: IndexParams, nprobe: int | None = None, ef_search: int | None = None) -> IndexParams:
    """`params` with `--nprobe` / `--ef-search` applied, refusing a knob the index type does not have."""
    changes: dict[str, int] = {}
    for knob, value in ((NPROBE, nprobe), (EF_SEARCH, ef_search)):
        if value is None:
            continue
        if params.kind.knob != knob:
            raise UsageError(f"{knob.flag} applies to {knob.applies_to}; this index is {params.index_type}")
        params.kind.check_knob(params, value)
        changes[knob.field] = int(value)
    return dataclasses.replace(params, **knob_values(**changes)) if changes else params


def search_setting_text(meta: IndexMeta, params: IndexParams | None = None) -> str:
    """What the index searches with and why, for people: the evaluate output and the UI's facts table."""
    raw = meta.calibration
    decision = meta.index_decision or ""
    params = params or meta.index_params or IndexParams("flat")
    if params.exact:
        text = "exact search (flat)"
        return f"{text}; {decision}" if decision else text
    current = _current_setting(params)
    if not isinstance(raw, dict):
        text = _setting_words(current) + " (not calibrated)"
    else:
        cal = Calibration.from_dict(raw)
        text = cal.summary()
        if any(cal.chosen.get(k) != v for k, v in current.items() if k in cal.chosen):
            given = _setting_words(current)
            text = f"{given} (given for this search; build-time calibration chose {text})"
    return f"{text}; {decision}" if decision else text


def build_summary(result: CalibratedBuild) -> list[str]:
    """Lines the `retrieval index` command prints about calibration and auto's choice."""
    lines = []
    if result.calibration is not None:
        lines.append("search setting: " + result.calibration.summary())
    if result.decision:
        lines.append(result.decision)
    return lines


def check_calibration_config(calib: CalibrationConfig) -> None:
    """Refuse settings calibration cannot use, naming the flag."""
    if not 0 <= calib.target_recall <= 1:
        raise IndexBuildError(f"--target-recall must be in 0..1 (0 = no calibration), got {calib.target_recall}")
    if calib.k < 1 or calib.queries < 1:
        raise IndexBuildError("calibration needs k >= 1 and --calibration-queries >= 1")
