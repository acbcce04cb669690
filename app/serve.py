"""Launch the search UI with safe serving defaults.

- Bound to 127.0.0.1 unless a host is given; no public share link unless asked for.
- One search worker (`concurrency_limit=1`) whose queued queries are embedded in batches of up to
  16, which suits one CPU or one GPU: the device is never oversubscribed and concurrent users share
  forward passes instead of waiting for each other's. The queue is bounded (`max_size`): beyond it a
  client gets "queue full" at once instead of waiting minutes.
- The only folder Gradio may serve from disk is the thumbnail folder (downscaled gallery images);
  uploads are capped by `max_file_size`. No analytics, no SSR node server, no run history.
- The thumbnail folder is also registered as a Gradio static path. Without that, every result tile
  of every response is checked against each allowed and blocked folder (several `realpath` calls
  each) and hashed and copied into Gradio's cache: at K=10 that file handling cost more CPU per
  query than a small embedder's forward pass, and under concurrent load it serialises on the
  server's one event loop. Static files are referenced in place.
"""

from __future__ import annotations

import os
import socket
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.ui import MAX_UPLOAD_BYTES, SearchApp, build_app

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
QUEUE_MAX_SIZE = 256  # pending events across all users before new ones are refused


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

    @property
    def allowed_paths(self) -> list[str]:
        return list(self.demo.allowed_paths)

    def close(self) -> None:
        self.demo.close()
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
    **app_kwargs: Any,
) -> RunningApp:
    """Build and start the app for an open Searcher. `block=False` returns at once (tests, benchmarks)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app_kwargs.setdefault("max_upload_bytes", MAX_UPLOAD_BYTES)
    demo, search_app = build_app(searcher, **app_kwargs)
    configure_queue(demo, queue_max_size)
    port = port if port is not None else _default_port(host)
    weakref.finalize(search_app, search_app.thumbnails.cleanup)
    register_static_folder(search_app.thumbnails.folder)
    try:
        _, local_url, _ = demo.launch(prevent_thread_lock=True, **launch_settings(search_app, host, port, share))
    except BaseException:
        unregister_static_folder(search_app.thumbnails.folder)
        raise
    running = RunningApp(demo, search_app, local_url.rstrip("/") + "/", host, port)
    if block:
        try:
            demo.block_thread()
        finally:
            running.close()
    return running


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
    *,
    backend: str | None = None,
    model: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str = "auto",
    host: str = DEFAULT_HOST,
    port: int | None = None,
    share: bool = False,
    block: bool = True,
    data_root: str | os.PathLike[str] | None = None,
) -> RunningApp:
    """Open the index (and the embedder it names, or the one given) and serve it."""
    searcher = open_searcher(index_dir, backend=backend, model=model, checkpoint=checkpoint, device=device,
                             data_root=data_root)
    return launch(searcher, host=host, port=port, share=share, block=block, index_dir=Path(index_dir))


def open_searcher(
    index_dir: str | os.PathLike[str],
    *,
    backend: str | None = None,
    model: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str = "auto",
    data_root: str | os.PathLike[str] | None = None,
) -> Any:
    """A Searcher over `index_dir`: the embedder the index records, or the one asked for.

    Only the torch backend imports torch; `--backend onnx --model m.onnx` never does. `data_root`: where
    the dataset is now, when it moved since the build (the gallery thumbnails are read from it).
    """
    from retrieval.search import Searcher

    embedder: Any = None
    if backend is not None or model is not None or checkpoint is not None:
        from retrieval.embed import load_backend

        embedder = load_backend(backend or "auto", checkpoint, model, device)
    return Searcher.open(index_dir, backend=embedder, device=device, data_root=data_root)
