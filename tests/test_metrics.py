"""Retrieval and geometry metrics against pytorch-metric-learning, brute-force numpy and hand-worked cases."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import FaissKNN

from retrieval.metrics import (
    alignment,
    evaluate_embeddings,
    mean_average_precision_at_r,
    r_precision,
    recall_at_k,
    uniformity,
    utilization,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _random(rng, n=600, d=32, classes=150):
    # Some labels end up with a single member: such queries have R = 0 in all-vs-all mode.
    return _unit(rng.standard_normal((n, d))), rng.integers(0, classes, n)


def _clustered(rng, n=600, d=32, classes=60, spread=0.9):
    labels = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes, d))
    return _unit(centres[labels] + spread * rng.standard_normal((n, d))), labels


def _with_duplicates(rng):
    emb, labels = _clustered(rng, n=400)
    dup = rng.choice(len(emb), 150, replace=False)  # the same image listed twice in its class
    return np.concatenate([emb, emb[dup]]), np.concatenate([labels, labels[dup]])


DATASETS = {"random": _random, "clustered": _clustered, "duplicates": _with_duplicates}


def _pml_accuracy(query, query_labels, gallery=None, gallery_labels=None):
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP),  # cosine, as we rank
    )
    if gallery is None:
        return calc.get_accuracy(query, query_labels)  # reference = query, ref_includes_query=True
    return calc.get_accuracy(query, query_labels, gallery, gallery_labels, ref_includes_query=False)


def _brute_force(query, query_labels, gallery=None, gallery_labels=None, ks=(1,)):
    """Full similarity matrix, ranking by (score desc, index asc), self excluded, R = 0 queries dropped."""
    all_vs_all = gallery is None
    if all_vs_all:
        gallery, gallery_labels = query, query_labels
    sims = query.astype(np.float64) @ gallery.astype(np.float64).T
    if all_vs_all:
        np.fill_diagonal(sims, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(gallery)), sims.shape), -sims), axis=-1)
    if all_vs_all:
        order = order[:, :-1]  # the query itself sorts last
    matches = gallery_labels[order] == query_labels[:, None]
    num_relevant = matches.sum(axis=1)
    keep = num_relevant > 0
    matches, num_relevant = matches[keep], num_relevant[keep]
    out = {f"R@{k}": matches[:, :k].any(axis=1).mean() for k in ks}
    ap = [sum(m[: i + 1].sum() / (i + 1) for i in range(r) if m[i]) / r for m, r in zip(matches, num_relevant)]
    rp = [m[:r].sum() / r for m, r in zip(matches, num_relevant)]
    out["MAP@R"], out["RP"] = float(np.mean(ap)), float(np.mean(rp))
    return out


@pytest.mark.parametrize("kind", list(DATASETS))
@pytest.mark.parametrize("protocol", ["all_vs_all", "query_gallery"])
def test_agrees_with_pytorch_metric_learning(kind, protocol):
    emb, labels = DATASETS[kind](np.random.default_rng(7))
    if protocol == "all_vs_all":
        args = (emb, labels)
    else:
        half = len(emb) // 2
        args = (emb[:half], labels[:half], emb[half:], labels[half:])
    ours = evaluate_embeddings(*args, ks=(1, 2, 4, 8), use_gpu=False, chunk_size=128)
    theirs = _pml_accuracy(*args)
    assert ours["R@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-12)
    assert ours["MAP@R"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-12)
    assert ours["RP"] == pytest.approx(theirs["r_precision"], abs=1e-12)
    assert set(ours) == {"R@1", "R@2", "R@4", "R@8", "MAP@R", "RP"}
    assert all(0.0 <= v <= 1.0 for v in ours.values())


@pytest.mark.parametrize("kind", list(DATASETS))
@pytest.mark.parametrize("protocol", ["all_vs_all", "query_gallery"])
def test_recall_at_k_matches_brute_force(kind, protocol):
    emb, labels = DATASETS[kind](np.random.default_rng(11))
    ks = (1, 2, 4, 8, 16, 32)
    if protocol == "all_vs_all":
        args = (emb, labels)
    else:
        args = (emb[:200], labels[:200], emb[200:], labels[200:])
    ours = evaluate_embeddings(*args, ks=ks, use_gpu=False, chunk_size=50)
    ref = _brute_force(*args, ks=ks)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


def test_cross_label_duplicates_and_ties_are_ranked_by_gallery_index():
    # Exact ties everywhere: vectors with four entries of 0.5, several shared across labels.
    rng = np.random.default_rng(5)
    x = np.zeros((300, 16), np.float32)
    for row in x:
        row[rng.choice(16, 4, replace=False)] = 0.5
    x[150:200] = x[:50]  # exact copies carrying other labels
    labels = rng.integers(0, 30, 300)
    ks = (1, 2, 4, 8, 100)
    assert evaluate_embeddings(x, labels, ks=ks, use_gpu=False, chunk_size=64) == pytest.approx(_brute_force(x, labels, ks=ks))
    q, g = (x[:100], labels[:100]), (x[100:], labels[100:])
    assert evaluate_embeddings(*q, *g, ks=ks, use_gpu=False) == pytest.approx(_brute_force(*q, *g, ks=ks))


def test_duplicates_never_let_a_query_find_itself():
    # Items 0 and 1 are the same vector with different labels; every query's true top-1 is a miss,
    # so any leak of the query itself (or of "drop the first result") would show up as a hit.
    emb = np.array([[1, 0], [1, 0], [0, 1], [0.6, 0.8]], np.float32)
    labels = np.array(["A", "B", "B", "A"])
    # Rankings: q0 -> 1(B) 3(A); q1 -> 0(A) 3(A) 2(B); q2 -> 3(A) 0(A) 1(B) (tie at 0 by index); q3 -> 2(B) 0(A).
    got = evaluate_embeddings(emb, labels, ks=(1, 2, 3), use_gpu=False)
    assert got == {"R@1": 0.0, "R@2": 0.5, "R@3": 1.0, "MAP@R": 0.0, "RP": 0.0}

    rng = np.random.default_rng(3)
    emb, labels = _clustered(rng, n=200, classes=20, spread=2.0)
    emb[100:150] = emb[:50]  # exact copies under other labels
    for query_set in (slice(None), slice(0, 120)):
        ours = evaluate_embeddings(emb[query_set], labels[query_set], ks=(1, 4), use_gpu=False, chunk_size=32)
        assert ours == pytest.approx(_brute_force(emb[query_set], labels[query_set], ks=(1, 4)))


def test_hand_worked_values_and_string_labels():
    neighbours = np.array([["a", "b", "a", "a"], ["a", "b", "a", "a"], ["a", "a", "b", "c"]])
    query = np.array(["a", "b", "c"])
    assert recall_at_k(neighbours, query, (1, 2, 4)) == pytest.approx({"R@1": 1 / 3, "R@2": 2 / 3, "R@4": 1.0})
    r = np.array([3, 2, 1])
    # AP@R = (1/R) sum_{i<=R} P@i rel(i): a -> (1/1 + 2/3)/3, b -> (1/2)/2, c -> 0 (its only match is 4th).
    assert mean_average_precision_at_r(neighbours, query, r) == pytest.approx(((1 + 2 / 3) / 3 + 1 / 4 + 0) / 3)
    assert r_precision(neighbours, query, r) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    with pytest.raises(ValueError, match="needs 5 neighbours"):
        recall_at_k(neighbours, query, (5,))

    emb = _unit(np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float64))
    got = evaluate_embeddings(emb, np.array(["x", "x", "y", "y"]), ks=(1, 3), use_gpu=False)
    assert got == {"R@1": 1.0, "R@3": 1.0, "MAP@R": 1.0, "RP": 1.0}


def test_k_beyond_gallery_and_input_errors():
    rng = np.random.default_rng(4)
    emb, labels = _clustered(rng, n=50, classes=5)
    out = evaluate_embeddings(emb, labels, ks=(1, 1000), use_gpu=False)
    assert out["R@1000"] == 1.0  # every query has a same-label item somewhere in the 49 others
    with pytest.raises(ValueError, match="no query has a same-label item"):
        evaluate_embeddings(emb[:5], np.arange(5), use_gpu=False)
    with pytest.raises(ValueError, match="differ in length"):
        evaluate_embeddings(emb, labels[:-1], use_gpu=False)
    with pytest.raises(ValueError, match="together"):
        evaluate_embeddings(emb, labels, gallery_emb=emb, use_gpu=False)


def test_alignment_matches_pairwise_definition():
    rng = np.random.default_rng(8)
    emb, labels = _clustered(rng, n=120, classes=9)
    emb[:10] *= 1.7  # the identity holds for any vectors, not only unit ones
    pairs = [(i, j) for i in range(120) for j in range(i + 1, 120) if labels[i] == labels[j]]
    direct = np.mean([((emb[i].astype(np.float64) - emb[j]) ** 2).sum() for i, j in pairs])
    assert alignment(emb, labels) == pytest.approx(direct, rel=1e-9)
    with pytest.raises(ValueError, match="two or more"):
        alignment(emb[:3], np.arange(3))


def test_uniformity_exact_and_sampled():
    rng = np.random.default_rng(9)
    emb = _unit(rng.standard_normal((700, 8))).astype(np.float64)
    d2 = ((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1)[np.triu_indices(700, k=1)]
    direct = np.log(np.mean(np.exp(-2 * d2)))
    assert uniformity(emb) == pytest.approx(direct, rel=1e-9)
    sampled = uniformity(emb, max_pairs=100_000, seed=1)
    assert sampled == uniformity(emb, max_pairs=100_000, seed=1)  # reproducible from the seed
    assert sampled != uniformity(emb, max_pairs=100_000, seed=2)
    assert sampled == pytest.approx(direct, abs=0.01)
    # Collapsed embeddings are the least uniform possible: log E exp(0) = 0.
    assert uniformity(np.ones((10, 4))) == pytest.approx(0.0)


def test_utilization_matches_nearest_training_distance():
    rng = np.random.default_rng(10)
    train = rng.standard_normal((300, 12)).astype(np.float32)  # deliberately not normalised
    test = rng.standard_normal((90, 12)).astype(np.float32)
    d2 = ((test[:, None, :].astype(np.float64) - train[None, :, :]) ** 2).sum(-1)
    assert utilization(test, train, use_gpu=False) == pytest.approx(d2.min(axis=1).mean(), rel=1e-5)
    assert utilization(train[:20], train, use_gpu=False) == pytest.approx(0.0, abs=1e-4)
