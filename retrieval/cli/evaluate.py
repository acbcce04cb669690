"""`retrieval evaluate`: Recall@K and MAP@R of an index's stored evaluation protocol (no re-embedding)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate(
        index: Path = typer.Option(..., "--index", help="Index folder written by `retrieval index`."),
        ks: Optional[str] = typer.Option(None, "--ks", help="Comma-separated K list (default: the dataset's)."),
        exact: bool = typer.Option(True, "--exact/--no-exact",
                                   help="For approximate indexes also compute exact-search numbers and the difference."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N] for FAISS."),
        analysis: bool = typer.Option(False, "--analysis",
                                      help="Also the paper's analyses: alignment and uniformity of the test embeddings; "
                                           "with --checkpoint, the utilization by the training set, clean and mixed."),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint",
                                                  help="--analysis: the checkpoint that built the index, to embed the "
                                                       "training images (clean and mixed) for utilization."),
        data_root: Optional[Path] = typer.Option(None, "--data-root",
                                                 help="--analysis: the dataset folder, if it moved since the build."),
        mix_level: Optional[str] = typer.Option(None, "--mix-level",
                                                help="--analysis: input | feature | embedding (default: the checkpoint's)."),
    ) -> None:
        """Evaluate an index: In-Shop/demo stored queries against the gallery; CUB/Cars/SOP/folder the gallery
        against itself, each item's own entry excluded. Approximate indexes also report exact search
        and the difference."""
        import json

        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        from retrieval.search import Searcher

        console = Console()
        try:
            k_list = [int(v) for v in ks.split(",") if v.strip()] if ks else None
            searcher = Searcher.open(index, device=device)
            result = searcher.evaluate(k_list, exact=exact)
            report = None
            if analysis:
                from training.analysis import analyse_index

                report = analyse_index(searcher, str(checkpoint) if checkpoint else None,
                                       str(data_root) if data_root else None, mix_level=mix_level,
                                       device=device, progress=not as_json)
        except (OSError, ValueError, RuntimeError) as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}")
            raise typer.Exit(code=1) from None
        meta = searcher.meta
        if as_json:
            payload = {"index": str(index), "index_type": meta.get("index_type"),
                       "search_device": searcher.devices['index'], "metrics": result}
            if report is not None:
                payload["analysis"] = report
            typer.echo(json.dumps(payload, indent=2))
            return
        names = [key for key in result if not key.startswith(("exact ", "diff "))]
        approximate = any(key.startswith("exact ") for key in result)
        table = Table(title=f"{escape(str(index))}: {meta.get('dataset')} ({meta.get('protocol')}), "
                            f"{meta.get('n_items'):,} items, {meta.get('index_factory')}", title_justify="left")
        table.add_column("metric")
        table.add_column("index %", justify="right")
        if approximate:
            table.add_column("exact %", justify="right")
            table.add_column("diff (points)", justify="right")
        for key in names:
            row = [key, f"{100 * result[key]:.2f}"]
            if approximate:
                row += [f"{100 * result['exact ' + key]:.2f}", f"{100 * result['diff ' + key]:+.2f}"]
            table.add_row(*row)
        console.print(table)
        console.print(f"search on {escape(searcher.devices['index'])}")
        if report is not None:
            from retrieval.cli.analysis_table import analysis_table

            console.print(analysis_table(report))
