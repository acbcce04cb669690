"""`retrieval index --from-embeddings FILE.npy`: vectors embedded elsewhere become an index folder that
`search` and `evaluate` open; bad vectors are refused by row number or normalised on request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retrieval.cli import app
from retrieval.index.config import IndexConfig
from retrieval.index.folder import GalleryIndex
from retrieval.metrics import evaluate_embeddings
from retrieval.search.searcher import Searcher
from retrieval.index.vectors import VectorFileError, build_from_vector_file, checked_vectors, load_ids


def _vectors(n: int = 600, d: int = 16, classes: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d))
    labels = rng.integers(0, classes, n)
    x = centres[labels] + 0.5 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels.astype(np.int64)


def _text(output: str) -> str:
    return " ".join(output.split())  # rich wraps long lines


def test_cli_builds_a_folder_from_a_npy_that_search_and_evaluate_open(tmp_path: Path):
    g, labels = _vectors()
    np.save(tmp_path / "emb.npy", g)
    np.save(tmp_path / "labels.npy", labels)
    (tmp_path / "ids.txt").write_text("".join(f"sku-{i}\n" for i in range(len(g))))
    np.save(tmp_path / "q.npy", g[[5, 9]])
    out = tmp_path / "idx"
    runner = CliRunner()
    res = runner.invoke(app, ["index", "--from-embeddings", str(tmp_path / "emb.npy"), "--labels",
                              str(tmp_path / "labels.npy"), "--ids", str(tmp_path / "ids.txt"), "--out", str(out),
                              "--no-gpu"])
    assert res.exit_code == 0, res.output
    assert "600 items, Flat (flat)" in _text(res.output)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["embedder_source"]["kind"] == "vectors" and meta["protocol"] == "all-vs-all"
    assert meta["embedder_source"]["path"] == str((tmp_path / "emb.npy").resolve())

    loaded = GalleryIndex.load(out, use_gpu=False)
    np.testing.assert_array_equal(loaded.exact_gallery_vectors(), g)
    assert loaded.items.item_ids[7] == "sku-7" and loaded.items.labels == labels.tolist()

    res = runner.invoke(app, ["search", "--index", str(out), "--embeddings", str(tmp_path / "q.npy"), "-k", "3",
                              "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    results = json.loads(res.output)["results"]
    brute = np.argsort(-(g[[5, 9]] @ g.T), axis=1, kind="stable")[:, :3]
    assert [[h["gallery_index"] for h in r["hits"]] for r in results] == brute.tolist()
    assert results[0]["hits"][0]["item_id"] == "sku-5"
    # the table form too: a folder built from vectors has no embedder, and none is needed to print its results
    res = runner.invoke(app, ["search", "--index", str(out), "--embeddings", str(tmp_path / "q.npy"), "-k", "3",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "queries: vectors from" in _text(res.output) and "sku-5" in res.output

    res = runner.invoke(app, ["evaluate", "--index", str(out), "--json", "--device", "cpu", "--ks", "1,4"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output)["metrics"]
    ref = evaluate_embeddings(g, labels, ks=(1, 4), use_gpu=False)
    for key in ref:
        assert metrics[key] == pytest.approx(ref[key], abs=1e-9), key

    # images cannot be searched without an embedder: the error says how to search this index
    res = runner.invoke(app, ["search", str(tmp_path / "q.npy"), "--index", str(out), "--device", "cpu"])
    assert res.exit_code == 1 and "--embeddings QUERIES.npy" in _text(res.output)


def test_approximate_index_from_vectors_is_calibrated_and_evaluates(tmp_path: Path):
    g, labels = _vectors(n=3_000, d=16, classes=60, seed=1)
    np.save(tmp_path / "emb.npy", g)
    np.save(tmp_path / "labels.npy", labels)
    index, result = build_from_vector_file(tmp_path / "emb.npy", tmp_path / "idx",
                                           IndexConfig(index_type="ivf-flat", use_gpu=False),
                                           labels_path=tmp_path / "labels.npy")
    assert result.calibration is not None and index.meta.calibration["chosen"]["nprobe"] == index.params.nprobe
    res = Searcher.open(tmp_path / "idx", device="cpu").evaluate(ks=(1,))
    assert {"R@1", "exact R@1", "diff R@1"} <= set(res)


def test_bad_vectors_are_refused_with_row_numbers(tmp_path: Path):
    g, _ = _vectors(n=50)
    bad = g.copy()
    bad[3] *= 2.0
    bad[11] *= 0.5
    bad[7, 0] = np.nan
    bad[20, 1] = np.inf
    np.save(tmp_path / "bad.npy", bad)
    res = CliRunner().invoke(app, ["index", "--from-embeddings", str(tmp_path / "bad.npy"), "--out",
                                   str(tmp_path / "idx"), "--no-gpu"])
    text = _text(res.output)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "2 rows contain NaN or inf (rows 7, 20)" in text
    assert "2 rows are not unit-norm (rows 3, 11; pass --normalize" in text
    assert not (tmp_path / "idx").exists()

    # --normalize rescales the off-norm rows, but NaN/inf and zero rows can never be normalised
    with pytest.raises(VectorFileError, match=r"rows contain NaN or inf \(rows 7, 20\)"):
        checked_vectors(bad, normalize=True)
    zero = g.copy()
    zero[4] = 0
    with pytest.raises(VectorFileError, match=r"1 rows are all zeros and cannot be normalised \(rows 4\)"):
        checked_vectors(zero, normalize=True)
    scaled = g.copy()
    scaled[[3, 11]] *= 3.0
    np.testing.assert_allclose(checked_vectors(scaled, normalize=True), g, atol=1e-6)
    many = g.copy()
    many[:30] *= 2
    with pytest.raises(VectorFileError, match=r"30 rows are not unit-norm \(rows 0, 1, .*, 9 and 20 more"):
        checked_vectors(many)

    np.save(tmp_path / "scaled.npy", scaled)
    res = CliRunner().invoke(app, ["index", "--from-embeddings", str(tmp_path / "scaled.npy"), "--normalize",
                                   "--out", str(tmp_path / "idx"), "--no-gpu"])
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(GalleryIndex.load(tmp_path / "idx").exact_gallery_vectors(), g, atol=1e-6)


def test_wrong_shapes_and_companion_files_are_refused(tmp_path: Path):
    g, labels = _vectors(n=40)
    runner = CliRunner()
    cases = {
        "flat.npy": (np.ones(8, np.float32), "expected (N, D) embeddings"),
        "ints.npy": (np.ones((4, 3), np.int64), "expected floating-point embeddings"),
    }
    for name, (arr, message) in cases.items():
        np.save(tmp_path / name, arr)
        res = runner.invoke(app, ["index", "--from-embeddings", str(tmp_path / name), "--out", str(tmp_path / "i")])
        assert res.exit_code == 1 and message in _text(res.output), name
    np.save(tmp_path / "g.npy", g)
    np.save(tmp_path / "short.npy", labels[:10])
    res = runner.invoke(app, ["index", "--from-embeddings", str(tmp_path / "g.npy"), "--labels",
                              str(tmp_path / "short.npy"), "--out", str(tmp_path / "i")])
    assert res.exit_code == 1 and "expected (40,): one label per embedding row" in _text(res.output)
    (tmp_path / "ids.txt").write_text("a\nb\n")
    with pytest.raises(VectorFileError, match="2 ids for 40 embedding rows"):
        load_ids(tmp_path / "ids.txt", 40)
    res = runner.invoke(app, ["index", "--from-embeddings", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "i")])
    assert res.exit_code == 1 and "embeddings file not found" in _text(res.output)
    res = runner.invoke(app, ["index", "--from-embeddings", str(tmp_path / "g.npy")])
    assert res.exit_code == 2 and "--from-embeddings needs --out DIR" in _text(res.output)
