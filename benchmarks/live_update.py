"""Index updates without downtime: concurrent API clients search without pause while the served index folder is
republished, against a real `retrieval serve` process (watching its folder, default settings). Not part of the suite.

    python benchmarks/live_update.py                                  # 8 clients, 20 republishes, ~2,400 items
    python benchmarks/live_update.py --clients 4 --swaps 6 --test-classes 100 --steady-seconds 10   # brief

Set-up (in a temporary folder): the generated demo dataset (In-Shop layout, 64 px photos), indexed by an untrained
resnet18 (64 px, `--embedding-size` d, flat index). The server is `python -m retrieval serve --index DIR --device
cpu --log-format json` in its own process. Clients are threads of this process using retrieval.client.SearchClient
(one multipart POST /api/v1/search per query, k=10, query photos of the stored query set). The republishing is done
by a separate publisher process (one torch thread): it copies the folder to a staging folder beside it, removes a
gallery product (all its photos) or adds the photos of a product the index never held there, as `retrieval index
--out STAGING --remove ID / --add FILES` would, then renames it into place (the renames `retrieval index` publishes
with), alternately.

Phases:
    steady   `--steady-seconds` of search, no republishing
    swaps    `--swaps` times: the publisher prepares a version (its CPU competes with the server), renames it in,
             the new version is awaited (GET /api/v1/info) and searched for 1 s, then `--quiet-seconds` of search
             without republishing
    scrape   `--scrapes` sequential GET /metrics on the idle server (one keep-alive connection, as Prometheus)

Measured and checked (PASS/FAIL):
    failed requests                0
    one version per answer         every answer names a version that was published, and every hit is that
                                   version's row (gallery index -> path), so no answer mixes versions; no removed
                                   product is in an answer from a version without it; a client never sees an
                                   older version after a newer one; a request sent after any answer from version V
                                   is answered by V or newer
    p95 during swaps               <= 2x the steady p95; "during a swap" = requests that overlap [renamed in, new
                                   version served + 1 s] (the watcher's poll, verification, load, warm-up, swap,
                                   release of the old version) and not the publisher's preparation; "steady" =
                                   requests of the steady phase and those inside the quiet periods between swaps
                                   (the same machine load, interleaved); the publisher's cost shows in the swap
                                   phase's overall p95, printed, not judged
    memory                         server RSS at rest (clients paused, nothing in flight) after the swaps minus
                                   RSS at rest before them is within one index size (the index folder's bytes)
    /metrics                       p95 of a scrape on the idle server <= 5 ms, server side (the access log's time,
                                   first byte in to last byte out; also printed: the server's CPU time per scrape)
                                   and at the client (wall clock, which on a shared, loaded machine includes
                                   waiting for a CPU); every scrape parses with the
                                   Prometheus text parser; its search counters, stage histograms and reload counters
                                   equal the clients' own counts; the access log holds one line per search
Also printed: the load average (the machine is shared), scrape latency under load, reload times.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))]


# --- the index and its republishing ---------------------------------------------------------------------------


def build(work: Path, test_classes: int, embedding_size: int) -> tuple[Path, Path]:
    """(dataset root, index folder): the demo data and its index, built here."""
    from retrieval.index.config import IndexConfig
    from retrieval.data.demo import generate_demo
    from retrieval.data.inshop import load_inshop
    from retrieval.embed.spec import EmbedderSpec, open_embedder
    from retrieval.index.build import build_index

    root = generate_demo(work / "demo", seed=0, num_train_classes=24, num_test_classes=test_classes,
                         images_per_class=12, image_size=64, test_images_per_class=None)
    index_dir, pristine = work / "index", work / f"index-{test_classes}-{embedding_size}.orig"
    shutil.rmtree(work / "staging", ignore_errors=True)
    if not pristine.is_dir():  # a --workdir of an earlier run keeps the index as built: the run starts from it
        backend = open_embedder(EmbedderSpec.untrained("resnet18", embedding_size=embedding_size, image_size=64),
                                "cpu")
        build_index(load_inshop(root, name="demo"), backend, pristine, IndexConfig(use_gpu=False), progress=False)
    shutil.rmtree(index_dir, ignore_errors=True)
    shutil.copytree(pristine, index_dir)
    return root, index_dir


def published(index_dir: Path) -> dict[str, Any]:
    """The folder as it is now: its version id, each row's dataset-relative path and item id."""
    from app.live_index import version_of
    from retrieval.index.folder import GalleryIndex
    from retrieval.search.hits import dataset_relative

    index = GalleryIndex.load(index_dir, verify_checksums=False, use_gpu=False)
    return {"version": version_of(index.meta).id,
            "paths": [dataset_relative(p, index.meta.data_root) for p in index.items.paths],
            "items": list(index.items.item_ids)}


def publisher(conn: Any, index_dir: str, embedding_size: int) -> None:
    """The publisher process. ("prepare", (kind, args)): copy the served folder to a staging folder beside it and
    remove (`kind` "remove": item ids) or add (`kind` "add": image paths) there, answer its facts; ("commit", None):
    rename the staging folder into place (retrieval.atomic.swap_in_folder, as `retrieval index` publishes)."""
    import torch

    torch.set_num_threads(1)
    from retrieval.atomic import swap_in_folder
    from retrieval.embed.spec import EmbedderSpec, open_embedder
    from retrieval.index.build import add_images, remove_items

    backend = open_embedder(EmbedderSpec.untrained("resnet18", embedding_size=embedding_size, image_size=64), "cpu")
    target = Path(index_dir)
    staging = target.parent / "staging"
    while True:
        command = conn.recv()
        if command is None:
            return
        action, payload = command
        started = time.perf_counter()
        if action == "commit":
            swap_in_folder(staging, target)
            conn.send({"seconds": time.perf_counter() - started})
            continue
        kind, args = payload
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(target, staging)
        if kind == "remove":
            remove_items(staging, args)
        else:
            add_images(staging, args, backend, progress=False)
        conn.send({**published(staging), "seconds": time.perf_counter() - started})


def train_items(root: Path) -> dict[str, list[str]]:
    """item id -> photo paths of the demo's train products (never in the gallery: what `--add` adds)."""
    out: dict[str, list[str]] = {}
    for line in (root / "Eval" / "list_eval_partition.txt").read_text().splitlines()[2:]:
        name, item, status = line.split()
        if status == "train":
            out.setdefault(item, []).append(str(root / "Img" / name))
    return out


# --- the server -----------------------------------------------------------------------------------------------


def start_server(index_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.Popen([sys.executable, "-m", "retrieval", "serve", "--index", str(index_dir), "--port",
                             str(port), "--device", "cpu", "--log-format", "json"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --- clients --------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    client: int
    sent: float
    received: float
    version: str = ""
    hits: list[tuple[int, str, str]] = field(default_factory=list)  # (gallery index, path, item id)
    error: str = ""


class Clients:
    """`n` threads searching without pause; every answer kept."""

    def __init__(self, url: str, queries: list[bytes], n: int) -> None:
        self.url, self.queries = url, queries
        self.answers: list[Answer] = []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._in_flight = 0
        self._threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in range(n)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def pause(self) -> None:
        """Stop sending and wait until no request is in flight."""
        self._go.clear()
        while self._in_flight:
            time.sleep(0.02)

    def resume(self) -> None:
        self._go.set()

    def stop(self) -> None:
        self._stop.set()
        self._go.set()
        for t in self._threads:
            t.join(timeout=120)

    def _run(self, c: int) -> None:
        from retrieval.client import SearchClient

        client, i = SearchClient(self.url, timeout=120), c * 7
        while not self._stop.is_set():
            self._go.wait()
            with self._lock:
                self._in_flight += 1
            sent = time.perf_counter()
            try:
                result = client.search(self.queries[i % len(self.queries)], k=10)
                answer = Answer(c, sent, time.perf_counter(), result.index_version,
                                [(h.gallery_index, h.path, h.item_id) for h in result.hits])
            except Exception as exc:  # noqa: BLE001  every failure is counted
                answer = Answer(c, sent, time.perf_counter(), error=repr(exc)[:200])
            with self._lock:
                self.answers.append(answer)
                self._in_flight -= 1
            i += 1


class Scraper:
    """GET /metrics every second on its own connection; latency and parse of each."""

    def __init__(self, url: str) -> None:
        self.url, self.ms, self.unparsed = url, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=30) as http:
            while not self._stop.wait(1.0):
                t0 = time.perf_counter()
                text = http.get(self.url + "metrics").text
                self.ms.append((time.perf_counter() - t0) * 1000)
                self.unparsed += 0 if parse_metrics(text) else 1


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample, sorted labels): value}, through the Prometheus text parser (empty when it does not parse)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}
    except Exception:  # noqa: BLE001
        return {}


def metric(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


# --- checks ---------------------------------------------------------------------------------------------------


def consistency(answers: list[Answer], versions: dict[str, dict[str, Any]], order: list[str]) -> list[str]:
    """Every violation of "one version per answer" (see the module docstring)."""
    problems: list[str] = []
    rank = {v: i for i, v in enumerate(order)}
    good = sorted((a for a in answers if not a.error), key=lambda a: a.received)
    last_of_client: dict[int, int] = {}
    for a in good:
        if a.version not in versions:
            problems.append(f"unknown version {a.version}")
            continue
        v = versions[a.version]
        held = v["item_set"]
        for gi, path, item in a.hits:
            if gi >= len(v["paths"]) or v["paths"][gi] != path or v["items"][gi] != item:
                problems.append(f"hit {gi} {path} is not row {gi} of {a.version}")
            if item not in held:
                problems.append(f"item {item} not held by {a.version}")
        if rank[a.version] < last_of_client.get(a.client, 0):
            problems.append(f"client {a.client} went back to {a.version}")
        last_of_client[a.client] = rank[a.version]
    newest, j = 0, 0  # answers by time received; for each request, the newest version answered before it was sent
    for a in sorted(good, key=lambda a: a.sent):
        while j < len(good) and good[j].received < a.sent:
            newest = max(newest, rank.get(good[j].version, 0))
            j += 1
        if a.version in rank and rank[a.version] < newest:
            problems.append(f"request sent after {order[newest]} answered got {a.version}")
    return problems


# --- the run --------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--test-classes", type=int, default=400, help="demo test products (6 gallery photos each)")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--steady-seconds", type=float, default=20.0)
    parser.add_argument("--quiet-seconds", type=float, default=4.0,
                        help="search without republishing after each swap (steady samples between swaps)")
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the data and index here (default: temporary)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import httpx

    from app.serve import free_port
    from retrieval.client import SearchClient

    work = args.workdir or Path(tempfile.mkdtemp(prefix="live-update-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    root, index_dir = build(work, args.test_classes, args.embedding_size)
    index_bytes = sum(p.stat().st_size for p in index_dir.iterdir() if p.is_file())
    first = published(index_dir)
    print(f"index: {len(first['paths']):,} items, {args.embedding_size}-d flat, {index_bytes / 2**20:.1f} MiB on disk "
          f"(built in {time.perf_counter() - t0:.0f} s)")
    versions = {first["version"]: first}
    order = [first["version"]]

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    pub = ctx.Process(target=publisher, args=(child, str(index_dir), args.embedding_size), daemon=True)
    pub.start()
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = work / "server.log"
    server = start_server(index_dir, port, log_path)
    results: dict[str, Any] = {}
    try:
        probe = SearchClient(url, timeout=30)
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited ({server.returncode}); see {log_path}")
            try:
                if probe.ready():
                    break
            except Exception:  # noqa: BLE001  not listening yet
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not become ready")
            time.sleep(0.5)
        from retrieval.index.folder import GalleryIndex

        queries = [Path(p).read_bytes() for p in GalleryIndex.load(index_dir, verify_checksums=False,
                                                                     use_gpu=False).queries.items.paths[:400]]
        rss_ready = rss_mib(server.pid)
        clients, scraper = Clients(url, queries, args.clients), Scraper(url)
        clients.start()
        scraper._thread.start()
        steady_from = time.perf_counter()
        time.sleep(args.steady_seconds)
        steady_to = time.perf_counter()
        clients.pause()  # memory at rest: no request in flight
        time.sleep(1.0)
        rss_before = rss_mib(server.pid)
        clients.resume()

        rng = random.Random(0)
        removable = sorted(set(first["items"]))
        rng.shuffle(removable)
        addable = sorted(train_items(root).items())
        preparing: list[tuple[float, float]] = []  # the publisher at work (its CPU competes with the server)
        windows: list[tuple[float, float]] = []  # [renamed in, served + 1 s]
        quiet: list[tuple[float, float]] = []  # between a window and the next preparation
        reload_s: list[float] = []
        publish_s: list[float] = []
        rss_series = [rss_before]
        swaps_from = time.perf_counter()
        for s in range(args.swaps):
            change = ("remove", [removable.pop()]) if s % 2 == 0 else ("add", addable[s % len(addable)][1])
            prepare_from = time.perf_counter()
            parent.send(("prepare", change))
            facts = parent.recv()
            preparing.append((prepare_from, time.perf_counter()))
            publish_s.append(facts["seconds"])
            facts["item_set"] = set(facts["items"])
            versions[facts["version"]] = facts
            order.append(facts["version"])
            parent.send(("commit", None))
            parent.recv()
            done = time.perf_counter()
            while probe.info()["index_version"] != facts["version"]:
                if time.perf_counter() - done > 120:
                    raise TimeoutError(f"version {facts['version']} was not served within 120 s")
                time.sleep(0.05)
            served = time.perf_counter()
            reload_s.append(served - done)
            windows.append((done, served + 1.0))
            time.sleep(1.0)
            quiet_from = time.perf_counter()
            time.sleep(args.quiet_seconds)
            quiet.append((quiet_from, time.perf_counter()))
            rss_series.append(rss_mib(server.pid))
        swaps_to = time.perf_counter()
        clients.pause()
        time.sleep(2.0)  # the last release runs on a server thread after the swap
        rss_after = rss_mib(server.pid)
        clients.stop()
        scraper._stop.set()
        scraper._thread.join(timeout=30)
        load_end = os.getloadavg()

        # idle scrapes
        time.sleep(0.5)
        scrape_ms: list[float] = []
        unparsed = 0
        with httpx.Client(timeout=30) as http:
            final = parse_metrics(http.get(url + "metrics").text)
            idle_from, idle_cpu = time.perf_counter(), cpu_seconds(server.pid)
            time.sleep(3.0)  # the server's own background work (watcher, UI queue) per second, to subtract
            idle_rate = (cpu_seconds(server.pid) - idle_cpu) / (time.perf_counter() - idle_from)
            scrapes_from, cpu_before = time.perf_counter(), cpu_seconds(server.pid)
            for _ in range(args.scrapes):
                t = time.perf_counter()
                text = http.get(url + "metrics").text
                scrape_ms.append((time.perf_counter() - t) * 1000)
                unparsed += 0 if parse_metrics(text) else 1
            busy = cpu_seconds(server.pid) - cpu_before - idle_rate * (time.perf_counter() - scrapes_from)
            scrape_cpu_ms = max(busy, 0.0) * 1000 / args.scrapes
    finally:
        parent.send(None)
        pub.join(timeout=30)
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    for v in versions.values():
        v.setdefault("item_set", set(v["items"]))
    answers = clients.answers
    ok = [a for a in answers if not a.error]
    failed = [a for a in answers if a.error]
    latency = lambda a: (a.received - a.sent) * 1000  # noqa: E731
    def overlaps(a: Answer, spans: list[tuple[float, float]]) -> bool:
        return any(a.sent < t1 and a.received > t0 for t0, t1 in spans)

    def inside(a: Answer, spans: list[tuple[float, float]]) -> bool:
        return any(t0 <= a.sent and a.received <= t1 for t0, t1 in spans)

    steady_first = [latency(a) for a in ok if steady_from <= a.sent and a.received <= steady_to]
    steady_between = [latency(a) for a in ok if inside(a, quiet)]
    steady = steady_first + steady_between
    during = [latency(a) for a in ok if overlaps(a, windows) and not overlaps(a, preparing)]
    swap_phase = [latency(a) for a in ok if a.sent >= swaps_from and a.received <= swaps_to]
    problems = consistency(answers, versions, order)
    search_labels = dict(route="/api/v1/search", method="POST")
    counted_ok = metric(final, "retrieval_http_requests_total", **search_labels, status="200")
    counted_all = sum(v for (name, labels), v in final.items()
                      if name == "retrieval_http_requests_total" and dict(labels).get("route") == "/api/v1/search")
    logged_ok = 0
    metrics_ms: list[float] = []  # server-side time of each /metrics request, from the access log
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("route") == "/api/v1/search" and entry.get("status") == 200:
            logged_ok += 1
        if isinstance(entry, dict) and entry.get("route") == "/metrics":
            metrics_ms.append(float(entry["ms"]))
    idle_metrics_ms = metrics_ms[-args.scrapes:]
    steady_p95, during_p95 = _percentile(steady, 95), _percentile(during, 95)
    rss_growth = rss_after - rss_before
    checks = [
        ("0 failed requests", not failed, f"{len(failed)} of {len(answers)}"
         + (f" (first: {failed[0].error})" if failed else "")),
        ("every answer is one index version", not problems, f"{len(problems)} violations" +
         (f" (first: {problems[0]})" if problems else "") + f"; {len(ok)} answers, {len(order)} versions"),
        ("p95 during swaps <= 2x steady p95", during_p95 <= 2 * steady_p95,
         f"{during_p95:.0f} ms vs {steady_p95:.0f} ms = {during_p95 / steady_p95:.2f}x"),
        ("server RSS after the swaps within one index size", abs(rss_growth) <= index_bytes / 2**20,
         f"{rss_before:.0f} -> {rss_after:.0f} MiB ({rss_growth:+.1f} MiB; index {index_bytes / 2**20:.1f} MiB)"),
        ("/metrics scrape p95 <= 5 ms (idle server, server side)", _percentile(idle_metrics_ms, 95) <= 5.0,
         f"p50 {_percentile(idle_metrics_ms, 50):.2f} ms, p95 {_percentile(idle_metrics_ms, 95):.2f} ms over "
         f"{len(idle_metrics_ms)} (access log); server CPU {scrape_cpu_ms:.2f} ms per scrape"),
        ("/metrics scrape p95 <= 5 ms (idle server, client wall clock)", _percentile(scrape_ms, 95) <= 5.0,
         f"p50 {_percentile(scrape_ms, 50):.2f} ms, p95 {_percentile(scrape_ms, 95):.2f} ms over {len(scrape_ms)}"),
        ("every scrape parses", unparsed == 0 and scraper.unparsed == 0 and bool(final),
         f"{len(scrape_ms) + len(scraper.ms)} scrapes, {unparsed + scraper.unparsed} unparsed"),
        ("metrics agree with the clients", counted_ok == len(ok) and counted_all == len(answers)
         and metric(final, "retrieval_search_seconds_count", stage="total") == len(ok)
         and metric(final, "retrieval_batch_size_sum") == len(ok)
         and metric(final, "retrieval_index_reloads_total", outcome="reloaded") == args.swaps
         and metric(final, "retrieval_index_reloads_total", outcome="refused") == 0,
         f"search 200s {counted_ok:.0f} vs {len(ok)}, all searches {counted_all:.0f} vs {len(answers)}, "
         f"total-latency count {metric(final, 'retrieval_search_seconds_count', stage='total'):.0f}, batched "
         f"queries {metric(final, 'retrieval_batch_size_sum'):.0f}, reloads "
         f"{metric(final, 'retrieval_index_reloads_total', outcome='reloaded'):.0f} vs {args.swaps}"),
        ("one access-log line per search", logged_ok == len(ok), f"{logged_ok} lines vs {len(ok)} answers"),
    ]
    print(f"load average at start {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f}, at end "
          f"{load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f} (1/5/15 min; {os.cpu_count()} CPUs)")
    print(f"clients {args.clients}, swaps {args.swaps}; requests {len(answers)} "
          f"({len(ok) / max(swaps_to - steady_from, 1e-9):.1f} q/s)")
    print(f"latency ms   steady p50 {_percentile(steady, 50):.0f} p95 {steady_p95:.0f} (n={len(steady)}: "
          f"first phase p95 {_percentile(steady_first, 95):.0f}, n={len(steady_first)}; between swaps p95 "
          f"{_percentile(steady_between, 95):.0f}, n={len(steady_between)}) | during swaps p50 "
          f"{_percentile(during, 50):.0f} p95 {during_p95:.0f} (n={len(during)}) | whole swap phase p95 "
          f"{_percentile(swap_phase, 95):.0f} (n={len(swap_phase)}, includes the publisher's work)")
    print(f"republish (publisher) s  median {statistics.median(publish_s):.2f} max {max(publish_s):.2f}; "
          f"published -> served s  median {statistics.median(reload_s):.2f} max {max(reload_s):.2f} "
          f"(watch interval 1 s)")
    print(f"server RSS MiB  ready {rss_ready:.0f}, before swaps {rss_before:.0f}, after {rss_after:.0f}; series "
          + " ".join(f"{r:.0f}" for r in rss_series))
    print(f"/metrics under load  p50 {_percentile(scraper.ms, 50):.1f} ms p95 {_percentile(scraper.ms, 95):.1f} ms "
          f"(n={len(scraper.ms)})")
    for name, passed, detail in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {detail}")
    results = {"checks": [{"name": n, "pass": bool(p), "detail": d} for n, p, d in checks],
               "steady_ms": steady, "during_ms": during, "rss": rss_series, "load_start": load_start,
               "load_end": load_end}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(p for _, p, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
