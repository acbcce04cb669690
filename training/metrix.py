"""Metrix mixing: which pairs are mixed, with which lam, and mixing at input, feature or embedding level.

Pairs (metrix-spec section 2).  For an anchor `a`, a mix is formed from a positive of `a` and a
negative of `a` (soft label lam), or, for an anchor with no positive in the batch, from `a` itself and
a negative (label lam).  Positive-positive pairs are never mixed.  A (positive, negative) mix of anchor
`a` depends only on labels, so mixes are enumerated once per ordered SOURCE pair (i, j) of the batch
and shared by every anchor they serve:

    source pair (i, j) is a mix candidate   iff  l_i != l_j, and
      kind "positive": i has a positive in the batch (i is then a positive of the anchors of its class)
      kind "anchor":   i has no positive (i is the anchor itself)
    mix (i, j) belongs to V(a)              iff  l_i = l_a, l_j != l_a, and (i != a or a has no positive)
    soft label of mix (i, j) for anchor a:  y = lam [l_i = l_a] + (1 - lam) [l_j = l_a]   (= lam in V(a))

The default enumerates the full B x B grid with a validity mask: static shapes, every
(positive, negative) combination of the official code, no host synchronisation.  A budget
(`max_pairs` > 0) keeps a uniformly random subset of the valid pairs in a FIXED number of slots;
slots beyond the valid count are padding with valid = False.  Input-level mixing must forward every
mixed image through the network, so it always works with a budget.  By default it mixes as the
official input mode does (`plan_hardest_pairs`): each positive of an anchor with the anchor's closest
negative(s), chosen on the step's clean embeddings; random valid pairs (`plan_pairs`) are the option.

All random draws (pair kind, subset, lam) happen on the batch's device, from `generator` when given
(which must live on that device) or from the device's default generator.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from retrieval.devices import same_device
from training import fused_pool
from training.catalog import LAMBDA_PER, PAIR_KINDS

DEFAULT_CHUNK_ELEMENTS = 1 << 26  # elements of mixed feature maps held at once (128 MiB in bf16)


class MixedTargets(NamedTuple):
    """The mixes of one batch: v_m = lam_m * x[first_m] + (1 - lam_m) * x[second_m], m < M.

    first / second: (M,) int64 indices into the clean batch; lam: (M,) float weight of `first`;
    valid: (M,) bool, False for masked grid cells and budget padding; first_label / second_label: (M,)
    class ids; grid: True when the mixes are the full B x B grid in row-major order (m = i * B + j),
    which feature mixing exploits to avoid gathering maps.
    """

    first: torch.Tensor
    second: torch.Tensor
    lam: torch.Tensor
    valid: torch.Tensor
    first_label: torch.Tensor
    second_label: torch.Tensor
    grid: bool = False

    def for_anchors(self, anchor_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft labels and V(a) membership for the batch's own anchors.

        anchor_labels: (B,) labels of the clean batch that `first`/`second` index.  Returns y (B, M) and
        valid (B, M) bool.
        """
        batch = anchor_labels.shape[0]
        lam = self.lam[None, :]
        same_first = anchor_labels[:, None] == self.first_label[None, :]
        same_second = anchor_labels[:, None] == self.second_label[None, :]
        y = lam * same_first + (1.0 - lam) * same_second
        index = torch.arange(batch, device=anchor_labels.device)
        has_positive = _has_positive(anchor_labels)
        serves = (self.first[None, :] != index[:, None]) | ~has_positive[:, None]
        valid = self.valid[None, :] & same_first & ~same_second & serves
        return y, valid

    def for_proxies(self, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft labels y_cm = lam [l_first = c] + (1 - lam) [l_second = c] for every proxy c: (C, M), and
        validity (C, M): every valid mix belongs to every proxy's set."""
        classes = torch.arange(num_classes, device=self.first_label.device)[:, None]
        lam = self.lam[None, :]
        y = lam * (self.first_label[None, :] == classes) + (1.0 - lam) * (self.second_label[None, :] == classes)
        return y, self.valid[None, :].expand(num_classes, -1)


def _has_positive(labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: whether each sample has another sample of its class in the batch."""
    same = labels[:, None] == labels[None, :]
    return same.sum(dim=1) > 1


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and not same_device(generator.device, device):
        raise ValueError(
            f"the mixing generator lives on {generator.device} but the batch is on {device}; create it with "
            f"torch.Generator(device={str(device)!r}) so random draws stay on the device"
        )


def sample_gamma(
    concentration: float,
    shape: tuple[int, ...],
    device: torch.device,
    generator: torch.Generator | None = None,
    rounds: int = 16,
) -> torch.Tensor:
    """Gamma(concentration, 1) draws on `device` (Marsaglia-Tsang), with a fixed number of proposal rounds.

    Unlike torch's own gamma sampler this accepts a generator, so runs are reproducible and resumable.
    All `rounds` proposals are drawn at once and the first accepted one is kept: static shapes, no
    host round-trip.  Each round accepts with probability > 0.95 for concentration >= 1, so the chance
    that none does is < 1e-20.  concentration < 1 uses Gamma(a) = Gamma(a + 1) * U^(1/a).
    """
    if concentration <= 0:
        raise ValueError(f"gamma concentration must be > 0, got {concentration}")
    boosted = concentration < 1.0
    a = concentration + 1.0 if boosted else concentration
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    x = torch.randn((rounds, *shape), generator=generator, device=device)
    u = torch.rand((rounds, *shape), generator=generator, device=device)
    v = (1.0 + c * x) ** 3
    v_safe = v.clamp_min(1e-12)
    accept = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v_safe + d * torch.log(v_safe))
    first_accepted = accept.to(torch.uint8).argmax(dim=0, keepdim=True)
    g = d * v_safe.gather(0, first_accepted).squeeze(0)
    if boosted:
        g = g * torch.rand(shape, generator=generator, device=device) ** (1.0 / concentration)
    return g


def sample_beta(
    alpha: float, shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """lam ~ Beta(alpha, alpha), drawn on `device`: (shape) float32 in [0, 1] (0 and 1 only by float rounding,
    which small alphas make likely)."""
    _check_generator(generator, torch.device(device))
    g1 = sample_gamma(alpha, shape, device, generator)
    g2 = sample_gamma(alpha, shape, device, generator)
    return g1 / (g1 + g2).clamp_min(torch.finfo(g1.dtype).tiny)


def _kind_mask(
    pair_kind: str, positive_kind: torch.Tensor, anchor_kind: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """The candidates of the batch's pair kind, from the masks of each kind (any shape, same for both).

    "random" flips one fair coin per batch (the official code's `random.randint(0, 1)` per step); a kind
    without any candidate in the batch gives way to the other, decided on the device (no host sync).
    """
    if pair_kind == "positive":
        return positive_kind
    if pair_kind == "anchor":
        return anchor_kind
    if pair_kind == "both":
        return positive_kind | anchor_kind
    coin = torch.rand((), generator=generator, device=positive_kind.device) < 0.5
    has_pos, has_anchor = positive_kind.any(), anchor_kind.any()
    pick_positive = torch.where(coin, has_pos | ~has_anchor, has_pos & ~has_anchor)
    return torch.where(pick_positive, positive_kind, anchor_kind)


def _draw_lam(
    alpha: float, lam_per: str, count: int, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    if lam_per == "batch":
        return sample_beta(alpha, (1,), device, generator).expand(count)
    return sample_beta(alpha, (count,), device, generator)


def _check_plan_args(pair_kind: str, lam_per: str) -> None:
    if pair_kind not in PAIR_KINDS:
        raise ValueError(f"unknown pair kind {pair_kind!r}; choose one of {PAIR_KINDS}")
    if lam_per not in LAMBDA_PER:
        raise ValueError(f"lam_per must be one of {LAMBDA_PER}, got {lam_per!r}")


def plan_pairs(
    labels: torch.Tensor,
    *,
    pair_kind: str = "random",
    alpha: float = 2.0,
    lam_per: str = "batch",
    max_pairs: int = 0,
    generator: torch.Generator | None = None,
) -> MixedTargets:
    """Choose the mixes of a batch.

    labels: (B,) int64 class ids (on the training device).  pair_kind: "positive" (positive-negative
    mixes), "anchor" (anchor-negative mixes for anchors without positive), "both", or "random" (one of
    the two kinds per batch, with probability 1/2 each, as the official code; a kind without any valid
    pair in the batch, e.g. "anchor" on class-balanced batches, gives way to the other).  lam_per: "batch"
    (one lam for all mixes, as the paper) or "pair" (one per source pair).  max_pairs: 0 = every valid
    source pair (the B x B grid, M = B^2), > 0 = a random subset of the valid pairs in exactly
    min(max_pairs, B^2) slots.
    """
    _check_plan_args(pair_kind, lam_per)
    device = labels.device
    _check_generator(generator, device)
    batch = labels.shape[0]
    other_class = labels[:, None] != labels[None, :]
    has_positive = _has_positive(labels)[:, None]
    positive_kind = has_positive & other_class
    anchor_kind = ~has_positive & other_class
    valid = _kind_mask(pair_kind, positive_kind, anchor_kind, generator).reshape(-1)
    rows = torch.arange(batch, device=device)
    first = rows.repeat_interleave(batch)
    second = rows.repeat(batch)
    grid = True
    if max_pairs > 0:
        slots = min(max_pairs, batch * batch)
        keys = torch.where(valid, torch.rand(batch * batch, generator=generator, device=device), -1.0)
        pick = keys.topk(slots).indices  # valid pairs first, in random order; then padding
        first, second, valid = first[pick], second[pick], valid[pick]
        grid = False
    lam = _draw_lam(alpha, lam_per, first.shape[0], device, generator)
    return MixedTargets(first, second, lam, valid, labels[first], labels[second], grid)


def hardest_negatives(emb: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each anchor's k closest negatives: indices (B, k') and whether each exists (B, k'), k' = min(k, B - 1).

    emb: (B, D) L2-normalised (highest cosine = smallest Euclidean distance, the official selection).
    """
    batch = labels.shape[0]
    width = max(1, min(int(k), batch - 1))
    sim = emb.detach().float() @ emb.detach().float().T
    negative = labels[:, None] != labels[None, :]
    scores, index = sim.masked_fill(~negative, float("-inf")).topk(width, dim=1)
    return index, torch.isfinite(scores)


def plan_hardest_pairs(
    labels: torch.Tensor,
    emb: torch.Tensor,
    *,
    slots: int,
    hard_negatives: int = 1,
    pair_kind: str = "random",
    alpha: float = 2.0,
    lam_per: str = "batch",
    generator: torch.Generator | None = None,
) -> MixedTargets:
    """Input-level mixes with hardest negatives, as the official input mode chooses them.

    For every (anchor a, positive i) pair, i is mixed with each of a's `hard_negatives` closest negatives
    (kind "positive"); an anchor without positive is mixed itself with its closest negatives (kind
    "anchor").  Closeness is measured on the clean embeddings `emb` (B, D) of this step.  The candidates
    fill exactly `slots` mixes (static shape, no host sync): all of them when they fit, a uniformly
    random subset otherwise; unused slots are padding with valid = False.  A mix (i, n) then serves
    every anchor of i's class as the paper's V(a) says (MixedTargets.for_anchors).
    """
    _check_plan_args(pair_kind, lam_per)
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    device = labels.device
    _check_generator(generator, device)
    batch = labels.shape[0]
    negatives, exists = hardest_negatives(emb, labels, hard_negatives)  # (B, k)
    width = negatives.shape[1]
    rows = torch.arange(batch, device=device)
    same = labels[:, None] == labels[None, :]
    positive_pair = same & (rows[:, None] != rows[None, :])  # (anchor, positive)
    has_positive = positive_pair.any(dim=1)
    # candidates: (anchor a, positive i, r) -> mix (i, negatives[a, r]); then (anchor a, r) -> (a, negatives[a, r])
    pos_valid = (positive_pair[:, :, None] & exists[:, None, :]).reshape(-1)
    pos_first = rows[None, :, None].expand(batch, batch, width).reshape(-1)
    pos_second = negatives[:, None, :].expand(batch, batch, width).reshape(-1)
    anc_valid = (~has_positive[:, None] & exists).reshape(-1)
    anc_first = rows[:, None].expand(batch, width).reshape(-1)
    anc_second = negatives.reshape(-1)
    zeros_anc = torch.zeros_like(anc_valid)
    zeros_pos = torch.zeros_like(pos_valid)
    valid = _kind_mask(pair_kind, torch.cat([pos_valid, zeros_anc]), torch.cat([zeros_pos, anc_valid]), generator)
    first = torch.cat([pos_first, anc_first])
    second = torch.cat([pos_second, anc_second])
    count = min(int(slots), first.shape[0])
    keys = torch.where(valid, torch.rand(first.shape[0], generator=generator, device=device), -1.0)
    pick = keys.topk(count).indices
    first, second, valid = first[pick], second[pick], valid[pick]
    if count < slots:  # more slots than candidates (tiny batches): pad with invalid mixes
        pad = slots - count
        first = torch.cat([first, first.new_zeros(pad)])
        second = torch.cat([second, second.new_zeros(pad)])
        valid = torch.cat([valid, valid.new_zeros(pad)])
    lam = _draw_lam(alpha, lam_per, slots, device, generator)
    return MixedTargets(first, second, lam, valid, labels[first], labels[second], False)


# ------------------------------------------------------------------------------------------------
# Mixing at each level
# ------------------------------------------------------------------------------------------------


def mix_images(images: torch.Tensor, targets: MixedTargets) -> torch.Tensor:
    """Input level: images (B, 3, H, W) -> mixed images (M, 3, H, W) = lam x_i + (1 - lam) x_j."""
    weight = targets.lam.to(images.dtype).view(-1, 1, 1, 1)
    return torch.lerp(images[targets.second], images[targets.first], weight)


def mix_embeddings(emb: torch.Tensor, targets: MixedTargets) -> torch.Tensor:
    """Embedding level: emb (B, D) L2-normalised -> mixed (M, D) L2-normalised.

    The mix is interpolated and then projected back onto the unit sphere.  Every embedding the loss
    compares lives on the sphere (the embedder ends with an L2 norm, and the official code measured
    mixed embeddings with pytorch-metric-learning distances that re-normalise their inputs), and
    "mix, then embed" at this level means the mix passes through the embedder's last operation, the
    normalisation.  Cosine losses are unaffected; for the Euclidean contrastive distance it keeps the
    margins on the same scale as clean pairs.
    """
    emb = emb.to(torch.promote_types(emb.dtype, torch.float32))
    weight = targets.lam.to(emb.dtype)[:, None]
    return F.normalize(torch.lerp(emb[targets.second], emb[targets.first], weight), dim=1)


@torch.no_grad()
def _mixed_argmax(flat: torch.Tensor, targets: MixedTargets, lam: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """Per mix and channel, the spatial position of the maximum of lam a + (1 - lam) b.

    flat: (B, C, P) maps (no grad); returns (M, C) int64.  Mixed maps exist one chunk at a time.
    """
    batch, channels, positions = flat.shape
    count = targets.first.shape[0]
    out = torch.empty(count, channels, dtype=torch.long, device=flat.device)
    if targets.grid:  # m = i * B + j: mix rows of i against all j by broadcasting, no gathered copies
        rows_per_chunk = max(1, chunk_elements // (batch * channels * positions))
        for r0 in range(0, batch, rows_per_chunk):
            r1 = min(batch, r0 + rows_per_chunk)
            weight = lam[r0 * batch : r1 * batch].view(r1 - r0, batch, 1, 1)
            mixed = torch.lerp(flat[None], flat[r0:r1, None], weight)  # (r, B, C, P)
            out[r0 * batch : r1 * batch] = mixed.argmax(dim=3).view(-1, channels)
    else:
        per_chunk = max(1, chunk_elements // (channels * positions))
        for s0 in range(0, count, per_chunk):
            s1 = min(count, s0 + per_chunk)
            weight = lam[s0:s1].view(-1, 1, 1)
            mixed = torch.lerp(flat[targets.second[s0:s1]], flat[targets.first[s0:s1]], weight)  # (k, C, P)
            out[s0:s1] = mixed.argmax(dim=2)
    return out


def mixed_pool(
    fmap: torch.Tensor, targets: MixedTargets, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, fused: bool | None = None
) -> torch.Tensor:
    """Feature level: the embedder's pooling (global avg + global max, summed) of every mixed map, without
    keeping the mixed maps.

    fmap: (B, C, h, w) layer4 maps of the clean pass -> (M, C) pooled mixes, differentiable w.r.t. fmap.
    Average pooling is linear, so avg(lam a + (1 - lam) b) = lam avg(a) + (1 - lam) avg(b) needs no
    mixed map.  For the max, the argmax position of each mixed map is found chunk by chunk without
    gradient, and the maximum is re-read from the two SOURCE maps, lam a[p*] + (1 - lam) b[p*], which
    carries exactly the gradient autograd gives through amax of the materialised mix (ties aside:
    amax splits the gradient among tied positions, this gives it to the first; on ReLU outputs ties are
    zeros, whose gradient the ReLU blocks either way).  Memory: O(M * C) instead of O(M * C * h * w)
    (about 4 GB in fp32 for the full grid of a batch of 100 on ResNet-50).

    fused: None picks `training.fused_pool` (two Triton kernels, same result and gradient) on CUDA
    unless deterministic algorithms are requested; True forces it, False forces this PyTorch path.
    """
    batch, channels, height, width = fmap.shape
    positions = height * width
    flat = fmap.reshape(batch, channels, positions)
    if fused is None:  # the kernels where available, once a first use has run them (else the path below)
        fused = fused_pool.ready(flat, targets.first, targets.second, targets.lam)
    if fused:
        return fused_pool.fused_mixed_pool(flat, targets.first, targets.second, targets.lam)
    lam = targets.lam.to(fmap.dtype)
    argmax = _mixed_argmax(flat.detach(), targets, lam, chunk_elements)  # (M, C)
    # linear index of (first_m, c, argmax) in flat, then of (second_m, c, argmax)
    channel_offset = torch.arange(channels, device=fmap.device) * positions
    index_first = argmax.add_(channel_offset[None, :]).add_(targets.first[:, None] * (channels * positions))
    index_second = index_first + ((targets.second - targets.first) * (channels * positions))[:, None]
    # From here on (at least) float32: a source map receives gradient from up to 2B mixes, and summing
    # those in bfloat16 would lose most of it; lam also keeps the precision the soft labels use.
    flat = flat.to(torch.promote_types(fmap.dtype, torch.float32))
    values = flat.reshape(-1)
    top_first = values.gather(0, index_first.view(-1)).view(-1, channels)
    top_second = values.gather(0, index_second.view(-1)).view(-1, channels)
    avg = flat.mean(dim=2)  # (B, C)
    weight = targets.lam.to(flat.dtype)[:, None]
    return torch.lerp(avg[targets.second] + top_second, avg[targets.first] + top_first, weight)


__all__ = [
    "MixedTargets",
    "plan_pairs",
    "plan_hardest_pairs",
    "hardest_negatives",
    "sample_beta",
    "sample_gamma",
    "mix_images",
    "mix_embeddings",
    "mixed_pool",
]
