"""The losses and Metrix mixing levels a run can choose, each declared once.

An entry is a name, one line of help and, for a level, what the distributed run must know about it.
The command line builds its help and validation from these entries, the config presets refuse names not
listed here, and the behaviour is keyed by the same names (`training.losses.LOSS_BUILDERS`,
`training.objective.LEVEL_TERMS`, `training.analysis.TRAINING_MIXES`); tests/test_catalog.py checks
that each covers exactly the catalog. Adding a loss or a level is its implementation plus one entry here.

Torch-free on purpose: `retrieval` registers its options at import time, and its start-up (and the
ONNX serving path) must not load torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from retrieval.devices import AMP_MODES  # precision is a device setting; listed here with the recipe's other choices
from retrieval.errors import UsageError


@dataclass(frozen=True)
class Loss:
    """A pair loss (training/losses.py)."""

    name: str
    help: str


@dataclass(frozen=True)
class MixingLevel:
    """Where Metrix forms its mixes (training/objective.py)."""

    name: str
    help: str
    # Under DDP: True when the objective runs on the global batch (every rank's embeddings gathered with
    # gradient); False when each rank can only mix and embed the images it holds, so it sees its own share.
    global_batch: bool
    mixes: bool = True  # False for the baseline, which forms no mixes


LOSSES: tuple[Loss, ...] = (
    Loss("contrastive", "Euclidean distance with margins"),
    Loss("ms", "multi-similarity"),
    Loss("pa", "proxy-anchor"),
)

LEVELS: tuple[MixingLevel, ...] = (
    MixingLevel("none", "the baseline, no mixing", global_batch=True, mixes=False),
    MixingLevel("input", "mixes of images", global_batch=False),
    MixingLevel("feature", "mixes of the trunk's feature maps", global_batch=True),
    MixingLevel("embedding", "mixes of embeddings", global_batch=True),
)

# The smaller settings of a recipe, each listed once; the behaviour that reads them is named beside it.
PAIR_KINDS: tuple[str, ...] = ("random", "positive", "anchor", "both")  # which mixes a batch forms (metrix.plan_pairs)
INPUT_PAIRS: tuple[str, ...] = ("hardest", "random")  # how input mixing picks partners (objective.Objective)
LAMBDA_PER: tuple[str, ...] = ("batch", "pair")  # one mixing ratio per batch or per mix (metrix.plan_pairs)
SAMPLERS: tuple[str, ...] = ("random", "balanced")  # how training batches are drawn (batches.build_batch_sampler)

DEFAULT_LOSS = "ms"
DEFAULT_LEVEL = "feature"  # the headline recipe; also the level analyses mix at for a baseline embedder

Choice = TypeVar("Choice", Loss, MixingLevel)


def loss_names() -> tuple[str, ...]:
    return tuple(c.name for c in LOSSES)


def level_names() -> tuple[str, ...]:
    return tuple(c.name for c in LEVELS)


def mixing_level_names() -> tuple[str, ...]:
    """The levels that form mixes (every level but the baseline)."""
    return tuple(c.name for c in LEVELS if c.mixes)


def one_of(choice_names: tuple[str, ...]) -> str:
    """'a, b or c', for messages and help."""
    return choice_names[0] if len(choice_names) == 1 else f"{', '.join(choice_names[:-1])} or {choice_names[-1]}"


def described(choices: tuple[Choice, ...]) -> str:
    """'a (help), b (help) or c (help)', for option help."""
    return one_of(tuple(f"{c.name} ({c.help})" for c in choices))


def _find(choices: tuple[Choice, ...], name: str, what: str) -> Choice:
    for choice in choices:
        if choice.name == name:
            return choice
    raise UsageError(f"unknown {what} {name!r}; choose {one_of(tuple(c.name for c in choices))}")


def loss(name: str) -> Loss:
    """The catalog entry of a loss; a UsageError naming the choices when there is none."""
    return _find(LOSSES, name, "loss")


def level(name: str) -> MixingLevel:
    """The catalog entry of a mixing level; a UsageError naming the choices when there is none."""
    return _find(LEVELS, name, "mixup level")


__all__ = [
    "AMP_MODES", "DEFAULT_LEVEL", "DEFAULT_LOSS", "INPUT_PAIRS", "LAMBDA_PER", "LEVELS", "LOSSES", "Loss",
    "MixingLevel", "PAIR_KINDS", "SAMPLERS", "described", "level",
    "level_names", "loss", "loss_names", "mixing_level_names", "one_of",
]
