"""The Metrix mixing levels, each declared once: one object says where a level forms its mixes.

A level is its name and one line of help (the `--mixup` choices and their help), what a distributed run
must know about it, the term it adds to a training step (training/objective.py calls `training_term`), and
the mixes the utilization analysis forms at it (training/analysis.py calls `analysis_mixes`). Adding a
level is one MixingLevel subclass registered in LEVELS (tests/test_catalog.py runs every entry).

    none       one forward, clean loss only;
    input      mixes of images: by default (hardest negatives, as the official input mode) the mixes are
               chosen from the clean embeddings, so the embedder is called once with a follow-up: clean
               images, then a fixed number K of mixed images (two trunk passes of fixed size inside ONE
               call, so cuDNN plans once and DistributedDataParallel sees a single forward; BatchNorm in
               train mode normalises each pass with its own statistics, as the official code's separate
               forwards); with random pairs, clean and mixed images go through ONE trunk pass of B + K;
    feature    one forward returning the layer4 maps too; mixes of those maps are pooled chunk-wise and
               projected by the embedding layer alone (the trunk is never run on mixes);
    embedding  one forward; mixes of the clean embeddings.

Torch is imported inside the methods: the command line and the config presets read names and help from
this module and must start without loading it (as retrieval/index/types.py does with FAISS).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from retrieval.errors import UsageError
from training.catalog import find

if TYPE_CHECKING:
    import torch
    from torch import nn

    from training.metrix import MixedTargets


class EmbedderCalls(Protocol):
    """What the levels call of an Embedder (retrieval.model, not imported here: the config presets read this
    module and the model reads the config)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> embeddings (B, D), L2-normalised."""
        ...

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled feature maps (M, C) -> embeddings (M, D): the embedding layer alone."""
        ...


class MixingRecipe(Protocol):
    """What a level's training term reads from the objective (training.objective.Objective): the mixing
    draws of a batch and the loss terms, possibly torch.compile'd."""

    input_pairs: str  # training.catalog.INPUT_PAIRS
    chunk_elements: int  # feature level: the pooling's working-set bound (metrix.mixed_pool)
    fused_pool: bool | None  # feature level: None = Triton kernels on CUDA (metrix.mixed_pool)
    # (emb (B, D), labels (B,), mixed_emb (M, D), targets) -> the Metrix loss
    mixed_term: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, MixedTargets], torch.Tensor]
    # (emb (B, D), labels (B,), targets) -> the Metrix loss of mixes of the embeddings themselves
    mixed_embedding_term: Callable[[torch.Tensor, torch.Tensor, MixedTargets], torch.Tensor]

    def plan(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> MixedTargets: ...

    def plan_hardest(
        self, labels: torch.Tensor, emb: torch.Tensor, generator: torch.Generator | None = None
    ) -> MixedTargets: ...


class MixingLevel:
    """One mixing level. Subclasses say how they mix; the defaults describe a level that mixes."""

    name: ClassVar[str]
    help: ClassVar[str]
    # Under DDP: True when the objective runs on the global batch (every rank's embeddings gathered with
    # gradient); False when each rank can only mix and embed the images it holds, so it sees its own share.
    global_batch: ClassVar[bool] = True
    mixes: ClassVar[bool] = True  # False for the baseline, which forms no mixes

    def default_max_pairs(self, batch_size: int) -> int:
        """The mixes per batch when the recipe sets no budget (max_pairs 0): 0 = every candidate pair."""
        return 0

    def max_pairs(self, max_pairs: int, batch_size: int) -> int:
        """The pair budget this level works with for a batch of `batch_size`: `max_pairs` if set, else the
        level's default."""
        if max_pairs < 0:
            raise ValueError(f"max_pairs must be >= 0, got {max_pairs}")
        return max_pairs if max_pairs > 0 else self.default_max_pairs(batch_size)

    def training_term(
        self,
        recipe: MixingRecipe,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The clean embeddings (B, D) of a training batch and its Metrix term (None without mixing).

        model: an Embedder, possibly wrapped by DDP or torch.compile; images (B, 3, H, W); labels (B,)
        int64 on the images' device; generator: on that device, for the mixing draws."""
        raise NotImplementedError

    def analysis_mixes(
        self, model: EmbedderCalls, images: torch.Tensor, fmap: torch.Tensor, emb: torch.Tensor, targets: MixedTargets
    ) -> torch.Tensor:
        """The embeddings (M, D) of a batch's mixes as training forms them at this level, for the analyses:
        from the (unwrapped, eval-mode) Embedder, the images, their layer4 maps and clean embeddings (B, D)."""
        raise UsageError(f"the {self.name} level forms no mixes")


class NoMixing(MixingLevel):
    name = "none"
    help = "the baseline, no mixing"
    mixes = False

    def training_term(
        self,
        recipe: MixingRecipe,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return model(images), None


class InputMixing(MixingLevel):
    name = "input"
    help = "mixes of images"
    global_batch = False  # an image can only be embedded by the rank that holds it (training/distributed.py)

    def default_max_pairs(self, batch_size: int) -> int:
        """One mix per batch image: each mix costs a forward pass (the full grid would be B^2 extra images)."""
        return batch_size

    def training_term(
        self,
        recipe: MixingRecipe,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        import torch

        from training.metrix import mix_images

        if recipe.input_pairs == "hardest":
            planned: list[MixedTargets] = []

            def mixed_images(clean_emb: torch.Tensor) -> torch.Tensor:
                planned.append(recipe.plan_hardest(labels, clean_emb, generator))
                return _like_memory_format(mix_images(images, planned[0]), images)

            emb, mixed_emb = model(images, follow_up=mixed_images)
            return emb, recipe.mixed_term(emb, labels, mixed_emb, planned[0])
        targets = recipe.plan(labels, generator)
        both = _like_memory_format(torch.cat([images, mix_images(images, targets)]), images)
        out = model(both)
        emb, mixed_emb = out[: images.shape[0]], out[images.shape[0] :]
        return emb, recipe.mixed_term(emb, labels, mixed_emb, targets)

    def analysis_mixes(
        self, model: EmbedderCalls, images: torch.Tensor, fmap: torch.Tensor, emb: torch.Tensor, targets: MixedTargets
    ) -> torch.Tensor:
        from training.metrix import mix_images

        return model(mix_images(images, targets))


class FeatureMixing(MixingLevel):
    name = "feature"
    help = "mixes of the trunk's feature maps"

    def training_term(
        self,
        recipe: MixingRecipe,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from training.metrix import mixed_pool

        targets = recipe.plan(labels, generator)
        fmap, emb = model(images, return_maps=True)
        mixed_emb = unwrap_embedder(model).project(mixed_pool(fmap, targets, recipe.chunk_elements, recipe.fused_pool))
        return emb, recipe.mixed_term(emb, labels, mixed_emb, targets)

    def analysis_mixes(
        self, model: EmbedderCalls, images: torch.Tensor, fmap: torch.Tensor, emb: torch.Tensor, targets: MixedTargets
    ) -> torch.Tensor:
        from training.metrix import mixed_pool

        return model.project(mixed_pool(fmap, targets, fused=False))


class EmbeddingMixing(MixingLevel):
    name = "embedding"
    help = "mixes of embeddings"

    def training_term(
        self,
        recipe: MixingRecipe,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        targets = recipe.plan(labels, generator)
        emb = model(images)
        return emb, recipe.mixed_embedding_term(emb, labels, targets)

    def analysis_mixes(
        self, model: EmbedderCalls, images: torch.Tensor, fmap: torch.Tensor, emb: torch.Tensor, targets: MixedTargets
    ) -> torch.Tensor:
        from training.metrix import mix_embeddings

        return mix_embeddings(emb, targets)


def unwrap_embedder(model: nn.Module) -> EmbedderCalls:
    """The Embedder inside DistributedDataParallel / torch.compile wrappers."""
    inner: Any = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    return getattr(inner, "_orig_mod", inner)


def _like_memory_format(mixed: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mixed images in the batch's memory format (channels_last stays channels_last)."""
    import torch

    if images.dim() == 4 and not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
        return mixed.contiguous(memory_format=torch.channels_last)
    return mixed


LEVELS: tuple[MixingLevel, ...] = (NoMixing(), InputMixing(), FeatureMixing(), EmbeddingMixing())

DEFAULT_LEVEL = "feature"  # the headline recipe; also the level analyses mix at for a baseline embedder


def level_names() -> tuple[str, ...]:
    return tuple(lv.name for lv in LEVELS)


def mixing_level_names() -> tuple[str, ...]:
    """The levels that form mixes (every level but the baseline)."""
    return tuple(lv.name for lv in LEVELS if lv.mixes)


def level(name: str) -> MixingLevel:
    """The registered level called `name`; a UsageError naming the choices when there is none."""
    return find(LEVELS, name, "mixup level")


__all__ = [
    "DEFAULT_LEVEL",
    "LEVELS",
    "EmbedderCalls",
    "EmbeddingMixing",
    "FeatureMixing",
    "InputMixing",
    "MixingLevel",
    "MixingRecipe",
    "NoMixing",
    "level",
    "level_names",
    "mixing_level_names",
    "unwrap_embedder",
]
