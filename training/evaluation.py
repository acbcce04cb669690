"""Evaluation during training: embed the test splits with the model being trained and score them with the
dataset's protocol (all-vs-all or query/gallery) and Recall@K list.

Test-time preprocessing is the deployed one (Resize(resize_size) -> CenterCrop(image_size)), so the
numbers logged while training are the numbers `retrieval evaluate` reproduces from the checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from retrieval.data.base import RetrievalDataset, Split
from retrieval.metrics import embedding_geometry, evaluate_embeddings


def _collate(items: list[tuple[torch.Tensor, int, int]]) -> torch.Tensor:
    return torch.stack([it[0] for it in items])


@torch.no_grad()
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
    """(N, D) float32 L2-normalised embeddings of `split`, in split order. Leaves the model in eval mode."""
    from retrieval.data.loading import ImageDataset
    from retrieval.data.transforms import eval_transform

    loader = DataLoader(
        ImageDataset(split, eval_transform(resize_size, image_size)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),  # never draws from the training RNG
    )
    model.eval()
    out = []
    for images in tqdm(loader, desc=f"embedding {split.name}", unit="batch", disable=not progress, leave=False):
        images = images.to(device, non_blocking=device.type == "cuda")
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            emb = model(images)
        out.append(F.normalize(emb.float(), dim=1).cpu())
    if not out:
        return np.zeros((0, getattr(model, "embedding_size", 0)), np.float32)
    return torch.cat(out).numpy().astype(np.float32, copy=False)


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
