"""Evaluation during training: embed the test splits with the model being trained and score them with the
dataset's protocol (all-vs-all or query/gallery) and Recall@K list.

Test-time preprocessing is the deployed one (Resize(resize_size) -> CenterCrop(image_size)), so the
numbers logged while training are the numbers `retrieval evaluate` reproduces from the checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from retrieval.data.base import RetrievalDataset, Split
from retrieval.embed.preprocess import Preprocessing
from retrieval.embed.torch_backend import TorchBackend
from retrieval.metrics import embedding_geometry, evaluate_embeddings


def embed_split(
    model: nn.Module,
    split: Split,
    *,
    image_size: int,
    resize_size: int,
    device: torch.device,
    batch_size: int = 128,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
) -> np.ndarray:
    """(N, D) float32 L2-normalised embeddings of `split`, in split order, through the backend that indexes
    and searches (the same preprocessing, decoding and normalisation). Leaves the model in eval mode."""
    backend = TorchBackend(model, Preprocessing(image_size=image_size, resize_size=resize_size), device=device,  # type: ignore[arg-type]
                           workers=workers, amp_dtype=amp_dtype, channels_last=channels_last)
    return backend.embed_paths(split.paths, batch_size=batch_size, progress=progress, desc=f"embedding {split.name}")


def evaluate_model(
    model: nn.Module,
    dataset: RetrievalDataset,
    *,
    image_size: int,
    resize_size: int,
    device: torch.device,
    batch_size: int = 128,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """{"R@k" for the dataset's ks, "MAP@R", "RP", "alignment", "uniformity"} of the model on the dataset's
    test protocol (the geometry over every test embedding, queries and gallery together)."""
    queries, gallery = dataset.eval_splits()
    kw = dict(
        image_size=image_size,
        resize_size=resize_size,
        device=device,
        batch_size=batch_size,
        workers=workers,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        progress=progress,
    )
    q_emb = embed_split(model, queries, **kw)  # type: ignore[arg-type]
    q_labels = np.asarray(queries.labels)
    use_gpu = device.type == "cuda"
    if gallery is queries:  # all-vs-all: each query's own index is excluded
        metrics = evaluate_embeddings(q_emb, q_labels, ks=dataset.recall_ks, use_gpu=use_gpu)
        return {**metrics, **embedding_geometry(q_emb, q_labels)}
    g_emb = embed_split(model, gallery, **kw)  # type: ignore[arg-type]
    g_labels = np.asarray(gallery.labels)
    metrics = evaluate_embeddings(q_emb, q_labels, g_emb, g_labels, ks=dataset.recall_ks, use_gpu=use_gpu)
    return {**metrics, **embedding_geometry(np.concatenate([q_emb, g_emb]), np.concatenate([q_labels, g_labels]))}
