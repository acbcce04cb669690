"""Batch samplers: balanced P x K batches that cover the epoch, random batches, determinism, DDP shards."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from retrieval.data.samplers import BalancedBatchSampler, RandomBatchSampler


def _uneven_labels(seed: int = 0, classes: int = 30) -> list[int]:
    sizes = np.random.default_rng(seed).integers(1, 12, size=classes)  # includes classes smaller than K
    return [c for c, n in enumerate(sizes) for _ in range(n)]


def test_balanced_batches_are_full_p_by_k():
    labels = _uneven_labels()
    s = BalancedBatchSampler(labels, batch_size=24, images_per_class=4, seed=3)
    batches = list(s)
    assert len(batches) == len(s) == len(labels) // 24
    assert len(batches) > 1  # not just one batch per epoch
    for b in batches:
        assert len(b) == 24
        counts = Counter(labels[i] for i in b)
        assert len(counts) == 6 and set(counts.values()) == {4}


def test_balanced_epoch_visits_each_image_once_when_classes_divide():
    labels = [c for c in range(12) for _ in range(8)]  # 12 classes x 8 images, K = 4 divides
    s = BalancedBatchSampler(labels, batch_size=16, images_per_class=4, seed=0)
    seen = [i for b in s for i in b]
    assert sorted(seen) == list(range(len(labels)))


def test_balanced_epoch_covers_most_images_with_uneven_classes():
    labels = _uneven_labels(1, classes=60)
    s = BalancedBatchSampler(labels, batch_size=20, images_per_class=5, seed=0)
    seen = [i for b in s for i in b]
    # padding repeats a few images of short classes, but most of the epoch is distinct images
    assert len(set(seen)) >= 0.6 * len(seen)
    big_classes = {c for c, n in Counter(labels).items() if n >= 5}
    covered = Counter(labels[i] for i in set(seen))
    assert sum(1 for c in big_classes if covered[c]) >= 0.8 * len(big_classes)


def test_small_classes_are_sampled_with_replacement():
    labels = [0, 0, 1, 1, 2, 2, 3, 3]  # every class smaller than K = 3
    s = BalancedBatchSampler(labels, batch_size=6, images_per_class=3, seed=0)
    (b,) = list(s)
    counts = Counter(labels[i] for i in b)
    assert len(counts) == 2 and set(counts.values()) == {3}


def test_balanced_is_deterministic_per_seed_and_epoch():
    labels = _uneven_labels()
    a = BalancedBatchSampler(labels, 24, 4, seed=5)
    b = BalancedBatchSampler(labels, 24, 4, seed=5)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first
    assert list(BalancedBatchSampler(labels, 24, 4, seed=6)) != first


@pytest.mark.parametrize("world_size", [2, 3])
def test_balanced_shards_partition_the_global_batch(world_size):
    labels = _uneven_labels(2, classes=40)
    single = BalancedBatchSampler(labels, 24, 4, seed=9)
    single.set_epoch(2)
    shards = []
    for rank in range(world_size):
        s = BalancedBatchSampler(labels, 24, 4, seed=9, rank=rank, world_size=world_size)
        s.set_epoch(2)
        shards.append(list(s))
        assert len(s) == len(single)
    for step, full in enumerate(single):
        parts = [shard[step] for shard in shards]
        assert all(len(p) == 24 // world_size for p in parts)
        assert sorted(i for p in parts for i in p) == sorted(full)
        for p in parts:  # each rank holds whole classes: K images of each of its P / world_size classes
            assert set(Counter(labels[i] for i in p).values()) == {4}


def test_balanced_rejects_impossible_settings():
    labels = [c for c in range(4) for _ in range(5)]
    with pytest.raises(ValueError, match="multiple"):
        BalancedBatchSampler(labels, 10, 3)
    with pytest.raises(ValueError, match="distinct classes"):
        BalancedBatchSampler(labels, 25, 5)
    with pytest.raises(ValueError, match="world_size"):
        BalancedBatchSampler(labels, 12, 4, world_size=2)  # 3 classes per batch over 2 ranks


def test_random_batches_are_a_permutation():
    s = RandomBatchSampler(103, 10, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == 10
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == 100 and all(len(b) == 10 for b in batches)
    assert flat != sorted(flat)


def test_random_keep_last_tops_up_the_tail():
    s = RandomBatchSampler(23, 10, seed=1, drop_last=False)
    batches = list(s)
    assert len(batches) == len(s) == 3 and all(len(b) == 10 for b in batches)
    assert set(i for b in batches for i in b) == set(range(23))


def test_random_is_deterministic_per_seed_and_epoch():
    a, b = RandomBatchSampler(50, 10, seed=4), RandomBatchSampler(50, 10, seed=4)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(RandomBatchSampler(50, 10, seed=5)) != first


def test_random_shards_partition_the_global_batch():
    single = RandomBatchSampler(64, 12, seed=2)
    single.set_epoch(3)
    shards = []
    for rank in range(4):
        s = RandomBatchSampler(64, 12, seed=2, rank=rank, world_size=4)
        s.set_epoch(3)
        shards.append(list(s))
    for step, full in enumerate(single):
        parts = [sh[step] for sh in shards]
        assert all(len(p) == 3 for p in parts)
        assert [i for p in parts for i in p] == full


def test_random_rejects_too_small_split():
    with pytest.raises(ValueError, match="batch size"):
        RandomBatchSampler(5, 10, drop_last=True)
    with pytest.raises(ValueError, match="divisible"):
        RandomBatchSampler(50, 10, world_size=3)


def test_samplers_drive_a_dataloader():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    labels = torch.tensor([c for c in range(6) for _ in range(4)])
    ds = TensorDataset(torch.arange(24), labels)
    loader = DataLoader(ds, batch_sampler=BalancedBatchSampler(labels.tolist(), 8, 4, seed=0))
    batches = list(loader)
    assert len(batches) == 3
    for idx, y in batches:
        assert idx.shape == (8,) and len(set(y.tolist())) == 2
