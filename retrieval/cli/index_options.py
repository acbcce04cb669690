"""The `retrieval index` flags generated from the index knobs (retrieval.index.knobs), one per declared knob.

Typer reads a command's options from its signature, so `with_knob_options` adds one parameter per knob
(flag, default, range and help as declared) to the command's signature and hands the parsed values to the
command as one dict, `knobs` (field name -> value; None for a calibrated knob not given). A new knob gets
its flag without any change here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Optional, TypeVar

import typer

from retrieval.index.knobs import INDEX_KNOBS, Knob

F = TypeVar("F", bound=Callable[..., Any])


def knob_option(knob: Knob) -> inspect.Parameter:
    """The command-line parameter of `knob`: a calibrated knob defaults to None (calibration picks its value)."""
    default = None if knob.calibrated else knob.default
    option = typer.Option(default, knob.flag, min=knob.minimum, max=knob.maximum, help=knob.help)
    annotation = Optional[knob.value_type] if knob.calibrated else knob.value_type
    return inspect.Parameter(knob.field, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def cli_knobs() -> list[Knob]:
    """The knobs that have a flag, in their declared order."""
    return [knob for knob in INDEX_KNOBS.values() if knob.cli]


def with_knob_options(after: str) -> Callable[[F], F]:
    """Decorate a Typer command taking `knobs: dict[str, int | None]`: its signature gets one option per knob
    with a flag, placed after the parameter `after` (where they show in --help); it receives their values in
    `knobs`."""

    def decorate(command: F) -> F:
        signature = inspect.signature(command)
        names = [knob.field for knob in cli_knobs()]

        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            knobs = {name: kwargs.pop(name) for name in names}
            return command(*args, knobs=knobs, **kwargs)

        params: list[inspect.Parameter] = []
        for param in signature.parameters.values():
            if param.name == "knobs":
                continue
            params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))
            if param.name == after:
                params += [knob_option(knob) for knob in cli_knobs()]
        run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]

    return decorate
