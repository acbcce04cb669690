"""Config presets, atomic writes, the embedder and checkpoints: the pieces every command stands on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from retrieval.atomic import atomic_write_json, atomic_write_with, read_json
from retrieval.checkpoint import CheckpointError, embedder_from_checkpoint, load_checkpoint, save_checkpoint
from retrieval.config import ModelConfig, RunConfig, from_dict, override, paper_train_preset, preset, TrainConfig
from retrieval.model import Embedder, PretrainedWeightsError, freeze_batchnorm, model_fingerprint

TINY = ModelConfig(arch="resnet18", embedding_size=16, pretrained="none")


@pytest.mark.parametrize(
    "dataset, loss, mixup, expected",
    [
        ("cub", "contrastive", "none", dict(epochs=60, lr=1e-4, lr_step=10, lr_gamma=0.1, warmup_epochs=5, freeze_bn=True)),
        ("sop", "contrastive", "none", dict(epochs=60, lr=3e-5, lr_step=10, lr_gamma=0.25, warmup_epochs=5, freeze_bn=False)),
        ("inshop", "contrastive", "feature", dict(epochs=60, lr=1e-4, lr_step=10, lr_gamma=0.25, freeze_bn=True)),
        ("cars", "ms", "none", dict(epochs=60, lr=1e-4, lr_step=5, lr_gamma=0.5, warmup_epochs=5, freeze_bn=True)),
        ("sop", "pa", "feature", dict(epochs=60, lr=6e-4, lr_step=20, lr_gamma=0.25, warmup_epochs=1, freeze_bn=False)),
        ("cub", "ms", "feature", dict(epochs=100, lr=1e-4, lr_step=10, lr_gamma=0.5, freeze_bn=True)),
        ("cub", "pa", "none", dict(epochs=60, lr_step=5)),
    ],
)
def test_paper_presets_match_the_official_recipe(dataset: str, loss: str, mixup: str, expected: dict) -> None:
    cfg = paper_train_preset(dataset, loss, mixup)
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key
    assert (cfg.weight_decay, cfg.grad_clip, cfg.seed, cfg.proxy_lr_mult) == (1e-4, 10.0, 1, 100.0)


def test_presets_pick_balanced_batches_only_on_large_datasets() -> None:
    assert preset("sop").data.sampler == "balanced" and preset("inshop").data.sampler == "balanced"
    assert preset("cub").data.sampler == "random" and preset("cars").data.batch_size == 100
    assert preset("cub", "ms", "feature").mixup.weight == 0.4 and preset("cub").mixup.alpha == 2.0


def test_config_round_trips_through_json_and_rejects_typos() -> None:
    cfg = preset("inshop", "pa", "embedding")
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig keys \\['epoch'\\]"):
        from_dict(TrainConfig, {"epoch": 3})
    assert override(cfg.train, lr=0.5, epochs=None).lr == 0.5


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "meta.json"
    atomic_write_json(target, {"version": 1})

    def broken_writer(tmp: Path) -> None:
        tmp.write_text("{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_with(target, broken_writer)
    assert read_json(target) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]  # no temp litter


def test_read_json_names_a_truncated_file(tmp_path: Path) -> None:
    bad = tmp_path / "meta.json"
    bad.write_text('{"a": ')
    with pytest.raises(ValueError, match="meta.json"):
        read_json(bad, "index metadata")


def test_embedder_outputs_unit_vectors_and_head_runs_alone() -> None:
    torch.manual_seed(0)
    model = Embedder(TINY).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        fmap = model.trunk(images)
        emb = model(images)
    assert fmap.shape == (3, 512, 2, 2)
    assert emb.shape == (3, 16)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(model.head(fmap), emb)
    torch.testing.assert_close(model.pool(fmap), fmap.mean((2, 3)) + fmap.amax((2, 3)))


def test_resnet50_embedder_has_the_paper_shape() -> None:
    model = Embedder(ModelConfig(pretrained="none"))
    assert model.channels == 2048 and model.embedding.in_features == 2048 and model.embedding_size == 512
    assert torch.count_nonzero(model.embedding.bias) == 0


def test_half_width_resnet18_is_a_quarter_of_the_trunk_and_trains_from_scratch_only() -> None:
    """The demo's CPU-sized trunk: resnet18's blocks at half the channels (32..256)."""
    half = Embedder(ModelConfig(arch="resnet18-half", embedding_size=16, pretrained="none"))
    full = Embedder(ModelConfig(arch="resnet18", embedding_size=16, pretrained="none"))
    with torch.no_grad():
        assert half.trunk(torch.randn(2, 3, 64, 64)).shape == (2, 256, 2, 2)
    trunk_size = [sum(p.numel() for p in m.trunk_parameters()) for m in (half, full)]
    assert 0.2 < trunk_size[0] / trunk_size[1] < 0.3
    with pytest.raises(PretrainedWeightsError, match="from scratch"):
        Embedder(ModelConfig(arch="resnet18-half", pretrained="imagenet"))


def test_local_pretrained_weights_are_loaded_and_bad_ones_refused(tmp_path: Path) -> None:
    reference = torchvision.models.resnet18(weights=None)
    weights = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), weights)
    model = Embedder(ModelConfig(arch="resnet18", embedding_size=8, pretrained=str(weights)))
    torch.testing.assert_close(model.stem[0].weight, reference.conv1.weight)
    torch.testing.assert_close(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    with pytest.raises(PretrainedWeightsError, match="do not fit"):
        Embedder(ModelConfig(arch="resnet50", pretrained=str(weights)))
    with pytest.raises(PretrainedWeightsError, match="not found"):
        Embedder(ModelConfig(arch="resnet18", pretrained=str(tmp_path / "missing.pth")))


def test_failed_imagenet_download_says_how_to_supply_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(PretrainedWeightsError, match="--pretrained PATH"):
        Embedder(ModelConfig(arch="resnet18", pretrained="imagenet"))


def test_frozen_batchnorm_keeps_running_statistics() -> None:
    model = Embedder(TINY)
    model.train()
    freeze_batchnorm(model)
    before = model.stem[1].running_mean.clone()
    model(torch.randn(4, 3, 64, 64))
    torch.testing.assert_close(model.stem[1].running_mean, before)
    assert not model.stem[1].weight.requires_grad and model.embedding.weight.requires_grad


def test_checkpoint_round_trip_is_weights_only_and_fingerprinted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Embedder(TINY)
    cfg = RunConfig(model=TINY)
    path = tmp_path / "ckpt" / "last.pt"
    fp = save_checkpoint(path, model, cfg, epoch=3, metrics={"R@1": 0.5})
    assert fp == model_fingerprint(model)
    payload = torch.load(path, weights_only=True)
    assert payload["epoch"] == 3 and payload["metrics"] == {"R@1": 0.5}
    loaded, loaded_cfg, prep, loaded_fp = embedder_from_checkpoint(path)
    assert loaded_fp == fp and loaded_cfg == cfg and prep.image_size == cfg.data.image_size
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    truncated = tmp_path / "cut.pt"
    save_checkpoint(truncated, Embedder(TINY), RunConfig(model=TINY))
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a metrix-retrieval checkpoint"):
        load_checkpoint(foreign)


def test_atomic_writes_get_ordinary_file_permissions(tmp_path: Path) -> None:
    import os
    import stat

    target = tmp_path / "metrics.csv"
    atomic_write_json(target, [])
    old = os.umask(0o022)
    os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~old
