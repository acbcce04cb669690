"""End to end on a generated In-Shop-layout dataset with a tiny untrained embedder (resnet18, 64 px, 32-d):
`retrieval index` / `search` / `evaluate`, the Searcher API, --add, mismatch refusal, interrupted builds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from retrieval.index.build import add_images, build_index
from retrieval.embed.spec import EmbedderSpec, open_embedder
from retrieval.cli import app
from retrieval.index.config import IndexConfig
from retrieval.data import load_dataset
from retrieval.index.folder import EmbedderMismatchError, GalleryIndex
from retrieval.index.meta import IndexMeta
from retrieval.metrics import evaluate_embeddings
from retrieval.search.searcher import Searcher
from tests.fakes import make_fake_inshop, make_fake_sop

TINY = dict(arch="resnet18", embedding_size=32, image_size=64, seed=0)
UNTRAINED_FLAGS = ["--untrained", "--arch", "resnet18", "--embedding-size", "32", "--image-size", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def inshop(tmp_path_factory) -> Path:
    # 6 test items x 4 images: 12 queries, 12 gallery images
    return make_fake_inshop(tmp_path_factory.mktemp("inshop"), train_items=2, test_items=6, per_item=4)


@pytest.fixture(scope="module")
def backend():
    return open_embedder(EmbedderSpec.untrained(**TINY), "cpu")


@pytest.fixture(scope="module")
def built(inshop, backend, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("indexes") / "inshop"
    emb_backend = backend
    build_index(load_dataset("inshop", inshop), emb_backend, out, IndexConfig(use_gpu=False), progress=False)
    return out


def fresh_copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_index_folder_records_what_search_needs(built, inshop):
    meta = json.loads((built / "meta.json").read_text())
    ds = load_dataset("inshop", inshop)
    assert meta["dataset"] == "inshop" and meta["split"] == ds.gallery.name and meta["protocol"] == "query-gallery"
    assert meta["n_items"] == len(ds.gallery) == 12 and meta["n_queries"] == len(ds.query) == 12
    assert meta["embedding_size"] == 32 and meta["normalisation"] == "l2" and meta["index_type"] == "flat"
    assert meta["embedder_source"]["kind"] == "untrained" and meta["backend"] == "torch" and meta["embed_device"] == "cpu"
    assert meta["preprocessing"]["image_size"] == 64 and {"faiss", "numpy", "torch"} <= set(meta["versions"])
    assert meta["recall_ks"] == [1, 10, 20, 30, 40, 50]
    assert sorted(meta["files"]) == ["index.faiss", "items.json", "queries.json", "queries.npy"]


def test_search_paths_equals_numpy_brute_force_ranking(built, inshop, backend):
    emb_backend = backend
    ds = load_dataset("inshop", inshop)
    searcher = Searcher.open(built, emb_backend, device="cpu")
    queries = [str(p) for p in ds.query.paths[:5]]
    results = searcher.search_paths(queries, k=12)

    g = emb_backend.embed_paths(list(ds.gallery.paths), progress=False).astype(np.float64)
    q = emb_backend.embed_paths(queries, progress=False).astype(np.float64)
    expected = np.argsort(-(q @ g.T), axis=1, kind="stable")
    for row, hits in enumerate(results):
        assert [h.gallery_index for h in hits] == expected[row].tolist()
        assert [h.rank for h in hits] == list(range(1, 13))
        top = hits[0]
        assert searcher.gallery_paths[top.gallery_index] == str(ds.gallery.paths[top.gallery_index])
        assert top.path == Path(ds.gallery.paths[top.gallery_index]).relative_to(inshop).as_posix()  # as clients see it
        assert top.label == ds.gallery.labels[top.gallery_index] and top.item_id == ds.gallery.item_id(top.gallery_index)
        assert top.score == pytest.approx(float(q[row] @ g[top.gallery_index]), abs=1e-5)
    # the PIL entry point gives the same ranking
    images = [Image.open(p).convert("RGB") for p in queries[:2]]
    assert [[h.gallery_index for h in r] for r in searcher.search_images(images, k=12)] == expected[:2].tolist()
    assert searcher.devices == {"embedding": "cpu", "index": "cpu"}


def test_searcher_reopens_the_recorded_untrained_embedder(built, inshop):
    searcher = Searcher.open(built, device="cpu")  # no backend, no checkpoint: meta.json says how
    ds = load_dataset("inshop", inshop)
    hits = searcher.search_paths([ds.gallery.paths[3]], k=1)[0]
    assert hits[0].gallery_index == 3 and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert searcher.gallery_paths == [str(p) for p in ds.gallery.paths]


def test_searcher_exposes_the_items_the_app_shows(built, inshop):
    searcher = Searcher.open(built, device="cpu")
    ds = load_dataset("inshop", inshop)
    assert searcher.index_dir == built
    assert searcher.recall_ks == (1, 10, 20, 30, 40, 50) == tuple(ds.recall_ks)
    assert searcher.gallery_labels == [int(v) for v in ds.gallery.labels]
    assert searcher.gallery_item_ids == [ds.gallery.item_id(i) for i in range(len(ds.gallery))]
    assert searcher.has_stored_queries
    assert searcher.query_paths == [str(p) for p in ds.query.paths]
    assert searcher.query_labels == [int(v) for v in ds.query.labels]
    assert searcher.query_item_ids == [ds.query.item_id(i) for i in range(len(ds.query))]
    assert searcher.devices["embedding"] == "not opened yet"  # reading the item tables opens no embedder


def test_searcher_accessors_without_stored_queries(tmp_path, backend):
    root = make_fake_sop(tmp_path / "sop", train_classes=2, test_classes=3, per_class=2)
    emb_backend = backend
    ds = load_dataset("sop", root)
    build_index(ds, emb_backend, tmp_path / "idx", IndexConfig(use_gpu=False), progress=False)
    searcher = Searcher.open(tmp_path / "idx", device="cpu")
    assert not searcher.has_stored_queries
    assert searcher.query_paths == searcher.query_labels == searcher.query_item_ids == []
    assert searcher.gallery_labels == [int(v) for v in ds.test.labels]
    assert searcher.recall_ks == tuple(ds.recall_ks)
    index = searcher.index
    unsaved = Searcher(GalleryIndex(index.index, index.params, index.items, IndexMeta(), use_gpu=False))
    assert unsaved.index_dir is None and unsaved.recall_ks == (1, 2, 4, 8)


def test_evaluate_uses_stored_queries_and_matches_metrics(built, inshop, backend):
    emb_backend = backend
    ds = load_dataset("inshop", inshop)
    result = Searcher.open(built, device="cpu").evaluate()
    q = emb_backend.embed_paths(list(ds.query.paths), progress=False)
    g = emb_backend.embed_paths(list(ds.gallery.paths), progress=False)
    ref = evaluate_embeddings(q, np.asarray(ds.query.labels), g, np.asarray(ds.gallery.labels),
                              ks=(1, 10, 20, 30, 40, 50), use_gpu=False)
    assert result.keys() == ref.keys()
    for key in ref:
        assert result[key] == pytest.approx(ref[key], abs=1e-6), key


def test_other_embedder_is_refused_with_both_fingerprints(built):
    other = open_embedder(EmbedderSpec.untrained(**{**TINY, "seed": 1}), "cpu")
    index_fp = json.loads((built / "meta.json").read_text())["fingerprint"]
    with pytest.raises(EmbedderMismatchError) as err:
        Searcher.open(built, other)
    assert index_fp in str(err.value) and other.fingerprint in str(err.value) and "rebuild" in str(err.value)
    wider = open_embedder(EmbedderSpec.untrained(**{**TINY, "embedding_size": 64}), "cpu")
    with pytest.raises(EmbedderMismatchError, match="embedding size 64 != 32"):
        Searcher.open(built, wider)


def test_add_images_then_find_them(built, inshop, backend, tmp_path):
    idx = fresh_copy(built, tmp_path)
    emb_backend = backend
    new_folder = tmp_path / "new"
    new_folder.mkdir()
    sources = sorted((inshop / "Img").rglob("*.jpg"))[:2]  # train images: not in the gallery yet
    for i, src in enumerate(sources):
        shutil.copy(src, new_folder / f"extra_{i}.jpg")
    updated, n_added = add_images(idx, [new_folder], emb_backend, progress=False)
    assert n_added == 2 and len(updated) == 14
    searcher = Searcher.open(idx, device="cpu")
    hits = searcher.search_paths([new_folder / "extra_1.jpg"], k=1)[0]
    assert hits[0].gallery_index == 13 and hits[0].label == -1 and hits[0].item_id == "new"
    # unlabelled additions never count as relevant: the metrics are unchanged up to rank shifts
    assert searcher.evaluate()["R@50"] == pytest.approx(1.0)
    other = open_embedder(EmbedderSpec.untrained(**{**TINY, "seed": 2}), "cpu")
    with pytest.raises(EmbedderMismatchError):
        add_images(idx, [new_folder], other, progress=False)
    assert len(GalleryIndex.load(idx)) == 14


def test_index_and_dataset_moved_together_work_with_a_data_root_override(built, inshop, backend, tmp_path):
    emb_backend = backend
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(sorted((inshop / "Img").rglob("*.jpg"))[0], outside / "extra.jpg")
    idx = fresh_copy(built, tmp_path)
    add_images(idx, [outside], emb_backend, progress=False)
    stored = json.loads((idx / "items.json").read_text())["paths"]
    assert not any(Path(p).is_absolute() for p in stored[:-1]) and stored[-1] == str((outside / "extra.jpg").resolve())
    assert not any(Path(p).is_absolute() for p in json.loads((idx / "queries.json").read_text())["paths"])
    original = [str(p) for p in load_dataset("inshop", inshop).gallery.paths]
    assert Searcher.open(idx, device="cpu").gallery_paths[:12] == original  # resolved to the same strings as before

    moved = tmp_path / "moved"
    shutil.copytree(inshop, moved / "data")
    shutil.move(str(idx), str(moved / "index"))
    searcher = Searcher.open(moved / "index", device="cpu", data_root=moved / "data")
    ds = load_dataset("inshop", moved / "data")
    assert searcher.gallery_paths[:12] == [str(p) for p in ds.gallery.paths]
    assert searcher.gallery_paths[12] == stored[-1] and searcher.query_paths == [str(p) for p in ds.query.paths]
    hit = searcher.search_paths([ds.gallery.paths[3]], k=1)[0][0]
    found = searcher.gallery_paths[hit.gallery_index]
    assert hit.gallery_index == 3 and Path(found).is_file() and found.startswith(str(moved / "data"))
    assert hit.path == Path(ds.gallery.paths[3]).relative_to(moved / "data").as_posix()  # the same before the move

    # the same from the command line, and for the web UI's searcher (whose thumbnails read the gallery files)
    res = CliRunner().invoke(app, ["search", str(ds.gallery.paths[3]), "--index", str(moved / "index"), "-k", "1",
                                   "--json", "--device", "cpu", "--data-root", str(moved / "data")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["results"][0]["hits"][0]["path"] == hit.path
    served = Searcher.open(moved / "index", device="cpu", data_root=moved / "data")
    assert served.gallery_paths == searcher.gallery_paths


def test_interrupted_build_keeps_the_previous_index(built, inshop, backend, tmp_path, monkeypatch):
    idx = fresh_copy(built, tmp_path)
    before = (idx / "index.faiss").read_bytes()
    emb_backend = backend
    import retrieval.index.folder as index_folder

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while writing the item table")

    monkeypatch.setattr(index_folder, "atomic_write_json", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_index(load_dataset("inshop", inshop), emb_backend, idx, IndexConfig(use_gpu=False), progress=False)
    monkeypatch.undo()
    assert (idx / "index.faiss").read_bytes() == before
    assert Searcher.open(idx, device="cpu").evaluate()["R@1"] >= 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [idx.name]


def test_all_vs_all_dataset_indexes_test_split_and_excludes_self(tmp_path, backend):
    root = make_fake_sop(tmp_path / "sop", train_classes=2, test_classes=4, per_class=3)
    emb_backend = backend
    ds = load_dataset("sop", root)
    out = tmp_path / "idx"
    build_index(ds, emb_backend, out, IndexConfig(use_gpu=False), progress=False)
    searcher = Searcher.open(out, device="cpu")
    assert searcher.meta.protocol == "all-vs-all" and searcher.meta.n_queries == 0
    g = emb_backend.embed_paths(list(ds.test.paths), progress=False)
    ref = evaluate_embeddings(g, np.asarray(ds.test.labels), ks=ds.recall_ks[:2], use_gpu=False)
    result = searcher.evaluate(ks=ds.recall_ks[:2])
    for key in ref:
        assert result[key] == pytest.approx(ref[key], abs=1e-6), key


# -- command line ----------------------------------------------------------------------------------


def test_cli_index_search_evaluate(inshop, tmp_path):
    runner = CliRunner()
    out = tmp_path / "idx"
    res = runner.invoke(app, ["index", "--dataset", "inshop", "--data-root", str(inshop), "--out", str(out),
                              "--no-gpu", *UNTRAINED_FLAGS])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # rich wraps long lines
    assert "12 items, Flat (flat) built on cpu" in text and "12 stored queries" in text

    query = str(next((inshop / "Img").rglob("01_1_front.jpg")))
    searcher_paths = Searcher.open(out, device="cpu").gallery_paths
    res = runner.invoke(app, ["search", query, "--index", str(out), "-k", "3", "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output)
    hits = payload["results"][0]["hits"]
    assert payload["results"][0]["query"] == query and [h["rank"] for h in hits] == [1, 2, 3]
    assert list(hits[0]) == ["rank", "gallery_index", "item_id", "label", "path", "score", "attributes"]
    assert [h["path"] for h in hits] == [Path(searcher_paths[h["gallery_index"]]).relative_to(inshop).as_posix()
                                         for h in hits]  # relative to the dataset root, as the API answers
    assert payload["devices"]["embedding"] == "cpu"

    res = runner.invoke(app, ["search", query, "--index", str(out), "-k", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "rank" in text and "score" in text and "embedding on cpu" in text

    res = runner.invoke(app, ["evaluate", "--index", str(out), "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output)["metrics"]
    assert {"R@1", "R@10", "R@50", "MAP@R"} <= set(metrics)


def test_cli_refuses_missing_embedder_and_corrupt_index(inshop, built, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["index", "--dataset", "inshop", "--data-root", str(inshop), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--untrained" in " ".join(res.output.split())
    idx = fresh_copy(built, tmp_path)
    path = idx / "index.faiss"
    path.write_bytes(path.read_bytes()[:50])
    res = runner.invoke(app, ["evaluate", "--index", str(idx)])
    text = " ".join(res.output.split())
    assert res.exit_code == 1 and "index.faiss is 50 bytes but meta.json records" in text and "rebuild" in text


def test_cli_add(inshop, built, tmp_path):
    idx = fresh_copy(built, tmp_path)
    image = next((inshop / "Img").rglob("01_1_front.jpg"))
    res = CliRunner().invoke(app, ["index", "--add", str(image), "--out", str(idx), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "added 1 images" in " ".join(res.output.split()) and len(GalleryIndex.load(idx)) == 13


def test_checkpoint_embedder_is_recorded_and_reopened(inshop, tmp_path):
    from retrieval.checkpoint import save_checkpoint
    from retrieval.config import DataConfig, ModelConfig, RunConfig

    emb_backend = open_embedder(EmbedderSpec.untrained(**TINY), "cpu")
    cfg = RunConfig(data=DataConfig(image_size=64, resize_size=73), model=ModelConfig("resnet18", 32, "none"))
    ckpt = tmp_path / "best.pt"
    save_checkpoint(ckpt, emb_backend.model, cfg)
    torch_backend = open_embedder(EmbedderSpec.from_options("auto", ckpt, None), "cpu")
    assert torch_backend.spec.to_record() == {"kind": "checkpoint", "path": str(ckpt.resolve())}
    out = tmp_path / "idx"
    build_index(load_dataset("inshop", inshop), torch_backend, out, IndexConfig(use_gpu=False), progress=False)
    searcher = Searcher.open(out, device="cpu")
    assert searcher.backend.fingerprint == torch_backend.fingerprint == searcher.meta.fingerprint
    ckpt.rename(tmp_path / "moved.pt")
    with pytest.raises(FileNotFoundError, match="pass the embedder with --checkpoint"):
        _ = Searcher.open(out, device="cpu").backend
    moved = Searcher.open(out, EmbedderSpec.checkpoint(tmp_path / "moved.pt"), device="cpu")
    assert moved.search_paths([load_dataset("inshop", inshop).gallery.paths[0]], k=1)[0][0].gallery_index == 0
