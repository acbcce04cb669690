"""Load test of the search UI: N concurrent gradio_client users against a locally launched app.

    python benchmarks/app_load.py                        # demo index, untrained ResNet-50 at 224 px
    python benchmarks/app_load.py --index indexes/inshop --clients 16 --queries 5
    python benchmarks/app_load.py --arch resnet18 --image-size 64 --embedding-size 32   # quick

The app is launched in this process on 127.0.0.1 (a free port), exactly as `retrieval serve` sets
it up (queue, batched search event). The clients run in a separate process (one thread each), so
their HTTP work does not compete with the server for the GIL. Printed, from one run:

    bare        embed + search of one decoded image, called directly (median / p95 over repeats),
                and of a batch of `clients` images (the floor a fully batched queue can reach);
                measured before and after the load phase, ratios use the mean of the two
    load        per-query latency through the app (upload + queue + decode + embed + search +
                thumbnails + response), p50 / p95 / max, throughput, errors, and batch sizes seen
    floor       the same load against the same app whose embed+search is replaced by a replay of one
                precomputed answer: what Gradio's HTTP/queue/SSE handling, the result tiles and the
                gradio_client library cost at this concurrency with zero model work
    one client  the app's latency with a single client (unloaded), real embedder
    ratio       load p95 / bare median (target < 3 at 16 clients); also floor p95 / bare median,
                which bounds from below what any embedder can reach through this stack

Bounded: `clients * queries` requests and an overall `--timeout`; unfinished requests count as
errors. Thumbnail downloads are not part of the measured request (the client does not fetch them).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[pos]


# --- client side (child process) ---------------------------------------------------------------------


def _one_client(url: str, paths: list[str], queries: int, k: int, deadline: float, start_barrier: float) -> list[tuple]:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, download_files=False)
    out: list[tuple] = []
    while time.time() < start_barrier:  # all clients connected, then start together
        time.sleep(0.005)
    for q in range(queries):
        if time.time() > deadline:
            out.append(("timeout", 0.0, ""))
            continue
        path = paths[q % len(paths)]
        t0 = time.perf_counter()
        try:
            job = client.submit(handle_file(path), k, api_name="/search")
            gallery, status = job.result(timeout=max(1.0, deadline - time.time()))
            dt = time.perf_counter() - t0
            ok = status.startswith("**Top") and len(gallery) == k
            out.append(("ok" if ok else f"bad: {status[:120]}", dt, status))
        except Exception as exc:  # a failed request is a measured error, not a crash of the benchmark
            out.append((f"error: {type(exc).__name__}: {str(exc)[:120]}", time.perf_counter() - t0, ""))
    return out


def run_clients(url: str, paths: list[str], clients: int, queries: int, k: int, timeout: float) -> tuple[list[tuple], float]:
    """In the child process: `clients` threads x `queries` sequential queries; (results, wall seconds)."""
    deadline = time.time() + timeout
    start_barrier = time.time() + min(30.0, 1.0 + 0.4 * clients)  # time for every client to fetch the config
    results: list[tuple] = []
    with cf.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(_one_client, url, paths[i:] + paths[:i], queries, k, deadline, start_barrier)
                   for i in range(clients)]
        done, pending = cf.wait(futures, timeout=max(1.0, deadline - time.time() + 5))
        for f in done:
            try:
                results += f.result()
            except Exception as exc:
                results += [(f"error: client failed to start: {exc}", 0.0, "")] * queries
        results += [("timeout", 0.0, "")] * (queries * len(pending))
    wall = max(1e-9, min(time.time(), deadline) - start_barrier)
    return results, wall


# --- server side -----------------------------------------------------------------------------------


def build_demo_index(args: argparse.Namespace, folder: Path) -> Path:
    from retrieval.build_index import build_index, untrained_backend
    from retrieval.data.demo import generate_demo
    from retrieval.data.inshop import load_inshop

    root = generate_demo(folder / "demo", seed=0, num_train_classes=4, num_test_classes=args.demo_items,
                         images_per_class=8, image_size=128)
    backend, source = untrained_backend(args.arch, args.embedding_size, args.image_size, device=args.device)
    out = folder / "index"
    print(f"building a demo index: {args.arch} (untrained) {args.image_size} px {args.embedding_size}-d ...", flush=True)
    build_index(load_inshop(root, name="demo"), backend, source, out, progress=False)
    return out


class ReplaySearcher:
    """The real searcher with embed+search replaced by one precomputed answer (the floor phase).

    Everything the app reads (meta, gallery, stored queries, embedder facts) comes from the real one,
    so the served path (upload, decode, queue, result tiles, response) is unchanged.
    """

    def __init__(self, searcher: object, image: object, k: int) -> None:
        self._searcher = searcher
        self._hits = searcher.search_images([image], k)[0]  # type: ignore[attr-defined]

    def search_images(self, images: list, k: int) -> list:
        return [self._hits[:k] for _ in images]

    def __getattr__(self, name: str) -> object:
        return getattr(self._searcher, name)


def load_phase(url: str, paths: list[str], args: argparse.Namespace) -> tuple[list[tuple], float, list[tuple]]:
    """(results at `clients` concurrency, wall seconds, results of one unloaded client) for one app."""
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        single, _ = pool.submit(run_clients, url, paths, 1, max(4, args.queries), args.k, 120.0).result()
        results, wall = pool.submit(run_clients, url, paths, args.clients, args.queries, args.k,
                                    args.timeout).result(timeout=args.timeout + 120)
    return results, wall, single


def summarise(results: list[tuple]) -> dict[str, float]:
    ok = [dt for kind, dt, _ in results if kind == "ok"]
    return {"p50": _percentile(ok, 50), "p95": _percentile(ok, 95), "max": max(ok, default=float("nan")),
            "ok": len(ok), "errors": len(results) - len(ok)}


def bare_latency(searcher: object, paths: list[str], k: int, repeats: int, batch: int) -> dict[str, float]:
    from retrieval.images import open_image

    images = [open_image(p) for p in paths]
    searcher.search_images(images[:1], k)  # type: ignore[attr-defined]  # warm-up
    single = []
    for i in range(repeats):
        t0 = time.perf_counter()
        searcher.search_images([images[i % len(images)]], k)  # type: ignore[attr-defined]
        single.append(time.perf_counter() - t0)
    decode = []
    for p in paths[:repeats]:
        t0 = time.perf_counter()
        open_image(p)
        decode.append(time.perf_counter() - t0)
    batch_images = [images[i % len(images)] for i in range(batch)]
    batched = []
    for _ in range(max(2, repeats // 4)):
        t0 = time.perf_counter()
        searcher.search_images(batch_images, k)  # type: ignore[attr-defined]
        batched.append(time.perf_counter() - t0)
    return {"median": statistics.median(single), "p95": _percentile(single, 95),
            "decode": statistics.median(decode), "batch": statistics.median(batched)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, help="index folder (default: build a demo index in a temp folder)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--queries", type=int, default=5, help="queries per client")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=300.0, help="overall limit for the load phase, seconds")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the app's batch limit (1 = no batching)")
    parser.add_argument("--repeats", type=int, default=20, help="repeats of the bare measurement")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--demo-items", type=int, default=12, help="test items of the generated demo index")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from app.serve import free_port, launch
    from retrieval.images import open_image
    from retrieval.search import Searcher

    with tempfile.TemporaryDirectory(prefix="app-load-") as tmp:
        index_dir = args.index or build_demo_index(args, Path(tmp))
        searcher = Searcher.open(index_dir, device=args.device)
        running = launch(searcher, port=free_port(), index_dir=index_dir, max_batch_size=args.max_batch_size)
        try:
            app = running.search_app
            paths = [str(q.path) for q in app.examples] or [str(p) for p in searcher.gallery_paths[:16]]
            bare = bare_latency(searcher, paths, args.k, args.repeats, args.clients)
            backend = searcher.backend
            print(f"app {running.url}  backend {backend.name} on {backend.device}  gallery {app.gallery_size:,}  "
                  f"k={args.k}  max_batch_size={args.max_batch_size}")
            print(f"bare embed+search: median {bare['median'] * 1e3:.1f} ms  p95 {bare['p95'] * 1e3:.1f} ms  "
                  f"(decode {bare['decode'] * 1e3:.1f} ms; batch of {args.clients}: {bare['batch'] * 1e3:.1f} ms)",
                  flush=True)
            results, wall, single = load_phase(running.url, paths, args)
            # measured again after the load: on a shared machine the CPU available drifts during a run
            after = bare_latency(searcher, paths, args.k, args.repeats, args.clients)
            print(f"bare embed+search after the load: median {after['median'] * 1e3:.1f} ms  "
                  f"p95 {after['p95'] * 1e3:.1f} ms  (batch of {args.clients}: {after['batch'] * 1e3:.1f} ms)")
            bare = {key: (bare[key] + after[key]) / 2 for key in bare}
            replay = ReplaySearcher(searcher, open_image(paths[0]), args.k)
        finally:
            running.close()
        floor_app = launch(replay, port=free_port(), index_dir=index_dir, max_batch_size=args.max_batch_size)
        try:
            floor_results, floor_wall, floor_single = load_phase(floor_app.url, paths, args)
        finally:
            floor_app.close()

    load, one, floor, floor_one = summarise(results), summarise(single), summarise(floor_results), summarise(floor_single)
    errors = [kind for kind, _, _ in results if kind != "ok"]
    batches = [int(m.group(1)) for _, _, s in results if (m := re.search(r"one batch of (\d+)", s))]
    singles = sum(1 for kind, _, s in results if kind == "ok" and "one batch of" not in s)
    print(f"load: {args.clients} clients x {args.queries} queries = {len(results)} requests in {wall:.1f} s")
    print(f"  latency p50 {load['p50'] * 1e3:.0f} ms  p95 {load['p95'] * 1e3:.0f} ms  max {load['max'] * 1e3:.0f} ms")
    print(f"  throughput {load['ok'] / wall:.2f} queries/s  errors {len(errors)}")
    if batches or singles:
        print(f"  batch sizes: mean {statistics.mean(batches + [1] * singles):.1f}, max {max(batches + [1])}")
    for kind in sorted(set(errors))[:5]:
        print(f"  error: {kind} (x{errors.count(kind)})")
    print(f"one client, real embedder: p50 {one['p50'] * 1e3:.0f} ms  p95 {one['p95'] * 1e3:.0f} ms  "
          f"errors {one['errors']}")
    print(f"floor (replayed answer, zero model work): one client p50 {floor_one['p50'] * 1e3:.0f} ms; "
          f"{args.clients} clients p50 {floor['p50'] * 1e3:.0f} ms  p95 {floor['p95'] * 1e3:.0f} ms  "
          f"throughput {floor['ok'] / floor_wall:.2f} queries/s  errors {floor['errors']}")
    print(f"bare (mean of before/after): median {bare['median'] * 1e3:.1f} ms, batch of {args.clients} "
          f"{bare['batch'] * 1e3:.1f} ms")
    print(f"ratio p95 / bare median: {load['p95'] / bare['median']:.2f}x  (target < 3x)   "
          f"p50 / bare: {load['p50'] / bare['median']:.2f}x   p95 / bare batch-of-{args.clients}: "
          f"{load['p95'] / bare['batch']:.2f}x")
    print(f"floor p95 / bare median: {floor['p95'] / bare['median']:.2f}x  (no embedder can bring the load ratio "
          f"below this through Gradio + gradio_client)   load p95 / one-client p50: {load['p95'] / one['p50']:.2f}x")
    return 0 if not errors and not floor['errors'] else 1


if __name__ == "__main__":
    raise SystemExit(main())
