"""A run's checkpoints: what last.pt and best.pt hold, and how a run resumes from last.pt exactly.

last.pt holds, besides the weights and config (retrieval.checkpoint), the optimiser, scheduler, loss
parameters, grad scaler and every RNG state of every rank (torch CPU/CUDA, numpy, python, the mixing
generator). Batches are a function of (seed, epoch), so a run resumed after epoch e continues exactly as
the uninterrupted run would. best.pt holds the weights and loss parameters only. The keys below are the
checkpoint format: runs written by earlier versions must keep loading.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn

from retrieval.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from retrieval.config import RunConfig
from retrieval.model import Embedder
from training.distributed import DistInfo
from training.run_files import BEST_CHECKPOINT, LAST_CHECKPOINT, resume_checkpoint

# Settings a resumed run must share with the checkpoint: (section, key) of RunConfig.
RESUME_MUST_MATCH = (("model", "arch"), ("model", "embedding_size"), ("loss", "name"), ("data", "dataset"))


@dataclass
class TrainingState:
    """Everything an epoch changes and a checkpoint restores."""

    model: Embedder
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # the mixing draws; the same on every rank


@dataclass
class Progress:
    """Epochs completed and the best epoch by R@1 so far (None before any evaluation)."""

    epoch: int = 0
    best_epoch: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)

    def record(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Count a finished epoch; returns whether its R@1 is the best so far."""
        self.epoch = epoch
        improved = "R@1" in metrics and (self.best_epoch is None or metrics["R@1"] > self.best_metrics.get("R@1", -1.0))
        if improved:
            self.best_epoch, self.best_metrics = epoch, dict(metrics)
        return improved


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG this process draws from, as tensors and plain lists (loadable with weights_only=True)."""
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))  # (name, keys, pos, has_gauss, gaussian)
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # only this process's GPU: touching every GPU would create a CUDA context on each from each rank
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_state[0]), "state": list(py_state[1]), "gauss_next": py_state[2]},
        "mix_generator": generator.get_state(),
    }


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    generator.set_state(state["mix_generator"])


def resume_state(
    state: TrainingState, rng_states: list[dict[str, Any]], *, seed: int, world_size: int, progress: Progress
) -> dict[str, Any]:
    """The training state last.pt carries besides the weights; `rng_states` holds one entry per rank."""
    return {
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "objective": state.objective.state_dict(),
        "scaler": state.scaler.state_dict(),
        "rng": rng_states,
        "sampler_seed": seed,
        "epoch": progress.epoch,
        "world_size": world_size,
        "best_epoch": -1 if progress.best_epoch is None else progress.best_epoch,
        "best_metrics": progress.best_metrics,
    }


def save_run_checkpoints(
    out_dir: Path,
    state: TrainingState,
    cfg: RunConfig,
    metrics: dict[str, float],
    resume: dict[str, Any],
    improved: bool,
) -> None:
    """Write last.pt (weights + `resume`, the state of `resume_state`), and best.pt when the epoch improved."""
    epoch = resume["epoch"]
    save_checkpoint(out_dir / LAST_CHECKPOINT, state.model, cfg, epoch=epoch, metrics=metrics, extra=resume)
    if improved:
        save_checkpoint(
            out_dir / BEST_CHECKPOINT,
            state.model,
            cfg,
            epoch=epoch,
            metrics=metrics,
            extra={"objective": state.objective.state_dict(), "epoch": epoch},
        )


def load_training_state(path: Path, cfg: RunConfig, info: DistInfo, state: TrainingState) -> Progress:
    """Restore everything last.pt holds into `state` (and this process's RNGs); returns the progress it records."""
    payload = load_checkpoint(path)
    extra = payload.get("extra") or {}
    if "optimizer" not in extra:
        raise CheckpointError(
            f"{path} holds weights only (no optimiser/RNG state); resume from the run's {LAST_CHECKPOINT}"
        )
    _check_same_settings(path, payload["config"], cfg)
    try:
        state.model.load_state_dict(payload["model"])
        state.objective.load_state_dict(extra["objective"])
        state.optimizer.load_state_dict(extra["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} does not fit this run's model/loss/optimiser: {exc}") from exc
    state.scheduler.load_state_dict(extra["scheduler"])
    if extra.get("scaler"):
        state.scaler.load_state_dict(extra["scaler"])
    _restore_rank_rng(path, extra, cfg.train.seed, info, state.generator)
    best_epoch = int(extra.get("best_epoch", -1))
    return Progress(int(extra["epoch"]), None if best_epoch < 0 else best_epoch, dict(extra.get("best_metrics", {})))


def _check_same_settings(path: Path, saved: dict[str, Any], cfg: RunConfig) -> None:
    for section, key in RESUME_MUST_MATCH:
        wanted = getattr(getattr(cfg, section), key)
        if saved[section][key] != wanted:
            raise CheckpointError(
                f"{path} was trained with {section}.{key}={saved[section][key]!r}, "
                f"but this run asks for {wanted!r}; resume with the same setting"
            )


def _restore_rank_rng(path: Path, extra: dict[str, Any], seed: int, info: DistInfo, generator: torch.Generator) -> None:
    """This rank's RNG states; with another number of processes, rank 0's and fresh augmentation seeds."""
    states = extra["rng"]
    if len(states) == info.world_size:
        restore_rng_state(states[info.rank], generator)
        return
    warnings.warn(
        f"{path} was written by {len(states)} process(es), this run has {info.world_size}: batches are the same "
        "(they depend on seed and epoch) but augmentation and mixing draws will differ from the original run",
        stacklevel=2,
    )
    restore_rng_state(states[0], generator)
    if info.rank > 0:
        torch.manual_seed(seed + info.rank + 1_000 * int(extra["epoch"]))


__all__ = [
    "BEST_CHECKPOINT",
    "LAST_CHECKPOINT",
    "Progress",
    "TrainingState",
    "load_training_state",
    "restore_rng_state",
    "resume_checkpoint",
    "resume_state",
    "rng_state",
    "save_run_checkpoints",
]
