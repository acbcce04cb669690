"""Evaluation during training: embed the test splits with the model being trained and score them with the
dataset's protocol (all-vs-all or query/gallery) and Recall@K list.

Test-time preprocessing is the deployed one (Resize(resize_size) -> CenterCrop(image_size)), so the
numbers logged while training are the numbers `retrieval evaluate` reproduces from the checkpoint.
"""

from __future__ import annotations

import numpy as np

from retrieval.data.base import RetrievalDataset
from retrieval.embed.torch_backend import TorchBackend
from retrieval.metrics import embedding_geometry, evaluate_embeddings


def evaluate_model(
    backend: TorchBackend, dataset: RetrievalDataset, *, batch_size: int = 128, progress: bool = False
) -> dict[str, float]:
    """{"R@k" for the dataset's ks, "MAP@R", "RP", "alignment", "uniformity"} of the backend's model on the
    dataset's test protocol (the geometry over every test embedding, queries and gallery together).

    `backend` wraps the model being trained (TorchBackend: the backend that indexes and searches, with the
    recipe's autocast dtype); it leaves the model in eval mode.
    """
    queries, gallery = dataset.eval_splits()
    q_emb = backend.embed_paths(queries.paths, batch_size, progress, desc=f"embedding {queries.name}")
    q_labels = np.asarray(queries.labels)
    use_gpu = backend.torch_device.type == "cuda"
    if gallery is queries:  # all-vs-all: each query's own index is excluded
        metrics = evaluate_embeddings(q_emb, q_labels, ks=dataset.recall_ks, use_gpu=use_gpu)
        return {**metrics, **embedding_geometry(q_emb, q_labels)}
    g_emb = backend.embed_paths(gallery.paths, batch_size, progress, desc=f"embedding {gallery.name}")
    g_labels = np.asarray(gallery.labels)
    metrics = evaluate_embeddings(q_emb, q_labels, g_emb, g_labels, ks=dataset.recall_ks, use_gpu=use_gpu)
    return {**metrics, **embedding_geometry(np.concatenate([q_emb, g_emb]), np.concatenate([q_labels, g_labels]))}
