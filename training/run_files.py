"""A run folder's checkpoint names and what a --resume value points at: torch-free, so that the command line
can check a --resume path before it loads torch (a mistyped path is reported at once)."""

from __future__ import annotations

from pathlib import Path

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


def resume_checkpoint(resume: str | Path) -> Path:
    """The checkpoint a --resume value names: a file, or a run folder's last.pt."""
    path = Path(resume)
    return path / LAST_CHECKPOINT if path.is_dir() else path
