"""Load test of the search UI: N concurrent users against a locally launched app, through gradio_client.

    python benchmarks/app_load.py                        # demo index, untrained ResNet-50 at 224 px
    python benchmarks/app_load.py --index indexes/inshop --clients 16 --queries 5
    python benchmarks/app_load.py --arch resnet18 --image-size 64 --embedding-size 32   # quick

The app is launched in this process on 127.0.0.1 (a free port), exactly as `retrieval serve` sets
it up (bounded queue, batched search event). Each simulated user is its own process (as browsers
are), so clients do not share one interpreter lock with each other or with the server. Printed,
from one run:

    bare        embed + search of one decoded image, called directly (median / p95 over repeats),
                and of a batch of `clients` images (the floor a fully batched queue can reach);
                measured before and after the load phases, ratios use the mean of the two
    app         per-query latency through the app (upload + queue + decode + embed + search +
                result tiles + response): p50 / p95 / max, throughput, errors, batch sizes seen;
                with one user (unloaded) and with `clients` users
    floor       the same requests against the same app whose embed+search is replaced by a replay
                of one precomputed answer: what Gradio's upload/queue/event-stream handling, the
                result tiles and the client library cost with zero model work
    clients     `gradio_client` (the library, as the target is stated) and `http` (Gradio's
                documented HTTP API: upload, POST /call/search, read the event stream) with httpx;
                gradio_client polls its event stream every 50 ms, which the http client does not
    ratio       app p95 / bare median (target < 3 at 16 clients); floor p95 / bare median bounds
                from below what any embedder can reach through the same stack

Bounded: `clients * queries` requests per phase and an overall `--timeout` per phase; unfinished
requests count as errors. Thumbnail downloads are not part of a request (clients do not fetch them).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLIENT_KINDS = ("gradio_client", "http")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[pos]


# --- client side (one process per simulated user) ----------------------------------------------------


class GradioClientUser:
    """One user through the gradio_client library."""

    def __init__(self, url: str) -> None:
        from gradio_client import Client, handle_file

        self._handle_file = handle_file
        self._client = Client(url, verbose=False, download_files=False)

    def query(self, path: str, k: int, timeout: float) -> tuple[list, str]:
        job = self._client.submit(self._handle_file(path), k, api_name="/search")
        gallery, status = job.result(timeout=timeout)
        return gallery, status


class HttpApiUser:
    """One user through Gradio's documented HTTP API (what `curl` would do), with one keep-alive connection."""

    def __init__(self, url: str) -> None:
        import httpx

        self._http = httpx.Client(base_url=url, timeout=60.0)
        self._http.get("config").raise_for_status()

    def query(self, path: str, k: int, timeout: float) -> tuple[list, str]:
        with open(path, "rb") as f:
            r = self._http.post("gradio_api/upload", files={"files": (Path(path).name, f)})
        r.raise_for_status()
        data = [{"path": r.json()[0], "meta": {"_type": "gradio.FileData"}}, k]
        r = self._http.post("gradio_api/call/search", json={"data": data})
        r.raise_for_status()
        event = ""
        with self._http.stream("GET", f"gradio_api/call/search/{r.json()['event_id']}", timeout=timeout) as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line[len("event:"):].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    payload = line[len("data:"):].strip()
                    if event == "error":
                        raise RuntimeError(f"server error: {payload[:200]}")
                    gallery, status = json.loads(payload)
                    return gallery, status
        raise RuntimeError("the event stream ended without a result")


USERS = {"gradio_client": GradioClientUser, "http": HttpApiUser}


def _user_process(kind: str, url: str, paths: list[str], queries: int, k: int, timeout: float,
                  barrier: Any, results: Any, slot: int) -> None:
    """Connect, wait until every user has connected, then send `queries` queries one after another."""
    try:
        user = USERS[kind](url)
        barrier.wait(timeout=300)
    except Exception as exc:
        barrier.abort()
        results.put((slot, [(f"error: client failed to start: {type(exc).__name__}: {exc}"[:160], 0.0, "")] * queries,
                     float("nan"), float("nan")))
        return
    start = time.time()
    deadline = start + timeout
    out: list[tuple] = []
    for q in range(queries):
        if time.time() > deadline:
            out.append(("timeout", 0.0, ""))
            continue
        t0 = time.perf_counter()
        try:
            gallery, status = user.query(paths[q % len(paths)], k, max(1.0, deadline - time.time()))
            ok = status.startswith("**Top") and len(gallery) == k
            out.append(("ok" if ok else f"bad: {status[:120]}", time.perf_counter() - t0, status))
        except Exception as exc:  # a failed request is a measured error, not a crash of the benchmark
            out.append((f"error: {type(exc).__name__}: {str(exc)[:120]}", time.perf_counter() - t0, ""))
    results.put((slot, out, start, time.time()))


def run_users(kind: str, url: str, paths: list[str], users: int, queries: int, k: int,
              timeout: float) -> tuple[list[tuple], float]:
    """`users` processes x `queries` sequential queries each, started together; (results, wall seconds)."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(users), ctx.Queue()
    procs = [ctx.Process(target=_user_process, daemon=True,
                         args=(kind, url, paths[i:] + paths[:i], queries, k, timeout, barrier, results, i))
             for i in range(users)]
    for p in procs:
        p.start()
    collected: list[tuple] = []
    starts, ends = [], []
    give_up = time.time() + timeout + 300  # process start-up and imports come on top of the load itself
    for _ in procs:
        try:
            _, out, start, end = results.get(timeout=max(1.0, give_up - time.time()))
        except queue.Empty:
            break
        collected += out
        if start == start:  # not nan
            starts.append(start)
            ends.append(end)
    collected += [("timeout", 0.0, "")] * (users * queries - len(collected))
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()
    wall = max(ends) - min(starts) if starts else float("nan")
    return collected, max(wall, 1e-9)


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

    def __init__(self, searcher: Any, image: Any, k: int) -> None:
        self._searcher = searcher
        self._hits = searcher.search_images([image], k)[0]

    def search_images(self, images: list, k: int) -> list:
        return [self._hits[:k] for _ in images]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._searcher, name)


def bare_latency(searcher: Any, paths: list[str], k: int, repeats: int, batch: int) -> dict[str, float]:
    from retrieval.images import open_image

    images = [open_image(p) for p in paths]
    searcher.search_images(images[:1], k)  # warm-up
    single = []
    for i in range(repeats):
        t0 = time.perf_counter()
        searcher.search_images([images[i % len(images)]], k)
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
        searcher.search_images(batch_images, k)
        batched.append(time.perf_counter() - t0)
    return {"median": statistics.median(single), "p95": _percentile(single, 95),
            "decode": statistics.median(decode), "batch": statistics.median(batched)}


# --- measurement -------------------------------------------------------------------------------------


def summarise(results: list[tuple], wall: float) -> dict[str, Any]:
    ok = [dt for kind, dt, _ in results if kind == "ok"]
    errors = [kind for kind, _, _ in results if kind != "ok"]
    batches = [int(m.group(1)) if (m := re.search(r"one batch of (\d+)", s)) else 1
               for kind, _, s in results if kind == "ok"]
    return {"p50": _percentile(ok, 50), "p95": _percentile(ok, 95), "max": max(ok, default=float("nan")),
            "rate": len(ok) / wall, "errors": errors, "requests": len(results),
            "mean_batch": statistics.mean(batches) if batches else float("nan"), "max_batch": max(batches, default=0)}


def measure_app(url: str, paths: list[str], args: argparse.Namespace, label: str) -> dict[tuple[str, int], dict]:
    """Every client kind asked for, with one user and with `args.clients` users, against one app."""
    rows: dict[tuple[str, int], dict] = {}
    for kind in args.client_kinds:
        for users, queries in ((1, max(5, args.queries)), (args.clients, args.queries)):
            results, wall = run_users(kind, url, paths, users, queries, args.k, args.timeout)
            rows[(kind, users)] = row = summarise(results, wall)
            print(f"  {label:<5} {kind:<13} {users:>3} users: p50 {row['p50'] * 1e3:7.0f} ms  "
                  f"p95 {row['p95'] * 1e3:7.0f} ms  {row['rate']:6.2f} q/s  errors {len(row['errors'])}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, help="index folder (default: build a demo index in a temp folder)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent users (one process each)")
    parser.add_argument("--queries", type=int, default=5, help="queries per user")
    parser.add_argument("--client", default="both", choices=[*CLIENT_KINDS, "both"],
                        help="gradio_client, http (Gradio's HTTP API) or both")
    parser.add_argument("--no-floor", action="store_true", help="skip the zero-model-work floor phase")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=300.0, help="limit per load phase, seconds")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the app's batch limit (1 = no batching)")
    parser.add_argument("--repeats", type=int, default=20, help="repeats of the bare measurement")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--demo-items", type=int, default=12, help="test items of the generated demo index")
    args = parser.parse_args(argv)
    args.client_kinds = CLIENT_KINDS if args.client == "both" else (args.client,)
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
                  f"k={args.k}  max_batch_size={args.max_batch_size}  cpus {os.cpu_count()}")
            print(f"bare embed+search: median {bare['median'] * 1e3:.1f} ms  p95 {bare['p95'] * 1e3:.1f} ms  "
                  f"(decode {bare['decode'] * 1e3:.1f} ms; batch of {args.clients}: {bare['batch'] * 1e3:.1f} ms)",
                  flush=True)
            rows = measure_app(running.url, paths, args, "app")
            # measured again after the load: on a shared machine the CPU available drifts during a run
            after = bare_latency(searcher, paths, args.k, args.repeats, args.clients)
            print(f"bare embed+search after the load: median {after['median'] * 1e3:.1f} ms  "
                  f"p95 {after['p95'] * 1e3:.1f} ms  (batch of {args.clients}: {after['batch'] * 1e3:.1f} ms)")
            bare = {key: (bare[key] + after[key]) / 2 for key in bare}
            replay = ReplaySearcher(searcher, open_image(paths[0]), args.k)
        finally:
            running.close()
        floor_rows: dict[tuple[str, int], dict] = {}
        if not args.no_floor:
            floor_app = launch(replay, port=free_port(), index_dir=index_dir, max_batch_size=args.max_batch_size)
            try:
                floor_rows = measure_app(floor_app.url, paths, args, "floor")
            finally:
                floor_app.close()

    print(f"\nbare embed+search (mean of before/after): median {bare['median'] * 1e3:.1f} ms, "
          f"batch of {args.clients} {bare['batch'] * 1e3:.1f} ms")
    header = (f"{'client':<14}{'users':>6}{'app p50':>10}{'app p95':>10}{'q/s':>8}{'errors':>8}{'batch':>7}"
              f"{'p95/bare':>10}{'floor p95':>11}{'floor/bare':>11}")
    print(header)
    for (kind, users), row in rows.items():
        floor = floor_rows.get((kind, users))
        floor_p95 = floor["p95"] if floor else float("nan")
        print(f"{kind:<14}{users:>6}{row['p50'] * 1e3:>8.0f}ms{row['p95'] * 1e3:>8.0f}ms{row['rate']:>8.2f}"
              f"{len(row['errors']):>8}{row['mean_batch']:>7.1f}{row['p95'] / bare['median']:>9.1f}x"
              f"{floor_p95 * 1e3:>9.0f}ms{floor_p95 / bare['median']:>10.1f}x")
    errors = [e for row in [*rows.values(), *floor_rows.values()] for e in row["errors"]]
    for kind in sorted(set(errors))[:5]:
        print(f"  error: {kind} (x{errors.count(kind)})")
    target = rows.get(("gradio_client", args.clients)) or next(iter(rows.values()))
    print(f"target (gradio_client, {args.clients} users): p95 / bare median = "
          f"{target['p95'] / bare['median']:.2f}x (< 3x wanted), errors {len(target['errors'])}")
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
