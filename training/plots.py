"""Figures of training runs: loss (clean and mixed) per epoch, Recall@K and MAP@R per evaluation, and the
test embeddings' alignment and uniformity, for one run (`metrics.png`, rewritten at each evaluation) or
several overlaid (`retrieval plot`), e.g. a baseline against Metrix.

Matplotlib runs headless (Agg backend, no display needed); a figure is written atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retrieval.atomic import atomic_write_bytes

METRICS_PNG = "metrics.png"
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of the rows that hold a number for `key` (evaluations happen every few epochs)."""
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            xs.append(int(row.get("epoch", 0)))
            ys.append(float(value))
    return xs, ys


def recall_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The R@k columns of a run, by increasing k."""
    keys = {k for row in rows for k in row if k.startswith("R@")}
    return sorted(keys, key=lambda k: int(k[2:]) if k[2:].isdigit() else 0)


def plot_runs(
    runs: Sequence[tuple[str, Sequence[dict[str, Any]]]], out: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Draw runs (name, metrics rows) into one 2 x 2 figure at `out` (PNG); returns the path.

    Panels: training loss per epoch (clean solid, mixed dashed); Recall@K per evaluation (R@1 solid, larger
    K fainter; only R@1 when several runs are overlaid); MAP@R; alignment (solid) and uniformity (dashed,
    right axis).  The untrained model's evaluation, when logged, is epoch 0.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    if not runs:
        from retrieval.errors import UsageError

        raise UsageError("nothing to plot: no runs given")
    fig = Figure(figsize=(12, 8.5), layout="constrained")
    ax_loss, ax_recall, ax_map, ax_geo = fig.subplots(2, 2).ravel()
    ax_uni = ax_geo.twinx()
    several = len(runs) > 1
    for n, (name, rows) in enumerate(runs):
        colour = _COLOURS[n % len(_COLOURS)]
        trained = [r for r in rows if r.get("phase") != "untrained"]
        for key, style in (("clean", "-"), ("mixed", "--")):
            xs, ys = _series(trained, key)
            if xs and (key == "clean" or any(ys)):
                ax_loss.plot(xs, ys, style, color=colour, label=f"{name} {key}")
        keys = recall_keys(rows)
        for i, key in enumerate(keys[:1] if several else keys):
            xs, ys = _series(rows, key)
            if xs:
                ax_recall.plot(
                    xs,
                    [100 * y for y in ys],
                    "-o",
                    color=colour,
                    markersize=3,
                    alpha=1.0 if i == 0 else max(0.25, 0.8 - 0.12 * i),
                    label=f"{name} {key}",
                )
        xs, ys = _series(rows, "MAP@R")
        if xs:
            ax_map.plot(xs, [100 * y for y in ys], "-o", color=colour, markersize=3, label=name)
        xs, ys = _series(rows, "alignment")
        if xs:
            ax_geo.plot(xs, ys, "-o", color=colour, markersize=3, label=f"{name} alignment")
        xs, ys = _series(rows, "uniformity")
        if xs:
            ax_uni.plot(xs, ys, "--s", color=colour, markersize=3, label=f"{name} uniformity")
    ax_loss.set(title="training loss (clean solid, mixed dashed)", xlabel="epoch", ylabel="loss")
    ax_recall.set(title="Recall@K on the test set", xlabel="epoch", ylabel="%")
    ax_map.set(title="MAP@R on the test set", xlabel="epoch", ylabel="%")
    ax_geo.set(title="test embeddings: alignment (solid), uniformity (dashed)", xlabel="epoch", ylabel="alignment")
    ax_uni.set_ylabel("uniformity")
    for ax in (ax_loss, ax_recall, ax_map):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    ax_geo.grid(alpha=0.3)
    handles = ax_geo.get_legend_handles_labels()
    extra = ax_uni.get_legend_handles_labels()
    if handles[0] or extra[0]:
        ax_geo.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8)
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out


def write_run_plot(out_dir: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> Path:
    """`<out_dir>/metrics.png` of one run."""
    out_dir = Path(out_dir)
    return plot_runs([(out_dir.name or "run", rows)], out_dir / METRICS_PNG, title=str(out_dir))


__all__ = ["plot_runs", "write_run_plot", "recall_keys", "METRICS_PNG"]
