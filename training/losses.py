"""One generic pair loss; contrastive, multi-similarity and proxy-anchor are choices of its parts.

For an anchor `a` with a labelled set U(a) = {(x, y)}, y in [0, 1]:

    l(a) = tau( sigma+( sum_U y * rho+(s(a, x)) ) + sigma-( sum_U (1 - y) * rho-(s(a, x)) ) )

computed here over a whole grid at once: a measure matrix `s` (anchors A x samples N), a soft label
matrix `y` (A, N) and a validity mask (A, N) that removes self pairs, miner-rejected pairs and, for
mixed samples, mixes not formed for that anchor.  A loss is a `LossForm`: which measure, which rho+,
rho-, which sigma (tau is the identity for all three) and how the per-anchor or per-pair parts are
reduced to a scalar.  Clean training uses binary y; Metrix's mixed samples carry soft y, through the
very same code.

  contrastive  Euclidean distance d   rho+ = [d - m+]+              rho- = [m- - d]+
               sigma+/- identity; each part averaged over its non-zero pair terms, then added
  MS           cosine s               rho+ = exp(-A (s - m))         rho- = exp(B (s - m))
               sigma+ = (1/A) ln(1 + .), sigma- = (1/B) ln(1 + .); mean over anchors
  PA           cosine s to proxies    rho+ = exp(-alpha (s - delta)) rho- = exp(alpha (s + delta))
               sigma+/- = ln(1 + .); + part averaged over proxies with positives, - part over all

With binary labels they equal pytorch-metric-learning's ContrastiveLoss (AvgNonZeroReducer),
MultiSimilarityLoss with MultiSimilarityMiner, and ProxyAnchorLoss.  One deliberate difference: that
library returns zero when a miner keeps at most one positive and one negative pair in the whole batch;
here those pairs still count (deciding that would need a host synchronisation, and dropping a lone
hard pair is not part of the method).

Everything runs in float32 (float64 if given) with autocast disabled: exp(75 * s) in bfloat16 is noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from retrieval.errors import UsageError
from training import catalog
from training.miners import multi_similarity_mask

if TYPE_CHECKING:  # pragma: no cover
    from retrieval.config import LossConfig
    from training.metrix import MixedTargets

Measure = Literal["cosine", "euclidean"]
Sigma = Literal["log1p", "identity"]
Reduction = Literal["mean", "mean_with_positives", "nonzero_pairs"]


@dataclass(frozen=True)
class LossForm:
    """One choice of rho+/rho-/sigma+/sigma- and reduction.

    rho_pos / rho_neg map the measure matrix elementwise.  With sigma "log1p" they return log(rho)
    (so that sigma(sum y rho) = scale * ln(1 + sum y exp(log rho)) is evaluated as a stable
    log-sum-exp) and the parts are per anchor; with sigma "identity" they return rho itself and the
    parts are per pair.
    Reductions: "mean" over all anchors; "mean_with_positives" over anchors with at least one
    positive (y > 0) in U; "nonzero_pairs" over the pair terms that are > 0.
    """

    measure: Measure
    rho_pos: Callable[[torch.Tensor], torch.Tensor]
    rho_neg: Callable[[torch.Tensor], torch.Tensor]
    sigma: Sigma
    pos_scale: float = 1.0  # sigma+(x) = pos_scale * ln(1 + x)  (log1p only)
    neg_scale: float = 1.0
    pos_reduction: Reduction = "mean"
    neg_reduction: Reduction = "mean"


def _exp_log_rho(sign: float, scale: float, margin: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """log rho(s) = sign * scale * (s - margin), i.e. rho = exp(sign * scale * (s - margin))."""
    return lambda s: (sign * scale) * (s - margin)


def contrastive_form(pos_margin: float = 0.0, neg_margin: float = 0.5) -> LossForm:
    return LossForm(
        measure="euclidean",
        rho_pos=lambda d: F.relu(d - pos_margin),
        rho_neg=lambda d: F.relu(neg_margin - d),
        sigma="identity",
        pos_reduction="nonzero_pairs",
        neg_reduction="nonzero_pairs",
    )


def multi_similarity_form(alpha: float = 17.97, beta: float = 75.66, base: float = 0.77) -> LossForm:
    return LossForm(
        measure="cosine",
        rho_pos=_exp_log_rho(-1.0, alpha, base),
        rho_neg=_exp_log_rho(1.0, beta, base),
        sigma="log1p",
        pos_scale=1.0 / alpha,
        neg_scale=1.0 / beta,
        pos_reduction="mean",
        neg_reduction="mean",
    )


def proxy_anchor_form(alpha: float = 32.0, margin: float = 0.1) -> LossForm:
    return LossForm(
        measure="cosine",
        rho_pos=_exp_log_rho(-1.0, alpha, margin),
        rho_neg=_exp_log_rho(1.0, alpha, -margin),
        sigma="log1p",
        pos_reduction="mean_with_positives",
        neg_reduction="mean",
    )


def measure_matrix(measure: Measure, anchors: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """anchors (A, D), samples (N, D), both L2-normalised -> (A, N) cosine similarity or Euclidean distance."""
    if measure == "cosine":
        return anchors @ samples.t()
    return torch.cdist(anchors, samples, p=2)


def _log1p_weighted_sum_exp(log_rho: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ln(1 + sum_j weight_ij * exp(log_rho_ij)) per row, stably; weight >= 0 and 0 removes a term."""
    logits = torch.where(weight > 0, log_rho + torch.log(weight.clamp_min(1e-38)), float("-inf"))
    zero = torch.zeros_like(logits[:, :1])
    return torch.logsumexp(torch.cat([logits, zero], dim=1), dim=1)


def _reduce(part: torch.Tensor, how: Reduction, has_positive: torch.Tensor) -> torch.Tensor:
    if how == "mean":
        return part.mean()
    if how == "mean_with_positives":
        return part.sum() / has_positive.sum().clamp_min(1).to(part.dtype)
    # nonzero_pairs: part is the (A, N) matrix of pair terms
    return part.sum() / (part > 0).sum().clamp_min(1).to(part.dtype)


def generic_pair_loss(form: LossForm, measure: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The generic loss over a grid.

    measure: (A, N) similarity or distance; y: (A, N) soft labels in [0, 1]; valid: (A, N) bool, the
    pairs in U(a).  Returns a scalar.  No data-dependent shapes, no host synchronisation.
    """
    y = y.to(measure.dtype)
    pos_weight = torch.where(valid, y, 0.0)
    neg_weight = torch.where(valid, 1.0 - y, 0.0)
    has_positive = (pos_weight > 0).any(dim=1)
    if form.sigma == "log1p":
        pos_part = form.pos_scale * _log1p_weighted_sum_exp(form.rho_pos(measure), pos_weight)  # (A,)
        neg_part = form.neg_scale * _log1p_weighted_sum_exp(form.rho_neg(measure), neg_weight)  # (A,)
    else:
        pos_part = pos_weight * form.rho_pos(measure)  # (A, N) pair terms
        neg_part = neg_weight * form.rho_neg(measure)
    return _reduce(pos_part, form.pos_reduction, has_positive) + _reduce(neg_part, form.neg_reduction, has_positive)


def _full_precision(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class PairLoss(nn.Module):
    """A `LossForm` applied to clean batches and to Metrix's mixed samples.

    Pair losses (contrastive, MS): anchors are the batch's embeddings, U(a) the rest of the batch.
    Proxy losses (PA): anchors are learnable class proxies (num_classes, D), U(c) the whole batch with
    y = [label == c]; `proxies` is this module's only parameter.
    """

    def __init__(
        self, form: LossForm, num_proxies: int = 0, embedding_size: int = 0, miner_epsilon: float | None = None
    ) -> None:
        super().__init__()
        self.form = form
        self.miner_epsilon = miner_epsilon
        if num_proxies > 0:
            self.proxies: nn.Parameter | None = nn.Parameter(torch.empty(num_proxies, embedding_size))
            nn.init.kaiming_normal_(self.proxies, mode="fan_out")
        else:
            self.proxies = None

    @property
    def uses_proxies(self) -> bool:
        return self.proxies is not None

    def _anchors(self, emb: torch.Tensor) -> torch.Tensor:
        assert self.proxies is not None
        return F.normalize(self.proxies.to(emb.dtype), dim=1)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Clean term.  emb: (B, D) embeddings (normalised here); labels: (B,) int64 class ids, in
        [0, num_classes) for proxy losses (checking that would cost a host synchronisation).  Scalar."""
        with torch.autocast(emb.device.type, enabled=False):
            emb = F.normalize(_full_precision(emb), dim=1)
            if self.uses_proxies:
                anchors = self._anchors(emb)  # (C, D)
                measure = measure_matrix(self.form.measure, anchors, emb)  # (C, B)
                classes = torch.arange(anchors.shape[0], device=labels.device)
                y = (classes[:, None] == labels[None, :]).to(emb.dtype)
                valid = torch.ones_like(y, dtype=torch.bool)
                return generic_pair_loss(self.form, measure, y, valid)
            measure = measure_matrix(self.form.measure, emb, emb)  # (B, B)
            same = labels[:, None] == labels[None, :]
            valid = ~torch.eye(len(labels), dtype=torch.bool, device=emb.device)
            if self.miner_epsilon is not None:
                cosine = measure if self.form.measure == "cosine" else emb @ emb.t()
                valid = valid & multi_similarity_mask(cosine.detach(), same, valid, self.miner_epsilon)
            return generic_pair_loss(self.form, measure, same.to(emb.dtype), valid)

    def mixed(
        self, anchor_emb: torch.Tensor, anchor_labels: torch.Tensor, mixed_emb: torch.Tensor, targets: MixedTargets
    ) -> torch.Tensor:
        """Mixed term l~: the generic loss with the mixed set V(a) in place of U(a).

        anchor_emb: (B, D) clean embeddings of the batch that `targets` indexes; anchor_labels: (B,);
        mixed_emb: (M, D) embeddings of the mixes v_m = mix(x_i, x_j) (i = targets.first[m],
        j = targets.second[m], weight lam_m on x_i).  Pair losses:

            l~(a) = tau( sigma+( sum_{m in V(a)} y_am rho+(s(f(a), v_m)) )
                       + sigma-( sum_{m in V(a)} (1 - y_am) rho-(s(f(a), v_m)) ) ),
            y_am = lam_m [l_i = l_a] + (1 - lam_m) [l_j = l_a],

        with s measured between the CLEAN anchor embedding and the mixed embedding, and V(a) the mixes
        formed for `a` (`MixedTargets.for_anchors`).  Proxy losses: anchors are the proxies and every
        valid mix is in V(c) with y_cm = lam_m [l_i = c] + (1 - lam_m) [l_j = c].  Same reduction as the
        clean term; no miner.  Scalar (0 when no mix is valid).
        """
        with torch.autocast(mixed_emb.device.type, enabled=False):
            mixed_emb = F.normalize(_full_precision(mixed_emb), dim=1)
            if self.uses_proxies:
                anchors = self._anchors(mixed_emb)
                y, valid = targets.for_proxies(anchors.shape[0])
            else:
                anchors = F.normalize(_full_precision(anchor_emb), dim=1).to(mixed_emb.dtype)
                y, valid = targets.for_anchors(anchor_labels)
            measure = measure_matrix(self.form.measure, anchors, mixed_emb)
            return generic_pair_loss(self.form, measure, y, valid)


def _contrastive(cfg: LossConfig, num_classes: int, embedding_size: int) -> PairLoss:
    return PairLoss(contrastive_form(cfg.pos_margin, cfg.neg_margin))


def _multi_similarity(cfg: LossConfig, num_classes: int, embedding_size: int) -> PairLoss:
    return PairLoss(multi_similarity_form(cfg.ms_alpha, cfg.ms_beta, cfg.ms_base), miner_epsilon=cfg.ms_miner_epsilon)


def _proxy_anchor(cfg: LossConfig, num_classes: int, embedding_size: int) -> PairLoss:
    if num_classes < 1 or embedding_size < 1:
        raise UsageError(
            f"proxy-anchor needs num_classes >= 1 and embedding_size >= 1, got {num_classes}, {embedding_size}"
        )
    return PairLoss(
        proxy_anchor_form(cfg.pa_alpha, cfg.pa_margin), num_proxies=num_classes, embedding_size=embedding_size
    )


# One builder per loss of training.catalog.LOSSES (tests/test_catalog.py checks they match).
LOSS_BUILDERS: dict[str, Callable[[LossConfig, int, int], PairLoss]] = {
    "contrastive": _contrastive,
    "ms": _multi_similarity,
    "pa": _proxy_anchor,
}


def build_loss(cfg: LossConfig, num_classes: int, embedding_size: int) -> PairLoss:
    """The configured loss.  num_classes / embedding_size size the proxies of proxy-anchor."""
    return LOSS_BUILDERS[catalog.loss(cfg.name).name](cfg, num_classes, embedding_size)


__all__ = [
    "LOSS_BUILDERS",
    "LossForm",
    "PairLoss",
    "build_loss",
    "generic_pair_loss",
    "measure_matrix",
    "contrastive_form",
    "multi_similarity_form",
    "proxy_anchor_form",
]
