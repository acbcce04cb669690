"""One optimisation step: forward, clean + Metrix loss, backward, clipping, Adam; eager or replayed from a graph.

On a GPU a Metrix step is a few hundred small kernels, and launching them from Python costs more CPU time
than the GPU spends on them. `GraphedStep` records the whole step (forward, loss at every mixing level,
backward, gradient clipping and the optimiser update) once as a CUDA graph and then replays it, so a step
costs one launch. What makes that correct:
  - the batch is copied into static buffers the graph reads from;
  - the mixing generator is registered with the graph, so every replay draws fresh pairs and lam;
  - Adam runs with `capturable=True` and the learning rate lives in a device tensor that the scheduler
    fills in place, so a schedule step changes what the next replay uses;
  - a few eager steps on a side stream come first (cuDNN plans, optimiser state, compiled kernels);
  - a batch of another shape (a smaller last batch) runs eagerly instead of being forced through the graph.
Where a graph cannot apply (CPU, DDP, deterministic algorithms, fp16 loss scaling, a torch.compile'd model)
the step runs eagerly; `graph_blocker` names the reason so the trainer can print it once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

GRAPH_WARMUP_STEPS = 3  # eager steps before capture: cuDNN autotuning, Adam state, compiled loss kernels


@dataclass
class StepParts:
    """Everything one step touches. `model` is what the objective calls (the embedder, maybe wrapped)."""

    model: nn.Module
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    amp_dtype: torch.dtype | None
    grad_clip: float

    def params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]


def _update(parts: StepParts, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Forward, backward and update with gradients already cleared; returns (loss, clean, mixed) float32."""
    device_type = images.device.type
    with torch.autocast(device_type, dtype=parts.amp_dtype or torch.float32, enabled=parts.amp_dtype is not None):
        out = parts.objective(parts.model, images, labels, generator=parts.generator)
    parts.scaler.scale(out.loss).backward()
    parts.scaler.unscale_(parts.optimizer)  # clip the true gradients (no-op without fp16 scaling)
    torch.nn.utils.clip_grad_value_(parts.params(), parts.grad_clip)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    return torch.stack([out.loss.detach(), out.clean.detach(), out.mixed.detach()]).float()


def eager_step(parts: StepParts, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One step without graphs; returns (loss, clean, mixed) on the device (no host sync)."""
    parts.optimizer.zero_grad(set_to_none=True)
    return _update(parts, images, labels)


class EagerStep:
    """The plain step, callable like `GraphedStep`."""

    mode = "eager"

    def __init__(self, parts: StepParts) -> None:
        self.parts = parts

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return eager_step(self.parts, images, labels)


class StaticBatch:
    """Fixed device buffers a captured graph reads its batch from; `load` copies a batch in place.

    The buffers keep the first batch's shape, dtype and memory format (channels_last stays channels_last),
    and their storage never moves, which is what a replay relies on.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images.clone(memory_format=torch.preserve_format)
        self.labels = labels.clone()

    def fits(self, images: torch.Tensor, labels: torch.Tensor) -> bool:
        return (
            images.shape == self.images.shape and labels.shape == self.labels.shape
            and images.dtype == self.images.dtype and labels.dtype == self.labels.dtype
            and images.device == self.images.device
        )

    def load(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if not self.fits(images, labels):
            raise ValueError(
                f"batch of shape {tuple(images.shape)} does not fit the static buffers {tuple(self.images.shape)}"
            )
        self.images.copy_(images)
        self.labels.copy_(labels)


class GraphedStep:
    """The whole step captured once as a CUDA graph and replayed for every batch of the captured shape."""

    mode = "cuda graph"

    def __init__(self, parts: StepParts, warmup_steps: int = GRAPH_WARMUP_STEPS) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedStep needs a CUDA device; use EagerStep (see graph_blocker)")
        for group in parts.optimizer.param_groups:
            if not group.get("capturable", False) or not isinstance(group["lr"], torch.Tensor):
                raise ValueError("GraphedStep needs an optimiser prepared by set_optimizer_for_graphs(..., True)")
        self.parts = parts
        self.warmup_left = warmup_steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self.batch: StaticBatch | None = None
        self.stats: torch.Tensor | None = None
        self.eager_batches = 0  # batches of another shape, run eagerly

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            assert self.batch is not None and self.stats is not None
            if not self.batch.fits(images, labels):
                return self._eager_other_shape(images, labels)
            self.batch.load(images, labels)
            self.graph.replay()
            return self.stats.clone()  # the next replay overwrites the graph's own output
        if self.warmup_left > 0:
            self.warmup_left -= 1
            side = torch.cuda.Stream(device=images.device)
            side.wait_stream(torch.cuda.current_stream(images.device))
            with torch.cuda.stream(side):
                stats = eager_step(self.parts, images, labels)
            torch.cuda.current_stream(images.device).wait_stream(side)
            return stats
        return self._capture_then_replay(images, labels)

    def _capture_then_replay(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.batch = StaticBatch(images, labels)
        # Gradients must not exist at capture: backward then allocates them inside the graph's memory
        # pool and every replay overwrites them (rather than accumulating into stale ones).
        self.parts.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.parts.generator)
        with torch.cuda.graph(graph):
            self.stats = _update(self.parts, self.batch.images, self.batch.labels)
        self.graph = graph
        graph.replay()  # capture records without running: this replay trains on the capture batch
        return self.stats.clone()

    def _eager_other_shape(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A batch the graph was not captured for (a smaller last batch): one eager step on the same state."""
        self.eager_batches += 1
        stats = eager_step(self.parts, images, labels)
        self.parts.optimizer.zero_grad(set_to_none=True)  # free the eager gradients; replays use their own
        return stats


def graph_blocker(
    device: torch.device,
    *,
    distributed: bool,
    amp_dtype: torch.dtype | None,
    compile_model: bool,
) -> str | None:
    """Why a whole-step CUDA graph cannot be used here, or None when the step qualifies."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, this run uses {device.type}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if distributed:
        return "DistributedDataParallel synchronises gradients outside a capturable region"
    if torch.are_deterministic_algorithms_enabled():
        return "deterministic algorithms are on (the fused kernels they replace are not capturable)"
    if amp_dtype == torch.float16:
        return "fp16 loss scaling checks for overflow on the host every step (use bf16)"
    if compile_model:
        return "the model is torch.compile'd (its own graphs would nest; use --no-compile)"
    return None


def set_optimizer_for_graphs(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Put an Adam-style optimiser into the form a graph needs (capturable, device-tensor lr) or back to eager.

    Called after a checkpoint is loaded, since a checkpoint carries the optimiser form of the run that wrote
    it: an eager run's checkpoint resumes under graphs and a graph run's resumes eagerly (e.g. on a CPU).
    """
    for group in optimizer.param_groups:
        device = group["params"][0].device if group["params"] else torch.device("cpu")
        lr = group["lr"]
        if capturable:
            if not (isinstance(lr, torch.Tensor) and lr.device == device):
                group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        elif isinstance(lr, torch.Tensor):
            group["lr"] = float(lr)
        if "capturable" in group:
            group["capturable"] = capturable
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(device if capturable else torch.device("cpu"), torch.float32)


def learning_rate(optimizer: torch.optim.Optimizer, group: int = 0) -> float:
    """The current learning rate of a group as a float (a device tensor under graphs)."""
    return float(optimizer.param_groups[group]["lr"])


def build_step(parts: StepParts, use_graphs: bool) -> EagerStep | GraphedStep:
    """The step runner for one training phase (build a new one when trainable parameters change)."""
    return GraphedStep(parts) if use_graphs else EagerStep(parts)


__all__ = [
    "EagerStep", "GraphedStep", "StaticBatch", "StepParts", "build_step", "eager_step", "graph_blocker",
    "learning_rate", "set_optimizer_for_graphs",
]
