"""The training loop, top to bottom: data -> model -> objective -> optimiser -> epochs -> logs and checkpoints.

Recipe (metrix-spec section 3): Adam with weight decay, StepLR stepped once per epoch, warm-up epochs in
which only the embedding layer and the loss parameters (proxies) train, BatchNorm frozen where the preset
says so, proxies at `proxy_lr_mult` x the learning rate, gradient-value clipping, one seed.

Speed: bf16 autocast and channels_last on GPU (fp16 + GradScaler on request, fp32 on CPU), optional
torch.compile, the whole step replayed from a CUDA graph where it qualifies (training/step.py), and no
host-device synchronisation inside a step: losses are summed on the device and read once every
`SYNC_EVERY` steps for the progress bar.

Resume: a checkpoint holds the optimiser, scheduler, loss parameters and every RNG state (torch CPU/CUDA,
numpy, python, the mixing generator; per rank), and batches are a function of (seed, epoch), so a run
resumed at epoch e continues exactly as the uninterrupted run would.

Multi-GPU: run under `torchrun`; see training/distributed.py for how the loss sees the global batch.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from retrieval.atomic import atomic_write_json, clean_stale_leftovers
from retrieval.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from retrieval.config import RunConfig
from retrieval.data.base import RetrievalDataset
from retrieval.errors import ConfigError, UsageError
from retrieval.model import Embedder, freeze_batchnorm
from training.batches import TrainBatches, build_train_batches
from training.determinism import deterministic_mode
from training.distributed import (
    DistInfo,
    all_gather_no_grad,
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup_distributed,
    gather_objects,
    gathers_global_batch,
    init_distributed,
    wrap_for_step,
)
from training.evaluation import evaluate_model
from training.logging import MetricsLog
from training.objective import build_objective
from training.step import StepParts, build_step, graph_blocker, learning_rate, set_optimizer_for_graphs

DEFAULT_DEMO_ROOT = Path("data/demo")
SYNC_EVERY = 20  # steps between reads of the running loss (the only host-device syncs of an epoch)
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
RUN_FILES = (LAST_CHECKPOINT, BEST_CHECKPOINT, "config.json", "summary.json", "metrics.jsonl", "metrics.csv")


@dataclass
class TrainResult:
    """What a finished run produced. Metrics are fractions in [0, 1] (R@k, MAP@R, RP)."""

    out_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    last_epoch: int
    last_metrics: dict[str, float]
    best_epoch: int | None
    best_metrics: dict[str, float]
    initial_metrics: dict[str, float] | None  # the untrained model, when evaluated before training
    history: list[dict[str, Any]] = field(default_factory=list)
    device: str = "cpu"

    def summary(self) -> str:
        """Last-epoch and best-epoch metrics, saying which is which (papers often report the best)."""
        lines = [f"run folder: {self.out_dir}"]
        if self.initial_metrics:
            lines.append(f"before training       : {format_metrics(self.initial_metrics)}")
        lines.append(f"last epoch ({self.last_epoch:>3})      : {format_metrics(self.last_metrics)}  -> {self.last_checkpoint}")
        if self.best_epoch is not None:
            lines.append(
                f"best epoch ({self.best_epoch:>3}) by R@1: {format_metrics(self.best_metrics)}  -> {self.best_checkpoint}"
            )
            lines.append("report the last epoch; the best epoch is selected on the test set and is optimistic")
        return "\n".join(lines)


def format_metrics(metrics: dict[str, float]) -> str:
    keys = [k for k in metrics if k.startswith("R@")] + [k for k in ("MAP@R", "RP") if k in metrics]
    if not keys:
        return "not evaluated"
    return "  ".join(f"{k} {100 * metrics[k]:.2f}" for k in keys)


# ----------------------------------------------------------------------------------------------
# Setup helpers
# ----------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for full precision. CPU always trains in float32."""
    if amp not in ("auto", "bf16", "fp16", "none"):
        raise UsageError(f"unknown amp setting {amp!r}; choose auto, bf16, fp16 or none")
    if device.type != "cuda" or amp == "none":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "auto" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def load_run_dataset(cfg: RunConfig, info: DistInfo | None = None) -> tuple[RetrievalDataset, RunConfig]:
    """The dataset named by the config; the demo is generated into data/demo when no root is given."""
    from retrieval.data import load_dataset

    root = cfg.data.root
    if cfg.data.dataset == "demo" and not root:
        from retrieval.data.demo import generate_demo

        root = str(DEFAULT_DEMO_ROOT)
        if info is None or info.is_main:
            generate_demo(DEFAULT_DEMO_ROOT, progress=True)
        if info is not None:
            barrier(info)
    if not root:
        raise UsageError(f"dataset {cfg.data.dataset!r} needs --data-root (the folder holding its official layout)")
    dataset = load_dataset(cfg.data.dataset, root)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(root)))
    return dataset, cfg


def build_optimizer(cfg: RunConfig, model: Embedder, objective: nn.Module) -> torch.optim.Optimizer:
    """Adam over trunk, embedding layer and loss parameters (the latter at proxy_lr_mult x lr)."""
    t = cfg.train
    groups: list[dict[str, Any]] = [
        {"params": model.trunk_parameters(), "lr": t.lr},
        {"params": model.head_parameters(), "lr": t.lr},
    ]
    loss_params = list(objective.parameters())
    if loss_params:
        groups.append({"params": loss_params, "lr": t.lr * t.proxy_lr_mult})
    return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)


def set_trunk_trainable(model: Embedder, trainable: bool, freeze_bn: bool, bn_affine: bool = False) -> None:
    """Warm-up trains only the embedding layer (and the loss parameters); frozen BN keeps its statistics
    frozen, and its affine parameters unless `bn_affine`."""
    for p in model.trunk_parameters():
        p.requires_grad_(trainable)
    if freeze_bn:
        freeze_batchnorm(model, train_affine=bn_affine)


def bn_affine_trains(t: Any, epoch: int) -> bool:
    """Whether frozen BatchNorm's scale and shift train in `epoch` (0-based): after a warm-up, as the
    official code (its warm-up ends by re-enabling every trunk parameter; without warm-up it never does)."""
    return bool(t.bn_affine_after_warmup) and t.warmup_epochs > 0 and epoch >= t.warmup_epochs


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG this process draws from, as tensors and plain lists (loadable with weights_only=True)."""
    np_state = np.random.get_state()
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
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    generator.set_state(state["mix_generator"])


# ----------------------------------------------------------------------------------------------
# One epoch
# ----------------------------------------------------------------------------------------------


def train_one_epoch(
    step_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: TrainBatches,
    *,
    cfg: RunConfig,
    info: DistInfo,
    gather_labels: bool,
    max_steps: int,
    desc: str,
    progress: bool,
) -> dict[str, float]:
    """Train for one epoch; returns mean loss/clean/mixed over steps and ranks, images/s, time."""
    device = info.device
    channels_last = cfg.train.channels_last and device.type == "cuda"
    sums = torch.zeros(3, device=device)  # running loss, clean, mixed: read only every SYNC_EVERY steps
    steps = min(len(batches), max_steps) if max_steps > 0 else len(batches)
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    images_seen = 0
    step = 0
    for images, labels in batches:
        if step >= steps:
            break
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if gather_labels:
            labels = all_gather_no_grad(labels)
        sums += step_fn(images, labels)  # (loss, clean, mixed) on the device
        step += 1
        images_seen += images.shape[0] * info.world_size
        if step % SYNC_EVERY == 0 or step == steps:
            loss = sums[0].item() / step  # the one host sync every SYNC_EVERY steps
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"{desc}: the loss became {loss} at step {step}; lower the learning rate (--lr) "
                    "or train in full precision (--amp none)"
                )
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_seen / (time.perf_counter() - start):.0f}")
        bar.update(1)
    bar.close()
    if step == 0:
        raise ConfigError(
            f"the training split yields no batch of {cfg.data.batch_size} images; lower --batch-size "
            "(or --images-per-class for balanced batches)"
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    means = all_reduce_mean(sums / step, info).tolist()
    return {
        "loss": means[0],
        "clean": means[1],
        "mixed": means[2],
        "steps": step,
        "images_per_s": images_seen / elapsed,
        "epoch_time_s": elapsed,
    }


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def train(
    cfg: RunConfig,
    progress: bool = True,
    *,
    resume: str | Path | None = None,
    evaluate_before: bool = False,
) -> TrainResult:
    """Train an embedder as `cfg` says; write <out>/last.pt, best.pt, metrics.jsonl/csv, config.json.

    `resume`: a checkpoint written by this function (last.pt) to continue from, exactly.
    `evaluate_before`: also evaluate the untrained model (logged as epoch 0, returned as initial_metrics).
    Runs single-process, or as one rank of a `torchrun` launch.
    """
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    with deterministic_mode(cfg.train.deterministic):  # before CUDA starts: cuBLAS reads its workspace setting
        info = init_distributed(cfg.train.device)
        try:
            return _train(cfg, info, progress and info.is_main, resume, evaluate_before)
        finally:
            if not had_group:  # leave a process group the caller set up to the caller
                cleanup_distributed(info)


def _train(
    cfg: RunConfig,
    info: DistInfo,
    progress: bool,
    resume: str | Path | None,
    evaluate_before: bool,
) -> TrainResult:
    device = info.device
    say = (lambda msg: tqdm.write(msg)) if progress else (lambda msg: None)
    t = cfg.train
    run_started = time.perf_counter()
    timings = {"setup_time_s": 0.0, "checkpoint_time_s": 0.0}  # for summary.json: where a run's wall time goes
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not t.deterministic  # shapes are fixed per step
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp_dtype = resolve_amp(t.amp, device)
    if device.type != "cuda" and t.amp in ("bf16", "fp16"):
        say(f"note: --amp {t.amp} applies to CUDA only; training in float32 on {device}")

    # Data
    seed_everything(t.seed)
    dataset, cfg = load_run_dataset(cfg, info)
    t = cfg.train
    out_dir = Path(t.out_dir)
    batches = build_train_batches(cfg, dataset.train, device, info.rank, info.world_size)
    num_classes = len(set(dataset.train.labels))

    # Model, objective, optimiser (identical initial weights on every rank: same seed)
    model = Embedder(cfg.model).to(device)
    if info.enabled and device.type == "cuda" and not t.freeze_bn:
        # BatchNorm statistics over the global batch, as a single-GPU run of the recipe computes them
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if t.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    objective = build_objective(cfg, num_classes, model.embedding_size).to(device)
    optimizer = build_optimizer(cfg, model, objective)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.lr_step, gamma=t.lr_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    generator = torch.Generator(device=device)
    generator.manual_seed(t.seed)  # same on every rank: the mixing of the global batch agrees
    if info.rank > 0:
        torch.manual_seed(t.seed + info.rank)  # but each rank augments its share differently

    # Resume
    start_epoch, best_epoch, best_metrics = 0, None, {}
    if resume is not None:
        resume = Path(resume) / LAST_CHECKPOINT if Path(resume).is_dir() else Path(resume)
        start_epoch, best_epoch, best_metrics = _load_training_state(
            resume, cfg, info, model, objective, optimizer, scheduler, scaler, generator
        )
        say(f"resumed from {resume} after epoch {start_epoch}")
    graph_reason = graph_blocker(device, distributed=info.enabled, amp_dtype=amp_dtype, compile_model=t.compile)
    use_graphs = t.cuda_graphs and graph_reason is None
    set_optimizer_for_graphs(optimizer, capturable=use_graphs)  # after resume: a checkpoint carries its run's form
    if start_epoch >= t.epochs:
        warnings.warn(f"the checkpoint already completed {start_epoch} of {t.epochs} epochs; nothing to train")

    log = None
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_leftovers(out_dir, RUN_FILES)  # says what it removes (a killed run's temporary files)
        atomic_write_json(out_dir / "config.json", cfg.to_dict())
        log = MetricsLog(out_dir, keep_up_to_epoch=start_epoch if resume is not None else None)
    history: list[dict[str, Any]] = list(log.rows) if log is not None else []

    gather = info.enabled and gathers_global_batch(cfg.mixup.level)
    eval_kw = dict(
        image_size=cfg.data.image_size,
        resize_size=cfg.data.resize_size,
        device=device,
        batch_size=max(cfg.data.batch_size, 64),
        workers=cfg.data.workers,
        amp_dtype=amp_dtype,
        channels_last=t.channels_last and device.type == "cuda",
        progress=progress,
    )
    say(
        f"training {cfg.model.arch} d={cfg.model.embedding_size} on {dataset.name} "
        f"({len(dataset.train)} images, {num_classes} classes) | loss {cfg.loss.name}, mixup {cfg.mixup.level} | "
        f"device {device}{' x' + str(info.world_size) if info.enabled else ''}, "
        f"{'float32' if amp_dtype is None else str(amp_dtype).replace('torch.', '') + ' autocast'} | "
        f"batches from {batches.source} | {len(batches)} steps/epoch | train crop {cfg.data.image_size} px, "
        f"test: resize short side {cfg.data.resize_size} px, centre crop {cfg.data.image_size} px"
    )
    say("step: whole-step CUDA graph" if use_graphs else
        f"step: eager ({'--no-cuda-graphs' if graph_reason is None else graph_reason})")

    def run_eval() -> dict[str, float]:
        metrics: dict[str, float] = {}
        if info.is_main:
            started = time.perf_counter()
            metrics = evaluate_model(model, dataset, **eval_kw)  # type: ignore[arg-type]
            metrics["eval_time_s"] = time.perf_counter() - started
        return broadcast_object(metrics, info)

    initial_metrics = None
    if evaluate_before and resume is None:
        initial_metrics = run_eval()
        if log is not None:
            row = {"epoch": 0, "phase": "untrained", **initial_metrics}
            log.append(row)
            history.append(row)
        say(f"untrained: {format_metrics(initial_metrics)}")

    last_metrics: dict[str, float] = {}
    phase = None
    step_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    timings["setup_time_s"] = time.perf_counter() - run_started
    for epoch in range(start_epoch, t.epochs):
        warm = epoch < t.warmup_epochs
        if phase != ("warmup" if warm else "full"):
            phase = "warmup" if warm else "full"
            set_trunk_trainable(model, trainable=not warm, freeze_bn=t.freeze_bn, bn_affine=bn_affine_trains(t, epoch))
            step_model = wrap_for_step(model, objective, info, gather=gather, compile_model=t.compile)
            # a new runner per phase: the trainable parameters (and so the captured graph) change
            step_fn = build_step(StepParts(step_model, objective, optimizer, scaler, generator, amp_dtype, t.grad_clip),
                                 use_graphs)
        model.train()
        if t.freeze_bn:
            freeze_batchnorm(model, train_affine=bn_affine_trains(t, epoch))
        batches.set_epoch(epoch)
        lr = learning_rate(optimizer)
        assert step_fn is not None
        stats = train_one_epoch(
            step_fn, batches, cfg=cfg, info=info, gather_labels=gather,
            max_steps=t.max_steps_per_epoch, desc=f"epoch {epoch + 1}/{t.epochs}", progress=progress,
        )  # fmt: skip
        scheduler.step()

        row: dict[str, Any] = {"epoch": epoch + 1, "phase": phase, "lr": lr, **stats}
        is_last = epoch + 1 == t.epochs
        if is_last or (t.eval_every > 0 and (epoch + 1) % t.eval_every == 0):
            row.update(run_eval())
        say(
            f"epoch {epoch + 1}/{t.epochs} [{phase}] loss {stats['loss']:.4f} (clean {stats['clean']:.4f}, "
            f"mixed {stats['mixed']:.4f}) | {stats['images_per_s']:.0f} img/s | {format_metrics(row)}"
        )
        last_metrics = {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}
        improved = "R@1" in row and (best_epoch is None or row["R@1"] > best_metrics.get("R@1", -1.0))
        if improved:
            best_epoch, best_metrics = epoch + 1, dict(last_metrics)

        # Checkpoints: every rank contributes its RNG state; rank 0 writes.
        rng_states = gather_objects(rng_state(generator), info)
        if log is not None:
            checkpoint_started = time.perf_counter()
            log.append(row)
            history.append(row)
            extra = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "objective": objective.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_states,
                "sampler_seed": t.seed,
                "epoch": epoch + 1,
                "world_size": info.world_size,
                "best_epoch": -1 if best_epoch is None else best_epoch,
                "best_metrics": best_metrics,
            }
            save_checkpoint(out_dir / LAST_CHECKPOINT, model, cfg, epoch=epoch + 1, metrics=last_metrics, extra=extra)
            if improved:
                save_checkpoint(
                    out_dir / BEST_CHECKPOINT, model, cfg, epoch=epoch + 1, metrics=last_metrics,
                    extra={"objective": objective.state_dict(), "epoch": epoch + 1},
                )  # fmt: skip
            timings["checkpoint_time_s"] += time.perf_counter() - checkpoint_started
        barrier(info)

    if not last_metrics and resume is not None:  # nothing left to train: report what the checkpoint holds
        last_metrics = load_checkpoint(resume)["metrics"]
    result = TrainResult(
        out_dir=out_dir,
        last_checkpoint=out_dir / LAST_CHECKPOINT,
        best_checkpoint=out_dir / BEST_CHECKPOINT if best_epoch is not None else None,
        last_epoch=max(t.epochs, start_epoch),
        last_metrics=last_metrics,
        best_epoch=best_epoch,
        best_metrics=best_metrics,
        initial_metrics=initial_metrics,
        history=history,
        device=str(device) + (f" x{info.world_size}" if info.enabled else ""),
    )
    if info.is_main:
        atomic_write_json(
            out_dir / "summary.json",
            {
                "last_epoch": result.last_epoch,
                "last_metrics": result.last_metrics,
                "best_epoch": result.best_epoch,
                "best_metrics": result.best_metrics,
                "initial_metrics": result.initial_metrics,
                **timings,
                "note": "last = the model at the end of training (report this); best = highest test R@1 (optimistic)",
            },
        )
    return result


def _load_training_state(
    path: Path,
    cfg: RunConfig,
    info: DistInfo,
    model: Embedder,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
) -> tuple[int, int | None, dict[str, float]]:
    """Restore everything a checkpoint holds; returns (epochs completed, best epoch, best metrics)."""
    payload = load_checkpoint(path)
    extra = payload.get("extra") or {}
    if "optimizer" not in extra:
        raise CheckpointError(
            f"{path} holds weights only (no optimiser/RNG state); resume from the run's {LAST_CHECKPOINT}"
        )
    saved = payload["config"]
    for section, key in (("model", "arch"), ("model", "embedding_size"), ("loss", "name"), ("data", "dataset")):
        if saved[section][key] != getattr(getattr(cfg, section), key):
            raise CheckpointError(
                f"{path} was trained with {section}.{key}={saved[section][key]!r}, "
                f"but this run asks for {getattr(getattr(cfg, section), key)!r}; resume with the same setting"
            )
    try:
        model.load_state_dict(payload["model"])
        objective.load_state_dict(extra["objective"])
        optimizer.load_state_dict(extra["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} does not fit this run's model/loss/optimiser: {exc}") from exc
    scheduler.load_state_dict(extra["scheduler"])
    if extra.get("scaler"):
        scaler.load_state_dict(extra["scaler"])
    states = extra["rng"]
    if len(states) == info.world_size:
        restore_rng_state(states[info.rank], generator)
    else:
        warnings.warn(
            f"{path} was written by {len(states)} process(es), this run has {info.world_size}: batches are the same "
            "(they depend on seed and epoch) but augmentation and mixing draws will differ from the original run"
        )
        restore_rng_state(states[0], generator)
        if info.rank > 0:
            torch.manual_seed(cfg.train.seed + info.rank + 1_000 * int(extra["epoch"]))
    best_epoch = int(extra.get("best_epoch", -1))
    return int(extra["epoch"]), (None if best_epoch < 0 else best_epoch), dict(extra.get("best_metrics", {}))
