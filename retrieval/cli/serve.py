"""`retrieval serve`: the web UI (search by photo, Recall@K) over an index folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        index: Path = typer.Option(..., "--index", help="Index folder built by `retrieval index`."),
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; 0.0.0.0 exposes the app to your network."),
        port: Optional[int] = typer.Option(None, "--port", help="TCP port (default 7860, or a free one if taken)."),
        share: bool = typer.Option(False, "--share", help="Also open a public gradio.live link (off by default)."),
        backend: Optional[str] = typer.Option(
            None, "--backend", help="torch or onnx; default: the embedder recorded in the index."
        ),
        model: Optional[Path] = typer.Option(None, "--model", help="ONNX model for --backend onnx."),
        checkpoint: Optional[Path] = typer.Option(
            None, "--checkpoint", help="Checkpoint for the torch backend (default: the one recorded in the index)."
        ),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        data_root: Optional[Path] = typer.Option(
            None, "--data-root", help="Where the dataset is now, if it moved since the index was built."
        ),
    ) -> None:
        """Serve a Gradio app to search INDEX by photo and show its Recall@K / MAP@R."""
        from rich.console import Console

        from app.serve import launch, open_searcher
        from retrieval.errors import UsageError

        console = Console()
        if backend not in (None, "torch", "onnx"):
            raise UsageError(f"--backend {backend!r}: choose torch or onnx")
        if backend == "onnx" and model is None:
            raise UsageError("--backend onnx needs --model model.onnx")
        searcher = open_searcher(index, backend=backend, model=model, checkpoint=checkpoint, device=device,
                                 data_root=data_root)
        embedder = searcher.backend
        running = launch(searcher, host=host, port=port, share=share, block=False, index_dir=index)
        console.print(
            f"Serving [bold]{index}[/bold] ({len(searcher.gallery_paths):,} gallery images) with "
            f"{embedder.name} on {embedder.device} at [link={running.url}]{running.url}[/link]"
        )
        if host not in ("127.0.0.1", "localhost", "::1"):
            console.print(f"[yellow]note:[/yellow] bound to {host}: anyone who can reach this machine can use the app")
        console.print("Press Ctrl+C to stop.")
        try:
            running.demo.block_thread()
        finally:
            running.close()
