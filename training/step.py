"""One optimisation step: forward, clean + Metrix loss, backward, clipping, Adam; eager or replayed from a graph.

On a GPU a Metrix step is a few hundred small kernels, and launching them from Python costs more CPU time
than the GPU spends on them. `GraphedStep` records the whole step (forward, loss at every mixing level,
backward, gradient clipping and the optimiser update) once as a CUDA graph and then replays it, so a step
costs one launch. What makes that correct:
  - the batch is copied into static buffers the graph reads from;
  - the mixing generator is registered with the graph, so every replay draws fresh pairs and lam;
  - Adam runs with `capturable=True` and the learning rate lives in a device tensor that the scheduler
    fills in place, so a schedule step changes what the next replay uses;
  - a few eager steps on ONE side stream come first (cuDNN plans, Adam's moments, compiled and Triton
    kernels), and the capture runs on that same stream;
  - the capture uses `capture_error_mode="thread_local"`: the loader's pin-memory and producer threads may
    allocate pinned memory or wait on events while the training thread captures;
  - a batch of another shape (a smaller last batch) runs eagerly instead of being forced through the graph.
Where a graph cannot apply (CPU, DDP, deterministic algorithms, fp16 loss scaling, a torch.compile'd model)
the step runs eagerly; `graph_blocker` names the reason so the trainer can print it once.

Graphs are opt-in (`--cuda-graphs`) until benchmarks/gpu_checks.sh has validated them on a GPU. Should the
warm-up, the capture or a replay fail anyway, `GraphedStep` falls back to the eager step for the rest of the
run: the optimiser goes back to its eager form, the mixing generator to its state before the failed attempt,
the batch is trained eagerly, and `on_fallback` receives one line saying why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn

from retrieval.errors import UserError

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
            images.shape == self.images.shape
            and labels.shape == self.labels.shape
            and images.dtype == self.images.dtype
            and labels.dtype == self.labels.dtype
            and images.device == self.images.device
        )

    def load(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if not self.fits(images, labels):
            raise ValueError(
                f"batch of shape {tuple(images.shape)} does not fit the static buffers {tuple(self.images.shape)}"
            )
        self.images.copy_(images)
        self.labels.copy_(labels)


class Replayable(Protocol):
    """What a capture returns: a recorded step that `replay()` runs again (torch.cuda.CUDAGraph)."""

    def replay(self) -> None: ...


# capture(record, generator, stream) -> (graph, the output `record()` returned while being recorded)
CaptureFn = Callable[[Callable[[], torch.Tensor], torch.Generator, Any], tuple[Replayable, torch.Tensor]]


def capture_cuda_graph(
    record: Callable[[], torch.Tensor],
    generator: torch.Generator,
    stream: torch.cuda.Stream | None,
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Record `record()` as a CUDA graph on `stream` (the warm-up's side stream).

    The mixing generator is registered so each replay draws new numbers. `thread_local` capture mode:
    other threads (pin-memory, cache producers) may call cudaHostAlloc or synchronise events meanwhile,
    which the default global mode turns into cudaErrorStreamCaptureUnsupported. The outer stream context
    restores the current stream even when a failed capture skips `torch.cuda.graph`'s own exit.
    """
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(generator)
    with (
        torch.cuda.stream(torch.cuda.current_stream()),
        torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"),
    ):
        out = record()
    return graph, out


def _say_with_warning(line: str) -> None:
    warnings.warn(line, RuntimeWarning, stacklevel=3)


class GraphedStep:
    """The whole step captured once as a CUDA graph and replayed for every batch of the captured shape.

    `capture` records the step (default: `capture_cuda_graph`; tests pass one that fails). If the
    warm-up, the capture or a replay raises, the runner becomes the eager step for good (`fallback_reason`
    says why, `on_fallback` receives it once; default: a RuntimeWarning) and trains that batch eagerly.
    """

    def __init__(
        self,
        parts: StepParts,
        warmup_steps: int = GRAPH_WARMUP_STEPS,
        *,
        capture: CaptureFn = capture_cuda_graph,
        on_fallback: Callable[[str], None] | None = None,
    ) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedStep needs a CUDA device; use EagerStep (see graph_blocker)")
        for group in parts.optimizer.param_groups:
            if not group.get("capturable", False) or not isinstance(group["lr"], torch.Tensor):
                raise ValueError("GraphedStep needs an optimiser prepared by set_optimizer_for_graphs(..., True)")
        if warmup_steps < 1 and not parts.optimizer.state:
            # Adam creates its moments on its first step: created inside the capture, every replay would
            # re-create (zero) them.
            raise ValueError(
                "GraphedStep needs at least one warm-up step before capture (the optimiser has no state yet)"
            )
        self.parts = parts
        self.warmup_left = warmup_steps
        self.capture = capture
        self.on_fallback = on_fallback or _say_with_warning
        self.graph: Replayable | None = None
        self.batch: StaticBatch | None = None
        self.stats: torch.Tensor | None = None
        self.eager_batches = 0  # batches of another shape, run eagerly
        self.fallback_reason: str | None = None  # set when the graph path failed and the step became eager
        self.side_stream: torch.cuda.Stream | None = None  # the one stream of warm-up and capture
        self._stage = "warm-up"

    @property
    def mode(self) -> str:
        return "cuda graph" if self.fallback_reason is None else "eager (the CUDA graph failed)"

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.fallback_reason is not None:
            return eager_step(self.parts, images, labels)
        if self.graph is not None and self.batch is not None and not self.batch.fits(images, labels):
            return self._eager_other_shape(images, labels)
        rng_before = self.parts.generator.get_state()  # host-side copy: no device sync
        try:
            return self._graph_step(images, labels)
        except UserError:
            raise  # an expected error of the step itself, not of the graph machinery
        except Exception as exc:
            self._fall_back(exc, rng_before)
            return eager_step(self.parts, images, labels)

    def _graph_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            assert self.batch is not None and self.stats is not None
            self._stage = "replay"
            self.batch.load(images, labels)
            self.graph.replay()
            return self.stats.clone()  # the next replay overwrites the graph's own output
        if self.warmup_left > 0:
            self._stage = "warm-up"
            self.warmup_left -= 1
            return self._warm_up(images, labels)
        return self._capture_then_replay(images, labels)

    def _side(self, device: torch.device) -> torch.cuda.Stream | None:
        """The side stream warm-up and capture share (created once; None off CUDA, where only tests go)."""
        if self.side_stream is None and device.type == "cuda":
            self.side_stream = torch.cuda.Stream(device=device)
        return self.side_stream

    def _warm_up(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        side = self._side(images.device)
        if side is None:
            return eager_step(self.parts, images, labels)
        current = torch.cuda.current_stream(images.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            stats = eager_step(self.parts, images, labels)
        current.wait_stream(side)
        return stats

    def _capture_then_replay(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._stage = "capture"
        batch = StaticBatch(images, labels)
        # Gradients must not exist at capture: backward then allocates them inside the graph's memory
        # pool and every replay overwrites them (rather than accumulating into stale ones).
        self.parts.optimizer.zero_grad(set_to_none=True)
        graph, stats = self.capture(
            lambda: _update(self.parts, batch.images, batch.labels), self.parts.generator, self._side(images.device)
        )
        self._stage = "replay"
        graph.replay()  # capture records without running: this replay trains on the capture batch
        self.graph, self.batch, self.stats = graph, batch, stats
        return stats.clone()

    def _fall_back(self, exc: BaseException, rng_before: torch.Tensor) -> None:
        """Drop the graph and put the optimiser and generator where the eager step expects them."""
        first_line = (str(exc).strip().splitlines() or [""])[0]
        self.fallback_reason = (
            f"the CUDA graph {self._stage} failed ({type(exc).__name__}: {first_line}); "
            "training continues with the eager step"
        )
        self.graph = self.batch = self.stats = None
        if self.side_stream is not None:  # a failed warm-up may still have work queued on the side stream
            torch.cuda.current_stream(self.side_stream.device).wait_stream(self.side_stream)
        self.parts.optimizer.zero_grad(set_to_none=True)  # gradients a capture left in the graph's pool
        set_optimizer_for_graphs(self.parts.optimizer, capturable=False)
        self.parts.generator.set_state(rng_before)  # the eager step draws what it would have drawn
        self.on_fallback(self.fallback_reason)

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
    it: an eager run's checkpoint resumes under graphs and a graph run's resumes eagerly (e.g. on a CPU);
    and by `GraphedStep` when it falls back to the eager step.
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


def build_step(
    parts: StepParts,
    use_graphs: bool,
    on_fallback: Callable[[str], None] | None = None,
) -> EagerStep | GraphedStep:
    """The step runner for one training phase (build a new one when trainable parameters change).

    on_fallback: told once, in one line, if the graph fails and the runner continues eagerly.
    """
    return GraphedStep(parts, on_fallback=on_fallback) if use_graphs else EagerStep(parts)


__all__ = [
    "EagerStep",
    "GraphedStep",
    "StaticBatch",
    "StepParts",
    "build_step",
    "capture_cuda_graph",
    "eager_step",
    "graph_blocker",
    "learning_rate",
    "set_optimizer_for_graphs",
]
