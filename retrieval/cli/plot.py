"""`retrieval plot`: one figure overlaying the metrics of several training runs (e.g. baseline vs Metrix)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("plot")
    def plot(
        runs: list[Path] = typer.Argument(..., help="Run folders written by `retrieval train` (each holds metrics.jsonl)."),
        out: Path = typer.Option(..., "--out", help="PNG file to write."),
        labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated legend names (default: folder names)."),
        title: Optional[str] = typer.Option(None, "--title", help="Figure title."),
    ) -> None:
        """Overlay runs: loss (clean, mixed) per epoch, Recall@K and MAP@R per evaluation, alignment and uniformity."""
        from retrieval.cli.runs import RunFolderError, read_run

        names = [v.strip() for v in labels.split(",")] if labels else [r.name for r in runs]
        if len(names) != len(runs):
            typer.echo(f"error: {len(names)} labels for {len(runs)} runs; give one label per run", err=True)
            raise typer.Exit(code=2)
        try:
            loaded = [(name, read_run(run).rows) for name, run in zip(names, runs)]
            from training.plots import plot_runs

            written = plot_runs(loaded, out, title=title)
        except (RunFolderError, OSError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=1) from None
        typer.echo(f"wrote {written}")
