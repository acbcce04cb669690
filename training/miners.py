"""Pair miners: which pairs of a clean batch a loss keeps.

A miner returns a boolean mask over the (anchor, sample) grid instead of index lists, so the loss keeps
static shapes and never synchronises with the host.
"""

from __future__ import annotations

import torch


def multi_similarity_mask(sim: torch.Tensor, same: torch.Tensor, valid: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The multi-similarity pair miner (Wang et al. 2019) as a mask.

    sim: (A, N) cosine similarities; same: (A, N) bool, same class; valid: (A, N) bool, candidate pairs
    (self pairs already removed).  Keeps a positive if it is less similar than the anchor's most
    similar negative plus epsilon, and a negative if it is more similar than the anchor's least
    similar positive minus epsilon.  Anchors without positives (or without negatives) keep nothing,
    which is what pytorch-metric-learning's MultiSimilarityMiner returns for them.
    Returns (A, N) bool.
    """
    with torch.no_grad():
        pos = same & valid
        neg = ~same & valid
        hardest_pos = torch.where(pos, sim, float("inf")).amin(
            dim=1, keepdim=True
        )  # least similar positive, +inf if none
        hardest_neg = torch.where(neg, sim, float("-inf")).amax(
            dim=1, keepdim=True
        )  # most similar negative, -inf if none
        keep_pos = pos & (sim - epsilon < hardest_neg)
        keep_neg = neg & (sim + epsilon > hardest_pos)
        return keep_pos | keep_neg
