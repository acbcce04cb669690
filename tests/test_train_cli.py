"""`retrieval train`: presets, config files and flags resolve as documented; a tiny run trains and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from retrieval.cli import app
from retrieval.config import preset

runner = CliRunner()


def _printed_config(*args: str) -> dict:
    result = runner.invoke(app, ["train", *args, "--print-config"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_print_config_starts_from_the_paper_preset() -> None:
    cfg = _printed_config("--dataset", "sop", "--loss", "pa", "--mixup", "embedding")
    assert cfg == {**preset("sop", "pa", "embedding").to_dict(),
                   "train": {**preset("sop", "pa", "embedding").to_dict()["train"], "out_dir": "runs/sop-pa-embedding"}}


def test_flags_override_the_config_file_which_overrides_the_preset(tmp_path: Path) -> None:
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"train": {"epochs": 7, "lr": 0.5}, "mixup": {"weight": 0.2},
                                       "data": {"dataset": "cars"}}))  # fmt: skip
    cfg = _printed_config(
        "--config", str(config_file), "--loss", "contrastive", "--lr", "0.002", "--no-freeze-bn", "--lam-per", "pair",
        "--max-pairs", "500", "--batch-size", "60", "--arch", "resnet18", "--set", "loss.neg_margin=0.7",
        "--set", "data.cache=none", "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert cfg["data"]["dataset"] == "cars" and cfg["loss"]["name"] == "contrastive"
    assert cfg["train"]["epochs"] == 7  # from the file
    assert cfg["train"]["lr"] == 0.002  # the flag beats the file
    assert cfg["train"]["freeze_bn"] is False and cfg["train"]["lr_gamma"] == 0.1  # flag; Cars contrastive preset
    assert cfg["mixup"] == {**cfg["mixup"], "weight": 0.2, "lam_per": "pair", "max_pairs": 500, "level": "feature"}
    assert cfg["loss"]["neg_margin"] == 0.7 and cfg["data"]["cache"] is None
    assert cfg["data"]["batch_size"] == 60 and cfg["model"]["arch"] == "resnet18"


@pytest.mark.parametrize(
    "content, message",
    [
        ({"train": {"epochz": 3}}, "unknown train key"),
        ({"optimiser": {"lr": 1}}, "unknown section"),
        ({"loss": {"name": "triplet"}}, "not one of"),
    ],
)
def test_bad_config_files_fail_clearly(tmp_path: Path, content: dict, message: str) -> None:
    config_file = tmp_path / "bad.json"
    config_file.write_text(json.dumps(content))
    result = runner.invoke(app, ["train", "--dataset", "cub", "--config", str(config_file), "--print-config"])
    assert result.exit_code == 2 and message in result.output


def test_bad_set_values_fail_clearly() -> None:
    result = runner.invoke(app, ["train", "--dataset", "cub", "--set", "train.epochs=many", "--print-config"])
    assert result.exit_code == 2 and "train.epochs" in result.output
    result = runner.invoke(app, ["train", "--dataset", "imagenet", "--print-config"])
    assert result.exit_code == 2 and "cub" in result.output


TINY_FLAGS = [
    "--dataset", "demo", "--loss", "ms", "--mixup", "embedding", "--arch", "resnet18", "--pretrained", "none",
    "--embedding-size", "16", "--image-size", "32", "--resize-size", "32", "--batch-size", "16",
    "--images-per-class", "4", "--warmup-epochs", "0", "--max-steps-per-epoch", "2", "--workers", "0",
    "--device", "cpu", "--lr-step", "1", "--quiet",
]  # fmt: skip


@pytest.mark.slow
def test_cli_trains_then_resumes_with_more_epochs(demo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = runner.invoke(app, ["train", *TINY_FLAGS, "--data-root", str(demo_root), "--epochs", "1", "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert "last epoch (  1)" in first.output and "best epoch" in first.output and "R@1" in first.output
    assert {"last.pt", "best.pt", "metrics.jsonl", "metrics.csv", "config.json", "summary.json"} <= {
        p.name for p in out.iterdir()
    }
    # resuming takes the config from the checkpoint; --epochs extends the run
    second = runner.invoke(app, ["train", "--resume", "last", "--out", str(out), "--epochs", "2", "--quiet"])
    assert second.exit_code == 0, second.output
    payload = torch.load(out / "last.pt", weights_only=True)
    assert payload["epoch"] == 2 and payload["config"]["mixup"]["level"] == "embedding"
    assert payload["config"]["train"]["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_from_a_missing_checkpoint_fails_clearly(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["train", "--resume", str(tmp_path / "nothing.pt")])
    assert missing.exit_code == 2 and "checkpoint not found" in missing.output
