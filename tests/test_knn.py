"""Exact k-NN: agreement with brute-force numpy, self-exclusion with duplicates, ties, padding, errors."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.knn import FlatSearcher, exact_knn, knn_device


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _reference_knn(query, gallery, k, exclude_self=False, metric="ip"):
    """Brute force: rank by score (desc for ip, asc for l2), ties by ascending gallery index."""
    q, g = query.astype(np.float64), gallery.astype(np.float64)
    if metric == "ip":
        key = -(q @ g.T)
    else:
        key = (q * q).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2 * q @ g.T
    if exclude_self:
        np.fill_diagonal(key, np.inf)
    index_key = np.broadcast_to(np.arange(len(g)), key.shape)
    order = np.lexsort((index_key, key), axis=-1)[:, : min(k, len(g) - int(exclude_self))]
    return order


def _exact_tie_vectors(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    """Unit vectors with four entries of 0.5: every dot product is exact, so ties are real ties."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, d), np.float32)
    for row in x:
        row[rng.choice(d, 4, replace=False)] = 0.5
    return x


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_matches_numpy_on_random_data(metric, exclude_self):
    rng = np.random.default_rng(1)
    gallery = _unit(rng.standard_normal((300, 24)))
    query = gallery if exclude_self else _unit(rng.standard_normal((77, 24)))
    k = 10
    scores, indices = exact_knn(query, gallery, k, exclude_self=exclude_self, use_gpu=False, chunk_size=16, metric=metric)
    ref = _reference_knn(query, gallery, k, exclude_self, metric)
    assert scores.shape == (len(query), k) and scores.dtype == np.float32
    assert indices.shape == (len(query), k) and indices.dtype == np.int64
    np.testing.assert_array_equal(indices, ref)
    if metric == "ip":
        expected = np.take_along_axis(query @ gallery.T, ref, axis=1)
    else:
        expected = ((query[:, None, :] - gallery[ref]) ** 2).sum(-1)
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_self_is_excluded_by_index_with_duplicates():
    rng = np.random.default_rng(2)
    base = _unit(rng.standard_normal((40, 8)))
    gallery = np.concatenate([base, base, base])  # item i has exact copies at i+40 and i+80
    scores, indices = exact_knn(gallery, gallery, 2, exclude_self=True, use_gpu=False, chunk_size=13)
    own = np.arange(len(gallery))
    assert not (indices == own[:, None]).any()
    copies = {(i, j) for i in own for j in own if i != j and i % 40 == j % 40}
    assert all((i, j) in copies for i in own for j in indices[i])
    np.testing.assert_allclose(scores, 1.0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 40, 299, 300])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_exact_ties_follow_ascending_index_even_at_the_cut(k, exclude_self):
    # 300 vectors drawn from C(16, 4) = 1820 patterns: many exact ties and duplicates, including
    # tied groups straddling the k-th place, where FAISS alone keeps an arbitrary part of the group.
    x = _exact_tie_vectors(300)
    _, indices = exact_knn(x, x, k, exclude_self=exclude_self, use_gpu=False, chunk_size=64)
    ref = _reference_knn(x, x, k, exclude_self)
    np.testing.assert_array_equal(indices[:, : ref.shape[1]], ref)


def test_k_larger_than_gallery_is_padded():
    rng = np.random.default_rng(3)
    gallery = _unit(rng.standard_normal((5, 4)))
    scores, indices = exact_knn(gallery, gallery, 8, exclude_self=True, use_gpu=False)
    assert indices.shape == (5, 8)
    assert (indices[:, 4:] == -1).all() and np.isneginf(scores[:, 4:]).all()
    assert all(sorted(indices[i, :4]) == [j for j in range(5) if j != i] for i in range(5))
    scores, indices = exact_knn(gallery[:2], gallery, 6, use_gpu=False, metric="l2")
    assert (indices[:, 5] == -1).all() and np.isposinf(scores[:, 5]).all()


def test_rejects_bad_input():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="query set to be the gallery"):
        exact_knn(x[:3], x, 1, exclude_self=True, use_gpu=False)
    with pytest.raises(ValueError, match="dimension"):
        exact_knn(np.ones((2, 5), np.float32), x, 1, use_gpu=False)
    bad = x.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        exact_knn(bad, x, 1, use_gpu=False)
    with pytest.raises(ValueError, match="k must be"):
        exact_knn(x, x, 0, use_gpu=False)


def test_reports_the_device_it_uses():
    gallery = np.eye(4, dtype=np.float32)
    assert FlatSearcher(gallery, use_gpu=False).device.startswith("cpu")
    assert knn_device(use_gpu=False).startswith("cpu")
    # With use_gpu=True the searcher lands where knn_device says (GPU when FAISS sees one, else CPU).
    assert FlatSearcher(gallery, use_gpu=True).device == knn_device(use_gpu=True)
