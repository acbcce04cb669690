"""The training step: eager runner, the building blocks of the whole-step CUDA graph, and (on CUDA) graph replay.

CPU: static buffers, the device-tensor learning rate filled in place by the scheduler, the optimiser's
conversion between graph and eager form (resume across them), the reasons a graph is refused, and the
fall-back to the eager step when a capture or replay fails (failures injected through `capture`).
CUDA only (skipped on CPU; run by benchmarks/gpu_checks.sh): replay equals eager, fresh draws per replay,
no host sync, capturable Adam equals eager Adam, a smaller batch falls back to eager, a capture that breaks
the rules falls back to eager, capture beside a thread allocating pinned memory, one side stream.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn as nn

from retrieval.config import LossConfig, MixupConfig, ModelConfig, RunConfig
from retrieval.model import Embedder
from training.objective import build_objective
from training.step import (
    EagerStep, GraphedStep, StaticBatch, StepParts, capture_cuda_graph, eager_step, graph_blocker, learning_rate,
    set_optimizer_for_graphs,
)

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run benchmarks/gpu_checks.sh)")


def _tiny_adam(params, lr, **kw) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, weight_decay=1e-4, **kw)


def _regression_problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    return model, x, y


def _train(model: nn.Module, opt: torch.optim.Optimizer, sched, x, y, steps: int, per_epoch: int = 2) -> None:
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if (i + 1) % per_epoch == 0:
            sched.step()


# ------------------------------------------------------------------------------------------------
# CPU: building blocks
# ------------------------------------------------------------------------------------------------


def test_static_batch_keeps_its_storage_and_layout_and_refuses_other_shapes() -> None:
    first = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    batch = StaticBatch(first, torch.arange(4))
    ptrs = (batch.images.data_ptr(), batch.labels.data_ptr())
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    nxt = torch.randn(4, 3, 8, 8)
    batch.load(nxt, torch.tensor([3, 2, 1, 0]))
    assert (batch.images.data_ptr(), batch.labels.data_ptr()) == ptrs  # a replay reads the same memory
    assert torch.equal(batch.images, nxt) and batch.labels.tolist() == [3, 2, 1, 0]
    assert not batch.fits(torch.randn(3, 3, 8, 8), torch.arange(3))
    with pytest.raises(ValueError, match="does not fit"):
        batch.load(torch.randn(3, 3, 8, 8), torch.arange(3))


def test_scheduler_fills_a_tensor_learning_rate_in_place_and_trains_like_a_float_one() -> None:
    """The graph reads lr from a fixed tensor: StepLR must update that tensor, not replace it."""
    model_f, x, y = _regression_problem()
    model_t = copy.deepcopy(model_f)
    opt_f = _tiny_adam(model_f.parameters(), 1e-2)
    opt_t = _tiny_adam(model_t.parameters(), torch.tensor(1e-2), foreach=False)
    lr_tensor = opt_t.param_groups[0]["lr"]
    sched_f = torch.optim.lr_scheduler.StepLR(opt_f, step_size=1, gamma=0.5)
    sched_t = torch.optim.lr_scheduler.StepLR(opt_t, step_size=1, gamma=0.5)
    _train(model_f, opt_f, sched_f, x, y, steps=8)
    _train(model_t, opt_t, sched_t, x, y, steps=8)
    assert opt_t.param_groups[0]["lr"] is lr_tensor
    assert learning_rate(opt_t) == pytest.approx(1e-2 * 0.5**4)
    assert learning_rate(opt_f) == pytest.approx(learning_rate(opt_t))
    for a, b in zip(model_f.parameters(), model_t.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_graph_form_optimiser_resumes_eagerly_and_continues_like_an_uninterrupted_run(tmp_path) -> None:
    """A checkpoint written under graphs (device-tensor lr, step tensors) resumes on a CPU without graphs."""
    model_ref, x, y = _regression_problem()
    model_a = copy.deepcopy(model_ref)
    opt_ref = _tiny_adam(model_ref.parameters(), 1e-2)
    sched_ref = torch.optim.lr_scheduler.StepLR(opt_ref, step_size=1, gamma=0.5)
    _train(model_ref, opt_ref, sched_ref, x, y, steps=8)

    opt_a = _tiny_adam(model_a.parameters(), torch.tensor(1e-2), foreach=False)  # graph form minus capturable
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=1, gamma=0.5)
    _train(model_a, opt_a, sched_a, x, y, steps=4)
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "sched": sched_a.state_dict()},
               tmp_path / "ckpt.pt")

    payload = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    model_b, _, _ = _regression_problem(seed=1)
    model_b.load_state_dict(payload["model"])
    opt_b = _tiny_adam(model_b.parameters(), 1e-2)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=1, gamma=0.5)
    opt_b.load_state_dict(payload["opt"])
    sched_b.load_state_dict(payload["sched"])
    set_optimizer_for_graphs(opt_b, capturable=False)
    assert isinstance(opt_b.param_groups[0]["lr"], float)
    assert all(s["step"].device.type == "cpu" for s in opt_b.state.values())
    _train(model_b, opt_b, sched_b, x, y, steps=4)
    assert learning_rate(opt_b) == pytest.approx(learning_rate(opt_ref))
    for a, b in zip(model_ref.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_graph_blocker_names_the_reason_a_step_runs_eagerly(monkeypatch) -> None:
    cpu = torch.device("cpu")
    assert "CUDA device" in graph_blocker(cpu, distributed=False, amp_dtype=None, compile_model=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda")
    assert graph_blocker(cuda, distributed=False, amp_dtype=torch.bfloat16, compile_model=False) is None
    assert "DistributedDataParallel" in graph_blocker(cuda, distributed=True, amp_dtype=None, compile_model=False)
    assert "fp16" in graph_blocker(cuda, distributed=False, amp_dtype=torch.float16, compile_model=False)
    assert "compile" in graph_blocker(cuda, distributed=False, amp_dtype=None, compile_model=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert "deterministic" in graph_blocker(cuda, distributed=False, amp_dtype=None, compile_model=False)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_graphed_step_refuses_an_optimiser_not_prepared_for_capture(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    parts = _metrix_parts(torch.device("cpu"), level="embedding")
    with pytest.raises(ValueError, match="set_optimizer_for_graphs"):
        GraphedStep(parts)


def test_graphed_step_needs_a_warm_up_step_before_the_optimiser_has_state(monkeypatch) -> None:
    """Adam creates its moments on its first step; created inside a capture, every replay would zero them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    parts = _metrix_parts(torch.device("cpu"), level="embedding", capturable=True)
    with pytest.raises(ValueError, match="warm-up"):
        GraphedStep(parts, warmup_steps=0)
    GraphedStep(parts, warmup_steps=1)


def _capture_fails(record, generator, stream):
    raise RuntimeError("CUDA error: operation not permitted when stream is capturing\n"
                       "CUDA kernel errors might be asynchronously reported at some other API call")


class _GraphThatFailsToReplay:
    def replay(self) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCompile with TORCH_USE_CUDA_DSA")


def _capture_then_replay_fails(record, generator, stream):
    return _GraphThatFailsToReplay(), torch.zeros(3)


@pytest.mark.parametrize("stage,capture", [("capture", _capture_fails), ("replay", _capture_then_replay_fails)])
def test_a_graph_that_fails_gives_way_to_the_eager_step_saying_why_once(monkeypatch, stage, capture) -> None:
    """Training goes on with the eager step's losses and weights; the optimiser is back in eager form."""
    cpu = torch.device("cpu")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # bit-identical CPU backward passes
    try:
        graphed = _metrix_parts(cpu, level="embedding")
        eager = _metrix_parts(cpu, level="embedding")
        batches = [_batch(cpu, seed=s) for s in range(3)]
        for parts in (graphed, eager):  # Adam's state exists, so the capture may come first
            eager_step(parts, *batches[0])
            set_optimizer_for_graphs(parts.optimizer, capturable=True)  # lr becomes a float32 tensor
        set_optimizer_for_graphs(eager.optimizer, capturable=False)  # the reference: the same lr, eagerly
        said: list[str] = []
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: True)
            runner = GraphedStep(graphed, warmup_steps=0, capture=capture, on_fallback=said.append)
        for images, labels in batches[1:]:
            assert torch.equal(runner(images, labels), eager_step(eager, images, labels))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert len(said) == 1 and said[0] == runner.fallback_reason, said
    assert f"CUDA graph {stage} failed (RuntimeError: CUDA error" in said[0] and "\n" not in said[0]
    assert said[0].endswith("training continues with the eager step")
    assert runner.graph is None and runner.mode.startswith("eager")
    for group in graphed.optimizer.param_groups:
        assert group["capturable"] is False and isinstance(group["lr"], float)
    assert all(state["step"].device.type == "cpu" for state in graphed.optimizer.state.values())
    assert torch.equal(graphed.generator.get_state(), eager.generator.get_state())
    for a, b in zip(graphed.params(), eager.params()):
        assert torch.equal(a, b)


def test_eager_step_equals_the_written_out_recipe_step() -> None:
    """forward -> clean + w * mixed -> backward -> clip by value -> Adam, with the mixing generator's draws."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # else CPU convolution backward sums in a thread-dependent order
    try:
        parts = _metrix_parts(torch.device("cpu"), level="feature")
        ref = _metrix_parts(torch.device("cpu"), level="feature")
        images, labels = _batch(torch.device("cpu"))
        runner = EagerStep(parts)
        for _ in range(2):
            stats = runner(images, labels)
            ref.optimizer.zero_grad(set_to_none=True)
            out = ref.objective(ref.model, images, labels, generator=ref.generator)
            out.loss.backward()
            torch.nn.utils.clip_grad_value_(ref.params(), ref.grad_clip)
            ref.optimizer.step()
            assert torch.equal(stats, torch.stack([out.loss, out.clean, out.mixed]).detach().float())
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(parts.model.parameters(), ref.model.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Shared fixtures for the step on a tiny embedder
# ------------------------------------------------------------------------------------------------


def _metrix_parts(device: torch.device, level: str, capturable: bool = False, lr: float = 1e-3,
                  amp_dtype: torch.dtype | None = None) -> StepParts:
    torch.manual_seed(0)
    cfg = RunConfig(loss=LossConfig(name="ms"), mixup=MixupConfig(level=level, pair_kind="both"))
    model = Embedder(ModelConfig(arch="resnet18", embedding_size=16, pretrained="none")).to(device)
    objective = build_objective(cfg, num_classes=4, embedding_size=16).to(device)
    optimizer = torch.optim.Adam(list(model.parameters()) + list(objective.parameters()), lr=lr, weight_decay=1e-4)
    if capturable:
        set_optimizer_for_graphs(optimizer, capturable=True)
    generator = torch.Generator(device=device).manual_seed(7)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    return StepParts(model, objective, optimizer, scaler, generator, amp_dtype, grad_clip=10.0)


def _batch(device: torch.device, size: int = 8, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 32, 32, generator=g).to(device)
    labels = torch.arange(size // 2).repeat_interleave(2).to(device)
    return images, labels


# ------------------------------------------------------------------------------------------------
# CUDA only
# ------------------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("level", ["none", "embedding", "feature", "input"])
def test_graph_replay_equals_eager_loss_and_weights(level: str) -> None:
    device = torch.device("cuda")
    eager = _metrix_parts(device, level, capturable=True)
    graphed = _metrix_parts(device, level, capturable=True)
    graph_runner = GraphedStep(graphed, warmup_steps=2)
    batches = [_batch(device, seed=s) for s in range(6)]
    for images, labels in batches:
        a = eager_step(eager, images, labels)
        b = graph_runner(images, labels)
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-4)
    assert graph_runner.graph is not None
    for p, q in zip(eager.model.parameters(), graphed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-3, atol=2e-4)
    assert eager.generator.get_offset() == graphed.generator.get_offset()


@cuda_only
def test_every_replay_draws_fresh_pairs_and_lam() -> None:
    device = torch.device("cuda")
    parts = _metrix_parts(device, "embedding", capturable=True)
    runner = GraphedStep(parts, warmup_steps=1)
    images, labels = _batch(device)
    runner(images, labels)
    runner(images, labels)  # captured
    for group in parts.optimizer.param_groups:
        group["lr"].fill_(0.0)  # weights frozen: only the mixing draws can change the mixed loss
    mixed = [runner(images, labels)[2].item() for _ in range(4)]
    assert len(set(mixed)) == 4, mixed


@cuda_only
def test_graph_replay_never_synchronises_with_the_host() -> None:
    device = torch.device("cuda")
    parts = _metrix_parts(device, "feature", capturable=True, amp_dtype=torch.bfloat16)
    runner = GraphedStep(parts, warmup_steps=2)
    images, labels = _batch(device)
    for _ in range(3):
        runner(images, labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            runner(images, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda_only
def test_capturable_adam_state_equals_eager_adam_after_steps() -> None:
    device = torch.device("cuda")
    eager = _metrix_parts(device, "embedding", capturable=False)
    capt = _metrix_parts(device, "embedding", capturable=True)
    sched_e = torch.optim.lr_scheduler.StepLR(eager.optimizer, step_size=2, gamma=0.5)
    sched_c = torch.optim.lr_scheduler.StepLR(capt.optimizer, step_size=2, gamma=0.5)
    for s in range(5):
        images, labels = _batch(device, seed=s)
        eager_step(eager, images, labels)
        eager_step(capt, images, labels)
        sched_e.step()
        sched_c.step()
    for p_e, p_c in zip(eager.params(), capt.params()):
        st_e, st_c = eager.optimizer.state[p_e], capt.optimizer.state[p_c]
        assert float(st_e["step"]) == float(st_c["step"])
        torch.testing.assert_close(st_e["exp_avg"], st_c["exp_avg"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(st_e["exp_avg_sq"], st_c["exp_avg_sq"], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(p_e, p_c, rtol=1e-4, atol=1e-6)


@cuda_only
def test_a_smaller_last_batch_runs_eagerly_and_replays_continue() -> None:
    device = torch.device("cuda")
    eager = _metrix_parts(device, "embedding", capturable=True)
    graphed = _metrix_parts(device, "embedding", capturable=True)
    runner = GraphedStep(graphed, warmup_steps=1)
    sizes = [8, 8, 4, 8]
    for i, size in enumerate(sizes):
        images, labels = _batch(device, size=size, seed=i)
        torch.testing.assert_close(eager_step(eager, images, labels), runner(images, labels), rtol=2e-3, atol=2e-4)
    assert runner.eager_batches == 1
    for p, q in zip(eager.model.parameters(), graphed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-3, atol=2e-4)


class _SyncsOnTheHost(nn.Module):
    """The objective plus a host read of the loss: harmless eagerly, forbidden inside a capture."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, model, images, labels, generator=None):
        out = self.inner(model, images, labels, generator=generator)
        out.loss.item()
        return out


@cuda_only
def test_a_capture_that_breaks_the_graph_rules_falls_back_to_eager_training() -> None:
    device = torch.device("cuda")
    eager = _metrix_parts(device, "feature", capturable=False)
    graphed = _metrix_parts(device, "feature", capturable=True)
    graphed.objective = _SyncsOnTheHost(graphed.objective)
    said: list[str] = []
    runner = GraphedStep(graphed, warmup_steps=1, on_fallback=said.append)
    for s in range(4):
        images, labels = _batch(device, seed=s)
        torch.testing.assert_close(runner(images, labels), eager_step(eager, images, labels), rtol=2e-3, atol=2e-4)
    assert len(said) == 1 and "capture failed" in said[0], said
    assert runner.graph is None
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # the failed capture left no stream set
    for p, q in zip(eager.model.parameters(), graphed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-3, atol=2e-4)
    assert eager.generator.get_offset() == graphed.generator.get_offset()


@cuda_only
def test_capture_succeeds_while_another_thread_allocates_pinned_memory() -> None:
    """The loaders' pin-memory and producer threads allocate page-locked memory during capture."""
    device = torch.device("cuda")
    parts = _metrix_parts(device, "feature", capturable=True, amp_dtype=torch.bfloat16)
    said: list[str] = []
    runner = GraphedStep(parts, warmup_steps=1, on_fallback=said.append)
    images, labels = _batch(device)
    runner(images, labels)  # warm-up
    stop, held = threading.Event(), []

    def allocate() -> None:
        while not stop.is_set() and len(held) < 2048:  # held blocks: each allocation is a new cudaHostAlloc
            held.append(torch.empty(1 << 18, dtype=torch.uint8, pin_memory=True))

    thread = threading.Thread(target=allocate, daemon=True)
    thread.start()
    try:
        for _ in range(3):
            runner(images, labels)  # capture, then replays
    finally:
        stop.set()
        thread.join()
    assert said == [] and runner.graph is not None and held


@cuda_only
def test_warm_up_and_capture_share_one_side_stream() -> None:
    device = torch.device("cuda")
    parts = _metrix_parts(device, "embedding", capturable=True)
    capture_streams = []

    def capture(record, generator, stream):
        capture_streams.append(stream)
        return capture_cuda_graph(record, generator, stream)

    runner = GraphedStep(parts, warmup_steps=2, capture=capture)
    images, labels = _batch(device)
    runner(images, labels)
    side = runner.side_stream
    runner(images, labels)
    assert runner.side_stream is side and side is not None and side != torch.cuda.current_stream()
    runner(images, labels)
    assert capture_streams == [side] and runner.graph is not None and runner.fallback_reason is None
