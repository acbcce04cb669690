"""Training batches: (images (B, 3, S, S) normalised on the device, labels (B,) on the device) per step.

Two sources, same contract:
- the decoded-image cache written by `retrieval prepare` (cfg.data.cache), augmented on the device;
- otherwise a DataLoader over the image files (Pillow decode + torchvision train transform in workers).

Batches come from a batch sampler (random, or class-balanced P x K) that is deterministic per
(seed, epoch) and hands each rank its share of the global batch, so a resumed or multi-process run
draws exactly the batches a single uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from retrieval.config import RunConfig
from retrieval.data.base import Split
from retrieval.errors import ConfigError, UsageError
from training import catalog


def contiguous_labels(split: Split) -> tuple[Split, dict[int, int]]:
    """The split with labels renumbered 0..C-1 in sorted order (loss proxies are indexed by label)."""
    mapping = {old: new for new, old in enumerate(sorted(set(split.labels)))}
    renumbered = Split(split.name, split.paths, tuple(mapping[y] for y in split.labels), split.item_ids)
    return renumbered, mapping


def build_batch_sampler(cfg: RunConfig, labels: tuple[int, ...], rank: int = 0, world_size: int = 1) -> Any:
    """The sampler named by cfg.data.sampler; `batch_size` is the global batch over all ranks."""
    from retrieval.data.samplers import BalancedBatchSampler, RandomBatchSampler

    d = cfg.data
    if d.batch_size % world_size:
        raise ConfigError(f"batch size {d.batch_size} is not divisible by the {world_size} processes")
    if d.sampler == "balanced":
        return BalancedBatchSampler(
            list(labels), d.batch_size, d.images_per_class, seed=cfg.train.seed, rank=rank, world_size=world_size
        )
    if d.sampler == "random":
        return RandomBatchSampler(
            len(labels), d.batch_size, seed=cfg.train.seed, drop_last=True, rank=rank, world_size=world_size
        )
    raise UsageError(f"unknown sampler {d.sampler!r}; choose {catalog.one_of(catalog.SAMPLERS)}")


def _seed_for(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 9_973 + rank) % (2**63)


def _collate(items: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([int(it[1]) for it in items], dtype=torch.long)
    return images, labels


@dataclass
class TrainBatches:
    """Iterable of one epoch of (images, labels) on the device; call `set_epoch` before each epoch."""

    sampler: Any
    source: str  # which input path feeds the run, in words (printed at start)
    device: torch.device
    _loader: Any
    _seed: int
    _rank: int
    _label_lut: torch.Tensor | None = None  # original label -> contiguous label, for sources that yield originals
    _epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self.sampler.set_epoch(epoch)
        if isinstance(self._loader, DataLoader) and self._loader.generator is not None:
            # Worker augmentation seeds derive from this generator: deterministic per (seed, epoch, rank).
            self._loader.generator.manual_seed(_seed_for(self._seed, epoch, self._rank))
        elif hasattr(self._loader, "set_epoch"):
            self._loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        non_blocking = self.device.type == "cuda"
        lut = None if self._label_lut is None else self._label_lut.to(self.device)
        for images, labels in self._loader:
            images = images.to(self.device, non_blocking=non_blocking)
            labels = labels.to(self.device, non_blocking=non_blocking)
            yield images, (labels if lut is None else lut[labels])


def build_train_batches(
    cfg: RunConfig, train_split: Split, device: torch.device, rank: int = 0, world_size: int = 1
) -> TrainBatches:
    """Batches of `train_split` for this rank, labels renumbered 0..C-1; from the cache when one exists."""
    original = train_split
    train_split, mapping = contiguous_labels(original)
    sampler = build_batch_sampler(cfg, train_split.labels, rank, world_size)
    d = cfg.data
    if d.cache:
        from retrieval.data.cache.loader import CacheTrainLoader
        from retrieval.data.cache.reader import has_cache

        if has_cache(d.cache, original.name, original):
            cache_loader = CacheTrainLoader(
                d.cache, original.name, sampler, d.image_size, device, cfg.train.seed + 7919 * rank,
                channels_last=cfg.train.channels_last and device.type == "cuda", scale=(d.crop_scale_min, 1.0),
            )  # fmt: skip
            # The cache stores the dataset's own labels; renumber them like the split.
            lut = torch.zeros(max(mapping) + 1, dtype=torch.long)
            for old, new in mapping.items():
                lut[old] = new
            source = f"decoded-image cache {d.cache}"
            if not cache_loader.cached.full_resolution:
                source += (
                    f" (stored at short side {cache_loader.cached.short_side} px: small crops are blurrier than from "
                    "the files; rerun `retrieval prepare` to store training images at full resolution)"
                )
            return TrainBatches(sampler, source, device, cache_loader, cfg.train.seed, rank, lut)
        source = (
            f"image files (no cache of split {train_split.name!r} in {d.cache}; write one with "
            f"`retrieval prepare` to decode once instead of every epoch)"
        )
    else:
        source = "image files"

    from retrieval.data.loading import ImageDataset
    from retrieval.data.transforms import train_transform
    from training.determinism import seed_worker

    generator = torch.Generator()
    generator.manual_seed(_seed_for(cfg.train.seed, 0, rank))
    loader = DataLoader(
        ImageDataset(train_split, train_transform(d.image_size, scale_min=d.crop_scale_min)),
        batch_sampler=sampler,
        num_workers=d.workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        generator=generator,
        persistent_workers=False,  # fresh workers per epoch: their seeds follow (seed, epoch, rank)
        worker_init_fn=seed_worker if cfg.train.deterministic and d.workers > 0 else None,
        prefetch_factor=4 if d.workers > 0 else None,
    )
    return TrainBatches(sampler, source, device, loader, cfg.train.seed, rank)
