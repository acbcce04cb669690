"""Multi-process training on CPU (gloo, 2 processes): the loss sees the global batch, and gradients after
DDP equal the single-process gradients of the same global batch."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from retrieval.config import preset
from retrieval.model import Embedder, freeze_batchnorm

WORLD = 2
GLOBAL_BATCH = 8
# (loss, mixup level): each level's path through the DDP wrapper, each loss's parameters (PA proxies).
CASES = [("ms", "feature"), ("pa", "embedding"), ("contrastive", "none"), ("ms", "input")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case_setup(loss: str, level: str):  # noqa: ANN202
    """Identical model, objective and global batch in every process (seeded)."""
    from training.objective import build_objective

    cfg = preset("demo", loss, level)
    cfg.model.arch, cfg.model.embedding_size, cfg.model.pretrained = "resnet18", 16, "none"
    torch.manual_seed(0)
    model = Embedder(cfg.model)
    freeze_batchnorm(model)  # BN statistics of a shard differ from the global batch's by design
    objective = build_objective(cfg, num_classes=4, embedding_size=16)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # both positives and negatives in each shard
    return cfg, model, objective, images, labels


def _grads(model: torch.nn.Module, objective: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = list(model.named_parameters()) + [(f"objective.{n}", p) for n, p in objective.named_parameters()]
    return {n: p.grad.detach().clone() for n, p in named if p.grad is not None}


def _single_process(loss: str, level: str, images: torch.Tensor | None = None, labels: torch.Tensor | None = None):  # noqa: ANN202
    _, model, objective, all_images, all_labels = _case_setup(loss, level)
    images = all_images if images is None else images
    labels = all_labels if labels is None else labels
    out = objective(model, images, labels, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    return out.loss.detach(), _grads(model, objective)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    from training.distributed import all_gather_no_grad, cleanup_distributed, init_distributed
    from training.distributed import wrap_for_step

    info = init_distributed("cpu")
    try:
        results = {}
        for loss, level in CASES:
            cfg, model, objective, images, labels = _case_setup(loss, level)
            share = GLOBAL_BATCH // WORLD
            local_images, local_labels = images[rank * share:(rank + 1) * share], labels[rank * share:(rank + 1) * share]
            gather = objective.gathers_global_batch
            step_model = wrap_for_step(model, objective, info, gather=gather)
            loss_labels = all_gather_no_grad(local_labels) if gather else local_labels
            out = objective(step_model, local_images, loss_labels, generator=torch.Generator().manual_seed(0))
            out.loss.backward()
            results[f"{loss}-{level}"] = {"loss": out.loss.detach(), "grads": _grads(model, objective)}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        cleanup_distributed(info)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want) and len(want) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("loss, level", [c for c in CASES if c[1] != "input"])
def test_ddp_gradients_equal_single_process_on_the_global_batch(ddp_results: list[dict], loss: str, level: str) -> None:
    want_loss, want_grads = _single_process(loss, level)
    for rank in range(WORLD):
        got = ddp_results[rank][f"{loss}-{level}"]
        torch.testing.assert_close(got["loss"], want_loss, rtol=1e-5, atol=1e-6)  # every rank sees the global batch
        _assert_grads_close(got["grads"], want_grads)
    if loss == "pa":  # proxies are trained and synchronised too
        assert any(name.startswith("objective.") for name in want_grads)


def test_ddp_input_mixup_averages_per_rank_losses(ddp_results: list[dict]) -> None:
    """Input-level mixing stays per rank (a mixed image is embedded where its sources are): DDP gradients
    are the mean of each shard's single-process gradients."""
    _, _, _, images, labels = _case_setup("ms", "input")
    share = GLOBAL_BATCH // WORLD
    shards = [_single_process("ms", "input", images[r * share:(r + 1) * share], labels[r * share:(r + 1) * share])
              for r in range(WORLD)]  # fmt: skip
    want = {n: sum(g[n] for _, g in shards) / WORLD for n in shards[0][1]}
    for rank in range(WORLD):
        got = ddp_results[rank]["ms-input"]
        torch.testing.assert_close(got["loss"], shards[rank][0], rtol=1e-5, atol=1e-6)
        _assert_grads_close(got["grads"], want)


@pytest.mark.slow
def test_two_process_torchrun_training_run_completes(demo_root: Path, tmp_path: Path) -> None:
    retrieval = shutil.which("retrieval", path=str(Path(sys.executable).parent)) or shutil.which("retrieval")
    assert retrieval is not None, "the retrieval console script must be installed (pip install -e .)"
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", retrieval, "train",
        "--dataset", "demo", "--data-root", str(demo_root), "--loss", "ms", "--mixup", "feature",
        "--arch", "resnet18", "--pretrained", "none", "--embedding-size", "16", "--image-size", "32",
        "--resize-size", "32", "--batch-size", "16", "--images-per-class", "4", "--sampler", "balanced",
        "--epochs", "1", "--max-steps-per-epoch", "2", "--warmup-epochs", "0", "--workers", "0",
        "--device", "cpu", "--out", str(out), "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 1, "only rank 0 writes the metrics log"
    assert '"R@1"' in rows[0] and '"steps": 2' in rows[0]
    payload = torch.load(out / "last.pt", weights_only=True)
    assert payload["extra"]["world_size"] == WORLD and len(payload["extra"]["rng"]) == WORLD
    assert proc.stdout.count("run folder:") == 1, "only rank 0 prints the summary"
