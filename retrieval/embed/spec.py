"""Which embedder to run, parsed once, and the one function that opens it.

An `EmbedderSpec` is what a command's options (`--checkpoint`, `--backend onnx --model`, `--untrained`)
or an index's record (`embedder_source` in meta.json) say about the embedder. `open_embedder` turns it
into a backend; every command, the app and the Ray workers go through it, so the "auto" rule, the
record format and the error telling the user what to pass live here only. A new kind of embedder is
one entry in `KINDS` plus its backend module.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.errors import InputError, UsageError

if TYPE_CHECKING:
    from retrieval.embed.backend import EmbeddingBackend


@dataclass(frozen=True)
class EmbedderSpec:
    """One embedder: a torch checkpoint, an ONNX file, or a seeded untrained network (baselines, tests).

    `path` is set for file kinds; the untrained fields for "untrained". Equal specs open equal embedders.
    """

    kind: str
    path: str | None = None
    arch: str = "resnet50"
    embedding_size: int = 512
    image_size: int = 224
    resize_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"unknown embedder kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if KINDS[self.kind].takes_path and not self.path:
            raise UsageError(f"the {self.kind} embedder needs {KINDS[self.kind].needs}")

    # -- constructors ----------------------------------------------------------------------------
    @classmethod
    def checkpoint(cls, path: str | os.PathLike[str]) -> EmbedderSpec:
        return cls("checkpoint", _absolute(path))

    @classmethod
    def onnx(cls, path: str | os.PathLike[str]) -> EmbedderSpec:
        return cls("onnx", _absolute(path))

    @classmethod
    def untrained(
        cls,
        arch: str = "resnet18",
        embedding_size: int = 128,
        image_size: int = 224,
        resize_size: int | None = None,
        seed: int = 0,
    ) -> EmbedderSpec:
        from retrieval.config import default_resize_size

        return cls(
            "untrained",
            None,
            arch,
            int(embedding_size),
            int(image_size),
            int(resize_size or default_resize_size(image_size)),
            int(seed),
        )

    @classmethod
    def from_options(
        cls,
        backend: str | None = "auto",
        checkpoint: str | os.PathLike[str] | None = None,
        model: str | os.PathLike[str] | None = None,
    ) -> EmbedderSpec | None:
        """What `--backend/--checkpoint/--model` ask for; None when they name no embedder.

        "auto" (or no backend) runs the ONNX model when one is given, the checkpoint otherwise.
        """
        backend = (backend or "auto").lower()
        if backend not in BACKEND_CHOICES:
            raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
        if backend == "auto":
            if model is None and checkpoint is None:
                return None
            backend = "onnx" if model is not None else "torch"
        kind = next(k for k in KINDS.values() if k.takes_path and k.backend == backend)
        path = {"checkpoint": checkpoint, "model": model}[kind.option]
        if path is None:
            raise UsageError(f"the {backend} backend needs {kind.needs}")
        return cls(kind.name, _absolute(path))

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> EmbedderSpec:
        """The embedder an index or embeddings folder records, or an error saying how to supply one."""
        kind = record.get("kind")
        if kind == "vectors":
            raise InputError(
                f"the index was built from vectors ({record.get('path')}) and records no embedder to embed images "
                "with; search it with --embeddings QUERIES.npy (vectors from the same model)"
            )
        if kind not in KINDS:
            raise InputError(f"the index records no usable embedder ({record!r}); pass --checkpoint or --model")
        if kind == "untrained":
            return cls.untrained(
                record["arch"], record["embedding_size"], record["image_size"], record["resize_size"], record["seed"]
            )
        return cls(kind, str(record["path"]))

    # -- facts -------------------------------------------------------------------------------------
    def to_record(self) -> dict[str, Any]:
        """The JSON record stored in meta.json / manifest.json (read back by `from_record`)."""
        if self.kind == "untrained":
            return {
                "kind": "untrained",
                "arch": self.arch,
                "embedding_size": self.embedding_size,
                "image_size": self.image_size,
                "resize_size": self.resize_size,
                "seed": self.seed,
            }
        return {"kind": self.kind, "path": self.path}

    def describe(self) -> str:
        """What an index was built from, as messages say it: "checkpoint /runs/x/best.pt"."""
        kind = KINDS[self.kind]
        return f"{kind.label} {self.path}" if kind.takes_path else f"{kind.label} ({kind.flag})"


def _absolute(path: str | os.PathLike[str]) -> str:
    """Recorded paths are absolute, so an index re-opens its embedder from any working directory."""
    return str(Path(path).expanduser().resolve())


def open_embedder(spec: EmbedderSpec, device: str = "auto") -> EmbeddingBackend:
    """The backend for `spec` on `device` ("auto", "cpu", "cuda[:N]"); it keeps the spec as `backend.spec`.

    The backend module is imported here, so an ONNX embedder never imports torch; for ONNX, `device`
    selects the onnxruntime providers and the backend's `device` reports what runs.
    """
    backend = KINDS[spec.kind].open(spec, device)
    backend.spec = spec
    return backend


def embedder_record(backend: EmbeddingBackend) -> dict[str, Any]:
    """The record an index or embeddings folder stores so the same embedder can be re-opened for search."""
    spec = getattr(backend, "spec", None)
    if spec is None:
        raise UsageError(
            "this embedder was not opened from a checkpoint, an ONNX file or --untrained, so an index "
            "could not re-open it; open it with retrieval.embed.spec.open_embedder"
        )
    return spec.to_record()


def recorded_spec(record: dict[str, Any]) -> EmbedderSpec:
    """The embedder an index (or embeddings folder) records, checked without opening it (no torch), or an error
    saying how to supply one."""
    spec = EmbedderSpec.from_record(record)
    if KINDS[spec.kind].takes_path and not Path(spec.path or "").is_file():
        raise FileNotFoundError(
            f"the index was built with {spec.path}, which no longer exists; pass the embedder "
            f"with {KINDS[spec.kind].flag}"
        )
    return spec


def open_recorded(record: dict[str, Any], device: str = "auto") -> EmbeddingBackend:
    """Re-open the embedder an index (or embeddings folder) records, or say how to supply one."""
    return open_embedder(recorded_spec(record), device)


# -- the kinds ---------------------------------------------------------------------------------------


def _open_checkpoint(spec: EmbedderSpec, device: str) -> EmbeddingBackend:
    from retrieval.embed.torch_backend import TorchBackend

    return TorchBackend.from_checkpoint(_path_of(spec), device=device)


def _open_onnx(spec: EmbedderSpec, device: str) -> EmbeddingBackend:
    from retrieval.embed.onnx_backend import OnnxBackend, providers_for_device

    return OnnxBackend(_path_of(spec), providers=providers_for_device(device))


def _path_of(spec: EmbedderSpec) -> str:
    """The file of a checkpoint or ONNX spec (__post_init__ refuses those kinds without one)."""
    if spec.path is None:
        raise ValueError(f"a {spec.kind} embedder spec needs a path")
    return spec.path


def _open_untrained(spec: EmbedderSpec, device: str) -> EmbeddingBackend:
    """Seeded, so that search re-creates the very network the index was built with."""
    import torch

    from retrieval.config import ModelConfig, default_resize_size
    from retrieval.embed.torch_backend import TorchBackend
    from retrieval.model import Embedder
    from retrieval.preprocess import Preprocessing

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Embedder(ModelConfig(arch=spec.arch, embedding_size=spec.embedding_size, pretrained="none"))
    prep = Preprocessing(
        image_size=spec.image_size, resize_size=spec.resize_size or default_resize_size(spec.image_size)
    )
    return TorchBackend(model, prep, device=device)


@dataclass(frozen=True)
class EmbedderKind:
    """How one kind of embedder is passed, recorded and opened."""

    name: str  # the record's "kind"
    backend: str  # what runs it ("torch" | "onnx"): the value of --backend
    takes_path: bool
    option: str  # the command-line value that carries its path ("checkpoint" | "model"; "" without a path)
    label: str  # what it is, in messages
    flag: str  # how a user passes it
    needs: str  # what --backend BACKEND without its file is told
    open: Callable[[EmbedderSpec, str], EmbeddingBackend]


KINDS: dict[str, EmbedderKind] = {
    "checkpoint": EmbedderKind(
        "checkpoint",
        "torch",
        True,
        "checkpoint",
        "checkpoint",
        "--checkpoint CKPT",
        "--checkpoint PATH (or use --backend onnx --model PATH.onnx)",
        _open_checkpoint,
    ),
    "onnx": EmbedderKind(
        "onnx",
        "onnx",
        True,
        "model",
        "ONNX model",
        "--backend onnx --model MODEL.onnx",
        "--model PATH.onnx (create one with `retrieval export --checkpoint CKPT --out model.onnx`)",
        _open_onnx,
    ),
    "untrained": EmbedderKind(
        "untrained", "torch", False, "", "an untrained embedder", "--untrained", "--untrained", _open_untrained
    ),
}

# values of --backend: "auto" plus every backend that runs a file
BACKEND_CHOICES: tuple[str, ...] = ("auto", *dict.fromkeys(k.backend for k in KINDS.values() if k.takes_path))
