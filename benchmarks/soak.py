"""Soak test of the web UI: a real `retrieval serve` process under a mix of good and hostile uploads for a
bounded time at several numbers of concurrent users. Not part of the test suite.

    python benchmarks/soak.py                              # 1, 4 and 16 users, 60 s each
    python benchmarks/soak.py --users 1,8 --seconds 20     # brief
    python benchmarks/soak.py --index indexes/inshop       # an existing index (its embedder is reopened)

Each user is a thread with its own HTTP connection; each request goes, at random, through the web UI's
event API (upload, POST /gradio_api/call/search, read the event stream) or the JSON API (POST
/api/v1/search, multipart), looping over a fixed mix of uploads:
good photos (query images of the index) and, by default one in two, hostile ones: truncated JPEG,
text named .jpg, PNG headers claiming 9000x9000 pixels, 60000x1 and 1x60000 PNGs (1 KB each), a file
over the upload limit, and a base64 paste over the limit sent as a data URL.

A request is correct when a good photo returns k results, a hostile one returns a refusal message
(UI; for the oversized file an HTTP 413 from the upload route) or a 4xx error (JSON API), within `--timeout`. Anything else is an
error: a server error event, an exception, a timeout, a hostile upload that returns results. Printed
per level: requests, errors (by kind), p50/p95/max latency of good and of hostile requests,
throughput, and the server's resident memory (VmRSS of the serving process, sampled every second):
at the start of the level, its maximum, at the end; the RSS series of the whole run closes the report.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
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


# --- inputs --------------------------------------------------------------------------------------------


def hostile_files(folder: Path, max_upload_bytes: int) -> dict[str, Path]:
    """The bad uploads of the mix (see the module docstring)."""
    import numpy as np
    from PIL import Image

    from tests.fakes import _png_header_only

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    buf = io.BytesIO()
    noisy = np.random.default_rng(0).integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
    out["truncated"] = folder / "truncated.jpg"
    out["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out["not_an_image"] = folder / "not_an_image.jpg"
    out["not_an_image"].write_bytes(b"this is not a photo\n" * 10)
    out["bomb_header"] = folder / "bomb.png"
    out["bomb_header"].write_bytes(_png_header_only(9000, 9000))
    for name, size in (("wide", (60000, 1)), ("tall", (1, 60000))):
        out[name] = folder / f"{name}.png"
        Image.new("RGB", size, (10, 200, 30)).save(out[name])
    out["oversized"] = folder / "oversized.jpg"
    out["oversized"].write_bytes(b"\xff\xd8\xff" + os.urandom(max_upload_bytes + 1024))
    return out


def build_index(folder: Path, arch: str, image_size: int, embedding_size: int) -> Path:
    from retrieval.index.build import build_index as build
    from retrieval.embed.spec import EmbedderSpec, open_embedder
    from retrieval.data.demo import generate_demo
    from retrieval.data.inshop import load_inshop

    root = generate_demo(folder / "demo", seed=0, num_train_classes=4, num_test_classes=40, images_per_class=6,
                         image_size=128, test_images_per_class=None)
    backend = open_embedder(EmbedderSpec.untrained(arch, embedding_size, image_size), "cpu")
    out = folder / "index"
    build(load_inshop(root, name="demo"), backend, out, progress=False)
    return out


# --- the server process --------------------------------------------------------------------------------


def start_server(index: Path, port: int, device: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.Popen([sys.executable, "-m", "retrieval", "serve", "--index", str(index), "--port", str(port),
                             "--device", device], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "config", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not come up")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.samples = pid, every, []  # (seconds since start, MiB)
        self._stop_event = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.samples.append((time.monotonic() - self.t0, rss_mib(self.pid)))
            except OSError:
                return
            self._stop_event.wait(self.every)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


# --- one user --------------------------------------------------------------------------------------------


API_SEARCH = "api/v1/search"
REFUSALS = (400, 413, 415, 422)  # what the JSON API answers a hostile upload with


def api_request(http: Any, item: tuple[str, Any], k: int, max_upload_bytes: int) -> tuple[str, str]:
    """One search through the JSON API (multipart upload, or base64 JSON for the paste)."""
    kind, source = item
    if kind == "paste":
        r = http.post(API_SEARCH, json={"image": "data:image/png;base64," + "A" * (4 * max_upload_bytes // 3 + 4096),
                                        "k": k})
    else:
        with open(source, "rb") as f:
            r = http.post(API_SEARCH, files={"image": (Path(source).name, f)}, data={"k": str(k)})
    if kind == "good":
        ok = r.status_code == 200 and len(r.json().get("results", [])) == k
        return ("ok", "") if ok else ("good photo not answered", f"{r.status_code} {r.text[:100]}")
    if r.status_code in REFUSALS and "error" in r.text:
        return "ok", ""
    return ("server error", r.text[:100]) if r.status_code >= 500 else ("hostile upload answered", f"{kind} {r.status_code}")


def one_request(http: Any, item: tuple[str, Any], k: int, timeout: float, max_upload_bytes: int,
                route: str = "ui") -> tuple[str, str]:
    """Send one upload through the UI's event API or the JSON API; returns (outcome, detail), outcome "ok" or an error kind."""
    if route == "api":
        return api_request(http, item, k, max_upload_bytes)
    kind, source = item
    if kind == "paste":
        url = "data:image/png;base64," + "A" * (4 * max_upload_bytes // 3 + 4096)
        data = [{"url": url, "path": None, "meta": {"_type": "gradio.FileData"}}, k, None, "none"]
    else:
        with open(source, "rb") as f:
            r = http.post("gradio_api/upload", files={"files": (Path(source).name, f)})
        if kind == "oversized":
            return ("ok", "") if r.status_code == 413 else ("oversized upload accepted", str(r.status_code))
        if r.status_code != 200:
            return "upload failed", f"{r.status_code} {r.text[:100]}"
        data = [{"path": r.json()[0], "meta": {"_type": "gradio.FileData"}}, k, None, "none"]
    r = http.post("gradio_api/call/search", json={"data": data})
    if kind == "paste" and r.status_code == 413:  # event bodies are size-limited before Gradio reads them
        return "ok", ""
    if r.status_code != 200:
        return "call refused", f"{r.status_code} {r.text[:100]}"
    event = ""
    with http.stream("GET", f"gradio_api/call/search/{r.json()['event_id']}", timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line[len("event:"):].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                if event == "error":
                    return "server error", line[5:120]
                gallery, status = json.loads(line[len("data:"):].strip())[:2]
                if kind == "good":
                    return ("ok", "") if len(gallery) == k else ("good photo not answered", str(status)[:120])
                return ("ok", "") if not gallery and "⚠️" in str(status) else ("hostile upload answered", kind)
    return "no result", kind


def user_loop(url: str, mix: list[tuple[str, Any]], k: int, timeout: float, max_upload_bytes: int,
              until: float, seed: int, out: list) -> None:
    import httpx

    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=timeout) as http:
        while time.monotonic() < until:
            item = rng.choice(mix)
            route = rng.choice(("ui", "api"))
            start = time.perf_counter()
            try:
                outcome, detail = one_request(http, item, k, timeout, max_upload_bytes, route)
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                outcome, detail = "exception", f"{type(exc).__name__}: {exc}"[:120]
            out.append((item[0], outcome, detail, time.perf_counter() - start, time.monotonic(), route))


def run_level(url: str, users: int, seconds: float, mix: list, k: int, timeout: float, max_upload_bytes: int,
              sampler: RssSampler) -> dict[str, Any]:
    results: list = []
    start = time.monotonic()
    until = start + seconds
    rss_start = rss_mib(sampler.pid)
    threads = [threading.Thread(target=user_loop, args=(url, mix, k, timeout, max_upload_bytes, until, i, results))
               for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 60)
    wall = time.monotonic() - start
    level_rss = [m for t, m in sampler.samples if start - sampler.t0 <= t <= start - sampler.t0 + wall]
    good = [r for r in results if r[0] == "good"]
    bad = [r for r in results if r[0] != "good"]
    errors: dict[str, int] = {}
    for r in results:
        if r[1] != "ok":
            errors[r[1]] = errors.get(r[1], 0) + 1
    return {
        "users": users, "requests": len(results), "good": len(good), "hostile": len(bad),
        "errors": sum(errors.values()), "error_kinds": errors,
        "good_p50_s": _percentile([r[3] for r in good], 50), "good_p95_s": _percentile([r[3] for r in good], 95),
        "good_max_s": max([r[3] for r in good], default=float("nan")),
        "hostile_p95_s": _percentile([r[3] for r in bad], 95),
        "requests_per_s": len(results) / wall, "wall_s": wall,
        "rss_start_mib": rss_start, "rss_max_mib": max(level_rss, default=float("nan")),
        "rss_end_mib": rss_mib(sampler.pid),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=Path, help="Index folder (default: a small demo index built here).")
    parser.add_argument("--users", default="1,4,16", help="Comma-separated concurrent users per level.")
    parser.add_argument("--seconds", type=float, default=60.0, help="Duration of each level.")
    parser.add_argument("--hostile-share", type=float, default=0.5, help="Share of hostile uploads in the mix.")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=60.0, help="Seconds a request may take before it counts as an error.")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--embedding-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args(argv)

    from app.serve import free_port
    from app.ui import MAX_UPLOAD_BYTES
    from retrieval.index.folder import GalleryIndex

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        folder = Path(tmp)
        index = args.index or build_index(folder, args.arch, args.image_size, args.embedding_size)
        opened = GalleryIndex.load(index, verify_checksums=False)
        good = list((opened.queries.items if opened.queries is not None else opened.items).paths)[:40]
        hostile = hostile_files(folder / "hostile", MAX_UPLOAD_BYTES)
        hostile_items = [(name, path) for name, path in hostile.items()] + [("paste", None)]
        n_bad = round(len(good) * args.hostile_share / max(1e-9, 1 - args.hostile_share))
        mix = [("good", p) for p in good] + [hostile_items[i % len(hostile_items)] for i in range(n_bad)]
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        server = start_server(index, port, args.device)
        try:
            wait_ready(url, server)
            sampler = RssSampler(server.pid)
            sampler.start()
            levels = []
            for users in [int(u) for u in args.users.split(",") if u.strip()]:
                result = run_level(url, users, args.seconds, mix, args.k, args.timeout, MAX_UPLOAD_BYTES, sampler)
                levels.append(result)
                print(f"{users:>3} users: {result['requests']:>5} requests ({result['good']} good, "
                      f"{result['hostile']} hostile), errors {result['errors']} {result['error_kinds'] or ''}| "
                      f"good p50 {result['good_p50_s'] * 1000:.0f} ms, p95 {result['good_p95_s'] * 1000:.0f} ms, "
                      f"max {result['good_max_s'] * 1000:.0f} ms; hostile p95 {result['hostile_p95_s'] * 1000:.0f} ms "
                      f"| {result['requests_per_s']:.1f} req/s | RSS {result['rss_start_mib']:.0f} -> max "
                      f"{result['rss_max_mib']:.0f} -> {result['rss_end_mib']:.0f} MiB", flush=True)
            sampler.stop()
            alive = server.poll() is None
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        series = sampler.samples[:: max(1, len(sampler.samples) // 12)]
        print("server RSS over time (s: MiB): " + ", ".join(f"{t:.0f}: {m:.0f}" for t, m in series))
        print(f"server still serving at the end: {alive}; total errors: {sum(level['errors'] for level in levels)}")
        if args.json:
            args.json.write_text(json.dumps({"levels": levels, "rss_series": sampler.samples, "alive": alive}, indent=2))
    return 0 if alive and not any(level["errors"] for level in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
