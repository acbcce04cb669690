"""Launch the search UI and the JSON API (app.api) in one server process, with safe serving defaults.

- One FastAPI application (uvicorn) on one port: the API under /api/v1 and the Gradio UI mounted at /,
  sharing one loaded embedder and index through one batching worker (app.batching), which embeds the
  queries of both in shared forward passes. `--share` (a gradio.live link) serves the UI alone.

- Bound to 127.0.0.1 unless a host is given; no public share link unless asked for.
- The UI's search events run concurrently (up to the worker's batch size) and wait on the worker,
  which owns the device: it is never oversubscribed and concurrent users share forward passes. The
  queues are bounded (Gradio's `max_size`, the worker's `queue_size`): beyond them a client gets
  "queue full" at once instead of waiting minutes.
- With a token (`api_token`, RETRIEVAL_API_TOKEN) every path needs it (app.access.AccessGate around the
  whole application: API, UI, Gradio's HTTP API and files); the browser asks for it once at /login.
  The probes /api/v1/health and /api/v1/ready stay open, and so do the paths given in `public_paths`
  (a public /metrics); /metrics and POST /api/v1/admin/reload need the token otherwise. The gate is
  inside the request-id middleware, so its refusals carry an X-Request-ID and are counted and logged.
- Result tiles are the API's thumbnail URLs of the index version that answered
  (/api/v1/thumbnails/<i>.jpg?v=<version>), so answers do not name the server's thumbnail folder and a
  tile stays right after a swap; example queries and a result put back in the query box are still
  files Gradio serves from that folder (its image input takes only files it can read).
- The only folder Gradio may serve from disk is the thumbnail folder (downscaled gallery images);
  uploads are capped by `max_file_size`. No analytics, no SSR node server, no run history.
- The thumbnail folder is also registered as a Gradio static path. Without that, every result tile
  of every response is checked against each allowed and blocked folder (several `realpath` calls
  each) and hashed and copied into Gradio's cache: at K=10 that file handling cost more CPU per
  query than a small embedder's forward pass, and under concurrent load it serialises on the
  server's one event loop. Static files are referenced in place.
- A live service (app.live_index): the index folder is watched (`watch`, default on) and a republished
  version is verified, loaded beside the served one with the same embedder and swapped in between
  batches; `/api/v1/ready` is 503 until a warm-up batch has run; `/metrics` (`metrics`, app.metrics);
  every answer carries an X-Request-ID, and every request is one line on the `retrieval.access` logger
  (`log_format` text or json; app.access_log).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.access_log import AccessLog
from app.batching import DEFAULT_QUEUE_SIZE, BatchingWorker
from app.event_limit import EventBodyLimit
from app.live_index import DEFAULT_WATCH_INTERVAL_S, LiveIndex
from app.metrics import ServerMetrics
from app.request_middleware import RequestObserver
from app.ui import MAX_UPLOAD_BYTES, SearchApp, build_app

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
QUEUE_MAX_SIZE = 256  # pending events across all users before new ones are refused
GRADIO_STARTUP_PATH = "/gradio_api/startup-events"


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port that was free a moment ago on `host` (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def configure_queue(demo: Any, max_size: int = QUEUE_MAX_SIZE) -> Any:
    """Bounded queue; events default to one at a time (the search event batches what queues up)."""
    return demo.queue(max_size=max_size, default_concurrency_limit=1)


@dataclass
class RunningApp:
    """A launched app: its URL, the Gradio Blocks and the SearchApp behind it; `close()` stops it."""

    demo: Any
    search_app: SearchApp
    url: str
    host: str
    port: int
    worker: BatchingWorker | None = None
    api: Any = None  # the FastAPI application (None with --share: UI only)
    _server: Any = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    live: LiveIndex | None = None  # the served index version (reloads, watching)
    metrics: ServerMetrics | None = None  # None with metrics off

    @property
    def allowed_paths(self) -> list[str]:
        return list(self.demo.allowed_paths)

    @property
    def api_url(self) -> str:
        return self.url + "api/v1/"

    def block_thread(self) -> None:
        """Serve until Ctrl+C."""
        if self._thread is None:
            self.demo.block_thread()
            return
        try:
            while self._thread.is_alive():
                self._thread.join(timeout=0.5)
        except KeyboardInterrupt:
            pass

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
        try:
            self.demo.close()  # stops Gradio's queue, which ends its open event streams
        except Exception:  # a mounted app has no server of its own to close
            pass
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True  # open event streams of connected clients would hold the exit
            if self._thread is not None:
                self._thread.join(timeout=15)
        if self.worker is not None:
            self.worker.close()
        unregister_static_folder(self.search_app.thumbnails.folder)
        self.search_app.thumbnails.cleanup()


def register_static_folder(folder: Path) -> None:
    """Let Gradio reference files of `folder` in place (its static-path list is per process)."""
    import gradio as gr

    gr.set_static_paths([folder])


def unregister_static_folder(folder: Path) -> None:
    """Drop `folder` from Gradio's per-process static paths, so a closed app leaves nothing served."""
    from gradio.data_classes import _StaticFiles

    resolved = Path(folder).resolve()
    _StaticFiles.all_paths[:] = [p for p in _StaticFiles.all_paths if Path(p) != resolved]


def launch_settings(search_app: SearchApp, host: str, port: int | None, share: bool) -> dict[str, Any]:
    """Keyword arguments of `Blocks.launch` (Gradio 6)."""
    return dict(
        server_name=host,
        server_port=port,
        share=share,
        allowed_paths=[str(search_app.thumbnails.folder)],
        max_file_size=search_app.max_upload_bytes,
        show_error=False,
        quiet=True,
        ssr_mode=False,
        enable_monitoring=False,
        mcp_server=False,
        run_history=False,
        footer_links=["api"],
        strict_cors=True,
    )


def launch(
    searcher: Any,
    *,
    host: str = DEFAULT_HOST,
    port: int | None = None,
    share: bool = False,
    block: bool = False,
    queue_max_size: int = QUEUE_MAX_SIZE,
    api_token: str | None = None,
    max_batch_size: int | None = None,
    max_wait_ms: float | None = None,
    worker_queue_size: int = DEFAULT_QUEUE_SIZE,
    engine: Any = None,
    watch: bool = True,
    watch_interval_s: float = DEFAULT_WATCH_INTERVAL_S,
    metrics: bool = True,
    log_format: str = "text",
    data_root: str | os.PathLike[str] | None = None,
    public_paths: tuple[str, ...] = (),
    **app_kwargs: Any,
) -> RunningApp:
    """Build and start the API + UI for an open Searcher. `block=False` returns at once (tests, benchmarks).

    `max_batch_size`/`max_wait_ms`: the batching worker's limits (defaults suit the device);
    `api_token`: the token every path requires (app.access); `public_paths`: paths that stay open
    with a token, beside the probes /api/v1/health and /api/v1/ready (e.g. "/metrics" to make metrics
    public; the OpenAPI document follows); `engine`: replaces embed+search (benchmarks' floor);
    `watch`: reload the index folder when it is republished (polled every `watch_interval_s`; `data_root`
    as the searcher was opened with); `metrics`: serve /metrics; `log_format`: the access log's, text or json."""
    from app.access import AccessGate, AccessPolicy, token_from_env
    from app.api import ApiSettings, SearchApi, build_api, thumbnail_url

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app_kwargs.setdefault("max_upload_bytes", MAX_UPLOAD_BYTES)
    app_kwargs.setdefault("thumbnail_route", None if share else thumbnail_url)  # share: the UI alone, no API
    access_log = AccessLog(log_format)  # refuses an unknown format before anything starts
    token = token_from_env(api_token)
    # Gradio's own launch (--share) calls its startup route itself, without the token: that route only
    # runs startup events once and answers no search or image, so it stays open there
    public = frozenset(public_paths) | ({GRADIO_STARTUP_PATH} if share else frozenset())
    gate = [] if token is None else [(AccessGate, {"policy": AccessPolicy(token, public)})]
    live = LiveIndex(searcher, app_kwargs.get("index_dir"), data_root=data_root)
    worker = BatchingWorker(
        live,
        max_batch=max_batch_size,
        max_wait_ms=max_wait_ms,
        queue_size=worker_queue_size,
        engine=engine,
        warm_up=True,
    )
    try:
        demo, search_app = build_app(searcher, worker=worker, **app_kwargs)
    except BaseException:
        worker.close()
        raise
    configure_queue(demo, queue_max_size)
    port = port if port is not None else _default_port(host)
    weakref.finalize(search_app, search_app.thumbnails.cleanup)
    register_static_folder(search_app.thumbnails.folder)
    try:
        if share:
            from starlette.middleware import Middleware

            middleware = [Middleware(cls, **kwargs) for cls, kwargs in gate]
            _, local_url, _ = demo.launch(
                prevent_thread_lock=True,
                app_kwargs={"middleware": middleware},
                **launch_settings(search_app, host, port, share),
            )
            running = RunningApp(demo, search_app, local_url.rstrip("/") + "/", host, port, worker)
        else:
            settings = ApiSettings(
                limits=search_app.limits,
                token=token,
                metrics=metrics,  # the UI's limits
                public_paths=frozenset(public_paths),
            )
            server_metrics = ServerMetrics() if metrics else None
            search_api = SearchApi(live, worker, search_app.thumbnails, settings, server_metrics)
            api = build_api(search_api)
            if server_metrics is not None:
                server_metrics.bind(live, worker, lambda: search_api.readiness()[0])
            api.add_middleware(EventBodyLimit)  # before Gradio reads an event body (app/event_limit.py)
            for cls, kwargs in gate:  # the one token check, before anything else reads the request
                api.add_middleware(cls, **kwargs)
            # outermost: ids, counts and the access log see every answer, the gate's refusals included
            api.add_middleware(RequestObserver, routes_of=api.router, access_log=access_log, metrics=server_metrics)
            running = _serve_mounted(api, demo, search_app, worker, host, port)
            running.metrics = server_metrics
    except BaseException:
        unregister_static_folder(search_app.thumbnails.folder)
        worker.close()
        raise
    running.live = live
    if watch:
        live.start_watching(watch_interval_s)
    if block:
        try:
            running.block_thread()
        finally:
            running.close()
    return running


def _serve_mounted(
    api: Any, demo: Any, search_app: SearchApp, worker: BatchingWorker, host: str, port: int
) -> RunningApp:
    """Mount the UI on the API application and run it with uvicorn on a background thread."""
    import gradio as gr
    import uvicorn

    settings = launch_settings(search_app, host, port, False)
    mount = {
        key: settings[key]
        for key in (
            "allowed_paths",
            "max_file_size",
            "show_error",
            "ssr_mode",
            "enable_monitoring",
            "mcp_server",
            "run_history",
            "footer_links",
        )
    }
    app = gr.mount_gradio_app(api, demo, path="", server_name=host, server_port=port, **mount)
    # uvicorn.error would print every event stream still open at shutdown as a traceback; start-up
    # failures are detected below and our own routes log through their loggers
    config = uvicorn.Config(
        app, host=host, port=port, log_level="critical", access_log=False, lifespan="on", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="http-server", daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            server.should_exit = True
            raise OSError(f"the server could not start on {host}:{port} (port in use, or not allowed to bind)")
        time.sleep(0.02)
    url = f"http://{host if ':' not in host else '[' + host + ']'}:{port}/"
    return RunningApp(demo, search_app, url, host, port, worker, app, server, thread)


def _default_port(host: str) -> int:
    """7860 when free (Gradio's usual port), else any free port, so a second app still starts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, DEFAULT_PORT))
            return DEFAULT_PORT
        except OSError:
            pass
    return free_port(host)


def open_and_launch(
    index_dir: str | os.PathLike[str],
    embedder: Any = None,
    *,
    device: str = "auto",
    host: str = DEFAULT_HOST,
    port: int | None = None,
    share: bool = False,
    block: bool = True,
    data_root: str | os.PathLike[str] | None = None,
    **launch_kwargs: Any,
) -> RunningApp:
    """Open the index with `embedder` (an EmbedderSpec or an open backend; default: the one it records) and serve it.

    An ONNX embedder never imports torch. `data_root`: where the dataset is now, when it moved since the build.
    """
    from retrieval.search.searcher import Searcher

    searcher = Searcher.open(index_dir, embedder, device=device, data_root=data_root)
    return launch(
        searcher,
        host=host,
        port=port,
        share=share,
        block=block,
        index_dir=Path(index_dir),
        data_root=data_root,
        **launch_kwargs,
    )
