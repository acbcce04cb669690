"""Metadata filters inside FAISS, re-ranking against NumPy references, neighbour lists, and item removal.

Vectors are small random clusters (fast, deterministic); the CLI tests use a tiny fake In-Shop dataset
with an untrained resnet18 at 32 px.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retrieval.index.config import IndexConfig
from retrieval.index.errors import IndexBuildError
from retrieval.index.faiss_index import build_faiss_index, resolve_params
from retrieval.index.filters import FilterError, parse_where
from retrieval.index.meta import IndexMeta
from retrieval.index.folder import GalleryIndex, ItemTable, StoredQueries
from retrieval.search.rerank import RerankError
from retrieval.search.searcher import Searcher
from tests.fakes import make_fake_cub, make_fake_inshop, make_fake_sop, make_image_folder

CATEGORIES = ("Dresses", "Shirts", "Pants", "Skirts", "Coats")


def clustered(n: int, d: int, classes: int, seed: int, spread: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d))
    labels = np.arange(n) % classes
    x = centres[labels] + spread * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def gallery_index(vectors: np.ndarray, labels: np.ndarray, cfg: IndexConfig, categories: list[str],
                  queries: tuple[np.ndarray, np.ndarray] | None = None) -> GalleryIndex:
    params = resolve_params(cfg, len(vectors), vectors.shape[1])
    built = build_faiss_index(vectors, params, use_gpu=False)
    items = ItemTable([f"/g/{i}.jpg" for i in range(len(vectors))], [int(v) for v in labels],
                      [f"item{v}" for v in labels], [{"category": c} for c in categories])
    stored = None
    if queries is not None:
        q, ql = queries
        stored = StoredQueries(q, ItemTable([f"/q/{i}.jpg" for i in range(len(q))], [int(v) for v in ql],
                                            [f"item{v}" for v in ql]))
    meta = IndexMeta(protocol="query-gallery" if queries is not None else "all-vs-all", recall_ks=[1, 2, 4])
    return GalleryIndex(built.index, built.params, items, meta, stored, use_gpu=False)


# --- attributes ---------------------------------------------------------------------------------------


def test_each_dataset_gives_its_items_attributes(tmp_path: Path) -> None:
    from retrieval.data import item_attributes, load_dataset

    inshop = load_dataset("inshop", make_fake_inshop(tmp_path / "inshop", 1, 2, 2))
    assert item_attributes(inshop, inshop.gallery)[0] == {"gender": "WOMEN", "category": "Dresses"}
    sop = load_dataset("sop", make_fake_sop(tmp_path / "sop", 2, 3, 2))
    assert {a["super_category"] for a in item_attributes(sop, sop.test)} <= {"bicycle", "chair", "mug"}
    folder = load_dataset("folder", make_image_folder(tmp_path / "folder", 4, 2))
    assert item_attributes(folder, folder.test)[0] == {"folder": "class_02"}
    cub = load_dataset("cub", make_fake_cub(tmp_path / "cub", 2, 2, 2))
    assert item_attributes(cub, cub.test)[0] == {"class": cub.test.item_id(0)}


def test_item_tables_written_before_attributes_still_open(tmp_path: Path) -> None:
    from retrieval.index.folder import file_digest

    x, labels = clustered(60, 8, 6, seed=0)
    index = gallery_index(x, labels, IndexConfig(index_type="flat", use_gpu=False), [CATEGORIES[i % 5] for i in range(60)])
    index.save(tmp_path / "idx")
    table = json.loads((tmp_path / "idx" / "items.json").read_text())
    assert table["attributes"][3] == {"category": CATEGORIES[3]}
    del table["attributes"]  # the format before attributes existed
    (tmp_path / "idx" / "items.json").write_text(json.dumps(table))
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    meta["files"]["items.json"] = file_digest(tmp_path / "idx" / "items.json")
    (tmp_path / "idx" / "meta.json").write_text(json.dumps(meta))
    old = GalleryIndex.load(tmp_path / "idx", use_gpu=False)
    assert old.items.attributes == [{}] * 60
    searcher = Searcher(old, device="cpu")
    assert searcher.attribute_values == {}
    assert len(searcher.search_embeddings(x[:2], 5)[0]) == 5  # unfiltered search unchanged
    with pytest.raises(FilterError, match="stores no item attributes"):
        searcher.search_embeddings(x[:1], 5, where=["category=Dresses"])


# --- filters ------------------------------------------------------------------------------------------


def test_where_syntax() -> None:
    assert parse_where(["category=Dresses", "category=Skirts", "gender=WOMEN"]) == {
        "category": frozenset({"Dresses", "Skirts"}), "gender": frozenset({"WOMEN"})}
    assert parse_where({"category": ["A", "B"]}) == {"category": frozenset({"A", "B"})}
    for bad in (["category"], ["=x"], ["category="]):
        with pytest.raises(FilterError):
            parse_where(bad)


def _brute_force_subset(x: np.ndarray, q: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
    scores = q.astype(np.float64) @ x[keep].astype(np.float64).T
    return keep[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


@pytest.mark.parametrize("where", [["category=Dresses"], ["category=Shirts", "category=Coats"]])
def test_filtered_flat_search_is_the_exact_top_k_of_the_subset(where: list[str]) -> None:
    rng = np.random.default_rng(1)
    x, labels = clustered(2000, 16, 40, seed=1)
    categories = [CATEGORIES[i] for i in rng.integers(0, 5, len(x))]
    searcher = Searcher(gallery_index(x, labels, IndexConfig(index_type="flat", use_gpu=False), categories), device="cpu")
    q, _ = clustered(25, 16, 40, seed=2)
    wanted = {w.split("=")[1] for w in where}
    keep = np.flatnonzero([c in wanted for c in categories])
    hits = searcher.search_embeddings(q, 10, where=where)
    expected = _brute_force_subset(x, q, keep, 10)
    assert [[h.gallery_index for h in row] for row in hits] == expected.tolist()
    assert all(categories[h.gallery_index] in wanted for row in hits for h in row)
    for i, (row, exp) in enumerate(zip(hits, expected)):
        assert [h.score for h in row] == pytest.approx((x[exp] @ q[i]).tolist(), abs=1e-5)


def test_filter_keeping_fewer_items_than_k_returns_just_those() -> None:
    x, labels = clustered(300, 8, 10, seed=3)
    categories = ["Rare" if i in (5, 77, 201) else "Common" for i in range(300)]
    searcher = Searcher(gallery_index(x, labels, IndexConfig(index_type="flat", use_gpu=False), categories), device="cpu")
    hits = searcher.search_embeddings(x[:2], 10, where={"category": "Rare"})
    assert [sorted(h.gallery_index for h in row) for row in hits] == [[5, 77, 201]] * 2


def test_filtered_search_works_after_faiss_torch_utils_replaced_index_search() -> None:
    """pytorch-metric-learning imports faiss.contrib.torch_utils, which swaps Index.search for one without params."""
    import faiss.contrib.torch_utils  # noqa: F401  (the swap is process-wide, as in a server that imported it)

    x, labels = clustered(300, 8, 10, seed=4)
    categories = ["Rare" if i in (3, 50, 299) else "Common" for i in range(300)]
    searcher = Searcher(gallery_index(x, labels, IndexConfig(index_type="flat", use_gpu=False), categories), device="cpu")
    hits = searcher.search_embeddings(x[:2], 5, where={"category": "Rare"})
    assert [sorted(h.gallery_index for h in row) for row in hits] == [[3, 50, 299]] * 2


@pytest.mark.parametrize("kind", ["ivf-flat", "hnsw"])
def test_filtered_approximate_search_is_as_good_as_unfiltered(kind: str) -> None:
    rng = np.random.default_rng(4)
    x, labels = clustered(4000, 16, 80, seed=4)
    categories = [CATEGORIES[i] for i in rng.integers(0, 5, len(x))]
    cfg = IndexConfig(index_type=kind, nlist=32, nprobe=8, ef_search=64, use_gpu=False)
    searcher = Searcher(gallery_index(x, labels, cfg, categories), device="cpu")
    q, _ = clustered(100, 16, 80, seed=5)
    keep = np.flatnonzero([c == "Pants" for c in categories])

    def recall(found: list[list[int]], expected: np.ndarray) -> float:
        return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, expected)]))

    filtered = [[h.gallery_index for h in row] for row in searcher.search_embeddings(q, 10, where=["category=Pants"])]
    unfiltered = [[h.gallery_index for h in row] for row in searcher.search_embeddings(q, 10)]
    assert all(categories[i] == "Pants" for row in filtered for i in row)
    r_filtered = recall(filtered, _brute_force_subset(x, q, keep, 10))
    r_unfiltered = recall(unfiltered, _brute_force_subset(x, q, np.arange(len(x)), 10))
    assert r_filtered >= r_unfiltered - 0.05, (r_filtered, r_unfiltered)


def test_an_unknown_attribute_is_refused_naming_the_known_ones() -> None:
    x, labels = clustered(50, 8, 5, seed=6)
    searcher = Searcher(gallery_index(x, labels, IndexConfig(index_type="flat", use_gpu=False), ["A"] * 50), device="cpu")
    with pytest.raises(FilterError, match="unknown filter attribute 'colour'.*category"):
        searcher.search_embeddings(x[:1], 3, where=["colour=red"])


# --- re-ranking against NumPy references ---------------------------------------------------------------


def ref_qe(q: np.ndarray, g: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """alpha-QE over the whole gallery: ranking of each query (loops, float64)."""
    out = []
    for qi in q.astype(np.float64):
        s = g @ qi
        top = np.argsort(-s, kind="stable")[:n]
        new = qi.copy()
        for j in top:
            new += max(s[j], 0.0) ** alpha * g[j]
        new /= np.linalg.norm(new)
        out.append(np.argsort(-(g @ new), kind="stable"))
    return np.array(out)


def ref_dba(q: np.ndarray, g: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Database-side augmentation of every gallery vector with its n nearest (itself first), then rank."""
    sims = g @ g.T
    aug = np.zeros_like(g)
    for i in range(len(g)):
        top = np.argsort(-sims[i], kind="stable")[:n]
        for j in top:
            aug[i] += max(sims[i, j], 0.0) ** alpha * g[j]
        aug[i] /= np.linalg.norm(aug[i])
    return np.argsort(-(q.astype(np.float64) @ aug.T), axis=1, kind="stable")


def ref_k_reciprocal(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray, k1: int, k2: int,
                     lambda_value: float) -> np.ndarray:
    """Zhong et al.'s published re_ranking (CVPR 2017), as released, for squared distances."""
    original_dist = np.concatenate([np.concatenate([q_q_dist, q_g_dist], axis=1),
                                    np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0)
    original_dist = np.transpose(1.0 * original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(np.float64)
    initial_rank = np.argsort(original_dist, kind="stable").astype(np.int32)
    query_num = q_g_dist.shape[0]
    gallery_num = q_g_dist.shape[0] + q_g_dist.shape[1]
    all_num = gallery_num
    for i in range(all_num):
        forward_k_neigh_index = initial_rank[i, : k1 + 1]
        backward_k_neigh_index = initial_rank[forward_k_neigh_index, : k1 + 1]
        fi = np.where(backward_k_neigh_index == i)[0]
        k_reciprocal_index = forward_k_neigh_index[fi]
        k_reciprocal_expansion_index = k_reciprocal_index
        for j in range(len(k_reciprocal_index)):
            candidate = k_reciprocal_index[j]
            candidate_forward_k_neigh_index = initial_rank[candidate, : int(np.around(k1 / 2.0)) + 1]
            candidate_backward_k_neigh_index = initial_rank[candidate_forward_k_neigh_index, : int(np.around(k1 / 2.0)) + 1]
            fi_candidate = np.where(candidate_backward_k_neigh_index == candidate)[0]
            candidate_k_reciprocal_index = candidate_forward_k_neigh_index[fi_candidate]
            if len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)) > 2.0 / 3 * len(candidate_k_reciprocal_index):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index, candidate_k_reciprocal_index)
        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = 1.0 * weight / np.sum(weight)
    original_dist = original_dist[:query_num, ]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float64)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
    invIndex = [np.where(V[:, i] != 0)[0] for i in range(gallery_num)]
    jaccard_dist = np.zeros_like(original_dist, dtype=np.float64)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, gallery_num], dtype=np.float64)
        indNonZero = np.where(V[i, :] != 0)[0]
        indImages = [invIndex[ind] for ind in indNonZero]
        for j in range(len(indNonZero)):
            temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(V[i, indNonZero[j]], V[indImages[j], indNonZero[j]])
        jaccard_dist[i] = 1 - temp_min / (2.0 - temp_min)
    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    return final_dist[:query_num, query_num:]


def ref_kreciprocal_ranking(q: np.ndarray, g: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """Each query on its own with the whole (small) gallery: squared Euclidean distances of unit vectors."""
    q, g = q.astype(np.float64), g.astype(np.float64)
    g_g = np.maximum(2 - 2 * g @ g.T, 0)
    out = []
    for qi in q:
        q_g = np.maximum(2 - 2 * (g @ qi), 0)[None, :]
        final = ref_k_reciprocal(q_g, np.zeros((1, 1)), g_g, k1, k2, lam)[0]
        out.append(np.argsort(final, kind="stable"))
    return np.array(out)


def ref_metrics(ranking: np.ndarray, q_labels: np.ndarray, g_labels: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """Recall@K and MAP@R from full rankings, the textbook way."""
    out = {f"R@{k}": 0.0 for k in ks}
    aps = []
    for row, ql in zip(ranking, q_labels):
        rel = g_labels[row] == ql
        r = int((g_labels == ql).sum())
        for k in ks:
            out[f"R@{k}"] += float(rel[:k].any()) / len(ranking)
        precisions = [rel[: i + 1].sum() / (i + 1) for i in range(r) if rel[i]]
        aps.append(sum(precisions) / r)
    out["MAP@R"] = float(np.mean(aps))
    return out


@pytest.fixture(scope="module")
def small_case() -> tuple[Searcher, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    g, gl = clustered(60, 12, 12, seed=7, spread=0.9)
    q, ql = clustered(24, 12, 12, seed=8, spread=0.9)
    index = gallery_index(g, gl, IndexConfig(index_type="flat", use_gpu=False), ["A"] * 60, (q, ql))
    index.build_neighbours(10)
    return Searcher(index, device="cpu"), g, gl, q, ql


@pytest.mark.parametrize("method", ["qe", "dba", "kreciprocal"])
def test_reranked_rankings_and_metrics_equal_the_numpy_reference(small_case, method: str) -> None:
    searcher, g, gl, q, ql = small_case
    cfg = searcher.reranker.cfg
    assert cfg.shortlist >= len(g)  # the shortlist is the whole gallery, as in the references
    if method == "qe":
        expected = ref_qe(q, g.astype(np.float64), cfg.qe_n, cfg.alpha)
    elif method == "dba":
        expected = ref_dba(q, g.astype(np.float64), cfg.dba_n, cfg.alpha)
    else:
        expected = ref_kreciprocal_ranking(q, g, cfg.k1, cfg.k2, cfg.lam)
    _, ids = searcher.search_raw(q, len(g), rerank=method)
    assert (ids == expected).mean() > 0.99  # float32 vs float64 may swap a near-tie deep in a list
    assert (ids[:, :10] == expected[:, :10]).all()
    got = searcher.evaluate(ks=(1, 2, 4), rerank=method)
    ref = ref_metrics(expected, ql, gl, (1, 2, 4))
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    before = searcher.evaluate(ks=(1, 2, 4))
    assert before["MAP@R"] == pytest.approx(ref_metrics(np.argsort(-(q @ g.T), axis=1, kind="stable"), ql, gl,
                                                         (1, 2, 4))["MAP@R"], abs=1e-6)


def test_reranking_keeps_to_the_filter(small_case) -> None:
    searcher, g, gl, q, ql = small_case
    index = searcher.index
    categories = [{"category": "odd" if i % 2 else "even"} for i in range(len(g))]
    index.items.attributes = categories
    fresh = Searcher(index, device="cpu")
    for method in ("qe", "dba", "kreciprocal"):
        hits = fresh.search_embeddings(q[:5], 8, where=["category=odd"], rerank=method)
        assert all(h.gallery_index % 2 == 1 for row in hits for h in row) and all(len(r) == 8 for r in hits)
    index.items.attributes = [{"category": "A"}] * len(g)


def test_neighbour_lists_are_stored_checked_and_refused_when_stale(small_case, tmp_path: Path) -> None:
    searcher, g, *_ = small_case
    folder = searcher.index.save(tmp_path / "idx")
    meta = json.loads((folder / "meta.json").read_text())
    assert {"neighbours.npy", "neighbour_scores.npy"} <= set(meta["files"]) and meta["rerank"]["neighbours"] == 10
    reopened = Searcher.open(folder, device="cpu")
    assert np.array_equal(reopened.index.neighbour_lists().ids, searcher.index.neighbours.ids)
    # the lists belong to another index file: refused, saying how to rebuild them
    meta["rerank"]["index_sha256"] = "0" * 64
    (folder / "meta.json").write_text(json.dumps(meta))
    stale = Searcher.open(folder, device="cpu")
    with pytest.raises(RerankError, match="stale.*--rerank-neighbours"):
        stale.search_embeddings(g[:1], 5, rerank="dba")
    assert len(stale.search_embeddings(g[:1], 5, rerank="qe")[0]) == 5  # the other methods need no lists
    # a tampered neighbour file is caught by the checksums like any other file
    np.save(folder / "neighbours.npy", np.zeros((60, 10), np.int64))
    with pytest.raises(ValueError, match="neighbours.npy"):
        Searcher.open(folder, device="cpu")


def test_an_index_without_neighbour_lists_refuses_dba_with_how_to_build_them() -> None:
    x, labels = clustered(40, 8, 4, seed=9)
    searcher = Searcher(gallery_index(x, labels, IndexConfig(index_type="flat", use_gpu=False), ["A"] * 40), device="cpu")
    with pytest.raises(RerankError, match="retrieval index --out .* --rerank-neighbours"):
        searcher.search_embeddings(x[:1], 5, rerank="dba")
    with pytest.raises(RerankError, match="unknown re-ranking"):
        searcher.search_embeddings(x[:1], 5, rerank="magic")


# --- removal --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "ivf-flat"])
def test_removed_rows_never_come_back_and_the_rest_rank_as_before(kind: str, tmp_path: Path) -> None:
    x, labels = clustered(800, 16, 20, seed=10)
    index = gallery_index(x, labels, IndexConfig(index_type=kind, nlist=8, nprobe=8, use_gpu=False),
                          [CATEGORIES[i % 5] for i in range(800)])
    index.build_neighbours(6)
    drop = [0, 3, 17, 400, 799]
    index.remove(drop)
    folder = index.save(tmp_path / "idx")
    searcher = Searcher.open(folder, device="cpu")
    keep = np.setdiff1d(np.arange(800), drop)
    assert len(searcher.gallery_paths) == 795 and searcher.gallery_paths[:3] == ["/g/1.jpg", "/g/2.jpg", "/g/4.jpg"]
    q = x[drop]  # the removed vectors themselves
    hits = searcher.search_embeddings(q, 20)
    found = {searcher.gallery_paths[h.gallery_index] for row in hits for h in row}
    assert not found & {f"/g/{i}.jpg" for i in drop}
    expected = keep[np.argsort(-(q @ x[keep].T), axis=1, kind="stable")[:, :20]]
    assert [[int(searcher.gallery_paths[h.gallery_index][3:-4]) for h in row] for row in hits] == expected.tolist()
    assert searcher.index.items.attributes[2] == {"category": CATEGORIES[4]}  # row 4 moved up to 2
    assert searcher.index.neighbour_lists().ids.shape == (795, 6)  # rebuilt for the new rows
    assert len(searcher.search_embeddings(q[:1], 5, rerank="dba")[0]) == 5


def test_hnsw_refuses_removal_saying_how_to_rebuild() -> None:
    x, labels = clustered(200, 8, 10, seed=11)
    index = gallery_index(x, labels, IndexConfig(index_type="hnsw", use_gpu=False), ["A"] * 200)
    with pytest.raises(IndexBuildError, match="cannot remove items.*rebuild"):
        index.remove([1])


TINY = ["--untrained", "--arch", "resnet18", "--embedding-size", "16", "--image-size", "32", "--device", "cpu",
        "--no-gpu"]


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from retrieval.cli import app

    root = make_fake_inshop(tmp_path_factory.mktemp("inshop"), train_items=1, test_items=4, per_item=4)
    out = tmp_path_factory.mktemp("idx") / "inshop"
    result = CliRunner().invoke(app, ["index", "--dataset", "inshop", "--data-root", str(root), "--out", str(out),
                                      "--index-type", "flat", "--rerank-neighbours", "4", *TINY])
    assert result.exit_code == 0, result.output
    return root, out


def test_cli_remove_by_item_id_and_path_then_search_never_returns_them(cli_index, tmp_path: Path) -> None:
    from retrieval.cli import app

    root, built = cli_index
    out = tmp_path / "inshop"
    shutil.copytree(built, out)
    before = Searcher.open(out, device="cpu")
    gallery = list(before.gallery_paths)
    item = before.gallery_item_ids[0]
    path = gallery[-1]
    runner = CliRunner()
    result = runner.invoke(app, ["index", "--out", str(out), "--remove", item,
                                 "--remove-path", before.relative_path(len(gallery) - 1)])
    assert result.exit_code == 0, result.output
    removed = {p for p, i in zip(gallery, before.gallery_item_ids) if i == item} | {path}
    assert f"removed {len(removed)} images" in result.output
    after = Searcher.open(out, device="cpu")
    assert set(after.gallery_paths) == set(gallery) - removed
    result = runner.invoke(app, ["search", *removed, "--index", str(out), "-k", "50", "--json", "--rerank", "dba"])
    assert result.exit_code == 0, result.output
    returned = {h["path"] for r in json.loads(result.output)["results"] for h in r["hits"]}
    removed_as_shown = {before.relative_path(gallery.index(p)) for p in removed}  # hits name dataset-relative paths
    assert returned and not returned & removed_as_shown
    history = json.loads((out / "meta.json").read_text())["history"]
    assert history[-1]["action"] == "remove" and history[-1]["items"] == len(removed)
    missing = runner.invoke(app, ["index", "--out", str(out), "--remove", "id_99999999"])
    text = " ".join(missing.output.split())  # rich wraps long lines
    assert missing.exit_code == 1 and "item id id_99999999" in text and "nothing was removed" in text


def test_cli_search_where_and_evaluate_rerank_table(cli_index) -> None:
    from retrieval.cli import app

    root, out = cli_index
    searcher = Searcher.open(out, device="cpu")
    runner = CliRunner()
    result = runner.invoke(app, ["search", searcher.query_paths[0], "--index", str(out), "--where", "category=Dresses",
                                 "--json", "-k", "3"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["results"][0]["hits"]) == 3
    bad = runner.invoke(app, ["search", searcher.query_paths[0], "--index", str(out), "--where", "colour=red"])
    assert bad.exit_code == 2 and "unknown filter attribute 'colour'" in " ".join(bad.output.split())
    table = runner.invoke(app, ["evaluate", "--index", str(out), "--rerank", "kreciprocal"])
    assert table.exit_code == 0, table.output
    assert "none %" in table.output and "kreciprocal %" in table.output and "MAP@R" in table.output
    as_json = json.loads(runner.invoke(app, ["evaluate", "--index", str(out), "--rerank", "qe", "--json"]).output)
    assert as_json["reranked"] == pytest.approx(searcher.evaluate(rerank="qe"))
    assert as_json["metrics"]["R@1"] == pytest.approx(searcher.evaluate()["R@1"])
