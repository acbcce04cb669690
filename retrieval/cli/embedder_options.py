"""The options that name an embedder, declared once for every command that embeds images.

Each function returns a fresh Typer option (a command's signature uses it as a default); `embedder_spec`
turns the parsed values into one EmbedderSpec, so the "auto" rule and the errors are the same everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from retrieval.embed.spec import BACKEND_CHOICES, EmbedderSpec
from retrieval.errors import UsageError

RECORDED = " (default: the one recorded in the index)"


def checkpoint_option(recorded: bool = False) -> Any:
    return typer.Option(
        None, "--checkpoint", help="Checkpoint written by `retrieval train`" + (RECORDED if recorded else "") + "."
    )


def backend_option(default: str | None = "auto") -> Any:
    return typer.Option(
        default,
        "--backend",
        help=f"{' | '.join(BACKEND_CHOICES[1:])} | auto (onnx when --model "
        "is given)" + ("" if default else "; default: the embedder recorded in the index") + ".",
    )


def model_option() -> Any:
    return typer.Option(None, "--model", help="ONNX model from `retrieval export` (--backend onnx).")


def untrained_option() -> Any:
    return typer.Option(
        False,
        "--untrained",
        help="A randomly initialised embedder (baselines, smoke tests); recorded with what it builds.",
    )


def arch_option() -> Any:
    return typer.Option("resnet50", "--arch", help="With --untrained: the trunk.")


def embedding_size_option() -> Any:
    return typer.Option(512, "--embedding-size", min=1, help="With --untrained: embedding size.")


def image_size_option() -> Any:
    return typer.Option(224, "--image-size", min=16, help="With --untrained: input crop size.")


def embedder_spec(
    backend: str | None,
    checkpoint: Path | None,
    model: Path | None,
    *,
    untrained: bool = False,
    arch: str = "resnet50",
    embedding_size: int = 512,
    image_size: int = 224,
    seed: int = 0,
    required: bool = True,
) -> EmbedderSpec | None:
    """The embedder the options name; None when they name none and `required` is false."""
    if untrained:
        if checkpoint is not None or model is not None:
            raise UsageError("--untrained cannot be combined with --checkpoint/--model")
        return EmbedderSpec.untrained(arch, embedding_size, image_size, seed=seed)
    spec = EmbedderSpec.from_options(backend, checkpoint, model)
    if spec is None and required:
        raise UsageError(
            "pass --checkpoint CKPT (or --backend onnx --model MODEL.onnx); for a random-weights "
            "baseline pass --untrained explicitly"
        )
    return spec
