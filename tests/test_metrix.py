"""Metrix mixing on hand-made batches: which pairs, which labels, lam limits, gradients, budgets,
chunked feature pooling, and one trunk pass per step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from retrieval.config import DataConfig, LossConfig, MixupConfig, ModelConfig, RunConfig
from retrieval.model import Embedder
from training.losses import build_loss
from training.metrix import (
    MixedTargets, hardest_negatives, mix_embeddings, mix_images, mixed_pool, plan_hardest_pairs, plan_pairs,
    sample_beta,
)
from training import levels
from training.objective import build_objective

# anchors 0,1 (class 0) and 3,4 (class 2) have a positive; 2 (class 1) and 5 (class 3) do not
LABELS = torch.tensor([0, 0, 1, 2, 2, 3])
MS = dict(alpha=17.97, beta=75.66, base=0.77)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pairs(t: MixedTargets) -> set[tuple[int, int]]:
    return {(int(i), int(j)) for i, j, v in zip(t.first, t.second, t.valid) if v}


def _served(t: MixedTargets, labels: torch.Tensor) -> dict[int, set[tuple[int, int]]]:
    _, valid = t.for_anchors(labels)
    return {a: {(int(t.first[m]), int(t.second[m])) for m in range(len(t.first)) if valid[a, m]} for a in range(len(labels))}


def _with_lam(t: MixedTargets, lam: float) -> MixedTargets:
    return t._replace(lam=torch.full_like(t.lam, lam))


def _emb(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=_gen(seed)), dim=1)


# ---- which pairs ---------------------------------------------------------------------------------

def test_positive_kind_mixes_a_positive_with_a_negative_of_each_anchor() -> None:
    t = plan_pairs(LABELS, pair_kind="positive", generator=_gen())
    others = lambda cls: {j for j in range(6) if LABELS[j] != cls}  # noqa: E731
    expected = {(i, j) for i in (0, 1, 3, 4) for j in others(int(LABELS[i]))}
    assert _pairs(t) == expected
    served = _served(t, LABELS)
    assert served[0] == {(1, j) for j in (2, 3, 4, 5)}  # anchor 0: its positive 1 with each negative
    assert served[1] == {(0, j) for j in (2, 3, 4, 5)}
    assert served[3] == {(4, j) for j in (0, 1, 2, 5)}
    assert served[2] == set() and served[5] == set()  # no positive: nothing of this kind


def test_anchor_kind_mixes_positive_less_anchors_with_their_negatives() -> None:
    t = plan_pairs(LABELS, pair_kind="anchor", generator=_gen())
    assert _pairs(t) == {(2, j) for j in (0, 1, 3, 4, 5)} | {(5, j) for j in (0, 1, 2, 3, 4)}
    served = _served(t, LABELS)
    assert served[2] == {(2, j) for j in (0, 1, 3, 4, 5)}
    assert served[5] == {(5, j) for j in (0, 1, 2, 3, 4)}
    assert all(served[a] == set() for a in (0, 1, 3, 4))


def test_both_kinds_together_and_never_positive_positive() -> None:
    t = plan_pairs(LABELS, pair_kind="both", generator=_gen())
    pairs = _pairs(t)
    assert pairs == _pairs(plan_pairs(LABELS, pair_kind="positive")) | _pairs(plan_pairs(LABELS, pair_kind="anchor"))
    assert all(LABELS[i] != LABELS[j] for i, j in pairs)
    assert len(t.first) == 36 and t.grid  # the full static B x B grid


def test_random_kind_follows_the_official_coin_per_step() -> None:
    """The official code picks a kind with random.randint(0, 1) per step: a fair coin, independent steps."""
    stats = pytest.importorskip("scipy.stats")
    positive = _pairs(plan_pairs(LABELS, pair_kind="positive"))
    gen = _gen(2024)
    picks = []
    for _ in range(2000):
        pairs = _pairs(plan_pairs(LABELS, pair_kind="random", generator=gen))
        assert pairs in (positive, _pairs(plan_pairs(LABELS, pair_kind="anchor")))
        picks.append(pairs == positive)
    assert stats.binomtest(sum(picks), len(picks), 0.5).pvalue > 1e-3
    runs = 1 + sum(a != b for a, b in zip(picks, picks[1:]))  # independent steps: about n/2 runs
    assert abs(runs - len(picks) / 2) < 4 * math.sqrt(len(picks)) / 2


@pytest.mark.parametrize("labels,kind", [(torch.arange(4).repeat_interleave(3), "positive"), (torch.arange(6), "anchor")])
def test_random_kind_gives_way_when_a_kind_has_no_pair(labels: torch.Tensor, kind: str) -> None:
    only = _pairs(plan_pairs(labels, pair_kind=kind))
    assert only and all(_pairs(plan_pairs(labels, pair_kind="random", generator=_gen(s))) == only for s in range(20))


def test_random_kind_picks_one_kind_per_batch() -> None:
    positive = _pairs(plan_pairs(LABELS, pair_kind="positive"))
    anchor = _pairs(plan_pairs(LABELS, pair_kind="anchor"))
    seen = [_pairs(plan_pairs(LABELS, pair_kind="random", generator=_gen(s))) for s in range(40)]
    assert all(p in (positive, anchor) for p in seen)
    assert 5 <= sum(p == positive for p in seen) <= 35


def test_soft_labels_are_lam_for_every_mix_of_an_anchor() -> None:
    t = _with_lam(plan_pairs(LABELS, pair_kind="both"), 0.3)
    y, valid = t.for_anchors(LABELS)
    assert torch.allclose(y[valid], torch.full_like(y[valid], 0.3))
    # the general rule: y = lam [l_i = l_a] + (1 - lam) [l_j = l_a]; e.g. anchor 2 (class 1) vs mix (0, 2)
    m = int(0 * 6 + 2)
    assert y[2, m].item() == pytest.approx(0.7)
    y_c, valid_c = t.for_proxies(4)
    assert torch.allclose(y_c.sum(0), torch.ones(36))  # an interpolated one-hot label per mix
    assert y_c[0, 1 * 6 + 2].item() == pytest.approx(0.3) and y_c[1, 1 * 6 + 2].item() == pytest.approx(0.7)
    assert torch.equal(valid_c[3], t.valid)


def test_lam_per_batch_or_per_pair() -> None:
    per_batch = plan_pairs(LABELS, pair_kind="both", generator=_gen(1))
    assert torch.all(per_batch.lam == per_batch.lam[0])
    per_pair = plan_pairs(LABELS, pair_kind="both", lam_per="pair", generator=_gen(1))
    assert per_pair.lam.unique().numel() == 36
    assert torch.all((per_pair.lam > 0) & (per_pair.lam < 1))


def test_same_generator_state_gives_same_plan() -> None:
    a = plan_pairs(LABELS, max_pairs=7, lam_per="pair", generator=_gen(5))
    b = plan_pairs(LABELS, max_pairs=7, lam_per="pair", generator=_gen(5))
    assert all(torch.equal(x, y) for x, y in zip(a[:6], b[:6]))


def test_generator_must_live_on_the_batch_device() -> None:
    with pytest.raises(ValueError, match="torch.Generator\\(device="):
        plan_pairs(LABELS.to("meta"), generator=torch.Generator())


# ---- budgets -------------------------------------------------------------------------------------

@pytest.mark.parametrize("labels", [LABELS, torch.tensor([0, 0, 0, 1, 1, 1]), torch.arange(6), torch.zeros(6, dtype=torch.long)])
def test_budget_keeps_a_fixed_shape_and_only_valid_pairs(labels: torch.Tensor) -> None:
    full = _pairs(plan_pairs(labels, pair_kind="both"))
    for budget in (1, 5, 40):
        t = plan_pairs(labels, pair_kind="both", max_pairs=budget, generator=_gen(budget))
        slots = min(budget, 36)
        assert all(x.shape == (slots,) for x in (t.first, t.second, t.lam, t.valid)) and not t.grid
        picked = _pairs(t)
        assert picked <= full
        assert len(picked) == min(slots, len(full))  # no duplicate, all slots used while pairs remain


def test_budget_draws_different_subsets() -> None:
    labels = torch.arange(10) % 5
    subsets = {frozenset(_pairs(plan_pairs(labels, pair_kind="both", max_pairs=6, generator=_gen(s)))) for s in range(10)}
    assert len(subsets) > 5


def test_input_level_defaults_to_one_mix_per_image() -> None:
    assert levels.level("input").max_pairs(0, 100) == 100
    assert levels.level("feature").max_pairs(0, 100) == 0 and levels.level("embedding").max_pairs(50, 100) == 50
    with pytest.raises(ValueError):
        levels.level("feature").max_pairs(-1, 100)


# ---- lam limits reduce to clean terms ------------------------------------------------------------

def _ms_pos(s: float) -> float:
    return math.exp(-MS["alpha"] * (s - MS["base"]))


def _ms_neg(s: float) -> float:
    return math.exp(MS["beta"] * (s - MS["base"]))


@pytest.mark.parametrize("lam", [1.0, 0.0])
def test_multi_similarity_mixed_loss_at_lam_limits(lam: float) -> None:
    """lam = 1: each mix is its positive (anchor itself for positive-less anchors), label 1; lam = 0: its
    negative, label 0.  The mixed loss is then the clean MS terms, each pair counted once per mix."""
    labels = LABELS
    emb = _emb(6)
    t = _with_lam(plan_pairs(labels, pair_kind="both"), lam)
    mixed = mix_embeddings(emb, t)
    assert torch.allclose(mixed[t.valid], (emb[t.first] if lam == 1 else emb[t.second])[t.valid], atol=1e-6)
    got = build_loss(LossConfig(name="ms"), 4, 8).mixed(emb, labels, mixed, t)
    sim = (emb @ emb.t()).tolist()
    total = 0.0
    for a in range(6):
        pos = [p for p in range(6) if p != a and labels[p] == labels[a]] or [a]
        neg = [n for n in range(6) if labels[n] != labels[a]]
        if lam == 1:
            total += math.log1p(len(neg) * sum(_ms_pos(sim[a][p]) for p in pos)) / MS["alpha"]
        else:
            total += math.log1p(len(pos) * sum(_ms_neg(sim[a][n]) for n in neg)) / MS["beta"]
    assert got.item() == pytest.approx(total / 6, rel=1e-5)


def test_contrastive_mixed_loss_at_lam_limits_adds_up_to_the_clean_loss() -> None:
    """On a class-balanced batch every anchor has as many positives and negatives, so the lam = 1 mixed
    loss is the clean positive part and the lam = 0 one the clean negative part."""
    from pytorch_metric_learning.losses import ContrastiveLoss

    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    emb = F.normalize(1.0 + 0.3 * torch.randn(9, 8, generator=_gen(3)), dim=1)  # close: negatives inside the margin
    loss = build_loss(LossConfig(name="contrastive"), 3, 8)
    t = plan_pairs(labels, pair_kind="positive")
    at_one = loss.mixed(emb, labels, mix_embeddings(emb, _with_lam(t, 1.0)), _with_lam(t, 1.0))
    at_zero = loss.mixed(emb, labels, mix_embeddings(emb, _with_lam(t, 0.0)), _with_lam(t, 0.0))
    clean = ContrastiveLoss(pos_margin=0.0, neg_margin=0.5)(emb, labels)
    assert (at_one + at_zero).item() == pytest.approx(clean.item(), rel=1e-5)
    assert at_one.item() > 0 and at_zero.item() > 0


def test_proxy_anchor_mixed_loss_at_lam_one_is_the_clean_loss_of_the_first_sources() -> None:
    from pytorch_metric_learning.losses import ProxyAnchorLoss

    emb = _emb(6, seed=4)
    torch.manual_seed(0)
    loss = build_loss(LossConfig(name="pa"), 4, 8)
    t = _with_lam(plan_pairs(LABELS, pair_kind="both"), 1.0)
    got = loss.mixed(emb, LABELS, mix_embeddings(emb, t), t)
    ref = ProxyAnchorLoss(4, 8, margin=0.1, alpha=32)
    with torch.no_grad():
        ref.proxies.copy_(loss.proxies)
    expected = ref(emb[t.first[t.valid]], LABELS[t.first[t.valid]])
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


# ---- gradients -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["contrastive", "ms", "pa"])
def test_gradients_reach_both_mixed_sources_at_embedding_level(name: str) -> None:
    labels = LABELS
    t = plan_pairs(labels, pair_kind="positive")
    one = t.valid.nonzero().flatten()[:1]  # keep a single mix: (i, j)
    t = _with_lam(MixedTargets(*(x[one] for x in t[:6]), grid=False), 0.6)
    i, j = int(t.first[0]), int(t.second[0])
    sources = _emb(6, seed=1).requires_grad_(True)
    anchors = _emb(6, seed=1)  # clean anchors held fixed: only the mix carries gradient
    torch.manual_seed(0)
    loss = build_loss(LossConfig(name=name), 4, 8)
    loss.mixed(anchors, labels, mix_embeddings(sources, t), t).backward()
    norms = sources.grad.norm(dim=1)
    assert norms[i] > 0 and norms[j] > 0
    assert torch.all(norms[[k for k in range(6) if k not in (i, j)]] == 0)


def test_gradients_reach_both_mixed_sources_at_feature_level() -> None:
    fmap = torch.randn(6, 5, 3, 3, generator=_gen(2)).requires_grad_(True)
    t = plan_pairs(LABELS, pair_kind="positive")
    one = t.valid.nonzero().flatten()[:1]
    t = _with_lam(MixedTargets(*(x[one] for x in t[:6]), grid=False), 0.4)
    mixed_pool(fmap, t).sum().backward()
    norms = fmap.grad.flatten(1).norm(dim=1)
    i, j = int(t.first[0]), int(t.second[0])
    assert norms[i] > 0 and norms[j] > 0 and norms.count_nonzero() == 2


# ---- batches the official code cannot handle ------------------------------------------------------

@pytest.mark.parametrize("kind", ["random", "positive", "anchor", "both"])
def test_balanced_batch_where_every_anchor_has_a_positive(kind: str) -> None:
    labels = torch.arange(4).repeat_interleave(3)
    emb = _emb(12, seed=5).requires_grad_(True)
    t = plan_pairs(labels, pair_kind=kind, generator=_gen(3))
    out = build_loss(LossConfig(name="ms"), 4, 8).mixed(emb, labels, mix_embeddings(emb, t), t)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(emb.grad).all()
    if kind == "anchor":  # no anchor lacks a positive: nothing to mix, zero mixed loss
        assert not t.valid.any() and out.item() == 0.0
    if kind in ("positive", "both"):
        assert int(t.valid.sum()) == 12 * 9 and out.item() > 0


@pytest.mark.parametrize("kind", ["positive", "anchor", "both"])
def test_batch_where_no_anchor_has_a_positive(kind: str) -> None:
    labels = torch.arange(5)
    emb = _emb(5, seed=6)
    t = plan_pairs(labels, pair_kind=kind)
    out = build_loss(LossConfig(name="ms"), 5, 8).mixed(emb, labels, mix_embeddings(emb, t), t)
    assert torch.isfinite(out)
    served = _served(t, labels)
    if kind == "positive":
        assert not t.valid.any() and out.item() == 0.0
    else:
        assert all(served[a] == {(a, j) for j in range(5) if j != a} for a in range(5)) and out.item() > 0


# ---- feature level: chunked pooling equals the materialised mixes --------------------------------

def _naive_pool(fmap: torch.Tensor, t: MixedTargets) -> torch.Tensor:
    lam = t.lam.view(-1, 1, 1, 1)
    mixed = lam * fmap[t.first] + (1 - lam) * fmap[t.second]
    return mixed.mean(dim=(2, 3)) + mixed.amax(dim=(2, 3))


@pytest.mark.parametrize("budget", [0, 11])
@pytest.mark.parametrize("chunk", [1, 200, 1 << 20])
@pytest.mark.parametrize("lam_per", ["batch", "pair"])
def test_chunked_feature_pool_equals_naive_values_and_gradients(budget: int, chunk: int, lam_per: str) -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    fmap0 = torch.randn(7, 6, 4, 3, generator=_gen(8), dtype=torch.float64)
    t = plan_pairs(labels, pair_kind="both", max_pairs=budget, lam_per=lam_per, generator=_gen(9))
    weights = torch.randn(len(t.first), 6, generator=_gen(10), dtype=torch.float64)
    fmap = fmap0.clone().requires_grad_(True)
    ours = mixed_pool(fmap, t._replace(lam=t.lam.double()), chunk_elements=chunk)
    (ours * weights).sum().backward()
    ref_fmap = fmap0.clone().requires_grad_(True)
    ref = _naive_pool(ref_fmap, t._replace(lam=t.lam.double()))
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(fmap.grad, ref_fmap.grad)


def test_feature_pool_matches_the_embedder_pooling_at_lam_one() -> None:
    fmap = torch.randn(4, 8, 3, 3, generator=_gen(11))
    t = _with_lam(plan_pairs(torch.tensor([0, 1, 2, 3]), pair_kind="both"), 1.0)
    torch.testing.assert_close(mixed_pool(fmap, t), Embedder.pool(fmap)[t.first])


def test_mix_images_interpolates() -> None:
    images = torch.randn(6, 3, 4, 4, generator=_gen(12))
    t = _with_lam(plan_pairs(LABELS, pair_kind="both", max_pairs=5, generator=_gen(1)), 0.25)
    torch.testing.assert_close(mix_images(images, t), 0.25 * images[t.first] + 0.75 * images[t.second])


# ---- lam distribution ----------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [2.0, 0.4])
def test_lam_follows_beta_alpha_alpha(alpha: float) -> None:
    stats = pytest.importorskip("scipy.stats")
    lam = sample_beta(alpha, (20000,), torch.device("cpu"), _gen(13))
    assert torch.all((lam >= 0) & (lam <= 1))
    assert stats.kstest(lam.numpy(), stats.beta(alpha, alpha).cdf).pvalue > 1e-3


# ---- the objective on a tiny model ----------------------------------------------------------------

def _tiny_run(level: str, loss: str = "ms", **mixup) -> tuple[Embedder, object]:
    torch.manual_seed(0)
    model = Embedder(ModelConfig(arch="resnet18", pretrained="none", embedding_size=16))
    cfg = RunConfig(model=model.cfg, loss=LossConfig(name=loss), mixup=MixupConfig(level=level, **mixup))
    return model, build_objective(cfg, num_classes=6, embedding_size=16)


BATCH_LABELS = torch.tensor([0, 0, 1, 1, 2, 3, 4, 4])


def _images(n: int = 8, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=_gen(14))


@pytest.mark.parametrize("level,input_pairs", [("feature", "hardest"), ("embedding", "hardest"), ("input", "random"),
                                               ("input", "hardest"), ("none", "hardest")])
def test_trunk_runs_once_per_step(level: str, input_pairs: str) -> None:
    model, objective = _tiny_run(level, pair_kind="both", input_pairs=input_pairs)
    batches = []
    model.layer4.register_forward_hook(lambda m, i, o: batches.append(o.shape[0]))
    out = objective(model, _images(), BATCH_LABELS, _gen(1))
    out.loss.backward()
    if level == "input" and input_pairs == "random":
        assert batches == [8 + 8]  # clean + one mix per image, in one trunk pass
    elif level == "input":
        assert batches == [8, 8]  # clean, then the mixes chosen from the clean embeddings (one model call)
    else:
        assert batches == [8]
    assert torch.isfinite(out.loss)
    assert model.layer1[0].conv1.weight.grad.abs().sum() > 0
    if level != "none":
        assert out.mixed.item() > 0
        assert out.loss.item() == pytest.approx(out.clean.item() + 0.4 * out.mixed.item(), rel=1e-6)
    else:
        assert out.mixed.item() == 0.0 and out.loss.item() == out.clean.item()
    assert not out.clean.requires_grad and not out.mixed.requires_grad


def test_feature_objective_equals_materialised_feature_mixup() -> None:
    """The whole feature-level step against the straightforward implementation: mix maps, run the head."""
    model, objective = _tiny_run("feature", pair_kind="both", lam_per="pair")
    images = _images(size=96)  # 3 x 3 layer4 maps: the max pooling has positions to choose from
    out = objective(model, images, BATCH_LABELS, _gen(2))
    out.loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    t = objective.plan(BATCH_LABELS, _gen(2))
    fmap = model.trunk(images)
    assert fmap.shape[2:] == (3, 3)
    emb = model.head(fmap)
    lam = t.lam.view(-1, 1, 1, 1)
    mixed_emb = model.head(lam * fmap[t.first] + (1 - lam) * fmap[t.second])
    loss = objective.loss(emb, BATCH_LABELS) + 0.4 * objective.loss.mixed(emb, BATCH_LABELS, mixed_emb, t)
    loss.backward()
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    for g, p in zip(ours, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_proxy_objective_exposes_the_proxies_as_its_parameters() -> None:
    model, objective = _tiny_run("embedding", loss="pa")
    params = list(objective.parameters())
    assert len(params) == 1 and params[0].shape == (6, 16)
    objective(model, _images(), BATCH_LABELS, _gen(0)).loss.backward()
    assert params[0].grad.abs().sum() > 0


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="mixup level"):
        _tiny_run("pixels")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is only observable on CUDA")
@pytest.mark.parametrize("level,input_pairs", [("feature", "hardest"), ("embedding", "hardest"), ("input", "random"),
                                               ("input", "hardest")])
def test_step_never_synchronises_with_the_host(level: str, input_pairs: str) -> None:
    model, objective = _tiny_run(level, max_pairs=0, input_pairs=input_pairs)
    model = model.cuda()
    objective = objective.cuda()
    images, labels = _images().cuda(), BATCH_LABELS.cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    objective(model, images, labels, gen).loss.backward()  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        objective(model, images, labels, gen).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("level", ["embedding", "feature"])
def test_compiled_loss_terms_give_the_eager_loss_and_gradients(level: str) -> None:
    """`--compile-loss` changes how the step runs, not what it computes."""
    model, eager = _tiny_run(level, loss="ms", pair_kind="both")
    compiled = _tiny_run(level, loss="ms", pair_kind="both")[1].compile_losses()
    assert compiled.losses_compiled and not eager.losses_compiled
    images = _images()
    results = []
    for objective in (eager, compiled):
        model.zero_grad(set_to_none=True)
        out = objective(model, images, BATCH_LABELS, _gen(1))
        out.loss.backward()
        results.append((out, model.embedding.weight.grad.clone(), model.layer4[0].conv1.weight.grad.clone()))
    (a, a_embed, a_trunk), (b, b_embed, b_trunk) = results
    torch.testing.assert_close(b.clean, a.clean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.mixed, a.mixed, rtol=1e-5, atol=1e-6)
    assert a.mixed > 0
    torch.testing.assert_close(b_embed, a_embed, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b_trunk, a_trunk, rtol=1e-4, atol=1e-6)


def test_compiling_the_loss_terms_keeps_the_checkpoint_layout() -> None:
    """Checkpoints hold the objective's state dict: compiling must not add or rename entries."""
    cfg = RunConfig(loss=LossConfig(name="pa"), mixup=MixupConfig(level="embedding"))
    eager = build_objective(cfg, num_classes=6, embedding_size=16)
    compiled = build_objective(cfg, num_classes=6, embedding_size=16).compile_losses()
    assert list(eager.state_dict()) == list(compiled.state_dict()) == ["loss.proxies"]
    assert [n for n, _ in compiled.named_parameters()] == ["loss.proxies"]


# ---- input level: hardest negatives ----------------------------------------------------------------

def _brute_force_hardest(emb: torch.Tensor, labels: torch.Tensor, k: int) -> list[list[int]]:
    out = []
    for a in range(len(labels)):
        negs = [j for j in range(len(labels)) if labels[j] != labels[a]]
        negs.sort(key=lambda j: -float(emb[a] @ emb[j]))
        out.append(negs[:k])
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_hardest_negatives_are_the_closest_other_class_items(k: int) -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4])
    emb = _emb(9, seed=21)
    index, exists = hardest_negatives(emb, labels, k)
    assert index.shape == (9, k) and exists.all()
    assert index.tolist() == _brute_force_hardest(emb, labels, k)


@pytest.mark.parametrize("kind", ["positive", "anchor", "both"])
@pytest.mark.parametrize("k", [1, 2])
def test_hardest_plan_mixes_each_positive_with_the_anchors_closest_negatives(kind: str, k: int) -> None:
    """Against a brute-force enumeration of the official input mode (with its wrong-list indexing fixed)."""
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4])
    emb = _emb(9, seed=22)
    hard = _brute_force_hardest(emb, labels, k)
    expected = []
    for a in range(9):
        positives = [i for i in range(9) if i != a and labels[i] == labels[a]]
        if positives and kind in ("positive", "both"):
            expected += [(i, n) for i in positives for n in hard[a]]
        if not positives and kind in ("anchor", "both"):
            expected += [(a, n) for n in hard[a]]
    t = plan_hardest_pairs(labels, emb, slots=64, hard_negatives=k, pair_kind=kind, generator=_gen(3))
    assert all(x.shape == (64,) for x in (t.first, t.second, t.lam, t.valid))  # static shape, padding invalid
    got = sorted((int(i), int(j)) for i, j, v in zip(t.first, t.second, t.valid) if v)
    assert got == sorted(expected)
    assert all(labels[i] != labels[j] for i, j in got)  # never a same-class "negative"


def test_hardest_plan_keeps_its_shape_and_subsamples_when_slots_are_few() -> None:
    labels = torch.arange(5).repeat_interleave(4)  # P x K = 5 x 4: 60 (anchor, positive) pairs
    emb = _emb(20, seed=23)
    full = plan_hardest_pairs(labels, emb, slots=60, pair_kind="random", generator=_gen(4))
    assert int(full.valid.sum()) == 60  # balanced batches: every candidate fits the default budget
    small = plan_hardest_pairs(labels, emb, slots=7, pair_kind="random", generator=_gen(4))
    assert small.first.shape == (7,) and small.valid.all()
    full_pairs = [(int(i), int(j)) for i, j in zip(full.first, full.second)]
    assert all((int(i), int(j)) in full_pairs for i, j in zip(small.first, small.second))


def test_input_budget_with_hardest_negatives_follows_the_batch_structure() -> None:
    cfg = RunConfig(data=DataConfig(sampler="balanced", images_per_class=5, batch_size=100),
                    mixup=MixupConfig(level="input"))
    objective = build_objective(cfg, num_classes=10, embedding_size=8)
    assert objective.input_slots(100) == 400 and objective.input_slots(50) == 200  # 20 x 5: every (a, p) pair
    cfg.mixup = MixupConfig(level="input", hard_negatives=2)
    assert build_objective(cfg, 10, 8).input_slots(100) == 800
    cfg.data = DataConfig(sampler="random")
    assert build_objective(cfg, 10, 8).input_slots(100) == 200
    cfg.mixup = MixupConfig(level="input", max_pairs=33)
    assert build_objective(cfg, 10, 8).input_slots(100) == 33


def test_input_objective_with_hardest_negatives_equals_the_two_pass_computation() -> None:
    model, objective = _tiny_run("input", pair_kind="both")
    model.eval()  # BatchNorm on running statistics: the two passes are comparable one by one
    images = _images()
    out = objective(model, images, BATCH_LABELS, _gen(5))
    emb = model(images)
    t = objective.plan_hardest(BATCH_LABELS, emb, _gen(5))
    mixed_emb = model(mix_images(images, t))
    ref = objective.loss(emb, BATCH_LABELS) + 0.4 * objective.loss.mixed(emb, BATCH_LABELS, mixed_emb, t)
    assert out.mixed.item() > 0
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
