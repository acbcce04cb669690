"""`--image-size N` alone brings the paper's 256/224 test-time resize with it, wherever a resize applies."""

from __future__ import annotations

import json

from retrieval.checkpoint import preprocessing_of
from retrieval.config_resolve import resolve_config
from retrieval.config import default_resize_size
from retrieval.embed.spec import EmbedderSpec, open_embedder


def _cfg(image_size=None, resize_size=None, sets=None, dataset="cub", config_file=None):
    flags = {"data": {"image_size": image_size, "resize_size": resize_size}}
    return resolve_config(dataset=dataset, loss="ms", mixup="feature", flags=flags, sets=sets, config_file=config_file)


def test_the_ratio_is_the_papers() -> None:
    assert default_resize_size(224) == 256 and default_resize_size(64) == 73 and default_resize_size(112) == 128


def test_image_size_alone_derives_the_resize() -> None:
    cfg = _cfg(image_size=64)
    assert (cfg.data.image_size, cfg.data.resize_size) == (64, 73)
    # what the checkpoint, the index and the ONNX metadata record
    assert preprocessing_of(cfg).resize_size == 73


def test_an_explicit_resize_wins(tmp_path) -> None:
    assert _cfg(image_size=64, resize_size=80).data.resize_size == 80
    assert _cfg(image_size=64, sets=["data.resize_size=90"]).data.resize_size == 90
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"data": {"resize_size": 70}}))
    assert _cfg(image_size=64, config_file=config).data.resize_size == 70


def test_presets_keep_their_own_pairs() -> None:
    assert (_cfg().data.image_size, _cfg().data.resize_size) == (224, 256)
    demo = _cfg(dataset="demo")
    assert (demo.data.image_size, demo.data.resize_size) == (64, 64)  # the demo tests at the size it trains


def test_an_untrained_index_embedder_uses_the_same_ratio() -> None:
    backend = open_embedder(EmbedderSpec.untrained("resnet18", 8, image_size=96), "cpu")
    record = backend.spec.to_record()  # what an index stores to re-create it
    assert backend.preprocessing.resize_size == record["resize_size"] == default_resize_size(96) == 110
