"""`retrieval serve`: the web UI (search by photo, Recall@K) over an index folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from retrieval.cli import embedder_options as opts


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        index: Path = typer.Option(..., "--index", help="Index folder built by `retrieval index`."),
        host: str = typer.Option(
            "127.0.0.1", "--host", help="Interface to bind; 0.0.0.0 exposes the app to your network."
        ),
        port: Optional[int] = typer.Option(None, "--port", help="TCP port (default 7860, or a free one if taken)."),
        share: bool = typer.Option(False, "--share", help="Also open a public gradio.live link (off by default)."),
        backend: Optional[str] = opts.backend_option(default=None),
        model: Optional[Path] = opts.model_option(),
        checkpoint: Optional[Path] = opts.checkpoint_option(recorded=True),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        data_root: Optional[Path] = typer.Option(
            None, "--data-root", help="Where the dataset is now, if it moved since the index was built."
        ),
        api_token: Optional[str] = typer.Option(
            None,
            "--api-token",
            envvar="RETRIEVAL_API_TOKEN",
            show_envvar=True,
            help="Require this token on every route: API clients send `Authorization: Bearer TOKEN`, the browser asks "
            "for it once at /login (the probes /api/v1/health and /api/v1/ready stay open).",
        ),
        max_batch_size: Optional[int] = typer.Option(
            None, "--max-batch-size", min=1, help="Queries embedded in one forward pass (default 16 on CPU, 64 on GPU)."
        ),
        max_wait_ms: Optional[float] = typer.Option(
            None,
            "--max-wait-ms",
            min=0.0,
            help="Wait this long for more queries to batch (default 2 on CPU, 5 on GPU).",
        ),
        queue_size: int = typer.Option(
            256, "--queue-size", min=1, help="Waiting queries beyond which the API answers 503."
        ),
        watch: bool = typer.Option(
            True,
            "--watch/--no-watch",
            help="Reload the index when its folder is republished (`retrieval index --out DIR --add/--remove`): "
            "verified, loaded beside the served one and swapped in without a restart.",
        ),
        watch_interval: float = typer.Option(
            1.0, "--watch-interval", min=0.05, help="Seconds between checks of the folder."
        ),
        metrics: bool = typer.Option(
            True, "--metrics/--no-metrics", help="Serve Prometheus metrics at /metrics (behind --api-token when set)."
        ),
        log_format: str = typer.Option(
            "text", "--log-format", help="Access log on stderr, one line per request: text | json."
        ),
    ) -> None:
        """Serve the search UI and the JSON API (/api/v1/search, /health, /ready, /info, /docs) on one port."""
        from rich.console import Console

        from app.access_log import LOG_FORMATS
        from app.serve import launch
        from retrieval.errors import UsageError
        from retrieval.search.searcher import Searcher

        if log_format not in LOG_FORMATS:
            raise UsageError(f"--log-format {log_format}: choose one of {', '.join(LOG_FORMATS)}")
        console = Console()
        spec = opts.embedder_spec(backend, checkpoint, model, required=False)
        searcher = Searcher.open(index, spec, device=device, data_root=data_root)
        embedder = searcher.backend
        _log_to_stderr()
        running = launch(
            searcher,
            host=host,
            port=port,
            share=share,
            block=False,
            index_dir=index,
            api_token=api_token,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            worker_queue_size=queue_size,
            watch=watch,
            watch_interval_s=watch_interval,
            metrics=metrics,
            log_format=log_format,
            data_root=data_root,
        )
        n_items = len(searcher.gallery_paths)
        del searcher  # the served version is the live index's: a reload must be able to let this one go
        console.print(
            f"Serving [bold]{index}[/bold] ({n_items:,} gallery images) with "
            f"{embedder.name} on {embedder.device} at [link={running.url}]{running.url}[/link]"
        )
        if host not in ("127.0.0.1", "localhost", "::1"):
            console.print(f"[yellow]note:[/yellow] bound to {host}: anyone who can reach this machine can use the app")
        worker = running.worker
        if running.api is not None and worker is not None:
            console.print(
                f"JSON API at {running.api_url}search (schema: {running.url}docs); batching up to "
                f"{worker.max_batch} queries, waiting at most {worker.max_wait * 1000:g} ms"
                + ("; Bearer token required" if api_token else "")
            )
            console.print(
                f"Readiness at {running.api_url}ready"
                + (f", Prometheus metrics at {running.url}metrics" if metrics else "")
                + (f"; watching {index} for republished versions" if watch else "; not watching the index")
            )
        console.print("Press Ctrl+C to stop.")
        try:
            running.block_thread()
        finally:
            running.close()


def _log_to_stderr() -> None:
    """The access log and index reload messages, one line each, on stderr."""
    import logging
    import sys

    from app.access_log import LOGGER

    for name in (LOGGER, "app.live_index"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s" if name == LOGGER else "%(levelname)s: %(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
