"""The table `retrieval evaluate --analysis` prints (kept apart from the evaluate command itself)."""

from __future__ import annotations

from typing import Any

_MEANING = {
    "alignment": "E ||f(x) - f(x+)||^2 over same-class test pairs (lower: tighter classes)",
    "uniformity": "log E exp(-2 ||f(x) - f(y)||^2) over test pairs (lower: more evenly spread)",
    "utilization clean": "mean over test q of min ||f(q) - f(x)||^2 over clean training embeddings",
    "utilization mixed": "same, over mixed training embeddings",
    "utilization clean+mixed": "same, over both (lower: training explored where the test set lies)",
}


def analysis_table(report: dict[str, Any]):
    from rich.table import Table

    facts = ", ".join(
        f"{key} {report[key]}" for key in ("test embeddings", "training images", "mixes", "mix level") if key in report
    )
    table = Table(title=f"embedding analysis ({facts})", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("definition")
    for key, meaning in _MEANING.items():
        if key in report:
            table.add_row(key, f"{report[key]:.4f}", meaning)
    return table
