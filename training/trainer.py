"""The training loop, top to bottom: data -> model -> objective -> optimiser -> epochs -> logs and checkpoints.

Recipe (metrix-spec section 3): Adam with weight decay, StepLR stepped once per epoch, warm-up epochs in
which only the embedding layer and the loss parameters (proxies) train, BatchNorm frozen where the preset
says so, proxies at `proxy_lr_mult` x the learning rate, gradient-value clipping, one seed.

Speed: bf16 autocast and channels_last on GPU (fp16 + GradScaler on request, fp32 on CPU), optional
torch.compile, on request (--cuda-graphs) the whole step replayed from a CUDA graph where it qualifies
(training/step.py; it falls back to the eager step, saying why, if the graph fails), and no
host-device synchronisation inside a step: losses are summed on the device and read once every
`SYNC_EVERY` steps for the progress bar.

Resume: last.pt holds the whole training state, every rank's RNGs included, so a run resumed after epoch e
continues exactly as the uninterrupted run would (training/checkpointing.py).

Multi-GPU: run under `torchrun`; see training/distributed.py for how the loss sees the global batch.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from retrieval.atomic import atomic_write_json, clean_stale_leftovers
from retrieval.checkpoint import load_checkpoint
from retrieval.config import RunConfig
from retrieval.data.base import RetrievalDataset
from retrieval.devices import resolve_amp
from retrieval.embed.torch_backend import TorchBackend
from retrieval.errors import ConfigError, UsageError
from retrieval.model import Embedder, freeze_batchnorm
from retrieval.preprocess import Preprocessing
from training.batches import TrainBatches, build_train_batches
from training.checkpointing import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    Progress,
    TrainingState,
    load_training_state,
    resume_checkpoint,
    resume_state,
    rng_state,
    save_run_checkpoints,
)
from training.determinism import deterministic_mode
from training.distributed import (
    DistInfo,
    all_gather_no_grad,
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup_distributed,
    gather_objects,
    init_distributed,
    wrap_for_step,
)
from training.evaluation import evaluate_model
from training.logging import MetricsLog
from training.objective import build_objective
from training.step import StepParts, build_step, graph_blocker, learning_rate, set_optimizer_for_graphs

DEFAULT_DEMO_ROOT = Path("data/demo")
SYNC_EVERY = 20  # steps between reads of the running loss (the only host-device syncs of an epoch)
RUN_FILES = (LAST_CHECKPOINT, BEST_CHECKPOINT, "config.json", "summary.json", "metrics.jsonl", "metrics.csv")
StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
        lines.append(
            f"last epoch ({self.last_epoch:>3})      : {format_metrics(self.last_metrics)}  -> {self.last_checkpoint}"
        )
        if self.best_epoch is not None:
            lines.append(
                f"best epoch ({self.best_epoch:>3}) by R@1: {format_metrics(self.best_metrics)}  -> "
                f"{self.best_checkpoint}"
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


def configure_cuda(device: torch.device, deterministic: bool) -> None:
    """Fast kernels for fixed shapes, TF32 matmuls; no autotuning when runs must be bit-identical."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic  # shapes are fixed per step
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@dataclass
class Run:
    """A run's parts, built once before the first epoch; `cfg` names the dataset root actually used."""

    cfg: RunConfig
    info: DistInfo
    dataset: RetrievalDataset
    batches: TrainBatches
    num_classes: int
    state: TrainingState
    amp_dtype: torch.dtype | None
    channels_last: bool  # channels_last memory format (GPU only)
    gather: bool  # the objective sees the global batch, so every rank's labels are gathered too
    graph_reason: str | None  # why the step cannot be (or is no longer) a CUDA graph; None when it qualifies

    @property
    def use_graphs(self) -> bool:
        return self.cfg.train.cuda_graphs and self.graph_reason is None


def build_run(cfg: RunConfig, info: DistInfo, say: Callable[[str], None]) -> Run:
    """Data, model, objective and optimiser, seeded so that every rank starts from identical weights."""
    device, t = info.device, cfg.train
    configure_cuda(device, t.deterministic)
    amp_dtype = resolve_amp(t.amp, device)
    if device.type != "cuda" and t.amp in ("bf16", "fp16"):
        say(f"note: --amp {t.amp} applies to CUDA only; training in float32 on {device}")
    seed_everything(t.seed)
    dataset, cfg = load_run_dataset(cfg, info)
    t = cfg.train
    batches = build_train_batches(cfg, dataset.train, device, info.rank, info.world_size)
    model = Embedder(cfg.model).to(device)
    if info.enabled and device.type == "cuda" and not t.freeze_bn:
        # BatchNorm statistics over the global batch, as a single-GPU run of the recipe computes them
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if t.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    num_classes = len(set(dataset.train.labels))
    objective = build_objective(cfg, num_classes, model.embedding_size).to(device)
    optimizer = build_optimizer(cfg, model, objective)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.lr_step, gamma=t.lr_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    generator = torch.Generator(device=device)
    generator.manual_seed(t.seed)  # same on every rank: the mixing of the global batch agrees
    if info.rank > 0:
        torch.manual_seed(t.seed + info.rank)  # but each rank augments its share differently
    return Run(
        cfg,
        info,
        dataset,
        batches,
        num_classes,
        TrainingState(model, objective, optimizer, scheduler, scaler, generator),
        amp_dtype,
        channels_last=t.channels_last and device.type == "cuda",
        gather=info.enabled and objective.gathers_global_batch,
        graph_reason=graph_blocker(device, distributed=info.enabled, amp_dtype=amp_dtype, compile_model=t.compile),
    )


def describe_run(run: Run) -> str:
    """What is trained on what, how, in two lines."""
    cfg, info, amp_dtype = run.cfg, run.info, run.amp_dtype
    if run.use_graphs:
        step = "whole-step CUDA graph (falls back to eager, saying why, if it fails)"
    elif not cfg.train.cuda_graphs:
        step = "eager" + (" (whole-step CUDA graphs are opt-in: --cuda-graphs)" if run.graph_reason is None else "")
    else:
        step = f"eager ({run.graph_reason})"
    return (
        f"training {cfg.model.arch} d={cfg.model.embedding_size} on {run.dataset.name} "
        f"({len(run.dataset.train)} images, {run.num_classes} classes) | loss {cfg.loss.name}, "
        f"mixup {cfg.mixup.level} | device {info.device}{' x' + str(info.world_size) if info.enabled else ''}, "
        f"{'float32' if amp_dtype is None else str(amp_dtype).replace('torch.', '') + ' autocast'} | "
        f"batches from {run.batches.source} | {len(run.batches)} steps/epoch | train crop {cfg.data.image_size} px, "
        f"test: resize short side {cfg.data.resize_size} px, centre crop {cfg.data.image_size} px\n"
        f"step: {step}"
    )


def phase_of(t: Any, epoch: int) -> str:
    """'warmup' (only the embedding layer and loss parameters train) or 'full'."""
    return "warmup" if epoch < t.warmup_epochs else "full"


def start_phase(run: Run, epoch: int, say: Callable[[str], None]) -> StepFn:
    """Make the phase's parameters trainable and build its step: a new runner per phase, since the trainable
    parameters (and so DDP's bookkeeping and a captured graph) change.

    If the CUDA graph fails, the runner continues eagerly (training/step.py); `say` prints why, once, and
    the run stays eager in later phases (the optimiser is back in its eager form)."""
    t, s = run.cfg.train, run.state
    warm = phase_of(t, epoch) == "warmup"
    set_trunk_trainable(s.model, trainable=not warm, freeze_bn=t.freeze_bn, bn_affine=bn_affine_trains(t, epoch))
    step_model = wrap_for_step(s.model, s.objective, run.info, gather=run.gather, compile_model=t.compile)
    parts = StepParts(step_model, s.objective, s.optimizer, s.scaler, s.generator, run.amp_dtype, t.grad_clip)

    def graph_failed(reason: str) -> None:
        run.graph_reason = reason
        say(f"note: {reason}")

    return build_step(parts, run.use_graphs, on_fallback=graph_failed)


# ----------------------------------------------------------------------------------------------
# One epoch
# ----------------------------------------------------------------------------------------------


def run_epoch(run: Run, step_fn: StepFn, epoch: int, progress: bool) -> dict[str, float]:
    """Train epoch `epoch` (0-based) and step the schedule; returns its learning rate and training statistics."""
    t, s = run.cfg.train, run.state
    s.model.train()
    if t.freeze_bn:
        freeze_batchnorm(s.model, train_affine=bn_affine_trains(t, epoch))
    run.batches.set_epoch(epoch)
    lr = learning_rate(s.optimizer)
    stats = train_one_epoch(
        step_fn,
        run.batches,
        run.info,
        batch_size=run.cfg.data.batch_size,
        channels_last=run.channels_last,
        gather_labels=run.gather,
        max_steps=t.max_steps_per_epoch,
        desc=f"epoch {epoch + 1}/{t.epochs}",
        progress=progress,
    )
    s.scheduler.step()
    return {"lr": lr, **stats}


def train_one_epoch(
    step_fn: StepFn,
    batches: TrainBatches,
    info: DistInfo,
    *,
    batch_size: int,
    channels_last: bool,
    gather_labels: bool,
    max_steps: int,
    desc: str,
    progress: bool,
) -> dict[str, float]:
    """Train for one epoch; returns mean loss/clean/mixed over steps and ranks, images/s, time."""
    device = info.device
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
            _check_finite(loss, desc, step)
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_seen / (time.perf_counter() - start):.0f}")
        bar.update(1)
    bar.close()
    if step == 0:
        raise ConfigError(
            f"the training split yields no batch of {batch_size} images; lower --batch-size "
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


def _check_finite(loss: float, desc: str, step: int) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"{desc}: the loss became {loss} at step {step}; lower the learning rate (--lr) "
            "or train in full precision (--amp none)"
        )


def evaluate(run: Run, progress: bool) -> dict[str, float]:
    """The test metrics of the model (computed by the main process, returned on every rank)."""
    metrics: dict[str, float] = {}
    if run.info.is_main:
        started = time.perf_counter()
        prep = Preprocessing(image_size=run.cfg.data.image_size, resize_size=run.cfg.data.resize_size)
        backend = TorchBackend(
            run.state.model,
            prep,
            device=run.info.device,
            workers=run.cfg.data.workers,
            amp_dtype=run.amp_dtype,
            channels_last=run.channels_last,
        )
        metrics = evaluate_model(backend, run.dataset, batch_size=max(run.cfg.data.batch_size, 64), progress=progress)
        metrics["eval_time_s"] = time.perf_counter() - started
    return broadcast_object(metrics, run.info)


def evaluates_after(t: Any, epoch: int) -> bool:
    """Whether epoch `epoch` (0-based) ends with an evaluation: every `eval_every` epochs, and the last."""
    return epoch + 1 == t.epochs or (t.eval_every > 0 and (epoch + 1) % t.eval_every == 0)


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {row['epoch']}/{epochs} [{row['phase']}] loss {row['loss']:.4f} (clean {row['clean']:.4f}, "
        f"mixed {row['mixed']:.4f}) | {row['images_per_s']:.0f} img/s | {format_metrics(row)}"
    )


# ----------------------------------------------------------------------------------------------
# The run folder
# ----------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """What the run folder receives. Only the main process writes; other ranks keep no rows."""

    log: MetricsLog | None
    history: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=lambda: {"setup_time_s": 0.0, "checkpoint_time_s": 0.0})

    @classmethod
    def open(cls, cfg: RunConfig, info: DistInfo, resumed_epoch: int | None) -> RunRecord:
        """Create the run folder with config.json, and its metrics log (keeping rows up to a resumed epoch)."""
        if not info.is_main:
            return cls(None, [])
        out_dir = Path(cfg.train.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_leftovers(out_dir, RUN_FILES)  # says what it removes (a killed run's temporary files)
        atomic_write_json(out_dir / "config.json", cfg.to_dict())
        log = MetricsLog(out_dir, keep_up_to_epoch=resumed_epoch)
        return cls(log, list(log.rows))

    def append(self, row: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.append(row)
            self.history.append(row)


def run_result(
    run: Run,
    done: Progress,
    last_epoch: int,
    last_metrics: dict[str, float],
    initial_metrics: dict[str, float] | None,
    history: list[dict[str, Any]],
) -> TrainResult:
    out_dir, info = Path(run.cfg.train.out_dir), run.info
    return TrainResult(
        out_dir=out_dir,
        last_checkpoint=out_dir / LAST_CHECKPOINT,
        best_checkpoint=out_dir / BEST_CHECKPOINT if done.best_epoch is not None else None,
        last_epoch=last_epoch,
        last_metrics=last_metrics,
        best_epoch=done.best_epoch,
        best_metrics=done.best_metrics,
        initial_metrics=initial_metrics,
        history=history,
        device=str(info.device) + (f" x{info.world_size}" if info.enabled else ""),
    )


def write_summary(result: TrainResult, timings: dict[str, float]) -> None:
    """summary.json: last and best epoch, and where the run's wall time went."""
    atomic_write_json(
        result.out_dir / "summary.json",
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
    say = tqdm.write if progress else (lambda msg: None)
    run_started = time.perf_counter()
    run = build_run(cfg, info, say)
    cfg, t, state = run.cfg, run.cfg.train, run.state
    done = Progress()
    if resume is not None:
        resume = resume_checkpoint(resume)
        done = load_training_state(resume, cfg, info, state)
        say(f"resumed from {resume} after epoch {done.epoch}")
    set_optimizer_for_graphs(
        state.optimizer, capturable=run.use_graphs
    )  # after resume: a checkpoint carries its run's form
    start_epoch = done.epoch
    if start_epoch >= t.epochs:
        warnings.warn(
            f"the checkpoint already completed {start_epoch} of {t.epochs} epochs; nothing to train", stacklevel=2
        )
    record = RunRecord.open(cfg, info, resumed_epoch=start_epoch if resume is not None else None)
    say(describe_run(run))
    initial_metrics = None
    if evaluate_before and resume is None:
        initial_metrics = evaluate(run, progress)
        record.append({"epoch": 0, "phase": "untrained", **initial_metrics})
        say(f"untrained: {format_metrics(initial_metrics)}")

    last_metrics: dict[str, float] = {}
    phase: str | None = None
    step_fn: StepFn | None = None
    record.timings["setup_time_s"] = time.perf_counter() - run_started
    for epoch in range(start_epoch, t.epochs):
        if phase != phase_of(t, epoch):
            phase, step_fn = phase_of(t, epoch), start_phase(run, epoch, say)
        assert step_fn is not None
        row: dict[str, Any] = {"epoch": epoch + 1, "phase": phase, **run_epoch(run, step_fn, epoch, progress)}
        if evaluates_after(t, epoch):
            row.update(evaluate(run, progress))
        say(epoch_line(row, t.epochs))
        last_metrics = {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}
        improved = done.record(epoch + 1, last_metrics)
        rng_states = gather_objects(rng_state(state.generator), info)  # every rank's, for last.pt
        if record.log is not None:
            checkpoint_started = time.perf_counter()
            record.append(row)
            extra = resume_state(state, rng_states, seed=t.seed, world_size=info.world_size, progress=done)
            save_run_checkpoints(Path(t.out_dir), state, cfg, last_metrics, extra, improved)
            record.timings["checkpoint_time_s"] += time.perf_counter() - checkpoint_started
        barrier(info)

    if not last_metrics and resume is not None:  # nothing left to train: report what the checkpoint holds
        last_metrics = load_checkpoint(resume)["metrics"]
    result = run_result(run, done, max(t.epochs, start_epoch), last_metrics, initial_metrics, record.history)
    if info.is_main:
        write_summary(result, record.timings)
    return result
