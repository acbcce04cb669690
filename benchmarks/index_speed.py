"""Index speed and recall on generated 512-d embeddings: build-time calibration per data distribution, or a
sweep of every index type x search setting.

Distributions (unit vectors, generated in seeded float32 chunks; queries are held-out points of the same
distribution, never gallery members):
    clustered        classes of ~10 in coarse groups (the original generator; easy to partition)
    catalogue-r0.8   categories -> items (625 per category) -> images, spread set for exact item Recall@1 ~0.8
    catalogue-r0.3   the same with a wider spread: exact item Recall@1 ~0.3
    isotropic        uniform on the sphere: nothing for an index to exploit

`--report calibrated` (default): for each size and distribution, each candidate index is built and
calibrated by the product's own code (retrieval.index.calibrate.build_calibrated, target Recall@10 0.95 on
gallery vectors); the table shows, on the held-out queries, Recall@10 against exact search and q/s at
batch 256 as a multiple of flat, for the fixed setting used before calibration (nprobe 16, efSearch 128)
and for the calibrated one, and what `--index-type auto` would keep. Flat is re-timed after each
candidate and its best speed is the denominator (conservative on a shared machine).

`--report sweep`: build time, size, RSS, q/s at batch 1 and 256 and Recall@10 of every type x setting on
the first distribution given.

`--report add-cost`: seconds per added vector with brute-force, HNSW and two-level coarse assignment.

`--report neighbours`: why a distribution is hard to index. Where each query's exact top-10 lie (its own
item, other items of its category, elsewhere) and the fraction of the gallery an IVF on the product's coarse
quantizer must scan to hold --target of them: a bound on any IVF's speed over a full scan, whatever its codes.

    python benchmarks/index_speed.py --sizes 100000 --candidates ivf-flat hnsw-m32 ivf-pq-refine
    python benchmarks/index_speed.py --sizes 1000000 --large-candidates ivf-flat
    python benchmarks/index_speed.py --report sweep --distributions clustered --sizes 100000 1000000
    python benchmarks/index_speed.py --report add-cost --add-nlist 4096 16384 65536
    python benchmarks/index_speed.py --report neighbours --sizes 1000000 --distributions catalogue-r0.3 isotropic
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.index.config import IndexConfig  # noqa: E402
from retrieval.index.faiss_index import (  # noqa: E402
    build_faiss_index,
    configure_search,
    resolve_params,
    search,
    training_rows,
)
from retrieval.index.types import default_nlist  # noqa: E402

ROWS_PER_CHUNK = 65_536


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class ClusteredVectors:
    """(N, D) unit vectors: super-centres -> class centres -> points, with the class of each point."""

    gallery: np.ndarray
    queries: np.ndarray
    gallery_labels: np.ndarray
    query_labels: np.ndarray
    n_classes: int
    category_of_label: np.ndarray | None = None  # catalogue data: each item's category


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def clustered_vectors(n: int, n_queries: int, d: int, seed: int, items_per_class: int = 10) -> ClusteredVectors:
    rng = np.random.default_rng(seed)
    n_classes = max(10, n // items_per_class)
    n_super = max(4, int(round(np.sqrt(n_classes) * 2)))
    supers = _normalise(rng.standard_normal((n_super, d), dtype=np.float32))
    parent = rng.integers(0, n_super, n_classes)
    # Spreads chosen so exact search finds a same-class item first for ~80% of queries (class Recall@1,
    # printed by the benchmark), like a trained embedder on SOP: neighbourhoods overlap across classes.
    centres = _normalise(supers[parent] + 0.6 * _normalise(rng.standard_normal((n_classes, d), dtype=np.float32)))
    spread = rng.uniform(0.8, 1.4, n_classes).astype(np.float32)  # per-class noise radius

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        out = np.empty((count, d), np.float32)
        labels = rng.integers(0, n_classes, count)
        for start in range(0, count, ROWS_PER_CHUNK):
            stop = min(count, start + ROWS_PER_CHUNK)
            cls = labels[start:stop]
            noise = rng.standard_normal((stop - start, d), dtype=np.float32) / np.float32(np.sqrt(d))
            out[start:stop] = centres[cls] + spread[cls, None] * noise
            _normalise(out[start:stop])
        return out, labels

    gallery, gallery_labels = draw(n)
    queries, query_labels = draw(n_queries)  # held out: same distribution, not gallery members
    return ClusteredVectors(gallery, queries, gallery_labels, query_labels, n_classes)


def _draw(rng: np.random.Generator, centres: np.ndarray, labels: np.ndarray, spread: np.ndarray | float) -> np.ndarray:
    """Unit vectors centres[labels] + spread * N(0, I/d), generated in float32 chunks."""
    d = centres.shape[1]
    out = np.empty((len(labels), d), np.float32)
    per_row = np.ndim(spread) > 0
    for start in range(0, len(labels), ROWS_PER_CHUNK):
        lab = labels[start : start + ROWS_PER_CHUNK]
        noise = rng.standard_normal((len(lab), d), dtype=np.float32) / np.float32(np.sqrt(d))
        s = spread[lab, None] if per_row else np.float32(spread)
        out[start : start + len(lab)] = centres[lab] + s * noise
        _normalise(out[start : start + len(lab)])
    return out


ITEMS_PER_CATEGORY = 625  # a catalogue of 64 categories x 40k items has 625 items per category


def catalogue_vectors(n: int, n_queries: int, d: int, seed: int, spread: float, images_per_item: int = 10
                      ) -> ClusteredVectors:
    """A product catalogue: categories -> items -> images. Items of one category are about as far from each
    other as from the category centre; images scatter around their item with radius `spread`. Categories
    grow with the gallery (625 items each), so an item's confusers (its category) stay as many at every
    size and exact item Recall@1 barely depends on N. Queries are further images of random items."""
    rng = np.random.default_rng(seed)
    n_items = max(2, n // images_per_item)
    n_categories = max(1, n_items // ITEMS_PER_CATEGORY)
    categories = _normalise(rng.standard_normal((n_categories, d), dtype=np.float32))
    item_category = rng.integers(0, n_categories, n_items)
    items = _normalise(categories[item_category] + _normalise(rng.standard_normal((n_items, d), dtype=np.float32)))
    gallery_labels = np.resize(np.repeat(np.arange(n_items), images_per_item), n)
    query_labels = rng.integers(0, n_items, n_queries)
    return ClusteredVectors(_draw(rng, items, gallery_labels, spread), _draw(rng, items, query_labels, spread),
                            gallery_labels, query_labels, n_items, item_category)


def isotropic_vectors(n: int, n_queries: int, d: int, seed: int) -> ClusteredVectors:
    """Uniform on the sphere: no structure for an index to exploit (the hardest case). Labels are unique."""
    rng = np.random.default_rng(seed)
    zero = np.zeros((1, d), np.float32)
    gallery = _draw(rng, zero, np.zeros(n, np.int64), np.float32(np.sqrt(d)))
    queries = _draw(rng, zero, np.zeros(n_queries, np.int64), np.float32(np.sqrt(d)))
    return ClusteredVectors(gallery, queries, np.arange(n), -np.ones(n_queries, np.int64), n)


# name -> (description, generator(n, n_queries, d, seed, items_per_class))
DISTRIBUTIONS = {
    "clustered": ("classes of ~10 in coarse groups, SOP-like spread (the original generator)",
                  lambda n, q, d, seed, per: clustered_vectors(n, q, d, seed, per)),
    "catalogue-r0.8": ("categories -> items -> images, spread for exact item Recall@1 ~0.8",
                       lambda n, q, d, seed, per: catalogue_vectors(n, q, d, seed, 1.85, per)),
    "catalogue-r0.3": ("categories -> items -> images, spread for exact item Recall@1 ~0.3",
                       lambda n, q, d, seed, per: catalogue_vectors(n, q, d, seed, 2.3, per)),
    "isotropic": ("uniform on the sphere, no structure",
                  lambda n, q, d, seed, per: isotropic_vectors(n, q, d, seed)),
}


@dataclass
class Row:
    size: int
    kind: str
    setting: str
    build_s: float
    index_mb: float
    rss_mb: float
    qps1: float
    qps256: float
    recall10: float
    note: str = ""
    extra: dict = field(default_factory=dict)


def index_size_bytes(index: faiss.Index) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "index.faiss")
        faiss.write_index(index, path)
        return os.path.getsize(path)


def qps_single(index, queries: np.ndarray, k: int, min_seconds: float) -> float:
    """Queries/s one query at a time: at least 10 queries, then until `min_seconds` or the queries run out."""
    t0 = time.perf_counter()
    done = 0
    for q in queries:
        search(index, q[None], k)
        done += 1
        if done >= 10 and time.perf_counter() - t0 >= min_seconds:
            break
    return done / (time.perf_counter() - t0)


def qps_batched(index, queries: np.ndarray, k: int, batch: int, min_seconds: float) -> tuple[float, np.ndarray]:
    """Queries/s in batches of `batch` (whole passes over the queries until `min_seconds`), and the first pass's ids."""
    t0 = time.perf_counter()
    done, first = 0, None
    while first is None or time.perf_counter() - t0 < min_seconds:
        ids = [search(index, queries[i : i + batch], k)[1] for i in range(0, len(queries), batch)]
        done += len(queries)
        if first is None:
            first = np.concatenate(ids)
    return done / (time.perf_counter() - t0), first


def recall_at(approx: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    n = min(len(approx), len(exact))
    hits = [len(np.intersect1d(approx[i, :k], exact[i, :k], assume_unique=False)) for i in range(n)]
    return float(np.mean(hits) / k)


def measure(index, params, queries: np.ndarray, exact_ids: np.ndarray, args) -> tuple[float, float, float]:
    configure_search(index, params)
    qps1 = qps_single(index, queries[: args.batch1_queries], 10, args.min_seconds)
    qps256, ids = qps_batched(index, queries, 10, 256, args.min_seconds)
    return qps1, qps256, recall_at(ids, exact_ids)


def run_size(n: int, args) -> list[Row]:
    d = args.dim
    t0 = time.perf_counter()
    data = DISTRIBUTIONS[args.distributions[0]][1](n, args.queries, d, args.seed, args.items_per_class)
    print(f"\n== {n:,} x {d} {args.distributions[0]} vectors ({data.n_classes:,} classes), {args.queries} held-out queries; "
          f"generated in {time.perf_counter() - t0:.1f}s ==", flush=True)
    rows: list[Row] = []
    exact_ids = None
    flat_qps = (0.0, 0.0)
    flat_index = None

    for kind in args.types:
        cfg = IndexConfig(index_type=kind, nlist=args.nlist if kind.startswith("ivf") else 0, pq_m=args.pq_m,
                          hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, train_size=args.train_size,
                          refine_factor=0, use_gpu=False)
        params = resolve_params(cfg, n, d)
        if kind == "hnsw" and n > args.hnsw_max_items:
            print(f"  hnsw: skipped at {n:,} items (--hnsw-max-items {args.hnsw_max_items:,})", flush=True)
            continue
        gc.collect()
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        if kind == "ivf-pq" and args.pq_refine:
            params_refined = resolve_params(
                IndexConfig(index_type=kind, nlist=cfg.nlist, pq_m=args.pq_m, train_size=args.train_size,
                            refine_factor=max(args.pq_refine), use_gpu=False), n, d)
            built = build_faiss_index(data.gallery, params_refined, use_gpu=False, seed=args.seed)
        else:
            built = build_faiss_index(data.gallery, params, use_gpu=False, seed=args.seed)
        build_s = time.perf_counter() - t0
        gc.collect()
        rss_mb = (rss_bytes() - rss0) / 2**20
        size_mb = index_size_bytes(built.index) / 2**20
        base_size_mb = size_mb
        if kind == "ivf-pq" and args.pq_refine:
            base_size_mb = index_size_bytes(faiss.downcast_index(built.index).base_index) / 2**20
        print(f"  {kind}: built {built.params.factory_string()} in {build_s:.1f}s (train {built.train_seconds:.1f}s on "
              f"{built.params.train_size or n:,}, add {built.add_seconds:.1f}s); {size_mb:.0f} MB", flush=True)

        if kind == "flat":
            settings = [("exact", built.params)]
        elif kind in ("ivf-flat", "ivf-pq"):
            settings = []
            for nprobe in args.nprobe:
                if nprobe > built.params.nlist:
                    continue
                refines = args.pq_refine if (kind == "ivf-pq" and args.pq_refine) else [0]
                for rf in refines:
                    p = IndexParams_replace(built.params, nprobe=nprobe, refine_factor=rf)
                    settings.append((f"nprobe={nprobe}" + (f" refine={rf}" if rf else ""), p))
        else:
            settings = [(f"efSearch={ef}", IndexParams_replace(built.params, ef_search=ef)) for ef in args.ef_search]

        for label, p in settings:
            if kind == "ivf-pq" and args.pq_refine and p.refine_factor == 0:
                # the same refined index searched without re-ranking: search its base IVF-PQ index
                index = faiss.downcast_index(built.index).base_index
            else:
                index = built.index
            if kind == "flat":
                configure_search(index, p)
                qps1 = qps_single(index, data.queries[: args.batch1_queries], 10, args.min_seconds)
                qps256, exact_ids = qps_batched(index, data.queries, 10, 256, 0.0)
                rec = 1.0
                class_r1 = float(np.mean(data.gallery_labels[exact_ids[:, 0]] == data.query_labels))
                print(f"    data difficulty: class Recall@1 of exact search = {class_r1:.3f}", flush=True)
                flat_qps = (qps1, qps256)
            else:
                assert exact_ids is not None, "flat must run first (it is the ground truth)"
                qps1, qps256, rec = measure(index, p, data.queries, exact_ids, args)
            row = Row(n, kind, label, build_s, size_mb if p.refine_factor or kind != "ivf-pq" else base_size_mb,
                      rss_mb, qps1, qps256, rec)
            rows.append(row)
            sp1 = qps1 / flat_qps[0] if flat_qps[0] else float("nan")
            sp256 = qps256 / flat_qps[1] if flat_qps[1] else float("nan")
            print(f"    {label:<22} qps@1 {qps1:9.1f} ({sp1:6.1f}x)  qps@256 {qps256:9.1f} ({sp256:6.1f}x)  "
                  f"R@10 {rec:.4f}", flush=True)
        if kind == "flat":
            flat_index = built.index
        else:
            # re-time flat next to every approximate type and keep its best speed: on a shared machine the
            # load changes during a run, and the best flat speed is the conservative denominator
            qps1 = qps_single(flat_index, data.queries[: args.batch1_queries], 10, args.min_seconds)
            qps256, _ = qps_batched(flat_index, data.queries[: args.flat_retime_queries], 10, 256, 0.0)
            flat_row = next(r for r in rows if r.size == n and r.kind == "flat")
            flat_row.qps1, flat_row.qps256 = max(flat_row.qps1, qps1), max(flat_row.qps256, qps256)
            flat_qps = (flat_row.qps1, flat_row.qps256)
            print(f"    flat re-timed: qps@1 {qps1:.1f}, qps@256 {qps256:.1f} (best so far {flat_qps[0]:.1f} / "
                  f"{flat_qps[1]:.1f})", flush=True)
        del built, index
        gc.collect()
    return rows


def IndexParams_replace(params, **changes):  # noqa: N802 - mirrors dataclasses.replace
    import dataclasses

    return dataclasses.replace(params, **changes)


def print_table(rows: list[Row], target: float) -> None:
    print("\n| items | index | setting | build s | index MB | RSS +MB | q/s batch 1 | q/s batch 256 | x flat (256) | x flat (1) | Recall@10 |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    flat = {r.size: r for r in rows if r.kind == "flat"}
    for r in rows:
        f = flat.get(r.size)
        s256 = r.qps256 / f.qps256 if f else float("nan")
        s1 = r.qps1 / f.qps1 if f else float("nan")
        print(f"| {r.size:,} | {r.kind} | {r.setting} | {r.build_s:.1f} | {r.index_mb:.0f} | {r.rss_mb:.0f} | "
              f"{r.qps1:.1f} | {r.qps256:.1f} | {s256:.1f} | {s1:.1f} | {r.recall10:.4f} |")
    for size, f in flat.items():
        good = [r for r in rows if r.size == size and r.kind != "flat" and r.recall10 >= target]
        if not good:
            print(f"\n{size:,} items: no approximate setting reached Recall@10 >= {target}")
            continue
        best = max(good, key=lambda r: r.qps256)
        best1 = max(good, key=lambda r: r.qps1)
        print(f"\n{size:,} items: fastest setting with Recall@10 >= {target} at batch 256: {best.kind} {best.setting} "
              f"R@10 {best.recall10:.4f}, {best.qps256:.0f} q/s = {best.qps256 / f.qps256:.1f}x flat "
              f"({f.qps256:.0f} q/s); at batch 1: {best1.kind} {best1.setting} R@10 {best1.recall10:.4f}, "
              f"{best1.qps1:.0f} q/s = {best1.qps1 / f.qps1:.1f}x flat ({f.qps1:.1f} q/s)")


# -- calibrated report: per distribution, the search setting before and after build-time calibration ----

# name -> (IndexConfig builder for n items, the fixed "before" setting the product used without calibration)
CANDIDATES = {
    "ivf-flat": (lambda n: IndexConfig(index_type="ivf-flat", use_gpu=False), {"nprobe": 16}),
    "ivf-flat-4x-lists": (lambda n: IndexConfig(index_type="ivf-flat", nlist=min(4 * default_nlist(n), n // 39),
                                                use_gpu=False), {"nprobe": 16}),
    "ivf-flat-sqrt-lists": (lambda n: IndexConfig(index_type="ivf-flat", nlist=int(round(np.sqrt(n))), use_gpu=False),
                            {"nprobe": 16}),
    "hnsw-m32": (lambda n: IndexConfig(index_type="hnsw", hnsw_m=32, ef_construction=80, use_gpu=False),
                 {"ef_search": 128}),
    "hnsw-m48": (lambda n: IndexConfig(index_type="hnsw", hnsw_m=48, ef_construction=120, use_gpu=False),
                 {"ef_search": 128}),
    "ivf-pq-refine": (lambda n: IndexConfig(index_type="ivf-pq", pq_m=64, refine_factor=4, use_gpu=False),
                      {"nprobe": 16, "refine_factor": 4}),
    # 128 4-bit sub-quantizers (64 bytes) for 512-d: PQ64x4 plateaued at Recall@10 0.80 on catalogue R@1 0.29
    "ivf-fastscan": (lambda n: IndexConfig(index_type="ivf-fastscan", pq_m=128, refine_factor=16, use_gpu=False),
                     {"nprobe": 16, "refine_factor": 16}),
    "ivf-fastscan-m64": (lambda n: IndexConfig(index_type="ivf-fastscan", pq_m=64, refine_factor=16, use_gpu=False),
                         {"nprobe": 16, "refine_factor": 16}),
    "ivf-fastscan-opq": (lambda n: IndexConfig(index_type="ivf-fastscan", pq_m=128, opq=1, refine_factor=16,
                                               use_gpu=False), {"nprobe": 16, "refine_factor": 16}),
    "ivf-fastscan-4x-lists-hnsw": (lambda n: IndexConfig(index_type="ivf-fastscan", nlist=min(4 * default_nlist(n), n // 39),
                                                         coarse_hnsw_m=32, pq_m=128, refine_factor=16, use_gpu=False),
                                   {"nprobe": 16, "refine_factor": 16}),
    # what `--index-type auto` builds when it measures (flat_max_items 0: no size rule)
    "auto": (lambda n: IndexConfig(index_type="auto", flat_max_items=0, use_gpu=False), {}),
}


@dataclass
class CalRow:
    size: int
    distribution: str
    item_r1: float
    index: str
    factory: str
    build_s: float
    calib_s: float
    before: str
    before_recall: float
    before_qps: float
    after: str
    after_recall: float  # held-out queries (not gallery members)
    calib_recall: float  # what calibration measured on its gallery queries
    after_qps: float
    flat_qps: float
    reached: bool
    auto: str = ""
    index_mb: float = 0.0


def _setting_text(setting: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items())


def run_calibrated(n: int, dist: str, args) -> list[CalRow]:
    from retrieval.index.calibrate import AUTO_MIN_SPEEDUP, build_calibrated
    from retrieval.config import CalibrationConfig

    d = args.dim
    t0 = time.perf_counter()
    data = DISTRIBUTIONS[dist][1](n, args.queries, d, args.seed, args.items_per_class)
    print(f"\n== {n:,} x {d} {dist} ({DISTRIBUTIONS[dist][0]}), {args.queries} held-out queries; generated in "
          f"{time.perf_counter() - t0:.1f}s ==", flush=True)
    flat = build_faiss_index(data.gallery, resolve_params(IndexConfig(index_type="flat"), n, d), use_gpu=False).index
    flat_qps, exact_ids = qps_batched(flat, data.queries, 10, 256, args.min_seconds)
    item_r1 = float(np.mean(data.gallery_labels[exact_ids[:, 0]] == data.query_labels))
    print(f"  flat: {flat_qps:.0f} q/s at batch 256; exact item Recall@1 {item_r1:.3f}", flush=True)
    rows = []
    names = args.candidates if n <= args.large_from else args.large_candidates
    for name in names:
        make_cfg, before = CANDIDATES[name]
        cfg = make_cfg(n)
        gc.collect()
        t0 = time.perf_counter()
        result = build_calibrated(data.gallery, cfg, CalibrationConfig(target_recall=args.target, k=10,
                                                                        queries=args.calibration_queries,
                                                                        seed=args.seed + 1), seed=args.seed)
        build_s = time.perf_counter() - t0
        built, cal = result.built, result.calibration
        if name == "auto":
            rows.append(_auto_row(n, dist, item_r1, result, build_s, data, exact_ids, flat, flat_qps, args))
            continue
        configure_search(built.index, IndexParams_replace(built.params, **before))
        b_qps, b_ids = qps_batched(built.index, data.queries, 10, 256, args.min_seconds)
        configure_search(built.index, built.params)
        a_qps, a_ids = qps_batched(built.index, data.queries, 10, 256, args.min_seconds)
        if args.flat_retime_queries > 0:
            re_flat, _ = qps_batched(flat, data.queries[: args.flat_retime_queries], 10, 256, 0.0)
            flat_qps = max(flat_qps, re_flat)  # best flat speed: the conservative denominator on a shared machine
        auto = ""
        if name == "ivf-flat":
            if n <= IndexConfig().flat_max_items:
                auto = "flat (size rule)"
            elif cal.reached and cal.speedup >= AUTO_MIN_SPEEDUP:
                auto = "keeps ivf-flat"
            else:
                auto = "flat (fallback)"
        row = CalRow(n, dist, item_r1, name, built.params.factory_string(), build_s, cal.seconds,
                     _setting_text(before), recall_at(b_ids, exact_ids), b_qps, _setting_text(cal.chosen),
                     recall_at(a_ids, exact_ids), cal.recall, a_qps, flat_qps, cal.reached, auto,
                     index_size_bytes(built.index) / 2**20)
        rows.append(row)
        print(f"  {name} ({row.factory}): built + calibrated in {build_s:.1f}s (calibration {cal.seconds:.1f}s); "
              f"before {row.before}: R@10 {row.before_recall:.3f} {b_qps / flat_qps:.1f}x flat; after "
              f"{row.after}: R@10 {row.after_recall:.3f} (calibration measured {cal.recall:.3f}) "
              f"{a_qps / flat_qps:.1f}x flat{'' if cal.reached else ' (target not reached)'}", flush=True)
        print("    curve: " + ", ".join(f"{_setting_text(p.setting)}: {p.recall:.3f} @ {p.qps / cal.flat_qps:.1f}x"
                                        for p in cal.curve), flush=True)
        del result, built
        gc.collect()
    return rows


def _auto_row(n: int, dist: str, item_r1: float, result, build_s: float, data: ClusteredVectors,
              exact_ids: np.ndarray, flat, flat_qps: float, args) -> CalRow:
    """What `--index-type auto` built, measured on the held-out queries like the other candidates."""
    built, cal = result.built, result.calibration
    qps, ids = qps_batched(built.index, data.queries, 10, 256, args.min_seconds)
    if args.flat_retime_queries > 0:
        re_flat, _ = qps_batched(flat, data.queries[: args.flat_retime_queries], 10, 256, 0.0)
        flat_qps = max(flat_qps, re_flat)
    print(f"  auto: {result.decision}", flush=True)
    for c in result.candidates:
        print(f"    candidate {c.name}: {c.summary()}", flush=True)
    setting = _setting_text(cal.chosen) if cal is not None else "exact"
    return CalRow(n, dist, item_r1, "auto", built.params.factory_string(), build_s, cal.seconds if cal else 0.0,
                  "", float("nan"), float("nan"), setting, recall_at(ids, exact_ids), cal.recall if cal else 1.0,
                  qps, flat_qps, cal.reached if cal else True, f"chose {built.params.index_type}",
                  index_size_bytes(built.index) / 2**20)


def print_calibrated_table(rows: list[CalRow], target: float, speedup_target: float) -> None:
    print(f"\nRecall@10 vs exact on held-out queries; speeds at batch 256 as x best flat q/s in the same run; "
          f"target Recall@10 >= {target} at >= {speedup_target:g}x flat.")
    print("\n| items | data | exact item R@1 | index | factory | build+calib s | index MB | before | R@10 | x flat | "
          "calibrated | R@10 (calib.) | x flat | meets target | auto |")
    print("| ---: | --- | ---: | --- | --- | ---: | ---: | --- | ---: | ---: | --- | --- | ---: | --- | --- |")
    for r in rows:
        meets = "yes" if r.after_recall >= target and r.after_qps / r.flat_qps >= speedup_target else "no"
        r1 = f"{r.item_r1:.2f}" if r.distribution != "isotropic" else "n/a"
        print(f"| {r.size:,} | {r.distribution} | {r1} | {r.index} | {r.factory} | {r.build_s:.0f} | {r.index_mb:.0f} | "
              f"{r.before} | {r.before_recall:.3f} | {r.before_qps / r.flat_qps:.1f} | {r.after} | {r.after_recall:.3f} "
              f"({r.calib_recall:.3f}) | {r.after_qps / r.flat_qps:.1f} | {meets} | {r.auto} |")


# -- add cost: coarse assignment by brute force vs an HNSW graph over the centroids ---------------------


def run_add_cost(args) -> list[dict]:
    """Seconds per added vector on one thread, IVF{nlist},PQ{m} with brute-force, HNSW32 and two-level coarse
    assignment (two-level: the centroids grouped by k-means into about sqrt(nlist) groups, an IVF-flat index over
    them; a vector is compared with the group centres and then with the centroids of its `nprobe` nearest groups,
    both as contiguous scans). `assign us` is the coarse assignment alone (the part the quantizer changes), the rest
    of an add is computing and encoding the residual.

    The centroids are a seeded sample of the vectors (training 65,536 lists by k-means would need 2.5M
    training vectors; the cost of assigning a vector does not depend on how its centroids were trained).
    Also reported: the HNSW graph's build time and how often it assigns a vector to the same list as
    brute force."""
    d, n_add = args.dim, args.add_vectors
    out = []
    for nlist in args.add_nlist:
        data = DISTRIBUTIONS[args.distributions[0]][1](nlist + n_add, 0, d, args.seed, args.items_per_class)
        rng = np.random.default_rng(args.seed)
        rows = rng.permutation(len(data.gallery))
        centroids = np.ascontiguousarray(data.gallery[rows[:nlist]])
        added = np.ascontiguousarray(data.gallery[rows[nlist:]])
        del data
        faiss.omp_set_num_threads(1)  # the capacity plan's unit: one 1-CPU worker
        brute = faiss.IndexFlatIP(d)
        brute.add(centroids)
        graph = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = 40
        t0 = time.perf_counter()
        graph.add(centroids)
        graph_s = time.perf_counter() - t0
        groups = max(1, int(round(np.sqrt(nlist))))
        two_level = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, groups, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        two_level.train(centroids)
        two_level.add(centroids)
        two_level.make_direct_map()  # the fine index computes residuals from its centroids by id
        two_level_s = time.perf_counter() - t0
        reference = brute.search(added[:2_000], 1)[1][:, 0]
        brute_us = brute_assign_us = 0.0
        ladder = ([("brute-force", 0)] + [("hnsw32", ef) for ef in args.add_coarse_ef]
                  + [(f"two-level {groups}", p) for p in args.add_coarse_probes])
        for coarse, ef in ladder:
            quantizer = brute if coarse == "brute-force" else graph if coarse == "hnsw32" else two_level
            if coarse == "hnsw32":
                graph.hnsw.efSearch = ef
            elif ef:
                two_level.nprobe = ef
            index = faiss.IndexIVFPQ(quantizer, d, nlist, args.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
            index.pq.cp.min_points_per_centroid = 1  # codebook quality does not change the add cost; no warnings
            faiss.omp_set_num_threads(args.threads)
            index.train(added[: args.add_train])  # PQ codebooks only: the quantizer already holds nlist centroids
            faiss.omp_set_num_threads(1)
            t0 = time.perf_counter()
            index.add(added)
            add_s = time.perf_counter() - t0
            same = float(np.mean(quantizer.search(added[:2_000], 1)[1][:, 0] == reference))
            t0 = time.perf_counter()
            quantizer.search(added, 1)
            assign_us = 1e6 * (time.perf_counter() - t0) / len(added)
            us = 1e6 * add_s / len(added)
            brute_us = us if coarse == "brute-force" else brute_us
            brute_assign_us = assign_us if coarse == "brute-force" else brute_assign_us
            knob = "efSearch" if coarse == "hnsw32" else "nprobe"
            build_s = graph_s if coarse == "hnsw32" else two_level_s if ef else 0.0
            row = {"nlist": nlist, "coarse": coarse, "ef_search": ef, "vectors": len(added), "us_per_vector": us,
                   "assign_us_per_vector": assign_us, "graph_build_s": round(build_s, 2),
                   "same_list_as_brute_force": round(same, 4), "speedup_vs_brute_force": round(brute_us / us, 2),
                   "assign_speedup_vs_brute_force": round(brute_assign_us / assign_us, 2)}
            out.append(row)
            print(f"  nlist {nlist:,} {coarse}{f' {knob} {ef}' if ef else ''}: add {us:.0f} us/vector on 1 thread "
                  f"({len(added):,} vectors), {brute_us / us:.1f}x brute force; assignment alone {assign_us:.0f} "
                  f"us ({brute_assign_us / assign_us:.1f}x); same list as brute force for {same:.1%}", flush=True)
            del index
            gc.collect()
        del brute, graph
    faiss.omp_set_num_threads(args.threads)
    print(f"\nIVF{{nlist}},PQ{args.pq_m} (8-bit), {args.add_vectors:,} vectors added on 1 thread")
    print("\n| nlist | coarse assignment | efSearch / nprobe | us per added vector | x brute force | assign us | "
          "x brute force | quantizer build s | same list as brute force |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in out:
        print(f"| {r['nlist']:,} | {r['coarse']} | {r['ef_search'] or ''} | {r['us_per_vector']:.0f} | "
              f"{r['speedup_vs_brute_force']:.1f} | {r['assign_us_per_vector']:.0f} | "
              f"{r['assign_speedup_vs_brute_force']:.1f} | {r['graph_build_s'] or ''} | "
              f"{r['same_list_as_brute_force']:.3f} |")
    return out


# -- neighbours: where a query's exact top-10 lie, and how much of the gallery an IVF must scan to hold them ---


def _lists_needed(list_rank: np.ndarray, list_sizes_in_order: np.ndarray, n: int, target: float) -> tuple[int, float]:
    """The fewest lists p such that the p best-ranked lists of each query hold `target` of all exact
    neighbours (averaged over queries, as Recall@10 is), and the mean fraction of the gallery they hold."""
    nlist = list_sizes_in_order.shape[1]
    held = np.cumsum(np.bincount(list_rank.ravel(), minlength=nlist)) / list_rank.size  # held[p - 1]: p lists
    p = int(np.searchsorted(held, target - 1e-12) + 1)
    scanned = float(np.mean(np.cumsum(list_sizes_in_order[:, :p], axis=1)[:, -1]) / n)
    return p, scanned


def run_neighbours(args) -> list[dict]:
    """Per distribution: the exact top-k of each held-out query split into the query's own item, other items
    of its category and elsewhere (catalogue data), how far above chance the neighbours found elsewhere are,
    and the IVF coverage bound: the product's coarse quantizer (its default nlist and training sample) is
    trained, every gallery vector assigned to its list, each query's lists ranked as search ranks them, and
    the fewest lists whose union holds `--target` of the exact neighbours found. Whatever codes an IVF on these
    lists stores, it must scan at least that fraction of the gallery to reach the target, so 1 / fraction is
    its speed over a scan of the whole gallery with the same per-vector cost."""
    d, k, out = args.dim, 10, []
    targets = sorted({0.9, args.target, 0.99})
    for n in args.sizes:
        for dist in args.distributions:
            t0 = time.perf_counter()
            data = DISTRIBUTIONS[dist][1](n, args.queries, d, args.seed, args.items_per_class)
            flat = faiss.IndexFlatIP(d)
            flat.add(data.gallery)
            sims, exact = flat.search(data.queries, k)
            del flat
            row: dict = {"size": n, "distribution": dist, "queries": len(data.queries),
                         "mean_sim_top1": float(sims[:, 0].mean()), f"mean_sim_top{k}": float(sims[:, -1].mean())}
            rng = np.random.default_rng(args.seed + 2)
            sample = data.gallery[rng.choice(n, min(n, 20_000), replace=False)]
            background = data.queries @ sample.T  # each query against random gallery vectors: chance similarity
            mean_bg, std_bg = background.mean(axis=1, keepdims=True), background.std(axis=1, keepdims=True)
            print(f"\n== {n:,} x {d} {dist}: exact top-{k} of {len(data.queries)} held-out queries ==", flush=True)
            print(f"  similarity: top-1 {row['mean_sim_top1']:.3f}, top-{k} {row[f'mean_sim_top{k}']:.3f}; a random "
                  f"gallery vector {float(mean_bg.mean()):.3f} +- {float(std_bg.mean()):.3f}", flush=True)
            if data.category_of_label is not None:
                own_item = data.gallery_labels[exact] == data.query_labels[:, None]
                cat = data.category_of_label
                own_cat = cat[data.gallery_labels[exact]] == cat[data.query_labels][:, None]
                elsewhere = ~own_cat
                z = (sims - mean_bg) / std_bg
                row.update({"own_item": float(own_item.mean()),
                            "own_category_other_items": float((own_cat & ~own_item).mean()),
                            "elsewhere": float(elsewhere.mean()),
                            "queries_with_one_elsewhere": float(elsewhere.any(1).mean()),
                            "elsewhere_z": float(z[elsewhere].mean()) if elsewhere.any() else float("nan"),
                            "categories": int(cat.max()) + 1})
                print(f"  top-{k}: own item {row['own_item']:.3f}, other items of its category "
                      f"{row['own_category_other_items']:.3f}, elsewhere {row['elsewhere']:.3f} (in "
                      f"{row['queries_with_one_elsewhere']:.1%} of queries; {row['elsewhere_z']:.1f} standard "
                      f"deviations above a random gallery vector); {row['categories']} categories", flush=True)
            nlist = args.nlist or default_nlist(n)
            params = resolve_params(IndexConfig(index_type="ivf-flat", nlist=nlist, use_gpu=False), n, d)
            ivf = faiss.index_factory(d, params.factory_string(), faiss.METRIC_INNER_PRODUCT)
            ivf.train(data.gallery[training_rows(n, params, args.seed)])  # the product's sample and seed
            quantizer = faiss.downcast_index(ivf.quantizer)
            assign = quantizer.search(data.gallery, 1)[1][:, 0]
            sizes = np.bincount(assign, minlength=nlist)
            order = quantizer.search(data.queries, nlist)[1]  # every list, ranked per query as a search ranks them
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.arange(nlist)[None, :].repeat(len(order), 0), axis=1)
            list_rank = np.take_along_axis(rank, assign[exact], axis=1)
            row.update({"nlist": nlist, "coverage": {}})
            for target in targets:
                p, scanned = _lists_needed(list_rank, sizes[order], n, target)
                row["coverage"][f"{target:.2f}"] = {"lists": p, "gallery_fraction": scanned}
                print(f"  IVF{nlist}: {target:.2f} of the exact top-{k} lie in each query's first {p:,} lists "
                      f"({p / nlist:.1%} of them), {scanned:.1%} of the gallery: at most {1 / scanned:.1f}x a full "
                      f"scan with the same codes", flush=True)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            out.append(row)
            del data, ivf, quantizer, background
            gc.collect()
    print(f"\n| items | data | top-{k}: own item | other items of its category | elsewhere (queries with one) | "
          "elsewhere, sd above chance | nlist | " + " | ".join(f"gallery scanned for {t:.2f}" for t in targets) + " |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in targets) + " |")
    for r in out:
        comp = "n/a | n/a | n/a | n/a"
        if "own_item" in r:
            comp = (f"{r['own_item']:.3f} | {r['own_category_other_items']:.3f} | {r['elsewhere']:.3f} "
                    f"({r['queries_with_one_elsewhere']:.0%}) | {r['elsewhere_z']:.1f}")
        cover = " | ".join(f"{c['gallery_fraction']:.1%} ({c['lists']:,} lists)" for c in r["coverage"].values())
        print(f"| {r['size']:,} | {r['distribution']} | {comp} | {r['nlist']:,} | {cover} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1024, help="held-out queries (batch-256 timing and recall)")
    ap.add_argument("--batch1-queries", type=int, default=200, help="at most this many single-query searches")
    ap.add_argument("--flat-retime-queries", type=int, default=256, help="queries used to re-time flat (0 = none)")
    ap.add_argument("--min-seconds", type=float, default=3.0, help="time each setting at least this long")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--items-per-class", type=int, default=10, help="mean class size (SOP/In-Shop have 5-10)")
    ap.add_argument("--types", nargs="+", default=["flat", "ivf-flat", "ivf-pq", "hnsw"])
    ap.add_argument("--nlist", type=int, default=0, help="0 = the product default (about 4 sqrt(N))")
    ap.add_argument("--train-size", type=int, default=0, help="IVF training sample; 0 = product default")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--pq-m", type=int, default=64)
    ap.add_argument("--pq-refine", type=int, nargs="*", default=[0, 4, 16], help="IVF-PQ refinement factors to try")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=80)
    ap.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--hnsw-max-items", type=int, default=10**9, help="skip HNSW above this size (bounds build time)")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--report", choices=["calibrated", "sweep", "add-cost", "neighbours"],
                    default="calibrated",
                    help="calibrated: per distribution, each index's setting before and after build-time calibration; "
                         "sweep: every type x setting on one distribution; add-cost: seconds per added vector with "
                         "brute-force vs HNSW coarse assignment; neighbours: where the exact top-10 lie and the "
                         "fraction of the gallery an IVF must scan to hold --target of them")
    ap.add_argument("--add-nlist", type=int, nargs="+", default=[4_096, 16_384, 65_536])
    ap.add_argument("--add-vectors", type=int, default=20_000, help="vectors added per add-cost measurement")
    ap.add_argument("--add-coarse-ef", type=int, nargs="+", default=[16, 64], help="HNSW coarse efSearch values")
    ap.add_argument("--add-coarse-probes", type=int, nargs="*", default=[4, 16],
                    help="two-level coarse quantizer: groups probed per vector")
    ap.add_argument("--add-train", type=int, default=20_000, help="vectors the add-cost PQ codebooks train on")
    ap.add_argument("--distributions", nargs="+", choices=list(DISTRIBUTIONS), default=list(DISTRIBUTIONS)[1:],
                    help="generated data (sweep uses the first)")
    ap.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES),
                    help="index configurations calibrated at sizes up to --large-from")
    ap.add_argument("--large-candidates", nargs="+", choices=list(CANDIDATES), default=["ivf-flat", "ivf-pq-refine"],
                    help="index configurations calibrated above --large-from (HNSW and 4x lists build slowly there)")
    ap.add_argument("--large-from", type=int, default=200_000)
    ap.add_argument("--calibration-queries", type=int, default=1000, help="gallery vectors calibration searches")
    ap.add_argument("--speedup-target", type=float, default=10.0, help="the 1M target: x flat q/s at batch 256")
    args = ap.parse_args()

    faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, numpy {np.__version__}, {args.threads} threads, seed {args.seed}")
    t_start = time.perf_counter()
    row_reports = {"neighbours": run_neighbours, "add-cost": run_add_cost}  # reports that return their JSON rows
    if args.report in row_reports:
        report_rows = row_reports[args.report](args)
        if args.json:
            args.json.write_text(json.dumps(report_rows, indent=2))
        print(f"\ntotal run time {time.perf_counter() - t_start:.0f}s")
        return
    if args.report == "calibrated":
        cal_rows: list[CalRow] = []
        for n in args.sizes:
            for dist in args.distributions:
                cal_rows += run_calibrated(n, dist, args)
                gc.collect()
                if args.json:  # after each distribution, so a long run that is stopped keeps what it measured
                    args.json.write_text(json.dumps([r.__dict__ for r in cal_rows], indent=2))
        print_calibrated_table(cal_rows, args.target, args.speedup_target)
        if args.json:
            args.json.write_text(json.dumps([r.__dict__ for r in cal_rows], indent=2))
        print(f"\ntotal run time {time.perf_counter() - t_start:.0f}s")
        return
    rows: list[Row] = []
    for n in args.sizes:
        rows += run_size(n, args)
        gc.collect()
    print_table(rows, args.target)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    print(f"\ntotal run time {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
