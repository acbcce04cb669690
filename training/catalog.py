"""The losses and the smaller settings a run can choose, each declared once.

A loss entry is a name and one line of help. The command line builds its help and validation from these
entries, the config presets refuse names not listed here, and the behaviour is keyed by the same names
(`training.losses.LOSS_BUILDERS`); tests/test_catalog.py checks that it covers exactly the catalog. Adding
a loss is its implementation plus one entry here. The mixing levels are objects of their own, each with
its behaviour (training/levels.py); the helpers below word their choices too.

Torch-free on purpose: `retrieval` registers its options at import time, and its start-up (and the
ONNX serving path) must not load torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from retrieval.devices import AMP_MODES  # precision is a device setting; listed here with the recipe's other choices
from retrieval.errors import UsageError


@dataclass(frozen=True)
class Loss:
    """A pair loss (training/losses.py)."""

    name: str
    help: str


LOSSES: tuple[Loss, ...] = (
    Loss("contrastive", "Euclidean distance with margins"),
    Loss("ms", "multi-similarity"),
    Loss("pa", "proxy-anchor"),
)

# The smaller settings of a recipe, each listed once; the behaviour that reads them is named beside it.
PAIR_KINDS: tuple[str, ...] = ("random", "positive", "anchor", "both")  # which mixes a batch forms (metrix.plan_pairs)
INPUT_PAIRS: tuple[str, ...] = ("hardest", "random")  # how input mixing picks partners (objective.Objective)
LAMBDA_PER: tuple[str, ...] = ("batch", "pair")  # one mixing ratio per batch or per mix (metrix.plan_pairs)
SAMPLERS: tuple[str, ...] = ("random", "balanced")  # how training batches are drawn (batches.build_batch_sampler)

DEFAULT_LOSS = "ms"


class Choice(Protocol):
    """An entry of a list of choices: a loss here, a mixing level (training/levels.py)."""

    @property
    def name(self) -> str: ...

    @property
    def help(self) -> str: ...


ChoiceT = TypeVar("ChoiceT", bound=Choice)


def loss_names() -> tuple[str, ...]:
    return tuple(c.name for c in LOSSES)


def one_of(choice_names: tuple[str, ...]) -> str:
    """'a, b or c', for messages and help."""
    return choice_names[0] if len(choice_names) == 1 else f"{', '.join(choice_names[:-1])} or {choice_names[-1]}"


def described(choices: Sequence[Choice]) -> str:
    """'a (help), b (help) or c (help)', for option help."""
    return one_of(tuple(f"{c.name} ({c.help})" for c in choices))


def find(choices: Sequence[ChoiceT], name: str, what: str) -> ChoiceT:
    """The entry called `name`; a UsageError naming the choices when there is none."""
    for choice in choices:
        if choice.name == name:
            return choice
    raise UsageError(f"unknown {what} {name!r}; choose {one_of(tuple(c.name for c in choices))}")


def loss(name: str) -> Loss:
    """The catalog entry of a loss; a UsageError naming the choices when there is none."""
    return find(LOSSES, name, "loss")


__all__ = [
    "AMP_MODES",
    "Choice",
    "DEFAULT_LOSS",
    "INPUT_PAIRS",
    "LAMBDA_PER",
    "LOSSES",
    "Loss",
    "PAIR_KINDS",
    "SAMPLERS",
    "described",
    "find",
    "loss",
    "loss_names",
    "one_of",
]
