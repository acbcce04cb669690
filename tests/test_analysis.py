"""The paper's analyses and figures as commands: geometry logged while training, metrics.png, `retrieval plot`,
`retrieval compare` and `retrieval evaluate --analysis`, checked against direct NumPy computations of the
paper's definitions on tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from retrieval.cli import app
from retrieval.config import preset
from retrieval.metrics import embedding_geometry
from training.logging import read_metrics
from training.trainer import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _direct_alignment(emb: np.ndarray, labels: np.ndarray) -> float:
    n = len(labels)
    d = [((emb[i].astype(np.float64) - emb[j]) ** 2).sum() for i in range(n) for j in range(i + 1, n)
         if labels[i] == labels[j]]
    return float(np.mean(d))


def _direct_uniformity(emb: np.ndarray) -> float:
    x = emb.astype(np.float64)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)[np.triu_indices(len(x), k=1)]
    return float(np.log(np.mean(np.exp(-2.0 * d2))))


def _direct_utilization(test: np.ndarray, train_emb: np.ndarray) -> float:
    d2 = ((test[:, None, :].astype(np.float64) - train_emb[None, :, :]) ** 2).sum(-1)
    return float(d2.min(axis=1).mean())


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_embedding_geometry_is_the_papers_definitions() -> None:
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((60, 6))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, 7, 60)
    geo = embedding_geometry(emb, labels)
    assert geo["alignment"] == pytest.approx(_direct_alignment(emb, labels), rel=1e-9)
    assert geo["uniformity"] == pytest.approx(_direct_uniformity(emb), rel=1e-9)
    assert "alignment" not in embedding_geometry(emb[:5], np.arange(5))  # no same-class pair


def _tiny(root: Path, out: Path, mixup: str):  # noqa: ANN202 - RunConfig
    cfg = preset("demo", "ms", mixup)
    cfg.data.root, cfg.data.image_size, cfg.data.resize_size = str(root), 32, 32
    cfg.data.batch_size, cfg.data.images_per_class, cfg.data.workers = 16, 4, 0
    cfg.model.arch, cfg.model.embedding_size, cfg.model.pretrained = "resnet18", 16, "none"
    t = cfg.train
    t.epochs, t.max_steps_per_epoch, t.warmup_epochs, t.eval_every = 2, 2, 0, 1
    t.lr, t.device, t.out_dir, t.seed = 1e-3, "cpu", str(out), 3
    return cfg


@pytest.fixture(scope="module")
def two_runs(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A baseline and a feature-Metrix run of the same (tiny) cell, 2 epochs each, evaluated every epoch."""
    base = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, mixup in (("baseline", "none"), ("metrix", "feature")):
        train(_tiny(demo_root, base / name, mixup), progress=False, evaluate_before=True)
        runs[name] = base / name
    return runs


@pytest.mark.slow
def test_training_logs_geometry_and_draws_metrics_png(two_runs: dict[str, Path]) -> None:
    for run in two_runs.values():
        rows = read_metrics(run)
        evaluated = [r for r in rows if "R@1" in r]
        assert [r["epoch"] for r in evaluated] == [0, 1, 2]
        assert all(isinstance(r["alignment"], float) and isinstance(r["uniformity"], float) for r in evaluated)
        assert all(0.0 <= r["alignment"] <= 4.0 and -4.0 <= r["uniformity"] <= 0.0 for r in evaluated)
        width, height = _png_size(run / "metrics.png")
        assert width >= 800 and height >= 600
        assert "alignment" in (run / "metrics.csv").read_text().splitlines()[0]


@pytest.mark.slow
def test_logged_geometry_equals_the_definitions_on_the_checkpoints_test_embeddings(
        demo_root: Path, two_runs: dict[str, Path]) -> None:
    from retrieval.checkpoint import embedder_from_checkpoint
    from retrieval.data import load_dataset
    from retrieval.embed.torch_backend import TorchBackend

    run = two_runs["metrix"]
    model, cfg, prep, _ = embedder_from_checkpoint(run / "last.pt")
    dataset = load_dataset("demo", demo_root)
    queries, gallery = dataset.eval_splits()
    backend = TorchBackend(model, prep, device="cpu", amp_dtype=None)  # what training evaluation embeds with
    emb = np.concatenate([backend.embed_paths(queries.paths, progress=False),
                          backend.embed_paths(gallery.paths, progress=False)])
    labels = np.concatenate([queries.labels, gallery.labels])
    last = read_metrics(run)[-1]
    assert last["alignment"] == pytest.approx(_direct_alignment(emb, labels), rel=1e-4)
    assert last["uniformity"] == pytest.approx(_direct_uniformity(emb), rel=1e-4)


@pytest.mark.slow
def test_plot_command_overlays_runs(two_runs: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "figs" / "compare.png"
    result = runner.invoke(app, ["plot", str(two_runs["baseline"]), str(two_runs["metrix"]), "--out", str(out),
                                 "--labels", "baseline,Metrix", "--title", "demo"])
    assert result.exit_code == 0, result.output
    assert _png_size(out)[0] >= 800
    bad = runner.invoke(app, ["plot", str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert bad.exit_code == 1 and "metrics.jsonl" in bad.output and not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_compare_prints_the_gain_table_from_the_two_runs(two_runs: dict[str, Path]) -> None:
    runner = CliRunner(env={"COLUMNS": "300"})
    result = runner.invoke(app, ["compare", str(two_runs["baseline"]), str(two_runs["metrix"]), "--json"])
    assert result.exit_code == 0, result.output
    table = json.loads(result.output)
    base, mix = read_metrics(two_runs["baseline"])[-1], read_metrics(two_runs["metrix"])[-1]
    assert table["columns"][:2] == ["R@1", "R@10"] and "MAP@R" in table["columns"]
    for key in table["columns"]:
        assert table["baseline"][key] == pytest.approx(100 * base[key])
        assert table["gain"][key] == pytest.approx(100 * (mix[key] - base[key]))
    assert table["epochs"] == {"baseline": 2, "metrix": 2}
    best = json.loads(runner.invoke(app, ["compare", str(two_runs["baseline"]), str(two_runs["metrix"]),
                                          "--epoch", "best", "--json"]).output)
    trained = [r for r in read_metrics(two_runs["metrix"]) if r.get("phase") != "untrained"]
    assert best["metrix"]["R@1"] == pytest.approx(100 * max(r["R@1"] for r in trained))
    text = runner.invoke(app, ["compare", str(two_runs["baseline"]), str(two_runs["metrix"])]).output
    assert "gain (points)" in text and "Metrix (feature)" in text


@pytest.mark.slow
def test_evaluate_analysis_reports_geometry_and_utilization(two_runs: dict[str, Path], demo_root: Path,
                                                             tmp_path: Path) -> None:
    from retrieval.checkpoint import embedder_from_checkpoint
    from retrieval.data import load_dataset
    from retrieval.search.searcher import Searcher
    from training.analysis import embed_training_split, index_test_embeddings

    runner = CliRunner()
    ckpt = two_runs["metrix"] / "last.pt"
    index = tmp_path / "index"
    built = runner.invoke(app, ["index", "--dataset", "demo", "--data-root", str(demo_root), "--checkpoint", str(ckpt),
                                "--out", str(index), "--device", "cpu"])
    assert built.exit_code == 0, built.output
    plain = runner.invoke(app, ["evaluate", "--index", str(index), "--analysis", "--json", "--device", "cpu"])
    assert plain.exit_code == 0, plain.output
    geometry = json.loads(plain.output)["analysis"]
    assert "utilization clean" not in geometry  # needs the checkpoint
    result = runner.invoke(app, ["evaluate", "--index", str(index), "--analysis", "--checkpoint", str(ckpt),
                                 "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["analysis"]

    searcher = Searcher.open(index, device="cpu")
    test_emb, test_labels = index_test_embeddings(searcher)
    assert report["test embeddings"] == len(test_emb) == 480
    assert report["alignment"] == pytest.approx(_direct_alignment(test_emb, test_labels), rel=1e-4)
    assert report["uniformity"] == pytest.approx(_direct_uniformity(test_emb), rel=1e-4)
    assert geometry["alignment"] == report["alignment"]

    model, cfg, prep, _ = embedder_from_checkpoint(ckpt)
    train_split = load_dataset("demo", demo_root).train
    emb = embed_training_split(model, train_split, level="feature", image_size=prep.image_size,
                               resize_size=prep.resize_size, alpha=cfg.mixup.alpha, batch_size=64, seed=0)
    assert report["training images"] == len(emb.clean) == len(train_split) and report["mix level"] == "feature"
    assert len(emb.mixed) == len(train_split)  # one mix per image (every batch holds other classes)
    np.testing.assert_allclose(np.linalg.norm(emb.mixed, axis=1), 1.0, rtol=1e-5)
    clean_u = _direct_utilization(test_emb, emb.clean)
    assert report["utilization clean"] == pytest.approx(clean_u, rel=1e-3)
    assert report["utilization mixed"] == pytest.approx(_direct_utilization(test_emb, emb.mixed), rel=1e-3)
    both = _direct_utilization(test_emb, np.concatenate([emb.clean, emb.mixed]))
    assert report["utilization clean+mixed"] == pytest.approx(both, rel=1e-3)
    assert report["utilization clean+mixed"] <= min(report["utilization clean"], report["utilization mixed"]) + 1e-6
    table = runner.invoke(app, ["evaluate", "--index", str(index), "--analysis", "--checkpoint", str(ckpt),
                                "--device", "cpu"], env={"COLUMNS": "300"})
    assert table.exit_code == 0 and "utilization clean+mixed" in table.output


def test_training_mixes_pair_images_of_different_classes() -> None:
    from training.analysis import other_class_partners

    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        partner, found = other_class_partners(labels, gen)
        assert found.all() and (labels[partner] != labels).all()
    partner, found = other_class_partners(torch.zeros(4, dtype=torch.long), gen)
    assert not found.any()
