"""The index benchmark's neighbour report: the IVF coverage bound it prints must count lists and vectors right."""

from __future__ import annotations

import numpy as np

from benchmarks.index_speed import _lists_needed, catalogue_vectors


def test_lists_needed_is_the_fewest_lists_holding_the_target_and_the_gallery_they_hold() -> None:
    # 2 queries x 4 exact neighbours: the rank (in that query's list order) of each neighbour's list
    list_rank = np.array([[0, 0, 1, 5], [0, 2, 3, 3]])
    # the sizes of each query's lists in its own order (6 lists, 200 vectors)
    sizes = np.array([[10, 20, 30, 40, 50, 50], [5, 5, 5, 5, 5, 175]])
    # neighbours held by the first p lists: p=1 3/8, p=2 4/8, p=3 5/8, p=4 7/8, p=5 7/8, p=6 8/8
    assert _lists_needed(list_rank, sizes, 200, 0.5) == (2, (30 + 10) / 2 / 200)
    assert _lists_needed(list_rank, sizes, 200, 0.8) == (4, (100 + 20) / 2 / 200)
    assert _lists_needed(list_rank, sizes, 200, 1.0) == (6, 1.0)


def test_brute_force_agrees_with_lists_needed_on_random_rankings() -> None:
    rng = np.random.default_rng(0)
    nlist, n = 12, 600
    list_rank = rng.integers(0, nlist, (30, 10))
    sizes = rng.multinomial(n, np.ones(nlist) / nlist, size=30)
    for target in (0.3, 0.9, 0.95):
        p, scanned = _lists_needed(list_rank, sizes, n, target)
        held = [np.mean(list_rank < q) for q in range(1, nlist + 1)]
        assert p == 1 + next(i for i, h in enumerate(held) if h >= target)
        assert scanned == np.mean(sizes[:, :p].sum(axis=1)) / n


def test_catalogue_generator_reports_each_items_category() -> None:
    data = catalogue_vectors(20_000, 200, 64, seed=0, spread=1.85)
    assert data.category_of_label is not None and len(data.category_of_label) == data.n_classes
    cat = data.category_of_label[data.gallery_labels]
    # images of one category are closer to each other than to the rest: the category is real structure
    sims = data.gallery[:500] @ data.gallery[500:4_000].T
    same = cat[:500, None] == cat[None, 500:4_000]
    assert sims[same].mean() > sims[~same].mean() + 0.05
