"""Per-epoch metrics a user can plot: <out>/metrics.jsonl (one JSON object per epoch) and <out>/metrics.csv,
and the plot itself, <out>/metrics.png, redrawn whenever a row carries an evaluation (training/plots.py).

Evaluation runs only every few epochs, so rows have different keys; the CSV is rewritten from all rows
with the union of columns (a few hundred rows at most), atomically, so it is always a valid table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from retrieval.atomic import atomic_write_text
from retrieval.errors import InputError

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
# Training columns first, then evaluation columns in the order they appear (R@k, MAP@R, RP, ...).
LEADING_COLUMNS = ("epoch", "phase", "lr", "loss", "clean", "mixed", "steps", "images_per_s", "epoch_time_s")


class MetricsLog:
    """Appends epoch rows; on resume keeps the rows up to the resumed epoch and drops later ones."""

    def __init__(self, out_dir: str | os.PathLike[str], *, keep_up_to_epoch: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.jsonl_path = self.out_dir / METRICS_JSONL
        self.csv_path = self.out_dir / METRICS_CSV
        self.rows: list[dict[str, Any]] = []
        if keep_up_to_epoch is not None and self.jsonl_path.is_file():
            self.rows = [r for r in _read_jsonl(self.jsonl_path) if int(r.get("epoch", 0)) <= keep_up_to_epoch]
        self._rewrite()

    def append(self, row: dict[str, Any]) -> None:
        row = {k: _plain(v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.jsonl_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._write_csv()
        if any(k.startswith("R@") for k in row):
            self._plot()

    def _plot(self) -> None:
        """Redraw metrics.png; a figure that cannot be drawn must not stop training."""
        from training.plots import write_run_plot

        try:
            write_run_plot(self.out_dir, self.rows)
        except Exception as exc:
            warnings.warn(f"could not draw {self.out_dir / 'metrics.png'}: {exc}", stacklevel=2)

    def _rewrite(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self._write_csv()

    def _write_csv(self) -> None:
        present = {k for row in self.rows for k in row}
        columns: list[str] = [k for k in LEADING_COLUMNS if k in present]
        for row in self.rows:
            columns.extend(k for k in row if k not in columns)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.csv_path, buf.getvalue())


def read_metrics(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (for plotting, tests and summaries)."""
    return _read_jsonl(Path(out_dir) / METRICS_JSONL)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n} is not valid JSON ({exc}); delete the line or the file") from exc
    return rows


def _plain(v: Any) -> Any:
    """JSON-friendly scalars (NaN/inf become null so every JSON reader accepts the file)."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
