"""FAISS vs Milvus as the index store, same vectors, same machine, one run: upload, search speed and recall.

For each index type (flat, ivf-flat, hnsw by default), the gallery is indexed by the product's own build
(retrieval.index.calibrate.build_calibrated: the same knobs and the same build-time recall calibration to
--target-recall), once into a FAISS index in this process and once into a Milvus collection
(retrieval.index.milvus_store.MilvusUpload). Printed per store and type:

    build s      FAISS: train + add; Milvus: upload + index build (calibration excluded)
    upload rows/s   Milvus only: upserts of --upload-batch rows over gRPC
    q/s b1, b64  held-out queries searched one at a time and in batches of 64 (the Searcher's call)
    R@10         Recall@10 of those queries against exact search over the gallery

and the Milvus / FAISS ratios. The Milvus server is --milvus-uri, or one started from .venv-milvus
(`make milvus-server`) on a free loopback port: --server lite (Milvus Lite) or standalone (Milvus 2.3.5).
Data: clustered unit vectors (classes of ~10), queries held out of the gallery.

    python benchmarks/store_compare.py                           # 100k x 512, Milvus Lite
    python benchmarks/store_compare.py --server standalone --types flat ivf-flat ivf-pq hnsw
    python benchmarks/store_compare.py --n 20000 --types flat hnsw --milvus-uri http://milvus:19530

Not measured here: the API's p50/p95 at 16 users with each store (benchmarks/app_load.py --index DIR runs
the load test against any index folder, a Milvus-backed one included).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrieval.config import CalibrationConfig
from retrieval.index.calibrate import build_calibrated, recall_against
from retrieval.index.config import IndexConfig
from retrieval.index.folder import ItemTable
from retrieval.index.milvus_store import MilvusStoreRecord, MilvusUpload
from retrieval.knn import exact_knn


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 10), d)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@contextmanager
def started_server(kind: str) -> Iterator[str]:
    """A Milvus server from .venv-milvus on a free loopback port (`make milvus-server`), stopped afterwards:
    "lite" = the Milvus Lite gRPC server, "standalone" = Milvus 2.3.5 standalone (the Go server)."""
    from tests.milvus_server import run_server, run_standalone, server_command, standalone_command

    command, run = (server_command(), run_server) if kind == "lite" else (standalone_command(), run_standalone)
    if not command.exists():
        raise SystemExit(f"{command} not found: run `make milvus-server` or pass --milvus-uri")
    data = Path(tempfile.mkdtemp(prefix="store-compare-")) / "data"
    server = run(data)
    try:
        yield next(server)
    finally:
        server.close()


def qps(search, queries: np.ndarray, batch: int, limit_s: float = 5.0) -> float:
    """Queries/s searching `queries` in batches of `batch` (stops after `limit_s`)."""
    done, t0 = 0, time.perf_counter()
    for start in range(0, len(queries), batch):
        search(queries[start : start + batch], 10)
        done += len(queries[start : start + batch])
        if time.perf_counter() - t0 > limit_s:
            break
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--types", nargs="+", default=["flat", "ivf-flat", "hnsw"])
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--upload-batch", type=int, default=1000)
    ap.add_argument("--milvus-uri", default=None, help="a running Milvus server (default: start --server)")
    ap.add_argument("--server", choices=["lite", "standalone"], default="lite",
                    help="the server to start when no --milvus-uri is given")
    a = ap.parse_args()

    all_points = clustered(a.n + a.queries, a.d, 0)
    gallery, queries = np.ascontiguousarray(all_points[: a.n]), np.ascontiguousarray(all_points[a.n :])
    _, exact = exact_knn(queries, gallery, 10, use_gpu=False)
    items = ItemTable([f"/g/{i}.jpg" for i in range(a.n)], [0] * a.n, [str(i) for i in range(a.n)])
    calib = CalibrationConfig(target_recall=a.target_recall, queries=min(1000, a.n // 10))
    load = os.getloadavg()
    print(f"{a.n:,} x {a.d} clustered unit vectors, {a.queries} held-out queries; {os.cpu_count()} CPUs, load "
          f"{load[0]:.1f} at start")
    rows = []
    with started_server(a.server) if a.milvus_uri is None else _given(a.milvus_uri) as uri:
        for kind in a.types:
            cfg = IndexConfig(index_type=kind, use_gpu=False)
            for store in ("faiss", "milvus"):
                builder = None
                if store == "milvus":
                    builder = MilvusUpload(MilvusStoreRecord(uri, f"compare_{kind.replace('-', '_')}"), items,
                                           "store-compare", None, batch_size=a.upload_batch, progress=False)
                t0 = time.perf_counter()
                result = build_calibrated(gallery, cfg, calib, builder=builder)
                total = time.perf_counter() - t0
                built = result.built
                index = built.index
                search = index.search
                _, found = search(queries, 10)
                recall = recall_against(np.asarray(found), exact)
                upload = a.n / builder.upload_seconds if builder is not None else float("nan")
                setting = result.calibration.chosen if result.calibration else {}
                rows.append((kind, store, built.train_seconds + built.add_seconds, total, upload,
                             qps(search, queries, 1), qps(search, queries, 64), recall, setting))
                print(f"  {kind:8s} {store:6s} done in {total:.1f} s", flush=True)
    print()
    print("| type | store | build s | with calibration s | upload rows/s | q/s b1 | q/s b64 | R@10 | setting |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, store, build, total, upload, q1, q64, recall, setting in rows:
        up = f"{upload:,.0f}" if store == "milvus" else "-"
        print(f"| {kind} | {store} | {build:.1f} | {total:.1f} | {up} | {q1:,.0f} | {q64:,.0f} | {recall:.4f} | "
              f"{setting or '-'} |")
    print()
    print("Milvus / FAISS ratios (same type): q/s b1, q/s b64, R@10 difference")
    for i in range(0, len(rows), 2):
        f, m = rows[i], rows[i + 1]
        print(f"  {f[0]:8s} {m[5] / f[5]:.3f}  {m[6] / f[6]:.3f}  {m[7] - f[7]:+.4f}")
    print(f"load at end {os.getloadavg()[0]:.1f}")


@contextmanager
def _given(uri: str) -> Iterator[str]:
    yield uri


if __name__ == "__main__":
    main()
