"""The training objective: E = mean_a [ l(a) + w * l~(a) ], the clean loss plus w times the Metrix loss.

The mixing level of the recipe (training/levels.py) decides where the mixes come from and computes its term;
the objective holds what every level draws from: the loss, the mixing draws and the compiled loss terms.
No step synchronises with the host: every count, choice and draw stays on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn

from retrieval.errors import UsageError
from training import catalog, levels
from training.losses import PairLoss, build_loss
from training.metrix import DEFAULT_CHUNK_ELEMENTS, MixedTargets, mix_embeddings, plan_hardest_pairs, plan_pairs

if TYPE_CHECKING:  # pragma: no cover
    from retrieval.config import MixupConfig, RunConfig


class ObjectiveOutput(NamedTuple):
    """loss: scalar to backpropagate (clean + w * mixed); clean, mixed: detached scalars for logging
    (mixed is 0 without mixing).  All stay on the device; call .item() only when logging."""

    loss: torch.Tensor
    clean: torch.Tensor
    mixed: torch.Tensor


class Objective(nn.Module):
    """Holds the loss (so `parameters()` are the loss parameters, e.g. proxies) and the mixing recipe; it is
    the levels.MixingRecipe its level's term reads."""

    def __init__(
        self,
        loss: PairLoss,
        mixup: MixupConfig,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        positives_per_image: int = 1,
    ) -> None:
        """positives_per_image: how many in-batch positives an image has (K - 1 on P x K batches, about 1
        on random batches); sizes the default input-level budget of hardest-negative mixes."""
        super().__init__()
        self.mixing = levels.level(mixup.level)
        self.gathers_global_batch = self.mixing.global_batch  # under DDP (training/distributed.py)
        if mixup.alpha <= 0:
            raise UsageError(f"mixup alpha must be > 0, got {mixup.alpha}")
        if mixup.input_pairs not in catalog.INPUT_PAIRS:
            raise UsageError(f"unknown input pairs {mixup.input_pairs!r}; choose one of {catalog.INPUT_PAIRS}")
        if mixup.hard_negatives < 1:
            raise UsageError(f"hard_negatives must be >= 1, got {mixup.hard_negatives}")
        self.input_pairs = mixup.input_pairs
        self.hard_negatives = int(mixup.hard_negatives)
        self.positives_per_image = max(1, int(positives_per_image))
        self.loss = loss
        self.level = mixup.level
        self.weight = float(mixup.weight)
        self.alpha = float(mixup.alpha)
        self.lam_per = mixup.lam_per
        self.pair_kind = mixup.pair_kind
        self.max_pairs = int(mixup.max_pairs)
        self.chunk_elements = int(chunk_elements)
        self.fused_pool: bool | None = None  # feature level: None = Triton kernels on CUDA (see mixed_pool)
        self.mixing.max_pairs(self.max_pairs, 1)  # validate early
        # bound methods, not modules: an attribute holding the loss module would register it twice and
        # put its parameters (proxies) into the state dict under a second name
        self.clean_term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self.loss.forward
        self.mixed_term: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, MixedTargets], torch.Tensor] = (
            self.loss.mixed
        )
        self.mixed_embedding_term: Callable[[torch.Tensor, torch.Tensor, MixedTargets], torch.Tensor] = (
            self._mix_embeddings_then_loss
        )
        self.losses_compiled = False

    def compile_losses(self) -> Objective:
        """torch.compile the loss terms (and the embedding-level mixing) into fused kernels.

        Eagerly, the Metrix term of a step is a few hundred small tensor operations; on a GPU their
        launch cost alone can exceed the arithmetic and slow a step that is otherwise limited by the
        trunk.  The random draws (`plan`) stay eager.  Shapes are static per batch size, so a run
        compiles once (again for a smaller last batch).
        """
        self.clean_term = torch.compile(self.loss.forward, dynamic=False)
        self.mixed_term = torch.compile(self.loss.mixed, dynamic=False)
        self.mixed_embedding_term = torch.compile(self._mix_embeddings_then_loss, dynamic=False)
        self.losses_compiled = True
        return self

    def _mix_embeddings_then_loss(self, emb: torch.Tensor, labels: torch.Tensor, targets: MixedTargets) -> torch.Tensor:
        return self.loss.mixed(emb, labels, mix_embeddings(emb, targets), targets)

    def plan(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> MixedTargets:
        """The mixes of a batch under this recipe."""
        return plan_pairs(
            labels,
            pair_kind=self.pair_kind,
            alpha=self.alpha,
            lam_per=self.lam_per,
            max_pairs=self.mixing.max_pairs(self.max_pairs, labels.shape[0]),
            generator=generator,
        )

    def input_slots(self, batch: int) -> int:
        """Mixed images per step at the input level with hardest negatives: `max_pairs` if set, else one per
        (anchor, positive, hard negative), which on P x K batches is every candidate of the official code."""
        return self.max_pairs if self.max_pairs > 0 else batch * self.positives_per_image * self.hard_negatives

    def plan_hardest(
        self, labels: torch.Tensor, emb: torch.Tensor, generator: torch.Generator | None = None
    ) -> MixedTargets:
        """Input-level mixes of a batch from its clean embeddings emb (B, D)."""
        return plan_hardest_pairs(
            labels,
            emb,
            slots=self.input_slots(labels.shape[0]),
            hard_negatives=self.hard_negatives,
            pair_kind=self.pair_kind,
            alpha=self.alpha,
            lam_per=self.lam_per,
            generator=generator,
        )

    def forward(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> ObjectiveOutput:
        """model: an Embedder (possibly wrapped by DDP or torch.compile); images (B, 3, H, W); labels (B,)
        int64 on the images' device; generator: a torch.Generator on that device for the mixing draws
        (None: the device's default generator)."""
        emb, mixed = self.mixing.training_term(self, model, images, labels, generator)
        clean = self.clean_term(emb, labels)
        if mixed is None:
            return ObjectiveOutput(clean, clean.detach(), torch.zeros((), device=clean.device, dtype=clean.dtype))
        loss = clean + self.weight * mixed
        return ObjectiveOutput(loss, clean.detach(), mixed.detach())


def build_objective(cfg: RunConfig, num_classes: int, embedding_size: int) -> Objective:
    """The objective of a run: its loss (cfg.loss) and mixing recipe (cfg.mixup); loss terms compiled
    when cfg.train.compile_loss asks for it."""
    per_image = cfg.data.images_per_class - 1 if cfg.data.sampler == "balanced" else 1
    objective = Objective(build_loss(cfg.loss, num_classes, embedding_size), cfg.mixup, positives_per_image=per_image)
    return objective.compile_losses() if cfg.train.compile_loss else objective


__all__ = ["Objective", "ObjectiveOutput", "build_objective"]
