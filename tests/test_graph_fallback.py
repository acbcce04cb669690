"""A run asked for CUDA graphs whose graph fails keeps training: eagerly, with the eager losses, saying why
once, and eager in its later phases too.

On this CPU the graph-form step fails for real: the warm-up runs Adam with `capturable=True`, which Adam
refuses on CPU parameters (were it accepted, the capture itself would fail). The run is built as the
trainer builds it, except that the device's graph blocker is lifted so the trainer takes the graph path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retrieval.config import RunConfig, preset
from training.distributed import DistInfo
from training.step import EagerStep, GraphedStep, set_optimizer_for_graphs
from training.trainer import build_run, phase_of, run_epoch, start_phase


def _config(root: Path, cuda_graphs: bool) -> RunConfig:
    """Two epochs of two steps: a warm-up phase (embedding layer and proxies only), then the full model."""
    cfg = preset("demo", "pa", "embedding")
    cfg.data.root, cfg.data.image_size, cfg.data.resize_size = str(root), 32, 32
    cfg.data.batch_size, cfg.data.images_per_class, cfg.data.sampler, cfg.data.workers = 16, 4, "balanced", 0
    cfg.model.arch, cfg.model.embedding_size, cfg.model.pretrained = "resnet18", 16, "none"
    t = cfg.train
    t.epochs, t.max_steps_per_epoch, t.warmup_epochs, t.eval_every = 2, 2, 1, 0
    t.device, t.seed, t.cuda_graphs = "cpu", 3, cuda_graphs
    # A learning rate float32 holds exactly (2**-9): the graph step keeps it as a float32 device tensor until the
    # fall-back, so with e.g. 3e-3 (float32 3.0000000261e-3) the runs would differ by that rounding, amplified by
    # the proxies' 100x rate to ~2e-4 of the loss within an epoch; with an exact rate they are equal.
    t.lr = 2.0**-9
    return cfg


def _train_epochs(cfg: RunConfig, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[object], list[dict]]:
    """What the trainer's epoch loop does; returns what it said, each phase's step runner, and each epoch's row."""
    said: list[str] = []
    run = build_run(cfg, DistInfo(device=torch.device("cpu")), said.append)
    if cfg.train.cuda_graphs:
        run.graph_reason = None  # lift "CUDA graphs need a CUDA device"
    set_optimizer_for_graphs(run.state.optimizer, capturable=run.use_graphs)
    runners: list[object] = []
    rows: list[dict] = []
    phase = None
    for epoch in range(cfg.train.epochs):
        if phase != phase_of(cfg.train, epoch):
            phase = phase_of(cfg.train, epoch)
            with monkeypatch.context() as m:
                m.setattr(torch.cuda, "is_available", lambda: True)  # GraphedStep is built only where CUDA is
                runners.append(start_phase(run, epoch, said.append))
        rows.append(run_epoch(run, runners[-1], epoch, progress=False))
    for group in run.state.optimizer.param_groups:
        assert group.get("capturable", False) is False and isinstance(group["lr"], float)
    assert not run.use_graphs
    return said, runners, rows


@pytest.mark.slow
def test_a_run_whose_graph_fails_trains_on_eagerly_and_says_why_once(demo_root: Path, monkeypatch) -> None:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # bit-identical CPU backward passes
    try:
        said, runners, rows = _train_epochs(_config(demo_root, cuda_graphs=True), monkeypatch)
        eager_said, eager_runners, eager_rows = _train_epochs(_config(demo_root, cuda_graphs=False), monkeypatch)
    finally:
        torch.use_deterministic_algorithms(previous)
    notes = [line for line in said if "CUDA graph" in line]
    assert len(notes) == 1, said
    assert notes[0].startswith("note: the CUDA graph ") and "failed" in notes[0] and "\n" not in notes[0]
    assert notes[0].endswith("training continues with the eager step")
    assert isinstance(runners[0], GraphedStep) and runners[0].fallback_reason is not None
    assert [type(r) for r in runners[1:]] == [EagerStep]  # the full phase does not try the graph again
    assert all(isinstance(r, EagerStep) for r in eager_runners) and not eager_said
    for row, eager_row in zip(rows, eager_rows, strict=True):
        assert row["steps"] == eager_row["steps"] == 2
        # The same steps on the same batches and draws, with the same (float32-exact) learning rate: equal.
        for key in ("loss", "clean", "mixed", "lr"):
            assert row[key] == eager_row[key], (key, row, eager_row)
