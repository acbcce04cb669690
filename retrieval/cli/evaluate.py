"""`retrieval evaluate`: Recall@K and MAP@R of an index's stored evaluation protocol (no re-embedding)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from training import catalog, levels


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate(
        index: Path = typer.Option(..., "--index", help="Index folder written by `retrieval index`."),
        ks: Optional[str] = typer.Option(None, "--ks", help="Comma-separated K list (default: the dataset's)."),
        exact: bool = typer.Option(
            True,
            "--exact/--no-exact",
            help="For approximate indexes also compute exact-search numbers and the difference.",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N] for FAISS."),
        rerank: str = typer.Option(
            "none", "--rerank", help="Also evaluate with this re-ranking (qe | dba | kreciprocal): before/after table."
        ),
        nprobe: Optional[int] = typer.Option(
            None, "--nprobe", min=1, help="IVF lists scanned per query (default: the calibrated setting)."
        ),
        ef_search: Optional[int] = typer.Option(
            None, "--ef-search", min=1, help="HNSW search beam width (default: the calibrated setting)."
        ),
        analysis: bool = typer.Option(
            False,
            "--analysis",
            help="Also the paper's analyses: alignment and uniformity of the test embeddings; "
            "with --checkpoint, the utilization by the training set, clean and mixed.",
        ),
        checkpoint: Optional[Path] = typer.Option(
            None,
            "--checkpoint",
            help="--analysis: the checkpoint that built the index, to embed the "
            "training images (clean and mixed) for utilization.",
        ),
        data_root: Optional[Path] = typer.Option(
            None, "--data-root", help="--analysis: the dataset folder, if it moved since the build."
        ),
        mix_level: Optional[str] = typer.Option(
            None,
            "--mix-level",
            help=f"--analysis: {catalog.one_of(levels.mixing_level_names())} (default: the checkpoint's).",
        ),
    ) -> None:
        """Evaluate an index: In-Shop/demo stored queries against the gallery; CUB/Cars/SOP/folder the gallery
        against itself, each item's own entry excluded. Approximate indexes also report exact search
        and the difference."""
        import json

        from rich.console import Console
        from rich.markup import escape

        from retrieval.errors import UsageError
        from retrieval.search.searcher import Searcher

        console = Console()
        try:
            k_list = [int(v) for v in ks.split(",") if v.strip()] if ks else None
        except ValueError:
            raise UsageError(f"--ks {ks!r}: expected comma-separated positive integers, e.g. 1,10,20") from None
        if k_list is not None and (not k_list or min(k_list) < 1):
            raise UsageError(f"--ks {ks!r}: expected comma-separated positive integers, e.g. 1,10,20")
        searcher = Searcher.open(index, device=device)
        from retrieval.index.calibrate import override_search_params, search_setting_text
        from retrieval.search.rerank import check_method

        searcher.index.set_search_params(override_search_params(searcher.index.params, nprobe, ef_search))
        method = check_method(rerank)
        result = searcher.evaluate(k_list, exact=exact and method == "none")
        reranked = searcher.evaluate(k_list, rerank=method) if method != "none" else None
        report = None
        if analysis:
            from training.analysis import analyse_index

            report = analyse_index(
                searcher,
                str(checkpoint) if checkpoint else None,
                str(data_root) if data_root else None,
                mix_level=mix_level,
                device=device,
                progress=not as_json,
            )
        meta = searcher.index.meta
        if reranked is not None:
            if as_json:
                typer.echo(
                    json.dumps(
                        {
                            "index": str(index),
                            "rerank": method,
                            "metrics": result,
                            "reranked": reranked,
                            **({"analysis": report} if report is not None else {}),
                        },
                        indent=2,
                    )
                )
                return
            _print_rerank_table(console, index, meta, method, result, reranked)
            if report is not None:
                from retrieval.cli.analysis_table import analysis_table

                console.print(analysis_table(report))
            return
        if as_json:
            payload = {
                "index": str(index),
                "index_type": meta.index_type,
                "search_device": searcher.devices["index"],
                "metrics": result,
                "search_params": searcher.index.params.to_dict(),
                "calibration": meta.calibration,
            }
            if report is not None:
                payload["analysis"] = report
            typer.echo(json.dumps(payload, indent=2))
            return
        _print_metrics_table(console, index, meta, result)
        console.print(f"search on {escape(searcher.devices['index'])}")
        console.print(f"search setting: {escape(search_setting_text(meta, searcher.index.params))}")
        if report is not None:
            from retrieval.cli.analysis_table import analysis_table

            console.print(analysis_table(report))


def _print_metrics_table(console: Any, index: Any, meta: Any, result: Any) -> None:
    """Index metrics, and for approximate indexes the exact search's and the difference beside them."""
    from rich.markup import escape
    from rich.table import Table

    names = [key for key in result if not key.startswith(("exact ", "diff "))]
    approximate = any(key.startswith("exact ") for key in result)
    table = Table(
        title=f"{escape(str(index))}: {meta.dataset} ({meta.protocol}), {meta.n_items:,} items, {meta.index_factory}",
        title_justify="left",
    )
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


def _print_rerank_table(console: Any, index: Any, meta: Any, method: str, before: Any, after: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(
        title=f"{escape(str(index))}: {meta.dataset} ({meta.protocol}), {meta.n_items:,} items, re-ranking {method}",
        title_justify="left",
    )
    table.add_column("metric")
    table.add_column("none %", justify="right")
    table.add_column(f"{method} %", justify="right")
    table.add_column("diff (points)", justify="right")
    for key in before:
        if key in after:
            table.add_row(
                key, f"{100 * before[key]:.2f}", f"{100 * after[key]:.2f}", f"{100 * (after[key] - before[key]):+.2f}"
            )
    console.print(table)
