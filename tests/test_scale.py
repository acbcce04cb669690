"""Resumable embedding into parts, index builds from parts (one index, shards, merged shards), sharded search.

Without Ray (the Ray engine is tested in test_scale_ray.py). A tiny untrained embedder (resnet18, 64 px,
32-d) on generated 32 px images; references are `retrieval index` itself, one FAISS index, and NumPy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from retrieval.index.build import build_index
from retrieval.embed.spec import EmbedderSpec, open_embedder
from retrieval.cli import app
from retrieval.config import CalibrationConfig
from retrieval.index.config import IndexConfig
from retrieval.data import load_dataset
from retrieval.index.folder import GalleryIndex
from retrieval.embed.engines import embed_to_parts
from retrieval.embed.job import EmbedOptions, source_from_dataset, source_from_images, write_arrays
from retrieval.embed.parts import EmbeddingsFolder, PartsError, part_paths
from retrieval.index.sharded_build import ShardOptions, build_from_parts
from retrieval.index.shards import ShardSet, merge_results
from retrieval.search.searcher import Searcher
from tests.fakes import make_fake_inshop, make_image_folder, write_nasty_images

TINY = dict(arch="resnet18", embedding_size=32, image_size=64, seed=0)
TINY_FLAGS = ["--untrained", "--arch", "resnet18", "--embedding-size", "32", "--image-size", "64", "--device", "cpu"]
NO_GPU = IndexConfig(use_gpu=False)


@pytest.fixture(scope="module")
def inshop(tmp_path_factory) -> Path:
    # 10 test products x 4 photos: 20 queries, 20 gallery images, in 3 + 2 parts of 8 / 16
    return make_fake_inshop(tmp_path_factory.mktemp("inshop"), train_items=2, test_items=10, per_item=4)


@pytest.fixture(scope="module")
def backend():
    return open_embedder(EmbedderSpec.untrained(**TINY), "cpu")


@pytest.fixture(scope="module")
def parts(inshop, backend, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "inshop"
    emb_backend = backend
    embed_to_parts(out, source_from_dataset(load_dataset("inshop", inshop)), emb_backend,
                   EmbedOptions(part_size=8, batch_size=4), progress=False)
    return out


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# -- embedding into parts ------------------------------------------------------------------------


def test_parts_hold_what_retrieval_index_embeds_and_the_index_evaluates_the_same(parts, inshop, backend, tmp_path):
    emb_backend = backend
    ds = load_dataset("inshop", inshop)
    folder = EmbeddingsFolder.open(parts)
    m = folder.manifest
    assert m["complete"] and m["fingerprint"] == emb_backend.fingerprint and m["embedding_size"] == 32
    assert m["dtype"] == "float32" and m["preprocessing"]["image_size"] == 64 and m["n_bad"] == 0
    assert m["splits"]["gallery"]["parts"] == 3 and m["splits"]["query"]["parts"] == 3
    g_emb, g_items = folder.load_role("gallery")
    assert g_items.rows == list(range(len(ds.gallery)))
    assert g_items.paths == [Path(p).relative_to(ds.root.resolve()).as_posix() for p in ds.gallery.paths]
    np.testing.assert_allclose(g_emb, emb_backend.embed_paths(ds.gallery.paths, progress=False), atol=1e-5)

    build_index(ds, emb_backend, tmp_path / "direct", NO_GPU, progress=False)
    build_from_parts(parts, tmp_path / "from_parts", NO_GPU, progress=False)
    direct, from_parts = Searcher.open(tmp_path / "direct", device="cpu"), Searcher.open(tmp_path / "from_parts",
                                                                                           device="cpu")
    assert from_parts.gallery_paths == direct.gallery_paths and from_parts.query_labels == direct.query_labels
    assert from_parts.index.items.attributes == direct.index.items.attributes  # the dataset's filter attributes
    assert any(from_parts.index.items.attributes)
    assert from_parts.index.meta.built_from["embeddings"] == str(parts.resolve())
    assert from_parts.evaluate() == pytest.approx(direct.evaluate(), abs=1e-12)


def test_images_are_embedded_unreadable_ones_listed_and_skipped(backend, tmp_path):
    emb_backend = backend
    root = make_image_folder(tmp_path / "photos", classes=2, per_class=3)
    nasty = write_nasty_images(root / "uploads")
    source = source_from_images([root])
    report = embed_to_parts(tmp_path / "emb", source, emb_backend, EmbedOptions(part_size=5), progress=False)
    m = report.manifest
    assert m["n_bad"] == 3 and m["embedded"] == {"gallery": 6 + 6}
    assert sorted(Path(b["path"]).name for b in m["bad_images"]) == sorted(
        nasty[k].name for k in ("truncated", "not_an_image", "huge"))
    assert all(b["error"] for b in m["bad_images"])
    index, _ = build_from_parts(tmp_path / "emb", tmp_path / "index", NO_GPU, progress=False)
    assert len(index) == 12 and not any(Path(p).name in ("truncated.jpg", "huge.png") for p in index.items.paths)
    assert index.meta.built_from["unreadable_images"] == 3


def run_cli_embed(args: list[str]) -> subprocess.Popen:
    # one thread: the same arithmetic in every run, and no oversubscription on a busy machine
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    code = "from retrieval.cli import main; main()"
    return subprocess.Popen([sys.executable, "-c", code, "embed", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def part_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "parts").iterdir())}


def test_killed_local_run_resumes_only_the_missing_parts_with_identical_files(tmp_path):
    root = make_image_folder(tmp_path / "photos", classes=4, per_class=10)  # 40 images, 10 parts
    args = [str(root), *TINY_FLAGS, "--part-size", "4", "--batch-size", "4"]
    reference = run_cli_embed([*args, "--out", str(tmp_path / "reference")])
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    out = tmp_path / "resumed"
    victim = run_cli_embed([*args, "--out", str(out)])
    deadline = time.time() + 120
    while not list((out / "parts").glob("*.done")) if (out / "parts").is_dir() else True:
        assert victim.poll() is None and time.time() < deadline, "the run ended before any part was written"
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.done")}
    assert 0 < len(done_before) < 10, "the kill must land mid-run"
    with pytest.raises(PartsError, match="incomplete"):
        build_from_parts(out, tmp_path / "index", NO_GPU, progress=False)

    resumed = run_cli_embed([*args, "--out", str(out)])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert f"{len(done_before)} already done, {10 - len(done_before)} embedded now" in " ".join(output.split())
    assert {p: (out / "parts" / p).stat().st_mtime_ns for p in done_before} == done_before  # not rewritten
    assert part_files(out) == part_files(tmp_path / "reference")
    ref_manifest = json.loads((tmp_path / "reference" / "manifest.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("fingerprint", "splits", "embedded", "bad_images", "dtype"):
        assert manifest[key] == ref_manifest[key]


def test_corrupt_part_and_foreign_fingerprint_are_refused_naming_the_file(parts, tmp_path, backend):
    import shutil

    copy = tmp_path / "emb"
    shutil.copytree(parts, copy)
    npy = part_paths(copy, "gallery-00001")[0]
    data = bytearray(npy.read_bytes())
    data[-7] ^= 0xFF
    npy.write_bytes(bytes(data))
    with pytest.raises(PartsError, match=str(npy)):
        build_from_parts(copy, tmp_path / "index", NO_GPU, progress=False)
    result = CliRunner().invoke(app, ["index", "--from-embeddings", str(copy), "--out", str(tmp_path / "index"),
                                      "--no-gpu"])
    assert result.exit_code == 1 and "corrupt" in result.output and "gallery-00001.npy" in result.output
    assert not (tmp_path / "index").exists()

    shutil.rmtree(copy)
    shutil.copytree(parts, copy)
    done = part_paths(copy, "query-00002")[2]
    marker = json.loads(done.read_text())
    marker["fingerprint"] = "0123456789abcdef"
    done.write_text(json.dumps(marker))
    with pytest.raises(PartsError, match="two embedders") as info:
        build_from_parts(copy, tmp_path / "index", NO_GPU, progress=False)
    assert str(done) in str(info.value)

    other_backend = open_embedder(EmbedderSpec.untrained(**{**TINY, "seed": 1}), "cpu")
    inshop_root = EmbeddingsFolder.open(parts).data_root
    with pytest.raises(PartsError, match="two embedders cannot be mixed"):
        embed_to_parts(parts, source_from_dataset(load_dataset("inshop", inshop_root)), other_backend,
                       EmbedOptions(part_size=8), progress=False)


# -- sharded search --------------------------------------------------------------------------------


def tied_vectors(n: int, d: int, distinct: int, seed: int) -> np.ndarray:
    """Random unit vectors drawn from `distinct` values, so many scores tie exactly."""
    rng = np.random.default_rng(seed)
    base = unit(rng.standard_normal((distinct, d)))
    return np.ascontiguousarray(base[rng.integers(0, distinct, n)])


def assert_same_ranking(s_ref: np.ndarray, i_ref: np.ndarray, s: np.ndarray, i: np.ndarray,
                        exact_scores: np.ndarray) -> None:
    """Scores equal bit for bit; ids equal wherever scores differ; within a run of equal scores the same ids,
    except a run cut by k, whose ids need only all carry that score (FAISS keeps whichever its scan met first).

    exact_scores (Q, N): every query's score against every gallery item (the reference's own arithmetic).
    """
    np.testing.assert_array_equal(s, s_ref)
    for r in range(len(s)):
        assert len(set(i[r].tolist())) == len(i[r])
        for value in np.unique(s_ref[r]):
            run = s_ref[r] == value
            got, ref = set(i[r][run].tolist()), set(i_ref[r][run].tolist())
            tied = np.flatnonzero(exact_scores[r] == value)
            if run[-1] and len(tied) > run.sum():
                assert got <= set(tied.tolist()), (r, value)
            else:
                assert got == ref, (r, value)


@pytest.mark.parametrize("nq", [5, 64])  # below and above FAISS's BLAS threshold (20 queries)
def test_sharded_flat_search_equals_one_flat_index_including_ties(nq):
    d = 24
    gallery = tied_vectors(1000, d, distinct=60, seed=0)
    rng = np.random.default_rng(1)
    queries = np.concatenate([gallery[rng.integers(0, 1000, nq // 2)], unit(rng.standard_normal((nq - nq // 2, d)))])
    single = faiss.IndexFlatIP(d)
    single.add(gallery)
    exact_scores = np.empty((nq, 1000), np.float32)
    all_s, all_i = single.search(queries, 1000)
    np.put_along_axis(exact_scores, all_i, all_s, axis=1)
    bounds = [0, 7, 300, 301, 650, 1000]  # uneven shards, one of a single item
    shards = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        shard = faiss.IndexFlatIP(d)
        shard.add(gallery[lo:hi])
        shards.append(shard)
    sharded = ShardSet.from_indexes(shards)
    assert sharded.ntotal == 1000
    for k in (1, 2, 10, 40, 150, 1000):
        s_ref, i_ref = single.search(queries, k)
        s, i = sharded.search(queries, k)
        assert_same_ranking(s_ref, i_ref, s, i, exact_scores)
        # where the run cut by k is the best run (or none is cut), FAISS keeps the first-met (smallest) ids of it:
        # then the very same ids in the very same order
        same = (s_ref[:, 0] == s_ref[:, -1]) | (
            (exact_scores == s_ref[:, -1:]).sum(axis=1) == (s_ref == s_ref[:, -1:]).sum(axis=1))
        if k <= 10:
            assert same.any()
        np.testing.assert_array_equal(i[same], i_ref[same])
    np.testing.assert_allclose(exact_scores, queries @ gallery.T, atol=1e-5)  # the reference is the true score


def test_merge_results_puts_missing_results_last():
    scores = [np.array([[0.9, -3.4e38]], np.float32), np.array([[0.5, 0.9]], np.float32)]
    ids = [np.array([[3, -1]]), np.array([[10, 11]])]
    s, i = merge_results(scores, ids, 3)
    assert i.tolist() == [[11, 3, 10]] and s[0, :2].tolist() == pytest.approx([0.9, 0.9])


@pytest.fixture(scope="module")
def synthetic_parts(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """3,000 clustered gallery vectors (with exact duplicates) + 50 queries in parts of 256."""
    rng = np.random.default_rng(0)
    d = 32
    centres = unit(rng.standard_normal((40, d)))
    labels = rng.integers(0, 40, 3000)
    gallery = unit(centres[labels] + 0.3 * rng.standard_normal((3000, d)).astype(np.float32))
    gallery[2000:2100] = gallery[:100]  # ties across shards
    q_labels = rng.integers(0, 40, 50)
    queries = unit(centres[q_labels] + 0.3 * rng.standard_normal((50, d)).astype(np.float32))
    out = tmp_path_factory.mktemp("synthetic") / "emb"
    write_arrays(out, {"gallery": (gallery, labels.tolist(), [str(v) for v in labels]),
                       "query": (queries, q_labels.tolist(), [str(v) for v in q_labels])},
                 fingerprint="synthetic", part_size=256)
    return out, gallery, queries


@pytest.mark.parametrize("index_type", ["flat", "ivf-flat", "ivf-pq"])
def test_shards_kept_equal_shards_merged_and_search_like_one_index(synthetic_parts, tmp_path, index_type):
    parts_dir, gallery, queries = synthetic_parts
    cfg = IndexConfig(index_type=index_type, nlist=16, nprobe=4, pq_m=8, pq_nbits=6, use_gpu=False)
    sharded, report = build_from_parts(parts_dir, tmp_path / "sharded", cfg, ShardOptions(shards=3), progress=False)
    merged, _ = build_from_parts(parts_dir, tmp_path / "merged", cfg, ShardOptions(shards=3, merge=True),
                                 progress=False)
    assert [r.n_items for r in report.shards] == [1024, 1024, 952] and all(r.max_rss_bytes > 0 for r in report.shards)
    meta = json.loads((tmp_path / "sharded" / "meta.json").read_text())
    assert [s["file"] for s in meta["shards"]] == ["shard-000.faiss", "shard-001.faiss", "shard-002.faiss"]
    assert all(meta["files"][s["file"]]["sha256"] for s in meta["shards"]) and "index.faiss" not in meta["files"]

    reopened = Searcher.open(tmp_path / "sharded", device="cpu")
    merged_searcher = Searcher.open(tmp_path / "merged", device="cpu")
    assert type(reopened.index).__name__ == "ShardedGalleryIndex" and len(reopened.gallery_paths) == 3000
    n = len(gallery)
    exact_scores = np.full((len(queries), n), np.nan, np.float32)  # the merged index's own scores
    all_s, all_i = merged_searcher.index.search(queries, n)
    found = all_i >= 0
    exact_scores[np.nonzero(found)[0], all_i[found]] = all_s[found]
    for k in (1, 10, 100):
        s1, i1 = reopened.index.search(queries, k)
        s2, i2 = merged_searcher.index.search(queries, k)
        assert_same_ranking(s2, i2, s1, i1, exact_scores)
    assert reopened.evaluate() == merged_searcher.evaluate()
    subset = np.flatnonzero(np.arange(n) % 3 == 1)  # a metadata filter's rows, across all shards
    s1, i1 = reopened.index.search_subset(queries, 10, subset)
    s2, i2 = merged_searcher.index.search_subset(queries, 10, subset)
    assert np.isin(i1, subset).all()
    assert_same_ranking(s2, i2, s1, i1, exact_scores)
    assert reopened.devices["index"] == "cpu (3 shards in parallel)"
    if index_type == "flat":  # and flat shards equal brute force over all vectors
        _, i = reopened.index.search(queries, 10)
        ref = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :10]
        assert (i[:, 0] == ref[:, 0]).mean() > 0.95  # ties may order differently from NumPy's stable sort
        np.testing.assert_allclose(np.sort(queries @ gallery.T, axis=1)[:, ::-1][:, :10],
                                   reopened.index.search(queries, 10)[0], atol=1e-5)


def test_ivf_shards_share_the_driver_quantizer_with_the_single_index(synthetic_parts, tmp_path):
    parts_dir, _, queries = synthetic_parts
    cfg = IndexConfig(index_type="ivf-flat", nlist=16, nprobe=4, use_gpu=False)
    single, _ = build_from_parts(parts_dir, tmp_path / "single", cfg, progress=False,
                                 calib=CalibrationConfig(target_recall=0))  # the given nprobe, as the shards use
    sharded, _ = build_from_parts(parts_dir, tmp_path / "sharded", cfg, ShardOptions(shards=2), progress=False)
    # the same seeded training sample, so the same centroids, so the same lists probed and the same results
    s1, i1 = single.search(queries, 20)
    s2, i2 = Searcher.open(tmp_path / "sharded", device="cpu").index.search(queries, 20)
    all_s, all_i = single.search(queries, len(single))
    exact_scores = np.full((len(queries), len(single)), np.nan, np.float32)
    found = all_i >= 0
    exact_scores[np.nonzero(found)[0], all_i[found]] = all_s[found]
    assert_same_ranking(s1, i1, s2, i2, exact_scores)


def test_sharded_folder_refuses_changes_and_corrupt_shards(synthetic_parts, tmp_path):
    parts_dir, gallery, _ = synthetic_parts
    build_from_parts(parts_dir, tmp_path / "sharded", IndexConfig(index_type="flat", use_gpu=False),
                     ShardOptions(shards=2), progress=False)
    index = GalleryIndex.load(tmp_path / "sharded", use_gpu=False)
    with pytest.raises(ValueError, match="cannot be extended in place"):
        index.add(gallery[:2], index.items)
    with pytest.raises(ValueError, match="cannot remove items in place"):
        index.remove([0])
    shard = tmp_path / "sharded" / "shard-001.faiss"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-001.faiss"):
        GalleryIndex.load(tmp_path / "sharded")


def test_cli_embed_then_index_sharded_then_evaluate_and_search(inshop, tmp_path):
    runner = CliRunner()
    emb = tmp_path / "emb"
    result = runner.invoke(app, ["embed", "--dataset", "inshop", "--data-root", str(inshop), "--out", str(emb),
                                 *TINY_FLAGS, "--part-size", "6", "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    assert "complete" in result.output and "0 unreadable" in result.output
    result = runner.invoke(app, ["index", "--from-embeddings", str(emb), "--out", str(tmp_path / "idx"),
                                 "--shards", "2", "--no-gpu"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", "--index", str(tmp_path / "idx"), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)["metrics"]
    ds = load_dataset("inshop", inshop)
    emb_backend = open_embedder(EmbedderSpec.untrained(**TINY), "cpu")
    from retrieval.metrics import evaluate_embeddings

    ref = evaluate_embeddings(emb_backend.embed_paths(ds.query.paths, progress=False), np.asarray(ds.query.labels),
                              emb_backend.embed_paths(ds.gallery.paths, progress=False), np.asarray(ds.gallery.labels),
                              ks=ds.recall_ks, use_gpu=False)
    for k in ds.recall_ks:  # float16 storage: the same neighbours as float32 embeddings on this data
        assert metrics[f"R@{k}"] == pytest.approx(ref[f"R@{k}"])
    query = ds.query.paths[0]
    result = runner.invoke(app, ["search", str(query), "--index", str(tmp_path / "idx"), "--json", "-k", "3",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)["results"][0]["hits"]
    assert len(hits) == 3 and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
