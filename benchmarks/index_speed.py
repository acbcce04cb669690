"""Index speed, memory and recall on synthetic clustered embeddings: flat vs IVF-flat vs IVF-PQ vs HNSW.

Vectors are 512-d, L2-normalised and clustered the way trained embeddings are (coarse groups of
classes, classes of ~10 items as in SOP/In-Shop, each with its own spread), generated in seeded float32 chunks. Queries
are held-out points from the same classes, never gallery members. For each index type and each
search setting it prints build time, index size, RSS growth, queries/s at batch 1 and batch 256,
and Recall@10 against exact (flat) search, all measured in this run with the product's own
build/search code (retrieval.index). Flat is re-timed after each approximate type and its best
speed is the denominator of every ratio (conservative on a shared machine). The summary names the fastest approximate setting with
Recall@10 >= the target and its speed-up over flat at batch 256 and at batch 1.

    python benchmarks/index_speed.py --sizes 100000 1000000 --threads 2
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

from retrieval.config import IndexConfig  # noqa: E402
from retrieval.index import build_faiss_index, configure_search, resolve_params, search  # noqa: E402

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
    data = clustered_vectors(n, args.queries, d, args.seed, args.items_per_class)
    print(f"\n== {n:,} x {d} clustered vectors ({data.n_classes:,} classes), {args.queries} held-out queries; "
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1024, help="held-out queries (batch-256 timing and recall)")
    ap.add_argument("--batch1-queries", type=int, default=200, help="at most this many single-query searches")
    ap.add_argument("--flat-retime-queries", type=int, default=256, help="queries used to re-time flat")
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
    args = ap.parse_args()

    faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, numpy {np.__version__}, {args.threads} threads, seed {args.seed}")
    rows: list[Row] = []
    for n in args.sizes:
        rows += run_size(n, args)
        gc.collect()
    print_table(rows, args.target)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2))


if __name__ == "__main__":
    main()
