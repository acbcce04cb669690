"""FAISS index layer and index folder: exactness, approximate recall, parameter checks, atomic publish,
corruption and mismatch refusal, incremental add. Synthetic vectors only (no embedder)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import retrieval.index.folder as index_folder
from retrieval.index.config import IndexConfig
from retrieval.index.errors import IndexBuildError, IndexFileError
from retrieval.index.faiss_index import build_faiss_index, choose_index_type, configure_search, read_index, resolve_params, search
from retrieval.index.meta import IndexMeta
from retrieval.index.types import default_nlist
from retrieval.index.folder import EmbedderMismatchError, GalleryIndex, ItemTable, StoredQueries
from retrieval.metrics import evaluate_embeddings
from retrieval.metrics import neighbour_metrics
from retrieval.search.searcher import Searcher


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, n_classes: int, seed: int, spread: float = 0.6, centre_seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around `n_classes` random centres (fixed by `centre_seed`; `seed` draws the points);
    returns (vectors (n, d), labels (n,))."""
    centres = _unit(np.random.default_rng(centre_seed).standard_normal((n_classes, d)))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    x = centres[labels] + spread * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return _unit(x), labels


def brute_force_ids(q: np.ndarray, g: np.ndarray, k: int) -> np.ndarray:
    scores = q.astype(np.float64) @ g.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall_vs(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, e)) / len(e) for a, e in zip(approx, exact)]))


def make_gallery(tmp_path: Path, n: int = 300, d: int = 16, cfg: IndexConfig | None = None, protocol: str = "query-gallery",
                 fingerprint: str = "fp-A") -> GalleryIndex:
    g, gl = clustered(n, d, 20, seed=1)
    q, ql = clustered(40, d, 20, seed=2)  # held-out points around the same centres
    params = resolve_params(cfg or IndexConfig(index_type="flat"), n, d)
    built = build_faiss_index(g, params, use_gpu=False)
    items = ItemTable([f"/img/{i}.jpg" for i in range(n)], [int(v) for v in gl], [f"item{v}" for v in gl])
    queries = None
    if protocol == "query-gallery":
        queries = StoredQueries(q, ItemTable([f"/q/{i}.jpg" for i in range(len(q))], [int(v) for v in ql],
                                             [f"item{v}" for v in ql]))
    meta = IndexMeta(fingerprint=fingerprint, protocol=protocol, recall_ks=[1, 2, 4], dataset="synthetic",
                     embedder_source={"kind": "checkpoint", "path": "/ckpt/best.pt"})
    return GalleryIndex(built.index, built.params, items, meta, queries, None if params.stores_exact_vectors else g,
                        use_gpu=False)


# -- exactness -------------------------------------------------------------------------------------


def test_flat_search_equals_numpy_brute_force():
    g, _ = clustered(500, 24, 10, seed=0)
    q = _unit(np.random.default_rng(5).standard_normal((30, 24)).astype(np.float32))
    built = build_faiss_index(g, resolve_params(IndexConfig(index_type="flat"), len(g), 24), use_gpu=False)
    scores, ids = search(built.index, q, 15)
    np.testing.assert_array_equal(ids, brute_force_ids(q, g, 15))
    np.testing.assert_allclose(scores, np.take_along_axis(q @ g.T, ids, axis=1), rtol=1e-5, atol=1e-5)
    assert built.device == "cpu"


def test_k_larger_than_gallery_is_clipped():
    g, _ = clustered(7, 8, 2, seed=0)
    built = build_faiss_index(g, resolve_params(IndexConfig(index_type="flat"), 7, 8), use_gpu=False)
    scores, ids = search(built.index, g[:2], 50)
    assert ids.shape == (2, 7) and sorted(ids[0]) == list(range(7))


def test_unnormalised_or_wrong_size_queries_are_refused():
    g, _ = clustered(50, 8, 2, seed=0)
    built = build_faiss_index(g, resolve_params(IndexConfig(index_type="flat"), 50, 8), use_gpu=False)
    with pytest.raises(ValueError, match="not L2-normalised"):
        search(built.index, g[:2] * 3, 5)
    with pytest.raises(ValueError, match="16 dimensions; the index holds 8-d"):
        search(built.index, _unit(np.ones((1, 16), np.float32)), 5)


# -- parameters ------------------------------------------------------------------------------------


def test_auto_picks_flat_for_small_galleries_and_ivf_for_large_or_tight_budgets():
    assert choose_index_type(50_000, 512, IndexConfig()) == "flat"
    assert choose_index_type(2_000_000, 512, IndexConfig(memory_budget_gb=8)) == "ivf-flat"
    assert choose_index_type(2_000_000, 512, IndexConfig(memory_budget_gb=1)) == "ivf-pq"
    assert choose_index_type(200_000, 512, IndexConfig(memory_budget_gb=0.1)) == "ivf-pq"
    assert resolve_params(IndexConfig(), 1000, 64).index_type == "flat"


def test_nlist_rule_and_clear_failures_for_too_few_vectors():
    assert default_nlist(1_000_000) == 4000
    assert default_nlist(1000) == 1000 // 39  # capped by the 39-per-list training floor
    p = resolve_params(IndexConfig(index_type="ivf-flat"), 100_000, 32)
    assert p.nlist == 1265 and p.train_size == 64 * 1265
    assert resolve_params(IndexConfig(index_type="ivf-flat"), 10_000, 32).nlist == 10_000 // 39
    with pytest.raises(IndexBuildError, match=r"nlist=100 needs at least 3,900 vectors.*has 1,000"):
        resolve_params(IndexConfig(index_type="ivf-flat", nlist=100), 1000, 32)
    with pytest.raises(IndexBuildError, match="needs at least 9,984 vectors"):
        resolve_params(IndexConfig(index_type="ivf-pq", pq_m=8), 5000, 32)
    with pytest.raises(IndexBuildError, match="must divide the embedding size 32"):
        resolve_params(IndexConfig(index_type="ivf-pq", pq_m=12), 20_000, 32)
    with pytest.raises(IndexBuildError, match="Use --index-type flat"):
        resolve_params(IndexConfig(index_type="ivf-flat"), 20, 32)
    with pytest.raises(IndexBuildError, match="unknown index type"):
        resolve_params(IndexConfig(index_type="lsh"), 100, 32)


# -- approximate types -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, min_recall",
    [
        (IndexConfig(index_type="ivf-flat", nprobe=8), 0.95),
        (IndexConfig(index_type="hnsw", hnsw_m=16, ef_search=64), 0.95),
        (IndexConfig(index_type="ivf-pq", pq_m=8, pq_nbits=6, nprobe=8, refine_factor=8), 0.95),
        (IndexConfig(index_type="ivf-pq", pq_m=8, pq_nbits=6, nprobe=8), 0.45),
    ],
    ids=["ivf-flat", "hnsw", "ivf-pq+refine", "ivf-pq"],
)
def test_approximate_indexes_reach_sensible_recall_on_clustered_vectors(cfg, min_recall):
    d = 32
    g, _ = clustered(6_000, d, 60, seed=3, spread=1.0)
    q, _ = clustered(200, d, 60, seed=4, spread=1.0)
    params = resolve_params(cfg, len(g), d)
    built = build_faiss_index(g, params, use_gpu=False)
    assert built.index.ntotal == len(g)
    _, ids = search(built.index, q, 10)
    recall = recall_vs(ids, brute_force_ids(q, g, 10))
    assert recall >= min_recall, f"{params.factory_string()}: Recall@10 {recall:.3f}"
    if cfg.index_type != "hnsw":
        # the knob that trades speed for recall is really applied: one list only is worse
        configure_search(built.index, type(params)(**{**params.to_dict(), "nprobe": 1}))
        _, ids1 = search(built.index, q, 10)
        assert recall_vs(ids1, brute_force_ids(q, g, 10)) < recall


# -- folder: save, load, verify --------------------------------------------------------------------


def test_save_load_roundtrip_keeps_results_and_records_metadata(tmp_path):
    gi = make_gallery(tmp_path)
    q = gi.queries.emb
    before = gi.search(q, 5)
    gi.save(tmp_path / "idx")
    files = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert files == ["index.faiss", "items.json", "meta.json", "queries.json", "queries.npy"]
    loaded = GalleryIndex.load(tmp_path / "idx")
    after = loaded.search(q, 5)
    np.testing.assert_array_equal(before[1], after[1])
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["n_items"] == 300 and meta["embedding_size"] == 16 and meta["normalisation"] == "l2"
    assert meta["metric"] == "inner_product" and meta["index_type"] == "flat"
    assert set(meta["files"]) == {"index.faiss", "items.json", "queries.json", "queries.npy"}
    assert meta["files"]["index.faiss"]["bytes"] == (tmp_path / "idx" / "index.faiss").stat().st_size
    assert loaded.items.paths[3] == "/img/3.jpg"
    np.testing.assert_array_equal(loaded.queries.emb, q)


def test_truncated_index_file_is_refused_naming_the_file(tmp_path):
    make_gallery(tmp_path).save(tmp_path / "idx")
    path = tmp_path / "idx" / "index.faiss"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IndexFileError, match=r"index\.faiss is .* bytes but meta\.json records"):
        GalleryIndex.load(tmp_path / "idx")


def test_altered_bytes_are_refused_by_checksum_and_faiss_errors_are_wrapped(tmp_path):
    make_gallery(tmp_path).save(tmp_path / "idx")
    path = tmp_path / "idx" / "index.faiss"
    data = bytearray(path.read_bytes())
    data[0:4] = b"XXXX"  # same size, broken header
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match=r"index\.faiss does not match the SHA-256"):
        GalleryIndex.load(tmp_path / "idx")
    # without checksums, FAISS's own failure still comes back as an error naming the file
    with pytest.raises(IndexFileError, match=r"index\.faiss is corrupt or truncated \(FAISS"):
        GalleryIndex.load(tmp_path / "idx", verify_checksums=False)
    garbage = tmp_path / "garbage.faiss"
    garbage.write_bytes(os.urandom(64))
    with pytest.raises(IndexFileError, match="garbage.faiss"):
        read_index(garbage)


def test_folder_without_meta_or_with_bad_items_is_refused(tmp_path):
    make_gallery(tmp_path).save(tmp_path / "idx")
    (tmp_path / "idx" / "meta.json").unlink()
    with pytest.raises(IndexFileError, match=r"meta\.json is missing"):
        GalleryIndex.load(tmp_path / "idx")
    with pytest.raises(IndexFileError, match="index folder not found"):
        GalleryIndex.load(tmp_path / "nowhere")


def test_interrupted_save_keeps_the_previous_index(tmp_path, monkeypatch):
    old = make_gallery(tmp_path, fingerprint="fp-old")
    old.save(tmp_path / "idx")
    new = make_gallery(tmp_path, n=200, fingerprint="fp-new")
    real = index_folder.atomic_write_json

    def crash_on_items(target, obj):
        if Path(target).name == "items.json":
            raise KeyboardInterrupt("simulated interruption")
        return real(target, obj)

    monkeypatch.setattr(index_folder, "atomic_write_json", crash_on_items)
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path / "idx")
    monkeypatch.undo()
    kept = GalleryIndex.load(tmp_path / "idx")
    assert len(kept) == 300 and kept.fingerprint == "fp-old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no half-built sibling left behind
    new.save(tmp_path / "idx")  # and a later save replaces it
    assert len(GalleryIndex.load(tmp_path / "idx")) == 200


def test_embedder_mismatch_is_refused_with_both_fingerprints(tmp_path):
    gi = make_gallery(tmp_path)
    gi.check_embedder("fp-A", 16)
    with pytest.raises(EmbedderMismatchError, match=r"fingerprint fp-B != fp-A.*checkpoint /ckpt/best.pt.*rebuild"):
        gi.check_embedder("fp-B", 16)
    with pytest.raises(EmbedderMismatchError, match="embedding size 32 != 16"):
        gi.check_embedder("fp-A", 32)
    with pytest.raises(EmbedderMismatchError, match="normalisation none != l2"):
        gi.check_embedder("fp-A", 16, normalisation="none")


@pytest.mark.parametrize("kind", ["flat", "ivf-flat", "hnsw", "ivf-pq"])
def test_add_appends_searchable_items_and_survives_save_load(tmp_path, kind):
    n = 2_500 if kind == "ivf-pq" else 400
    cfg = IndexConfig(index_type=kind, nprobe=64, pq_m=4, pq_nbits=6 if kind == "ivf-pq" else 8, hnsw_m=8)
    gi = make_gallery(tmp_path, n=n, cfg=cfg)
    new = _unit(np.random.default_rng(11).standard_normal((3, 16)).astype(np.float32))
    gi.add(new, index_folder.items_from_paths([tmp_path / "new" / f"n{i}.jpg" for i in range(3)]))
    assert len(gi) == n + 3
    gi.save(tmp_path / "idx")
    loaded = GalleryIndex.load(tmp_path / "idx")
    _, ids = loaded.search(new, 1)
    if kind != "ivf-pq":  # PQ codes are lossy, so only the exact types must return the vector itself first
        assert ids[:, 0].tolist() == [n, n + 1, n + 2]
    assert loaded.items.labels[n:] == [-1, -1, -1] and loaded.items.item_ids[n] == "new"
    assert [h["action"] for h in loaded.meta.history] == ["add"]
    np.testing.assert_allclose(loaded.exact_gallery_vectors()[n:], new, atol=1e-6)


# -- evaluation from neighbour lists ---------------------------------------------------------------


def test_evaluate_flat_matches_metrics_module_query_gallery_and_all_vs_all(tmp_path):
    gi = make_gallery(tmp_path)
    g = gi.exact_gallery_vectors()
    gl = np.asarray(gi.items.labels)
    res = Searcher(gi).evaluate()
    ref = evaluate_embeddings(gi.queries.emb, np.asarray(gi.queries.items.labels), g, gl, ks=(1, 2, 4), use_gpu=False)
    assert res.keys() == ref.keys()
    for key in ref:
        assert res[key] == pytest.approx(ref[key], abs=1e-9), key

    avsa = make_gallery(tmp_path, protocol="all-vs-all")
    res = Searcher(avsa).evaluate()
    ref = evaluate_embeddings(g, gl, ks=(1, 2, 4), use_gpu=False)
    for key in ref:
        assert res[key] == pytest.approx(ref[key], abs=1e-9), key


def test_evaluate_approximate_reports_exact_numbers_and_difference(tmp_path):
    gi = make_gallery(tmp_path, n=2000, cfg=IndexConfig(index_type="ivf-flat", nlist=40, nprobe=1))
    res = Searcher(gi).evaluate()
    exact = evaluate_embeddings(gi.queries.emb, np.asarray(gi.queries.items.labels), gi.exact_gallery_vectors(),
                                np.asarray(gi.items.labels), ks=(1, 2, 4), use_gpu=False)
    for key in exact:
        assert res[f"exact {key}"] == pytest.approx(exact[key], abs=1e-9)
        assert res[f"diff {key}"] == pytest.approx(res[key] - exact[key], abs=1e-12)


def test_neighbour_metrics_ignore_missing_and_unlabelled_neighbours():
    labels = np.array([0, 0, 1, -1])
    q = np.zeros((1, 2), np.float32)

    def fake_search(_q, k):  # nearest: unlabelled, then a missing result, then the real match
        return np.zeros((1, k), np.float32), np.array([[3, -1, 0, 2]])[:, :k]

    res = neighbour_metrics(fake_search, q, np.array([0]), labels, ks=(1, 2, 3))
    assert res["R@1"] == 0 and res["R@2"] == 0 and res["R@3"] == 1
    assert res["MAP@R"] == 0  # R = 2 and neither of the first two results is relevant


def test_published_folder_is_readable_by_others(tmp_path):
    make_gallery(tmp_path).save(tmp_path / "idx")
    assert (tmp_path / "idx").stat().st_mode & 0o755 == 0o755
    assert (tmp_path / "idx" / "meta.json").stat().st_mode & 0o644 == 0o644
    shutil.rmtree(tmp_path / "idx")
