"""Checkpoints: weights + the config that made them + metrics, saved atomically, loaded without pickle.

Layout (a plain dict, loadable with torch.load(weights_only=True)):
    format: "metrix-retrieval/checkpoint/1"
    model: Embedder state_dict
    config: RunConfig.to_dict()
    preprocessing: Preprocessing.to_dict()
    fingerprint: model_fingerprint(model)
    metrics: {name: float}; epoch: int
    extra: optional training state (optimizer, scheduler, loss parameters, RNG) for --resume
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from retrieval.atomic import atomic_write_with
from retrieval.config import ModelConfig, RunConfig
from retrieval.errors import UserError
from retrieval.model import Embedder, fingerprint_state, model_fingerprint
from retrieval.preprocess import Preprocessing

CHECKPOINT_FORMAT = "metrix-retrieval/checkpoint/1"


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, corrupt or of another format; the message names the file."""


def preprocessing_of(cfg: RunConfig) -> Preprocessing:
    return Preprocessing(image_size=cfg.data.image_size, resize_size=cfg.data.resize_size)


def save_checkpoint(
    path: str | os.PathLike[str],
    model: Embedder,
    cfg: RunConfig,
    *,
    epoch: int = 0,
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write atomically; returns the model fingerprint recorded in it."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fp = fingerprint_state(state)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": state,
        "config": cfg.to_dict(),
        "preprocessing": preprocessing_of(cfg).to_dict(),
        "fingerprint": fp,
        "epoch": int(epoch),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "extra": extra or {},
    }
    atomic_write_with(path, lambda tmp: torch.save(payload, tmp))
    return fp


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; train one with `retrieval train` or pass --checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {exc}. It may be truncated or not a checkpoint."
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a metrix-retrieval checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return payload


def embedder_from_checkpoint(path: str | os.PathLike[str]) -> tuple[Embedder, RunConfig, Preprocessing, str]:
    """(model in eval mode, its config, its preprocessing, its fingerprint)."""
    payload = load_checkpoint(path)
    cfg = RunConfig.from_dict(payload["config"])
    model_cfg = ModelConfig(arch=cfg.model.arch, embedding_size=cfg.model.embedding_size, pretrained="none")
    model = Embedder(model_cfg)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {path} do not fit a {model_cfg.arch} embedder: {exc}") from exc
    model.eval()
    fp = model_fingerprint(model)
    if fp != payload["fingerprint"]:
        raise CheckpointError(f"{path}: weights fingerprint {fp} differs from the recorded {payload['fingerprint']}")
    return model, cfg, Preprocessing.from_dict(payload["preprocessing"]), fp
