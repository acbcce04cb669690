"""Batch samplers for DataLoader(batch_sampler=...): class-balanced P x K batches and random batches.

Both are deterministic functions of (seed, epoch) -- call `set_epoch(epoch)` before each epoch -- and
both shard for distributed training: `batch_size` is the global batch; rank r of `world_size` gets
the r-th contiguous slice of every global batch, so the ranks' batches are disjoint, equally sized,
and together equal the single-process batch of the same seed and epoch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from retrieval.errors import ConfigError


def _check_shard(batch_size: int, rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size % world_size:
        raise ValueError(f"global batch size {batch_size} is not divisible by world_size {world_size}")


class _EpochSampler:
    batch_size: int
    rank: int
    world_size: int
    seed: int
    epoch: int

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields (same epoch -> same batches)."""
        self.epoch = int(epoch)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def global_batches(self) -> list[list[int]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        share = self.batch_size // self.world_size
        lo = self.rank * share
        for batch in self.global_batches():
            yield batch[lo : lo + share]


class BalancedBatchSampler(_EpochSampler):
    """Batches of P = batch_size // K classes with K images each.

    Every epoch each class's images are shuffled and cut into groups of K; the groups of a class are
    spread evenly over the epoch and packed into batches of P distinct classes. So every batch is
    full, an epoch visits (nearly) every image once, and the last K-group of a class is topped up
    with other images of that class (with replacement when the class has fewer than K images).
    An epoch has max(1, N // batch_size) batches; a short stream is extended with fresh groups.
    Batches list their K-groups contiguously, so DDP shards hold whole classes when P is divisible
    by world_size (required).
    """

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        images_per_class: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        labels_arr = np.asarray(labels, dtype=np.int64)
        if images_per_class < 1 or batch_size % images_per_class:
            raise ConfigError(f"batch size {batch_size} is not a multiple of images_per_class {images_per_class}")
        self.classes_per_batch = batch_size // images_per_class
        _check_shard(batch_size, rank, world_size)
        if self.classes_per_batch % world_size:
            raise ConfigError(
                f"{self.classes_per_batch} classes per batch cannot be split evenly over world_size {world_size}"
            )
        classes, inverse = np.unique(labels_arr, return_inverse=True)
        if len(classes) < self.classes_per_batch:
            raise ConfigError(
                f"a balanced batch needs {self.classes_per_batch} distinct classes but the split has {len(classes)}; "
                "lower the batch size or raise images_per_class"
            )
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse))[:-1]
        self._members = [m for m in np.split(order, bounds)]  # indices of each class, in split order
        self.num_samples = len(labels_arr)
        self.batch_size = batch_size
        self.images_per_class = images_per_class
        self.seed, self.epoch = int(seed), 0
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(1, self.num_samples // self.batch_size)

    def _groups(self, rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
        """One pass over every class: (class, K indices) groups in an order that spreads each class out."""
        k = self.images_per_class
        keyed: list[tuple[float, int, np.ndarray]] = []
        for c, members in enumerate(self._members):
            perm = rng.permutation(members)
            n_groups = -(-len(perm) // k)
            short = n_groups * k - len(perm)
            if short:
                # top up from images outside the last group; a class smaller than K repeats images
                others = perm[: (n_groups - 1) * k]
                if len(others) >= short:
                    pad = rng.choice(others, size=short, replace=False)
                else:
                    pad = rng.choice(members, size=short, replace=True)
                perm = np.concatenate([perm, pad])
            offset = rng.random()
            for g in range(n_groups):
                keyed.append(((g + offset) / n_groups, c, perm[g * k : (g + 1) * k]))
        keyed.sort(key=lambda t: t[0])
        return [(c, idx) for _, c, idx in keyed]

    def global_batches(self) -> list[list[int]]:
        rng = self._rng()
        stream: deque[tuple[int, np.ndarray]] = deque(self._groups(rng))
        pending: list[tuple[int, np.ndarray]] = []
        batches: list[list[int]] = []
        while len(batches) < len(self):
            chosen: list[np.ndarray] = []
            used: set[int] = set()
            deferred: list[tuple[int, np.ndarray]] = []
            for c, idx in pending:  # groups bumped from earlier batches go first
                if len(chosen) < self.classes_per_batch and c not in used:
                    chosen.append(idx)
                    used.add(c)
                else:
                    deferred.append((c, idx))
            pending = deferred
            while len(chosen) < self.classes_per_batch:
                if not stream:
                    stream.extend(self._groups(rng))
                c, idx = stream.popleft()
                if c in used:
                    pending.append((c, idx))
                else:
                    chosen.append(idx)
                    used.add(c)
            batches.append([int(i) for idx in chosen for i in idx])
        return batches


class RandomBatchSampler(_EpochSampler):
    """Shuffled batches of `batch_size` indices out of range(n).

    drop_last=True drops the incomplete tail; with drop_last=False the tail batch is topped up with
    indices from the start of the permutation so it stays full and shards stay equal.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ConfigError("batch size must be positive")
        _check_shard(batch_size, rank, world_size)
        if drop_last and n < batch_size:
            raise ConfigError(f"only {n} images for a batch size of {batch_size} with drop_last; lower the batch size")
        if n < 1:
            raise ConfigError("cannot sample batches from an empty split")
        self.n, self.batch_size, self.drop_last = n, batch_size, drop_last
        self.seed, self.epoch = int(seed), 0
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def global_batches(self) -> list[list[int]]:
        perm = self._rng().permutation(self.n)
        total = len(self) * self.batch_size
        if total > self.n:
            perm = np.concatenate([perm, np.resize(perm, total - self.n)])
        return [perm[i : i + self.batch_size].tolist() for i in range(0, total, self.batch_size)]


class SamplerDrivenLoader:
    """Base of the loaders that draw their batches from a batch sampler: length and epoch follow it."""

    batch_sampler: Any  # a sized iterable of index lists, with set_epoch when it reshuffles per epoch
    epoch: int = 0

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)
