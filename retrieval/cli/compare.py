"""`retrieval compare`: the paper's gain table (baseline vs Metrix) from two training runs' metric files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def gain_table(baseline: Any, metrix: Any, epoch: str = "last") -> dict[str, Any]:
    """{"columns": [...], "baseline": {...}, "metrix": {...}, "gain": {...}, "epochs": {...}} in percent.

    epoch "last": each run's last evaluation (what to report); "best": its highest-R@1 evaluation (the
    official code's protocol, selected on the test set).
    """
    picked = {}
    for role, run in (("baseline", baseline), ("metrix", metrix)):
        evaluations = run.evaluations()
        if not evaluations:
            from retrieval.errors import InputError

            raise InputError(f"{run.folder} has no evaluated epoch yet (no R@1 in metrics.jsonl)")
        picked[role] = evaluations[-1] if epoch == "last" else max(evaluations, key=lambda r: r["R@1"])
    shared = [k for k in picked["baseline"] if k.startswith("R@") and k in picked["metrix"]]
    shared.sort(key=lambda k: int(k[2:]))
    columns = shared + [k for k in ("MAP@R", "RP") if k in picked["baseline"] and k in picked["metrix"]]
    table: dict[str, Any] = {
        "columns": columns,
        "epoch": epoch,
        "epochs": {role: int(row["epoch"]) for role, row in picked.items()},
    }
    for role, row in picked.items():
        table[role] = {k: 100.0 * float(row[k]) for k in columns}
    table["gain"] = {k: table["metrix"][k] - table["baseline"][k] for k in columns}
    return table


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare(
        baseline: Path = typer.Argument(..., help="Run folder of the baseline (no mixing)."),
        metrix: Path = typer.Argument(..., help="Run folder of the Metrix run of the same cell."),
        epoch: str = typer.Option("last", "--epoch", help="last (report this) or best (highest test R@1, optimistic)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Print R@K and MAP@R of a baseline and a Metrix run, and the gain in points, as the paper's table does."""
        import json

        from retrieval.cli.runs import read_run
        from retrieval.errors import UsageError

        if epoch not in ("last", "best"):
            raise UsageError(f"--epoch must be last or best, got {epoch!r}")
        runs = read_run(baseline), read_run(metrix)
        table = gain_table(*runs, epoch=epoch)
        cells = [run.cell() for run in runs]
        datasets = {run.config.get("data", {}).get("dataset") for run in runs if run.config}
        if len(datasets) > 1:
            typer.echo(f"warning: the runs are of different datasets ({cells[0]} vs {cells[1]})", err=True)
        if as_json:
            table["runs"] = {
                "baseline": {"folder": str(baseline), "cell": cells[0]},
                "metrix": {"folder": str(metrix), "cell": cells[1]},
            }
            typer.echo(json.dumps(table, indent=2))
            return

        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        out = Table(title=f"{escape(cells[1])} vs its baseline ({epoch} evaluated epoch, %)", title_justify="left")
        out.add_column("method")
        out.add_column("epoch", justify="right")
        for key in table["columns"]:
            out.add_column(key, justify="right")
        for role, folder, cell in (("baseline", baseline, cells[0]), ("metrix", metrix, cells[1])):
            name = "baseline" if role == "baseline" else f"+ Metrix ({cell.rsplit('mixup ', 1)[-1]})"
            out.add_row(
                f"{name}  {escape(str(folder))}",
                str(table["epochs"][role]),
                *[f"{table[role][k]:.1f}" for k in table["columns"]],
            )
        out.add_row("gain (points)", "", *[f"{table['gain'][k]:+.1f}" for k in table["columns"]])
        Console().print(out)
