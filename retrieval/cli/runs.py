"""Reading a training run folder (metrics.jsonl, config.json) for `retrieval plot` and `retrieval compare`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.errors import InputError


class RunFolderError(InputError):
    """A folder is not a readable training run."""


@dataclass
class Run:
    """A run's folder, its metric rows (one per epoch) and its config (empty when config.json is absent)."""

    folder: Path
    rows: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    def evaluations(self) -> list[dict[str, Any]]:
        """Rows with test metrics, untrained evaluation excluded."""
        return [r for r in self.rows if isinstance(r.get("R@1"), (int, float)) and r.get("phase") != "untrained"]

    def cell(self) -> str:
        """dataset / loss / mixing level, from config.json."""
        if not self.config:
            return "unknown cell"
        c = self.config
        dataset, loss = c.get("data", {}).get("dataset"), c.get("loss", {}).get("name")
        return f"{dataset} / {loss} / mixup {c.get('mixup', {}).get('level')}"


def read_run(folder: str | Path) -> Run:
    """The run at `folder`; RunFolderError naming the folder when it holds no metrics."""
    from training.logging import METRICS_JSONL, read_metrics

    folder = Path(folder)
    if not (folder / METRICS_JSONL).is_file():
        raise RunFolderError(f"{folder} holds no {METRICS_JSONL}; pass a folder written by `retrieval train` (--out)")
    try:
        rows = read_metrics(folder)
    except ValueError as exc:  # a line that is not JSON: the message names the file and line
        raise RunFolderError(str(exc)) from None
    if not rows:
        raise RunFolderError(f"{folder / METRICS_JSONL} is empty; the run has not finished an epoch yet")
    config: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RunFolderError(f"{folder / 'config.json'} is not valid JSON ({exc})") from exc
    return Run(folder, rows, config)
