"""The catalog of losses and the registry of mixing levels: every implementation covers exactly its entries,
every level trains and analyses on a tiny batch, and the command line, the config presets and the objective
read their choices from them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from retrieval.config_resolve import CHOICES
from retrieval.config import paper_train_preset
from retrieval.errors import UsageError
from training import catalog, levels

if TYPE_CHECKING:
    from retrieval.model import Embedder


def test_each_loss_of_the_catalog_has_exactly_one_builder() -> None:
    from training.losses import LOSS_BUILDERS

    assert set(LOSS_BUILDERS) == set(catalog.loss_names())


@pytest.fixture(scope="module")
def tiny_embedder() -> Embedder:
    import torch

    from retrieval.config import ModelConfig
    from retrieval.model import Embedder

    torch.manual_seed(0)
    return Embedder(ModelConfig(arch="resnet18", pretrained="none", embedding_size=16))


@pytest.mark.parametrize("mixing", levels.LEVELS, ids=lambda lv: lv.name)
def test_every_level_trains_and_analyses_a_tiny_batch(mixing: levels.MixingLevel, tiny_embedder: Embedder) -> None:
    """Each registered level is one object: its help, its objective term (clean loss plus w x its Metrix
    term) and, where it mixes, the mixes the analyses form, each run on a batch of 8 tiny images."""
    import torch

    from retrieval.config import preset
    from training.objective import build_objective

    assert mixing.help and levels.level(mixing.name) is mixing
    model = tiny_embedder.train()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    objective = build_objective(preset("demo", "ms", mixing.name), num_classes=4, embedding_size=16)
    assert objective.gathers_global_batch is mixing.global_batch
    out = objective(model, images, labels, torch.Generator().manual_seed(2))
    assert torch.isfinite(out.loss) and out.clean.item() > 0
    assert (out.mixed.item() > 0) is mixing.mixes
    assert out.loss.item() == pytest.approx(out.clean.item() + objective.weight * out.mixed.item(), rel=1e-6)
    if not mixing.mixes:
        with pytest.raises(UsageError, match="forms no mixes"):
            mixing.analysis_mixes(model, images, images, images, objective.plan(labels))
        return
    model.eval()
    with torch.no_grad():
        fmap = model.trunk(images)
        emb = model.head(fmap)
        targets = objective.plan(labels, torch.Generator().manual_seed(3))
        mixed = mixing.analysis_mixes(model, images, fmap, emb, targets)
    assert mixed.shape == (len(targets.first), 16) and len(targets.first) > 0
    assert torch.allclose(mixed.norm(dim=1), torch.ones(len(mixed)), atol=1e-5)  # embeddings, L2-normalised


def test_only_the_input_level_keeps_to_its_rank_and_only_the_baseline_forms_no_mixes() -> None:
    assert [lv.name for lv in levels.LEVELS if not lv.global_batch] == ["input"]  # images stay on their rank
    assert [lv.name for lv in levels.LEVELS if not lv.mixes] == ["none"]
    assert levels.mixing_level_names() == ("input", "feature", "embedding")


def test_defaults_and_names_are_catalog_entries() -> None:
    assert catalog.DEFAULT_LOSS in catalog.loss_names() and levels.DEFAULT_LEVEL in levels.mixing_level_names()
    assert len(set(catalog.loss_names())) == len(catalog.LOSSES)
    assert len(set(levels.level_names())) == len(levels.LEVELS)
    assert CHOICES["loss.name"] == catalog.loss_names() and CHOICES["mixup.level"] == levels.level_names()


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
        levels.level("pixels")
    with pytest.raises(UsageError, match="unknown loss"):
        paper_train_preset("cub", "triplet")


def test_cli_help_lists_every_choice_with_its_help() -> None:
    from typer.testing import CliRunner

    from retrieval.cli import app

    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).output
    for choice in (*catalog.LOSSES, *levels.LEVELS):
        assert f"{choice.name} ({choice.help})" in out


def test_the_catalog_and_the_cli_start_without_torch() -> None:
    code = ("import sys, training.catalog, training.levels, retrieval.config, retrieval.cli; "
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
