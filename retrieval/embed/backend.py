"""Batch embedding of images behind one interface, whatever runs the network (torch or onnxruntime).

A backend turns RGB images into L2-normalised float32 embeddings and says which embedder it is
(fingerprint), what input it expects (preprocessing) and where it runs (device). Indexes, search and
the web UI only talk to this interface. This module itself imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from retrieval.errors import UsageError
from retrieval.embed.preprocess import Preprocessing


@runtime_checkable
class EmbeddingBackend(Protocol):
    fingerprint: str
    embedding_size: int
    preprocessing: Preprocessing
    device: str  # human-readable: "cuda:0 (bf16)", "cpu", "onnxruntime CPUExecutionProvider"
    name: str  # "torch" | "onnx"

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB PIL images -> (N, D) float32, L2-normalised."""
        ...

    def embed_paths(
        self, paths: Sequence[str | os.PathLike[str]], batch_size: int = 64, progress: bool = True
    ) -> np.ndarray:
        """Image files -> (N, D) float32, L2-normalised, in the order given."""
        ...


BACKEND_KINDS = ("auto", "torch", "onnx")


def load_backend(
    kind: str,
    checkpoint: str | os.PathLike[str] | None,
    model: str | os.PathLike[str] | None,
    device: str = "auto",
    providers: Sequence[object] | None = None,
) -> EmbeddingBackend:
    """The backend a command asked for: "torch" runs a checkpoint, "onnx" an exported model.

    "auto" picks onnx when a model file is given, torch otherwise. The backend module is imported
    here, so choosing onnx never imports torch. For onnx, `device` ("cpu", "cuda[:N]") selects the
    onnxruntime providers unless `providers` is given; the backend's `device` reports what runs.
    """
    kind = (kind or "auto").lower()
    if kind not in BACKEND_KINDS:
        raise UsageError(f"unknown backend {kind!r}; choose one of {', '.join(BACKEND_KINDS)}")
    if kind == "auto":
        kind = "onnx" if model is not None else "torch"
    if kind == "onnx":
        if model is None:
            raise UsageError(
                "the onnx backend needs --model PATH.onnx (create one with `retrieval export --checkpoint CKPT --out model.onnx`)"
            )
        from retrieval.embed.onnx_backend import OnnxBackend, providers_for_device

        return OnnxBackend(model, providers=providers or providers_for_device(device))
    if checkpoint is None:
        raise UsageError("the torch backend needs --checkpoint PATH (or use --backend onnx --model PATH.onnx)")
    from retrieval.embed.torch_backend import TorchBackend

    return TorchBackend.from_checkpoint(checkpoint, device=device)
