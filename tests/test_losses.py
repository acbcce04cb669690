"""The generic pair loss against pytorch-metric-learning (binary labels) and against the paper's
formula written out anchor by anchor (soft labels)."""

from __future__ import annotations

import math

import pytest
import torch

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

from retrieval.config import LossConfig  # noqa: E402
from training.losses import PairLoss, build_loss, generic_pair_loss, multi_similarity_form  # noqa: E402

MS = dict(alpha=17.97, beta=75.66, base=0.77)
NUM_CLASSES = 6


def _batches() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Named (emb, labels) batches covering the edge cases a training run meets."""
    g = torch.Generator().manual_seed(7)
    out = {}
    # a random batch whose class 5 has exactly one sample
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5, 0])
    out["singleton_class"] = (torch.randn(len(labels), 8, generator=g), labels)
    # > 25 rows: torch.cdist switches to its matrix-multiply path
    labels = torch.randint(0, NUM_CLASSES, (40,), generator=g)
    out["large_random"] = (torch.randn(40, 16, generator=g), labels)
    # correlated embeddings: many hard pairs for the miner
    base = torch.randn(NUM_CLASSES, 8, generator=g)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(3)
    out["clustered"] = (base[labels] + 0.7 * torch.randn(len(labels), 8, generator=g), labels)
    out["all_same_class"] = (torch.randn(10, 8, generator=g), torch.full((10,), 2))
    out["no_positives"] = (torch.randn(NUM_CLASSES, 8, generator=g), torch.arange(NUM_CLASSES))
    return out


BATCHES = _batches()


def _reference(name: str, emb: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor | None):
    if name == "contrastive":
        return pml_losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5)(emb, labels), None
    if name == "ms":
        pairs = pml_miners.MultiSimilarityMiner(epsilon=0.39)(emb, labels)
        if 0 < max(len(p) for p in pairs) <= 1:
            pytest.fail("batch hits the library's <= 1 mined pair shortcut; choose another batch")
        return pml_losses.MultiSimilarityLoss(**MS)(emb, labels, pairs), None
    ref = pml_losses.ProxyAnchorLoss(NUM_CLASSES, emb.shape[1], margin=0.1, alpha=32)
    with torch.no_grad():
        ref.proxies.copy_(proxies)
    return ref(emb, labels), ref.proxies


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("name", ["contrastive", "ms", "pa"])
def test_matches_pytorch_metric_learning_value_and_gradient(name: str, batch: str) -> None:
    emb0, labels = BATCHES[batch]
    torch.manual_seed(0)
    loss = build_loss(LossConfig(name=name), NUM_CLASSES, emb0.shape[1])
    emb = emb0.clone().requires_grad_(True)
    ours = loss(emb, labels)
    ours.backward()

    emb_ref = emb0.clone().requires_grad_(True)
    ref, ref_proxies = _reference(name, emb_ref, labels, None if loss.proxies is None else loss.proxies.detach())
    ref.backward()

    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb.grad, emb_ref.grad, rtol=1e-5, atol=1e-5)
    if name == "pa":
        torch.testing.assert_close(loss.proxies.grad, ref_proxies.grad, rtol=1e-5, atol=1e-5)
    if batch not in ("no_positives", "all_same_class") or name == "pa":
        assert ours.item() > 0  # the comparison is not between two zeros


def test_proxy_anchor_owns_kaiming_initialised_proxies() -> None:
    torch.manual_seed(0)
    loss = build_loss(LossConfig(name="pa"), 100, 512)
    assert [p.shape for p in loss.parameters()] == [torch.Size([100, 512])]
    # kaiming normal, fan_out = 100 rows: std = sqrt(2 / 100)
    assert loss.proxies.std().item() == pytest.approx(math.sqrt(2 / 100), rel=0.05)
    assert list(build_loss(LossConfig(name="ms"), 100, 512).parameters()) == []


def test_unknown_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss(LossConfig(name="triplet"), 10, 8)


def test_low_precision_inputs_are_evaluated_in_float32() -> None:
    emb, labels = BATCHES["clustered"]
    loss = build_loss(LossConfig(name="ms"), NUM_CLASSES, 8)
    half = emb.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(half, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, loss(half.float(), labels))


# ---- soft labels: the paper's formula, anchor by anchor -----------------------------------------

def _formula_ms(sim, y, valid, a_, b_, m):
    total = 0.0
    for a in range(len(sim)):
        pos = sum(y[a, x] * math.exp(-a_ * (sim[a, x] - m)) for x in range(len(sim[0])) if valid[a, x])
        neg = sum((1 - y[a, x]) * math.exp(b_ * (sim[a, x] - m)) for x in range(len(sim[0])) if valid[a, x])
        total += math.log1p(pos) / a_ + math.log1p(neg) / b_
    return total / len(sim)


def _formula_pa(sim, y, valid, alpha, delta):
    pos_sum, neg_sum, with_pos = 0.0, 0.0, 0
    for c in range(len(sim)):
        pos = sum(y[c, x] * math.exp(-alpha * (sim[c, x] - delta)) for x in range(len(sim[0])) if valid[c, x])
        neg = sum((1 - y[c, x]) * math.exp(alpha * (sim[c, x] + delta)) for x in range(len(sim[0])) if valid[c, x])
        with_pos += any(valid[c, x] and y[c, x] > 0 for x in range(len(sim[0])))
        pos_sum += math.log1p(pos)
        neg_sum += math.log1p(neg)
    return pos_sum / max(with_pos, 1) + neg_sum / len(sim)


def _formula_contrastive(dist, y, valid, mp, mn):
    pos = [y[a, x] * max(dist[a, x] - mp, 0) for a in range(len(dist)) for x in range(len(dist[0])) if valid[a, x]]
    neg = [(1 - y[a, x]) * max(mn - dist[a, x], 0) for a in range(len(dist)) for x in range(len(dist[0])) if valid[a, x]]
    pos = [t for t in pos if t > 0]
    neg = [t for t in neg if t > 0]
    return (sum(pos) / len(pos) if pos else 0.0) + (sum(neg) / len(neg) if neg else 0.0)


def test_soft_labels_follow_the_generic_formula() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.nn.functional.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=1)
    x = torch.nn.functional.normalize(torch.randn(9, 6, generator=g, dtype=torch.float64), dim=1)
    y = torch.rand(5, 9, generator=g, dtype=torch.float64) * (torch.rand(5, 9, generator=g) < 0.6)
    valid = torch.rand(5, 9, generator=g) < 0.8
    sim = a @ x.t()
    dist = torch.cdist(a, x)
    from training.losses import contrastive_form, proxy_anchor_form

    got = generic_pair_loss(multi_similarity_form(**{"alpha": 2.0, "beta": 10.0, "base": 0.5}), sim, y, valid)
    assert got.item() == pytest.approx(_formula_ms(sim.numpy(), y.numpy(), valid.numpy(), 2.0, 10.0, 0.5), rel=1e-9)
    got = generic_pair_loss(proxy_anchor_form(8.0, 0.1), sim, y, valid)
    assert got.item() == pytest.approx(_formula_pa(sim.numpy(), y.numpy(), valid.numpy(), 8.0, 0.1), rel=1e-9)
    got = generic_pair_loss(contrastive_form(0.0, 1.2), dist, y, valid)
    assert got.item() == pytest.approx(_formula_contrastive(dist.numpy(), y.numpy(), valid.numpy(), 0.0, 1.2), rel=1e-9)


def test_no_valid_pair_gives_zero_loss_and_zero_gradient() -> None:
    emb = torch.randn(4, 8, requires_grad=True)
    loss = PairLoss(multi_similarity_form())
    sim = emb @ emb.t()
    out = generic_pair_loss(loss.form, sim, torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0
    assert torch.equal(emb.grad, torch.zeros_like(emb))
