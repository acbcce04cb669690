"""Load test of the search server (JSON API and UI): N concurrent users against a locally launched app.

    python benchmarks/app_load.py                        # demo index, untrained ResNet-50 at 224 px
    python benchmarks/app_load.py --index indexes/inshop --clients 16 --queries 5
    python benchmarks/app_load.py --arch resnet18 --image-size 64 --embedding-size 32   # quick

The app is launched in this process on 127.0.0.1 (a free port), exactly as `retrieval serve` sets
it up (bounded queue, batched search event). Each simulated user is its own process (as browsers
are), so clients do not share one interpreter lock with each other or with the server. Printed,
from one run:

    bare        embed + search of one decoded image, called directly (median / p95 over repeats),
                and of a batch of `clients` images (the floor a fully batched queue can reach);
                measured before and after the load phases, ratios use the faster of the two
    app         per-query latency through the app (upload + queue + decode + embed + search +
                result tiles + response): p50 / p95 / max, throughput, errors, batch sizes seen;
                with one user (unloaded) and with `clients` users
    floor       the same requests against the same app whose embed+search is replaced by a replay
                of one precomputed answer: what Gradio's upload/queue/event-stream handling, the
                result tiles and the client library cost with zero model work
    clients     `api` (our JSON API: one multipart POST /api/v1/search per query, httpx),
                `gradio_client` (the library) and `http` (Gradio's documented HTTP API: upload,
                POST /call/search, read the event stream) with httpx; gradio_client polls its event
                stream every 50 ms, which the http client does not
    floor       (UI clients) the same app whose embed+search is replaced by a replay of one answer
    filtered    exact (flat) search over `--filter-items` random vectors, a filter keeping 10%, against
                unfiltered search of the same queries (q/s, batches of `clients`), and the filtered
                results checked against a NumPy ranking of the subset

Targets, printed as ratios with PASS/FAIL:
    API, `clients` users   0 errors; GPU: p95 <= 2x bare batch time and q/s >= 0.7x bare batched q/s;
                           CPU: p95 <= 1.15x bare batch time
    API, 1 user            median <= 1.3x bare single-query median + 2 ms
    UI (gradio_client)     p95 at `clients` users <= 1.5x the floor's p95 (a regression guard)
    filtered search        q/s >= 0.5x unfiltered, results exact

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

CLIENT_KINDS = ("api", "gradio_client", "http")


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
        data = [{"path": r.json()[0], "meta": {"_type": "gradio.FileData"}}, k, "All", "none"]  # no filter, no re-ranking
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
                    gallery, status = json.loads(payload)[:2]  # (a third output is the UI's session state)
                    return gallery, status
        raise RuntimeError("the event stream ended without a result")


class JsonApiUser:
    """One program calling our JSON API: POST /api/v1/search with the photo as multipart, one keep-alive connection."""

    def __init__(self, url: str) -> None:
        import httpx

        self._http = httpx.Client(base_url=url, timeout=60.0)
        self._http.get("api/v1/health").raise_for_status()

    def query(self, path: str, k: int, timeout: float) -> tuple[list, str]:
        with open(path, "rb") as f:
            r = self._http.post("api/v1/search", files={"image": (Path(path).name, f, "image/jpeg")},
                                data={"k": str(k)}, timeout=timeout)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:120]}")
        body = r.json()
        return body["results"], f"**Top {len(body['results'])}** (one batch of {body['batch_size']} queued queries)"


USERS = {"api": JsonApiUser, "gradio_client": GradioClientUser, "http": HttpApiUser}


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
    from retrieval.index.build import build_index
    from retrieval.embed.spec import EmbedderSpec, open_embedder
    from retrieval.data.demo import generate_demo
    from retrieval.data.inshop import load_inshop

    root = generate_demo(folder / "demo", seed=0, num_train_classes=4, num_test_classes=args.demo_items,
                         images_per_class=8, image_size=128, test_images_per_class=None)
    backend = open_embedder(EmbedderSpec.untrained(args.arch, args.embedding_size, args.image_size), args.device)
    out = folder / "index"
    print(f"building a demo index: {args.arch} (untrained) {args.image_size} px {args.embedding_size}-d ...", flush=True)
    build_index(load_inshop(root, name="demo"), backend, out, progress=False)
    return out


class ReplayEngine:
    """The batching worker's embed+search replaced by one precomputed answer (the floor phase): the served
    path (upload, decode, preprocessing, queue, worker hand-off, result tiles, response) is unchanged."""

    def __init__(self, searcher: Any, image: Any, k: int) -> None:
        self._hits = searcher.search_images([image], k)[0]
        self._size = int(searcher.backend.embedding_size)

    def embed(self, pixels: Any) -> Any:
        import numpy as np

        return np.zeros((len(pixels), self._size), np.float32)

    def search(self, emb: Any, k: int, where: Any, rerank: str) -> list:
        return [self._hits[:k] for _ in range(len(emb))]


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


def measure_app(url: str, paths: list[str], args: argparse.Namespace, label: str,
                kinds: tuple[str, ...]) -> dict[tuple[str, int], dict]:
    """Every client kind given, with one user and with `args.clients` users, against one app."""
    rows: dict[tuple[str, int], dict] = {}
    for kind in kinds:
        for users, queries in ((1, max(5, args.queries)), (args.clients, args.queries)):
            results, wall = run_users(kind, url, paths, users, queries, args.k, args.timeout)
            rows[(kind, users)] = row = summarise(results, wall)
            print(f"  {label:<5} {kind:<13} {users:>3} users: p50 {row['p50'] * 1e3:7.0f} ms  "
                  f"p95 {row['p95'] * 1e3:7.0f} ms  {row['rate']:6.2f} q/s  errors {len(row['errors'])}", flush=True)
    return rows


def filtered_search_speed(n: int, d: int, batch: int, rounds: int, seed: int = 0) -> dict[str, Any]:
    """Flat index of `n` random unit vectors, 5 categories of which the filter keeps one (10% of items
    by construction): q/s of filtered vs unfiltered search through the Searcher, and exactness."""
    import numpy as np

    from retrieval.index.config import IndexConfig
    from retrieval.index.faiss_index import build_faiss_index, resolve_params
    from retrieval.index.folder import GalleryIndex, ItemTable
    from retrieval.index.meta import IndexMeta
    from retrieval.search.searcher import Searcher

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    kept = rng.random(n) < 0.1
    attrs = [{"category": "kept" if keep else f"other{i % 4}"} for i, keep in enumerate(kept)]
    params = resolve_params(IndexConfig(index_type="flat", use_gpu=False), n, d)
    built = build_faiss_index(x, params, use_gpu=False)
    items = ItemTable([f"/g/{i}.jpg" for i in range(n)], [0] * n, ["x"] * n, attrs)
    searcher = Searcher(GalleryIndex(built.index, params, items, IndexMeta(), use_gpu=False), device="cpu")
    q = x[rng.choice(n, batch * rounds)] + 0.05 * rng.standard_normal((batch * rounds, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    where = ["category=kept"]
    searcher.search_raw(q[:batch], 10)
    searcher.search_raw(q[:batch], 10, where)  # warm-up (and the subset's row list is cached, as when serving)
    timings = {}
    for label, flt in (("unfiltered", None), ("filtered", where)):
        t0 = time.perf_counter()
        for r in range(rounds):
            searcher.search_raw(q[r * batch:(r + 1) * batch], 10, flt)
        timings[label] = batch * rounds / (time.perf_counter() - t0)
    _, ids = searcher.search_raw(q[:batch], 10, where)
    keep = np.flatnonzero(kept)
    expected = keep[np.argsort(-(q[:batch].astype(np.float64) @ x[keep].T.astype(np.float64)), axis=1)[:, :10]]
    return {"n": n, "kept": float(kept.mean()), "unfiltered": timings["unfiltered"], "filtered": timings["filtered"],
            "exact": bool((ids == expected).all())}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, help="index folder (default: build a demo index in a temp folder)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent users (one process each)")
    parser.add_argument("--queries", type=int, default=5, help="queries per user")
    parser.add_argument("--client", default="all", choices=[*CLIENT_KINDS, "all"],
                        help="api (our JSON API), gradio_client, http (Gradio's HTTP API) or all")
    parser.add_argument("--no-floor", action="store_true", help="skip the zero-model-work floor phase")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=300.0, help="limit per load phase, seconds")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="the worker's batch limit (default: 16 on CPU, 64 on GPU; 1 = no batching)")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="the worker's wait for more queries")
    parser.add_argument("--repeats", type=int, default=20, help="repeats of the bare measurement")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--demo-items", type=int, default=12, help="test items of the generated demo index")
    parser.add_argument("--filter-items", type=int, default=100_000, help="gallery of the filtered-search phase (0 = skip)")
    args = parser.parse_args(argv)
    kinds = CLIENT_KINDS if args.client == "all" else (args.client,)
    ui_kinds = tuple(k for k in kinds if k != "api")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from app.serve import free_port, launch
    from retrieval.images import open_image
    from retrieval.search.searcher import Searcher

    serving = dict(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms)
    with tempfile.TemporaryDirectory(prefix="app-load-") as tmp:
        index_dir = args.index or build_demo_index(args, Path(tmp))
        searcher = Searcher.open(index_dir, device=args.device)
        running = launch(searcher, port=free_port(), index_dir=index_dir, **serving)
        try:
            app = running.search_app
            paths = [str(q.path) for q in app.examples] or [str(p) for p in searcher.gallery_paths[:16]]
            bare = bare_latency(searcher, paths, args.k, args.repeats, args.clients)
            backend = searcher.backend
            worker = running.worker
            print(f"app {running.url}  backend {backend.name} on {backend.device}  gallery {app.gallery_size:,}  "
                  f"k={args.k}  worker: max batch {worker.max_batch}, max wait {worker.max_wait * 1e3:g} ms  "
                  f"cpus {os.cpu_count()}")
            print(f"bare embed+search: median {bare['median'] * 1e3:.1f} ms  p95 {bare['p95'] * 1e3:.1f} ms  "
                  f"(decode {bare['decode'] * 1e3:.1f} ms; batch of {args.clients}: {bare['batch'] * 1e3:.1f} ms)",
                  flush=True)
            rows = measure_app(running.url, paths, args, "app", kinds)
            # measured again after the load: on a shared machine the CPU available drifts during a run
            after = bare_latency(searcher, paths, args.k, args.repeats, args.clients)
            print(f"bare embed+search after the load: median {after['median'] * 1e3:.1f} ms  "
                  f"p95 {after['p95'] * 1e3:.1f} ms  (batch of {args.clients}: {after['batch'] * 1e3:.1f} ms)")
            bare = {key: min(bare[key], after[key]) for key in bare}  # a load spike cannot flatter the ratios
            replay = ReplayEngine(searcher, open_image(paths[0]), args.k)
            on_gpu = "cuda" in str(backend.device)
        finally:
            running.close()
        floor_rows: dict[tuple[str, int], dict] = {}
        if not args.no_floor and ui_kinds:
            floor_app = launch(searcher, port=free_port(), index_dir=index_dir, engine=replay, **serving)
            try:
                floor_rows = measure_app(floor_app.url, paths, args, "floor", ui_kinds)
            finally:
                floor_app.close()
    filtered = filtered_search_speed(args.filter_items, args.embedding_size, args.clients, 8) if args.filter_items else None

    print(f"\nbare embed+search (the faster of before/after): median {bare['median'] * 1e3:.1f} ms, "
          f"batch of {args.clients} {bare['batch'] * 1e3:.1f} ms")
    header = (f"{'client':<14}{'users':>6}{'p50':>9}{'p95':>9}{'q/s':>8}{'errors':>8}{'batch':>7}"
              f"{'p95/bare1':>11}{'p95/batch':>11}{'floor p95':>11}{'p95/floor':>11}")
    print(header)
    for (kind, users), row in rows.items():
        floor = floor_rows.get((kind, users))
        floor_p95 = floor["p95"] if floor else float("nan")
        print(f"{kind:<14}{users:>6}{row['p50'] * 1e3:>7.0f}ms{row['p95'] * 1e3:>7.0f}ms{row['rate']:>8.2f}"
              f"{len(row['errors']):>8}{row['mean_batch']:>7.1f}{row['p95'] / bare['median']:>10.2f}x"
              f"{row['p95'] / bare['batch']:>10.2f}x{floor_p95 * 1e3:>9.0f}ms{row['p95'] / floor_p95:>10.2f}x")
    errors = [e for row in [*rows.values(), *floor_rows.values()] for e in row["errors"]]
    for kind in sorted(set(errors))[:5]:
        print(f"  error: {kind} (x{errors.count(kind)})")

    print("\ntargets" + (" (GPU)" if on_gpu else " (CPU)") + ":")
    ok = True
    if ("api", args.clients) in rows:
        row = rows[("api", args.clients)]
        ratio = row["p95"] / bare["batch"]
        bare_rate = args.clients / bare["batch"]
        if on_gpu:
            good = not row["errors"] and ratio <= 2.0 and row["rate"] >= 0.7 * bare_rate
            print(f"  API {args.clients} users: p95 / bare batch = {ratio:.2f}x (<= 2), q/s / bare batched q/s = "
                  f"{row['rate'] / bare_rate:.2f}x (>= 0.7), errors {len(row['errors'])}  {verdict(good)}")
        else:
            good = not row["errors"] and ratio <= 1.15
            print(f"  API {args.clients} users: p95 / bare batch = {ratio:.2f}x (<= 1.15), errors "
                  f"{len(row['errors'])}  {verdict(good)}")
        ok &= good
    if ("api", 1) in rows:
        row = rows[("api", 1)]
        limit = 1.3 * bare["median"] + 0.002
        good = not row["errors"] and row["p50"] <= limit
        print(f"  API 1 user: median {row['p50'] * 1e3:.1f} ms vs 1.3 x bare {bare['median'] * 1e3:.1f} ms + 2 ms = "
              f"{limit * 1e3:.1f} ms (ratio {row['p50'] / limit:.2f}x of the limit)  {verdict(good)}")
        ok &= good
    for kind in ui_kinds:
        if (kind, args.clients) in rows and (kind, args.clients) in floor_rows:
            row, floor = rows[(kind, args.clients)], floor_rows[(kind, args.clients)]
            good = not row["errors"] and row["p95"] <= 1.5 * floor["p95"]
            print(f"  UI {kind} {args.clients} users: p95 / zero-model floor p95 = {row['p95'] / floor['p95']:.2f}x "
                  f"(<= 1.5)  {verdict(good)}")
            ok &= good
    if filtered:
        good = filtered["exact"] and filtered["filtered"] >= 0.5 * filtered["unfiltered"]
        print(f"  filtered search, {filtered['n']:,} items, filter keeps {filtered['kept']:.1%}: "
              f"{filtered['filtered']:.0f} q/s vs unfiltered {filtered['unfiltered']:.0f} q/s = "
              f"{filtered['filtered'] / filtered['unfiltered']:.2f}x (>= 0.5), exact {filtered['exact']}  {verdict(good)}")
        ok &= good
    return 0 if ok and not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
