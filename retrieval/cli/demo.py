"""`retrieval demo`: the whole product on the embedded demo dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from training import catalog, levels


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        data_root: Path = typer.Option(Path("data/demo"), "--data-root", help="Where the demo dataset is generated."),
        run_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Training run folder (checkpoints, metrics)."),
        index_dir: Path = typer.Option(Path("indexes/demo"), "--index", help="Index folder to write."),
        loss: str = typer.Option(catalog.DEFAULT_LOSS, "--loss", help=f"{catalog.one_of(catalog.loss_names())}."),
        mixup: str = typer.Option(levels.DEFAULT_LEVEL, "--mixup", help=f"{catalog.one_of(levels.level_names())}."),
        epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Override the demo's epoch count."),
        serve: bool = typer.Option(True, "--serve/--no-serve", help="Start the web UI at the end."),
        host: str = typer.Option("127.0.0.1", "--host", help="Web UI address (loopback by default)."),
        port: Optional[int] = typer.Option(None, "--port", help="Web UI port (default 7860, or a free one)."),
    ) -> None:
        """Generate the demo dataset, train a Metrix embedder, index the gallery, print Recall@K, serve the UI.

        Recall@K is measured on the In-Shop-style query/gallery split for the untrained and the trained
        embedder. Takes a few minutes on a 2-core CPU.
        """
        from rich.console import Console
        from rich.table import Table

        from retrieval.demo_job import run_demo

        console = Console()
        result = run_demo(data_root, run_dir, index_dir, loss, mixup, epochs, say=console.print)
        table = Table(title="Query/gallery retrieval on the demo test products (%)")
        table.add_column("embedder")
        keys = [f"R@{k}" for k in result.recall_ks] + ["MAP@R"]
        for key in keys:
            table.add_column(key, justify="right")
        for name, metrics in (("untrained", result.untrained), ("trained (Metrix)", result.trained)):
            table.add_row(name, *(f"{100 * metrics[k]:.1f}" if k in metrics else "-" for k in keys))
        console.print(table)
        console.print(f"checkpoint {result.checkpoint}, index {result.index_dir}; {result.seconds / 60:.1f} min in all")
        if serve:
            from app.serve import open_and_launch

            console.print("starting the web UI (Ctrl-C to stop)")
            open_and_launch(index_dir, host=host, port=port, block=True)
