"""Every cell of the paper's table, pinned: a change to a recipe must change this table too.

Values come from the official code's README commands (billpsomas/metrix), with main.py's defaults where a
flag is absent (--lr_decay_step 10, --warm 5, --bn_freeze 1); REPRODUCE.md gives the source of each.
"""

from __future__ import annotations

import pytest

from retrieval.config import preset

# (dataset, loss, mixup): (epochs, lr, StepLR step, gamma, warm-up epochs, BN frozen, sampler, pair kind)
CELLS = {
    ("cub", "contrastive", "none"): (60, 1e-4, 10, 0.1, 5, True, "random", "random"),
    ("cub", "contrastive", "input"): (60, 1e-4, 10, 0.1, 5, True, "random", "random"),
    ("cub", "contrastive", "feature"): (60, 1e-4, 10, 0.1, 5, True, "random", "random"),
    ("cub", "contrastive", "embedding"): (60, 1e-4, 10, 0.1, 5, True, "random", "random"),
    ("cub", "ms", "none"): (60, 1e-4, 5, 0.5, 5, True, "random", "random"),
    ("cub", "ms", "input"): (100, 1e-4, 10, 0.5, 5, True, "random", "random"),
    ("cub", "ms", "feature"): (100, 1e-4, 10, 0.5, 5, True, "random", "random"),
    ("cub", "ms", "embedding"): (100, 1e-4, 10, 0.5, 5, True, "random", "positive"),
    ("cub", "pa", "none"): (60, 1e-4, 5, 0.5, 5, True, "random", "random"),
    ("cub", "pa", "input"): (100, 1e-4, 10, 0.5, 5, True, "random", "random"),
    ("cub", "pa", "feature"): (100, 1e-4, 10, 0.5, 5, True, "random", "random"),
    ("cub", "pa", "embedding"): (100, 1e-4, 10, 0.5, 5, True, "random", "random"),
    ("cars", "contrastive", "none"): (60, 1e-4, 10, 0.1, 5, True, "random", "random"),
    ("cars", "contrastive", "input"): (60, 1e-4, 10, 0.1, 5, True, "random", "random"),
    ("cars", "contrastive", "feature"): (60, 1e-4, 10, 0.1, 5, True, "random", "random"),
    ("cars", "contrastive", "embedding"): (60, 1e-4, 10, 0.1, 5, True, "random", "random"),
    ("cars", "ms", "none"): (60, 1e-4, 5, 0.5, 5, True, "random", "random"),
    ("cars", "ms", "input"): (60, 1e-4, 5, 0.5, 5, True, "random", "random"),
    ("cars", "ms", "feature"): (60, 1e-4, 5, 0.5, 5, True, "random", "random"),
    ("cars", "ms", "embedding"): (60, 1e-4, 5, 0.5, 5, True, "random", "positive"),
    ("cars", "pa", "none"): (60, 1e-4, 5, 0.5, 5, True, "random", "random"),
    ("cars", "pa", "input"): (60, 1e-4, 5, 0.5, 5, True, "random", "random"),
    ("cars", "pa", "feature"): (60, 1e-4, 5, 0.5, 5, True, "random", "random"),
    ("cars", "pa", "embedding"): (60, 1e-4, 5, 0.5, 5, True, "random", "random"),
    ("sop", "contrastive", "none"): (60, 3e-5, 10, 0.25, 5, False, "balanced", "random"),
    ("sop", "contrastive", "input"): (60, 3e-5, 10, 0.25, 5, True, "balanced", "random"),
    ("sop", "contrastive", "feature"): (60, 3e-5, 10, 0.25, 5, True, "balanced", "random"),
    ("sop", "contrastive", "embedding"): (60, 3e-5, 10, 0.25, 5, True, "balanced", "random"),
    ("sop", "ms", "none"): (60, 6e-4, 20, 0.25, 1, False, "balanced", "random"),
    ("sop", "ms", "input"): (60, 6e-4, 20, 0.25, 1, False, "balanced", "random"),
    ("sop", "ms", "feature"): (60, 6e-4, 20, 0.25, 1, False, "balanced", "random"),
    ("sop", "ms", "embedding"): (60, 6e-4, 20, 0.25, 1, False, "balanced", "positive"),
    ("sop", "pa", "none"): (60, 6e-4, 20, 0.25, 1, False, "balanced", "random"),
    ("sop", "pa", "input"): (60, 6e-4, 20, 0.25, 1, False, "balanced", "random"),
    ("sop", "pa", "feature"): (60, 6e-4, 20, 0.25, 1, False, "balanced", "random"),
    ("sop", "pa", "embedding"): (60, 6e-4, 20, 0.25, 1, False, "balanced", "random"),
    ("inshop", "contrastive", "none"): (60, 3e-5, 5, 0.25, 1, False, "balanced", "random"),
    ("inshop", "contrastive", "input"): (60, 1e-4, 10, 0.25, 5, True, "balanced", "random"),
    ("inshop", "contrastive", "feature"): (60, 1e-4, 10, 0.25, 5, True, "balanced", "random"),
    ("inshop", "contrastive", "embedding"): (60, 1e-4, 10, 0.25, 5, True, "balanced", "random"),
    ("inshop", "ms", "none"): (60, 6e-4, 20, 0.25, 1, False, "balanced", "random"),
    ("inshop", "ms", "input"): (60, 6e-4, 20, 0.25, 1, False, "balanced", "random"),
    ("inshop", "ms", "feature"): (60, 6e-4, 20, 0.25, 1, False, "balanced", "random"),
    ("inshop", "ms", "embedding"): (60, 6e-4, 20, 0.25, 1, False, "balanced", "positive"),
    ("inshop", "pa", "none"): (60, 6e-4, 20, 0.25, 1, False, "balanced", "random"),
    ("inshop", "pa", "input"): (60, 6e-4, 20, 0.25, 1, False, "balanced", "random"),
    ("inshop", "pa", "feature"): (60, 6e-4, 20, 0.25, 1, False, "balanced", "random"),
    ("inshop", "pa", "embedding"): (60, 6e-4, 20, 0.25, 1, False, "balanced", "random"),
}


def test_the_table_covers_every_cell() -> None:
    assert len(CELLS) == 4 * 3 * 4


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_preset_cell_is_the_released_recipe(cell: tuple[str, str, str]) -> None:
    epochs, lr, step, gamma, warm, frozen, sampler, kind = CELLS[cell]
    cfg = preset(*cell)
    t, d, m = cfg.train, cfg.data, cfg.mixup
    assert (t.epochs, t.lr_step, t.warmup_epochs, t.freeze_bn) == (epochs, step, warm, frozen)
    assert t.lr == pytest.approx(lr) and t.lr_gamma == pytest.approx(gamma)
    assert (d.sampler, d.batch_size, d.images_per_class, d.image_size, d.resize_size) == (sampler, 100, 5, 224, 256)
    assert (m.level, m.pair_kind) == (cell[2], kind)
    # shared by every cell of the official code
    assert (t.weight_decay, t.grad_clip, t.seed, t.proxy_lr_mult, t.bn_affine_after_warmup) == (1e-4, 10.0, 1, 100.0, True)
    assert (m.alpha, m.weight, m.lam_per, m.max_pairs, m.input_pairs, m.hard_negatives) == (2.0, 0.4, "batch", 0, "hardest", 1)
    assert (cfg.model.arch, cfg.model.embedding_size, cfg.model.pretrained) == ("resnet50", 512, "imagenet")
    assert cfg.loss.name == cell[1]


def test_the_demo_keeps_the_papers_pair_set() -> None:
    """Outside the table (demo, folders) mixing uses V(a) exactly as the paper defines it."""
    assert preset("demo", "ms", "feature").mixup.pair_kind == "both"
    assert preset("folder", "ms", "feature").mixup.pair_kind == "both"
