"""The catalog of losses and mixing levels: every implementation covers exactly its entries, and the command
line, the config presets and the objective read their choices from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from retrieval.config_resolve import CHOICES
from retrieval.config import paper_train_preset
from retrieval.errors import UsageError
from training import catalog


def test_each_loss_of_the_catalog_has_exactly_one_builder() -> None:
    from training.losses import LOSS_BUILDERS

    assert set(LOSS_BUILDERS) == set(catalog.loss_names())


def test_each_level_of_the_catalog_has_exactly_one_objective_forward() -> None:
    from training.objective import LEVEL_TERMS

    assert set(LEVEL_TERMS) == set(catalog.level_names())


def test_each_mixing_level_has_exactly_one_analysis_mix() -> None:
    from training.analysis import TRAINING_MIXES

    assert set(TRAINING_MIXES) == set(catalog.mixing_level_names()) == set(catalog.level_names()) - {"none"}


def test_the_objective_says_whether_its_level_needs_the_global_batch() -> None:
    from retrieval.config import preset
    from training.objective import build_objective

    for level in catalog.LEVELS:
        objective = build_objective(preset("demo", "ms", level.name), 4, 8)
        assert objective.gathers_global_batch is level.global_batch
    assert [lv.name for lv in catalog.LEVELS if not lv.global_batch] == ["input"]  # images stay on their rank


def test_defaults_and_names_are_catalog_entries() -> None:
    assert catalog.DEFAULT_LOSS in catalog.loss_names() and catalog.DEFAULT_LEVEL in catalog.mixing_level_names()
    assert len(set(catalog.loss_names())) == len(catalog.LOSSES) and len(set(catalog.level_names())) == len(catalog.LEVELS)
    assert CHOICES["loss.name"] == catalog.loss_names() and CHOICES["mixup.level"] == catalog.level_names()


def test_every_value_of_the_smaller_settings_is_accepted_and_no_other(tmp_path: Path) -> None:
    """Pair kinds, input pairs, the mixing-ratio mode and amp: the CLI validates against the catalog, and every
    catalog value is one the behaviour accepts."""
    import json

    import torch

    from retrieval.config_resolve import resolve_config
    from retrieval.config import preset
    from retrieval.errors import ConfigError
    from training.metrix import plan_pairs
    from training.objective import build_objective
    from training.trainer import resolve_amp

    assert CHOICES["mixup.pair_kind"] == catalog.PAIR_KINDS and CHOICES["mixup.input_pairs"] == catalog.INPUT_PAIRS
    assert CHOICES["mixup.lam_per"] == catalog.LAMBDA_PER and CHOICES["train.amp"] == catalog.AMP_MODES
    assert CHOICES["data.sampler"] == catalog.SAMPLERS
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    for kind in catalog.PAIR_KINDS:
        for lam_per in catalog.LAMBDA_PER:
            plan_pairs(labels, pair_kind=kind, lam_per=lam_per, generator=torch.Generator().manual_seed(0))
    for mode in catalog.INPUT_PAIRS:
        cfg = preset("demo", "ms", "input")
        cfg.mixup.input_pairs = mode
        build_objective(cfg, 4, 8)
    for amp in catalog.AMP_MODES:
        resolve_amp(amp, torch.device("cpu"))
    from training.batches import build_batch_sampler

    for sampler in catalog.SAMPLERS:
        cfg = preset("demo", "ms", "feature")
        cfg.data.sampler = sampler
        assert len(build_batch_sampler(cfg, tuple(i % 30 for i in range(300)))) > 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mixup": {"pair_kind": "diagonal"}}))
    with pytest.raises(ConfigError, match="diagonal"):
        resolve_config(dataset="demo", loss=None, mixup=None, config_file=bad)


def test_unknown_names_are_refused_with_the_choices() -> None:
    with pytest.raises(UsageError, match="unknown loss 'triplet'; choose contrastive, ms or pa"):
        catalog.loss("triplet")
    with pytest.raises(UsageError, match="unknown mixup level 'pixels'; choose none, input, feature or embedding"):
        catalog.level("pixels")
    with pytest.raises(UsageError, match="unknown loss"):
        paper_train_preset("cub", "triplet")


def test_cli_help_lists_every_choice_with_its_help() -> None:
    from typer.testing import CliRunner

    from retrieval.cli import app

    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).output
    for choice in catalog.LOSSES + catalog.LEVELS:
        assert f"{choice.name} ({choice.help})" in out


def test_the_catalog_and_the_cli_start_without_torch() -> None:
    code = ("import sys, training.catalog, retrieval.config, retrieval.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"


def test_the_cli_starts_without_numpy_or_pillow() -> None:
    """Registering every command (help texts from the registries) loads no array or image library."""
    code = ("import sys, retrieval.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'PIL', 'faiss', 'scipy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"
