"""The pieces of exact resume: RNG states round-trip, progress counts the best epoch, --resume finds last.pt.
(The end-to-end checks are in test_trainer.py and test_resume_kill.py.)"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from training.checkpointing import LAST_CHECKPOINT, Progress, restore_rng_state, resume_checkpoint, rng_state


def _draws(generator: torch.Generator) -> tuple:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(), random.random(),
            torch.rand(3, generator=generator).tolist())


def test_rng_state_restores_every_generator() -> None:
    generator = torch.Generator().manual_seed(7)
    np.random.randn()  # a cached Gaussian is part of numpy's state
    saved = rng_state(generator)
    first = _draws(generator)
    _draws(generator)
    restore_rng_state(saved, generator)
    assert _draws(generator) == first


def test_rng_state_is_plain_tensors_and_lists(tmp_path: Path) -> None:
    torch.save(rng_state(torch.Generator()), tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    assert {"torch", "cuda", "numpy", "python", "mix_generator"} == set(loaded)


def test_progress_keeps_the_best_epoch_by_recall_at_1() -> None:
    progress = Progress()
    assert not progress.record(1, {"loss": 1.0})  # not evaluated
    assert progress.record(2, {"R@1": 0.5}) and not progress.record(3, {"R@1": 0.4})
    assert progress.record(4, {"R@1": 0.6})
    assert (progress.epoch, progress.best_epoch, progress.best_metrics) == (4, 4, {"R@1": 0.6})


def test_resume_names_a_checkpoint_or_a_run_folder(tmp_path: Path) -> None:
    assert resume_checkpoint(tmp_path) == tmp_path / LAST_CHECKPOINT
    assert resume_checkpoint(tmp_path / "epoch3.pt") == tmp_path / "epoch3.pt"
