"""`retrieval plot`: one figure overlaying the metrics of several training runs (e.g. baseline vs Metrix)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("plot")
    def plot(
        runs: list[Path] = typer.Argument(
            ..., help="Run folders written by `retrieval train` (each holds metrics.jsonl)."
        ),
        out: Path = typer.Option(..., "--out", help="PNG file to write."),
        labels: Optional[str] = typer.Option(
            None, "--labels", help="Comma-separated legend names (default: folder names)."
        ),
        title: Optional[str] = typer.Option(None, "--title", help="Figure title."),
    ) -> None:
        """Overlay runs: loss (clean, mixed) per epoch, Recall@K and MAP@R per evaluation, alignment and uniformity."""
        from retrieval.cli.runs import read_run
        from retrieval.errors import UsageError
        from training.plots import plot_runs

        names = [v.strip() for v in labels.split(",")] if labels else [r.name for r in runs]
        if len(names) != len(runs):
            raise UsageError(f"--labels: {len(names)} labels for {len(runs)} runs; give one label per run")
        loaded = [(name, read_run(run).rows) for name, run in zip(names, runs)]
        typer.echo(f"wrote {plot_runs(loaded, out, title=title)}")
