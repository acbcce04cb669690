"""The paper's analyses of an embedder: alignment and uniformity of the test embeddings, and the utilization
of the embedding space by the training set, clean and mixed (Venkataramanan et al. 2022, section 5).

    utilization u(Q, X) = mean over test q of min over x in X ||f(q) - f(x)||^2

Q = every test embedding the index holds (gallery, plus stored queries); X = the training images embedded
by the same model with the test-time preprocessing (clean), or mixes of pairs of them (mixed), or both.
Lower means the test points lie closer to what training explored; Metrix's claim is that mixed
embeddings reach the regions where test classes fall.

Mixes are formed the way training forms them at the checkpoint's mixing level (feature maps, embeddings
or images: the level's `analysis_mixes`, training/levels.py; `--mix-level` overrides), one per training
image: each image of a batch is mixed with a random image of another class of the same batch,
lam ~ Beta(alpha, alpha) per pair, all seeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from retrieval.data.base import Split
from retrieval.errors import UsageError
from retrieval.metrics import embedding_geometry, utilization
from training import levels
from training.metrix import MixedTargets, sample_beta

if TYPE_CHECKING:
    from retrieval.model import Embedder


@dataclass
class TrainingEmbeddings:
    """clean (N, D) and mixed (M, D) float32 embeddings of a training split, L2-normalised."""

    clean: np.ndarray
    mixed: np.ndarray
    level: str


def _collate(items: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items], dtype=torch.long)


def other_class_partners(labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample of a batch, a random partner of another class: (partner (B,), found (B,) bool)."""
    other = labels[:, None] != labels[None, :]
    keys = torch.where(other, torch.rand(other.shape, generator=generator), -1.0)
    return keys.argmax(dim=1), other.any(dim=1)


@torch.no_grad()
def embed_training_split(
    model: Embedder,
    split: Split,
    *,
    level: str,
    image_size: int,
    resize_size: int,
    alpha: float = 2.0,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> TrainingEmbeddings:
    """Clean embeddings of every image of `split` and one mix per image (see module docstring)."""
    from tqdm.auto import tqdm

    from retrieval.data.loading import ImageDataset
    from retrieval.data.transforms import eval_transform

    if level not in levels.mixing_level_names():
        raise UsageError(f"--mix-level {level!r}: choose one of {', '.join(levels.mixing_level_names())}")
    mixing = levels.level(level)
    device = torch.device(device)
    order = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        ImageDataset(split, eval_transform(resize_size, image_size)),
        batch_size=batch_size,
        shuffle=True,
        generator=order,
        collate_fn=_collate,
    )
    pick = torch.Generator().manual_seed(seed + 1)
    model = model.to(device).eval()
    clean, mixed = [], []
    for images, labels in tqdm(loader, desc="embedding training images", unit="batch", disable=not progress):
        images = images.to(device)
        partner, found = other_class_partners(labels, pick)
        first = torch.arange(len(labels))[found]
        lam = sample_beta(alpha, (len(first),), torch.device("cpu"), pick)
        targets = MixedTargets(
            first.to(device),
            partner[found].to(device),
            lam.to(device),
            torch.ones(len(first), dtype=torch.bool, device=device),
            labels[first].to(device),
            labels[partner[found]].to(device),
        )
        fmap = model.trunk(images)
        emb = model.head(fmap)
        clean.append(emb.float().cpu())
        if not len(first):
            continue
        mixed.append(mixing.analysis_mixes(model, images, fmap, emb, targets).float().cpu())
    dim = model.embedding_size
    as_array = lambda parts: torch.cat(parts).numpy() if parts else np.zeros((0, dim), np.float32)  # noqa: E731
    return TrainingEmbeddings(as_array(clean), as_array(mixed), level)


def utilization_report(test_emb: np.ndarray, train: TrainingEmbeddings, use_gpu: bool = False) -> dict[str, float]:
    """u(Q, X) for X = clean training embeddings, mixed ones, and both together."""
    out = {"utilization clean": utilization(test_emb, train.clean, use_gpu=use_gpu)}
    if len(train.mixed):
        out["utilization mixed"] = utilization(test_emb, train.mixed, use_gpu=use_gpu)
        out["utilization clean+mixed"] = utilization(
            test_emb, np.concatenate([train.clean, train.mixed]), use_gpu=use_gpu
        )
    return out


def index_test_embeddings(searcher: Any) -> tuple[np.ndarray, np.ndarray]:
    """Every labelled test embedding an index holds (gallery, plus stored queries) and its labels."""
    labels = np.asarray(searcher.index.items.labels, dtype=np.int64)
    emb = searcher.index.exact_gallery_vectors()
    if searcher.index.queries is not None and len(searcher.index.queries.items):
        emb = np.concatenate([emb, searcher.index.queries.emb])
        labels = np.concatenate([labels, np.asarray(searcher.index.queries.items.labels, dtype=np.int64)])
    keep = labels >= 0  # items added later without a label are not part of the test set
    return np.ascontiguousarray(emb[keep], dtype=np.float32), labels[keep]


def analyse_index(
    searcher: Any,
    checkpoint: str | None = None,
    data_root: str | None = None,
    *,
    mix_level: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Alignment and uniformity of the index's test embeddings; with a checkpoint (the index's own embedder),
    also the utilization by its training split (from `data_root`, default the index's dataset folder)."""
    test_emb, test_labels = index_test_embeddings(searcher)
    report: dict[str, Any] = dict(embedding_geometry(test_emb, test_labels))
    report["test embeddings"] = int(len(test_emb))
    if checkpoint is None:
        return report

    from retrieval.checkpoint import embedder_from_checkpoint
    from retrieval.data import load_dataset
    from retrieval.devices import torch_device

    model, cfg, prep, fingerprint = embedder_from_checkpoint(checkpoint)
    searcher.index.check_embedder(fingerprint, model.embedding_size, "l2", what=f"checkpoint {checkpoint}")
    meta = searcher.meta
    root = data_root or meta.data_root
    if not root:
        raise UsageError("the index records no dataset folder; pass --data-root")
    dataset = load_dataset(meta.dataset, root)
    level = mix_level or (cfg.mixup.level if levels.level(cfg.mixup.level).mixes else levels.DEFAULT_LEVEL)
    run_device = torch_device(device)
    train = embed_training_split(
        model,
        dataset.train,
        level=level,
        image_size=prep.image_size,
        resize_size=prep.resize_size,
        alpha=cfg.mixup.alpha,
        batch_size=batch_size,
        seed=seed,
        device=run_device,
        progress=progress,
    )
    report.update(utilization_report(test_emb, train, use_gpu=run_device.type == "cuda"))
    report["training images"] = int(len(train.clean))
    report["mixes"] = int(len(train.mixed))
    report["mix level"] = level
    return report


__all__ = [
    "TrainingEmbeddings",
    "embed_training_split",
    "utilization_report",
    "index_test_embeddings",
    "analyse_index",
    "other_class_partners",
]
