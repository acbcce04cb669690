"""Batch embedding of images behind one interface, whatever runs the network (torch or onnxruntime).

A backend turns RGB images into L2-normalised float32 embeddings and says which embedder it is
(fingerprint), what input it expects (preprocessing) and where it runs (device). Indexes, search and
the web UI only talk to this interface. This module itself imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from retrieval.preprocess import Preprocessing


@runtime_checkable
class EmbeddingBackend(Protocol):
    @property
    def fingerprint(self) -> str:
        """What identifies the weights and preprocessing (stored with indexes; a mismatch is refused)."""
        ...

    embedding_size: int
    preprocessing: Preprocessing
    device: str  # human-readable: "cuda:0 (bf16)", "cpu", "onnxruntime CPUExecutionProvider"
    name: str  # "torch" | "onnx"
    spec: Any  # the EmbedderSpec it was opened from (retrieval.embed.spec); None for an in-memory model

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB PIL images -> (N, D) float32, L2-normalised."""
        ...

    def runtime_versions(self) -> dict[str, str]:
        """The runtime's library versions ({"torch": ...}), recorded with what it embeds."""
        ...

    def embed_paths(
        self, paths: Sequence[str | os.PathLike[str]], batch_size: int = 64, progress: bool = True
    ) -> np.ndarray:
        """Image files -> (N, D) float32, L2-normalised, in the order given."""
        ...
