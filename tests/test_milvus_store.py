"""Milvus as an index store, against a real Milvus Lite gRPC server on a loopback port (one per module).

The server runs from .venv-milvus (`make test` makes it); without it these tests are skipped, saying so.
Vectors are small random clusters; every folder gets its own collection on the shared server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retrieval.config import CalibrationConfig
from retrieval.index.calibrate import build_calibrated
from retrieval.index.config import IndexConfig
from retrieval.index.errors import IndexFileError
from retrieval.index.filters import FilterError
from retrieval.index.folder import ItemTable
from retrieval.index.meta import IndexMeta, read_meta, write_meta
from retrieval.index.milvus_filters import string_literal, where_expression
from retrieval.index.milvus_store import (
    MilvusStoreRecord,
    MilvusUpload,
    connect,
    count_rows,
)
from retrieval.index.stores import gallery_index, open_index
from retrieval.index.vectors import build_from_vectors
from retrieval.search.searcher import Searcher
from tests.milvus_server import REPO, run_server, server_command

HOSTILE = ('Dresses" or attributes["category"] != "', "back\\slash", "x or y", ")", 'quo"te', "it's", "a\\\"b",
           "Dresses")


def test_faiss_in_the_project_environment_is_the_gpu_build():
    """milvus-lite depends on faiss-cpu, which provides the same `faiss` module: it must stay out of this venv."""
    from importlib.metadata import packages_distributions

    providers = packages_distributions().get("faiss", [])
    assert providers and all(p.lower().startswith("faiss-gpu") for p in providers), providers


def test_filter_values_become_escaped_literals():
    assert string_literal('a"b') == '"a\\"b"'
    assert string_literal("c\\d") == '"c\\\\d"'
    expr = where_expression({"category": frozenset({'x" or key >= 0 or "', "Dresses"}), "gender": frozenset({"WOMEN"})})
    assert expr == ('(attributes["category"] == "Dresses" or attributes["category"] == "x\\" or key >= 0 or \\"") '
                    'and (attributes["gender"] == "WOMEN")')
    with pytest.raises(FilterError, match="control character"):
        where_expression({"category": frozenset({"a\nb"})})


def test_each_difference_between_a_collection_and_its_folder_is_named():
    from retrieval.index.milvus_store import COLLECTION_FORMAT, mismatch

    facts = {"format": COLLECTION_FORMAT, "fingerprint": "a", "dim": 16, "metric": "IP"}
    assert mismatch(facts, "a", 16, 10, 10) == []
    assert mismatch({**facts, "dim": 8, "metric": "L2"}, "b", 16, 9, 10) == [
        "embedder fingerprint a != b", "dimension 8 != 16", "metric L2 != IP", "row count 9 != 10"]
    assert "not a metrix-retrieval collection" in mismatch({**facts, "format": ""}, "a", 16)[0]


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not server_command().exists():
        pytest.skip(f"no Milvus Lite server environment at {server_command().parents[1]} (`make test` creates it)")
    yield from run_server(tmp_path_factory.mktemp("milvus") / "data")


def clustered(n: int, d: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d))
    labels = np.arange(n) % classes
    x = centres[labels] + 0.7 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


class VectorsOnly:
    """The embedder of the test folders (searched by vector only): what a live reload checks the index against."""

    name, device, fingerprint, embedding_size, normalisation = "vectors", "cpu", "fp-test", 8, "l2"


def milvus_folder(uri: str, out: Path, vectors: np.ndarray, labels: np.ndarray, categories: list[str],
                  collection: str, index_type: str = "flat", calib: CalibrationConfig | None = None, **knobs: int):
    """A Milvus-backed folder with category attributes, built as `retrieval index` builds (upload, calibration)."""
    items = ItemTable([f"/g/{i}.jpg" for i in range(len(vectors))], [int(v) for v in labels],
                      [f"item{i}" for i in range(len(vectors))], [{"category": c} for c in categories])
    record = MilvusStoreRecord(uri, collection)
    builder = MilvusUpload(record, items, "fp-test", None, batch_size=128, progress=False)
    result = build_calibrated(vectors, IndexConfig(index_type=index_type, use_gpu=False, **knobs),
                              calib or CalibrationConfig(queries=100), builder=builder)
    meta = IndexMeta(protocol="all-vs-all", recall_ks=[1, 2, 4], fingerprint="fp-test",
                     embedding_size=vectors.shape[1], **result.meta())
    index = gallery_index(result.built.index, result.built.params, items, meta, None, None, use_gpu=False)
    index.save(out)
    return index


def test_flat_equals_faiss_flat_and_evaluates_the_same(milvus_uri: str, tmp_path: Path):
    g, labels = clustered(300, 16, 12, seed=1)
    build_from_vectors(g, tmp_path / "faiss", IndexConfig(index_type="flat", use_gpu=False),
                                      labels=labels.tolist())
    build_from_vectors(g, tmp_path / "milvus", IndexConfig(index_type="flat", use_gpu=False),
                                  labels=labels.tolist(), store=MilvusStoreRecord(milvus_uri, "flat_vs_faiss"))
    meta = json.loads((tmp_path / "milvus" / "meta.json").read_text())
    assert {k: v for k, v in meta["store"].items() if k != "keys_sha256"} == {
        "kind": "milvus", "uri": milvus_uri, "collection": "flat_vs_faiss", "token_env": ""}
    assert sorted(meta["files"]) == []  # vectors and items live in the collection

    faiss_s = Searcher.open(tmp_path / "faiss", device="cpu")
    milvus_s = Searcher.open(tmp_path / "milvus", device="cpu")
    q = g[::7]
    fs, fi = faiss_s.index.search(q, 10)
    ms, mi = milvus_s.index.search(q, 10)
    np.testing.assert_array_equal(mi, fi)
    np.testing.assert_allclose(ms, fs, atol=1e-5)
    assert milvus_s.evaluate() == pytest.approx(faiss_s.evaluate(), abs=1e-9)
    hits = milvus_s.search_embeddings(q[:1], 3)[0]
    assert [h.item_id for h in hits] == [faiss_s.gallery_item_ids[i] for i in fi[0, :3]]
    for method in ("qe", "kreciprocal"):
        a, b = milvus_s.search_raw(q, 5, rerank=method), faiss_s.search_raw(q, 5, rerank=method)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_allclose(a[0], b[0], atol=1e-5)


def test_filters_equal_brute_force_and_hostile_values_match_literally(milvus_uri: str, tmp_path: Path):
    g, labels = clustered(240, 16, 8, seed=2)
    categories = [HOSTILE[i % len(HOSTILE)] for i in range(len(g))]
    milvus_folder(milvus_uri, tmp_path / "idx", g, labels, categories, "filters")
    searcher = Searcher.open(tmp_path / "idx", device="cpu")
    q = g[[3, 50, 101]]
    cats = np.asarray(categories, dtype=object)
    for value in HOSTILE:
        subset = np.flatnonzero(cats == value)
        expected = subset[np.argsort(-(q @ g[subset].T), axis=1, kind="stable")[:, :10]]
        _, ids = searcher.search_raw(q, 10, where={"category": value})
        np.testing.assert_array_equal(ids, expected, err_msg=value)
        assert all(categories[i] == value for i in ids.ravel())
    either = np.flatnonzero((cats == ")") | (cats == "x or y"))
    _, ids = searcher.search_raw(q, 5, where=["category=)", "category=x or y"])
    np.testing.assert_array_equal(ids, either[np.argsort(-(q @ g[either].T), axis=1, kind="stable")[:, :5]])
    # an injection attempt that no item holds: sent to Milvus as it is, it matches nothing
    attack = {"category": frozenset({'nothing" or attributes["category"] != "'})}
    _, ids = searcher.index.index.search(q, 10, where_expression(attack))
    assert (ids == -1).all()
    with pytest.raises(FilterError, match="unknown filter attribute"):
        searcher.search_raw(q, 10, where={"colour": "red"})


def test_calibrated_milvus_indexes_record_their_curve(milvus_uri: str, tmp_path: Path):
    g, labels = clustered(2000, 16, 20, seed=3)
    for index_type, collection in (("ivf-flat", "calib_ivf"), ("ivf-sq8", "calib_sq8"), ("hnsw", "calib_hnsw")):
        out = tmp_path / index_type
        milvus_folder(milvus_uri, out, g, labels, ["c"] * len(g), collection, index_type,
                      CalibrationConfig(target_recall=0.9, queries=100))
        meta = read_meta(out / "meta.json")
        cal = meta.calibration
        assert cal is not None and cal["index_type"] == index_type and cal["curve"], index_type
        assert cal["reached"] and cal["recall"] >= 0.9 and "milvus" in cal["device"]
        client = connect(MilvusStoreRecord(milvus_uri, collection))
        assert client.describe_index(collection, "vector")["index_type"] == {
            "ivf-flat": "IVF_FLAT", "ivf-sq8": "IVF_SQ8", "hnsw": "HNSW"}[index_type]
        searcher = Searcher.open(out, device="cpu")
        assert searcher.index.params.to_dict() == meta.index_params.to_dict() and len(searcher.index) == len(g)


def test_a_mismatched_collection_is_refused_naming_what_differs(milvus_uri: str, tmp_path: Path):
    g, labels = clustered(80, 8, 4, seed=4)
    out = tmp_path / "idx"
    milvus_folder(milvus_uri, out, g, labels, ["c"] * len(g), "mismatch")
    meta = read_meta(out / "meta.json")
    meta.fingerprint = "another-embedder"
    write_meta(out / "meta.json", meta)
    with pytest.raises(IndexFileError, match="embedder fingerprint fp-test != another-embedder"):
        open_index(out)
    meta.fingerprint, meta.n_items = "fp-test", 81
    write_meta(out / "meta.json", meta)
    with pytest.raises(IndexFileError, match="row count 80 != 81"):
        open_index(out)
    # a build into a collection made by another embedder is refused before it writes
    record = MilvusStoreRecord(milvus_uri, "mismatch")
    items = ItemTable(["/a.jpg"] * 4, [0] * 4, ["a"] * 4)
    with pytest.raises(Exception, match="embedder fingerprint fp-test != other"):
        MilvusUpload(record, items, "other", None, progress=False).build(g[:4], meta.index_params)


def test_add_and_remove_write_through_and_a_running_server_reloads(milvus_uri: str, tmp_path: Path):
    from app.live_index import LiveIndex
    from retrieval.index.build import remove_items

    g, labels = clustered(120, 8, 6, seed=5)
    out = tmp_path / "idx"
    milvus_folder(milvus_uri, out, g[:100], labels[:100], ["old"] * 100, "live")
    live = LiveIndex(Searcher.open(out, VectorsOnly(), device="cpu"), out)
    other = Searcher.open(out, device="cpu")  # a second replica over the same collection
    before = live.version.id

    index = open_index(out, use_gpu=False)
    new = ItemTable([f"/new/{i}.jpg" for i in range(20)], [-1] * 20, [f"new{i}" for i in range(20)],
                    [{"category": "new"}] * 20)
    index.add(g[100:], new)
    index.save(out)
    # the replica still on the old version leaves out what it does not hold yet
    assert other.index.search(g[100:101], 1)[1][0, 0] != 100
    outcome = live.reload("watch")
    assert outcome.outcome == "reloaded" and live.version.id != before and live.version.n_items == 120, outcome
    hit = live.searcher.search_embeddings(g[100:101], 1, where={"category": "new"})[0][0]
    assert hit.item_id == "new0" and hit.score == pytest.approx(1.0, abs=1e-5)

    removed, n = remove_items(out, ["new0", "item5"])
    assert n == 2 and len(removed) == 118
    assert live.reload("watch").outcome == "reloaded"
    ids = {h.item_id for h in live.searcher.search_embeddings(g[[5, 100]], 3)[0] +
           live.searcher.search_embeddings(g[[5, 100]], 3)[1]}
    assert "new0" not in ids and "item5" not in ids
    assert Searcher.open(out, device="cpu").gallery_item_ids == live.searcher.gallery_item_ids
    live.stop()


def test_the_token_comes_from_the_named_variable_and_is_never_written(milvus_uri: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    g, labels = clustered(40, 8, 4, seed=6)
    monkeypatch.setenv("METRIX_TEST_MILVUS_TOKEN", "root:s3cret-token")
    record = MilvusStoreRecord(milvus_uri, "tokened", token_env="METRIX_TEST_MILVUS_TOKEN")
    build_from_vectors(g, tmp_path / "idx", IndexConfig(index_type="flat", use_gpu=False), store=record)
    text = (tmp_path / "idx" / "meta.json").read_text()
    assert "s3cret" not in text and json.loads(text)["store"]["token_env"] == "METRIX_TEST_MILVUS_TOKEN"
    monkeypatch.delenv("METRIX_TEST_MILVUS_TOKEN")
    with pytest.raises(Exception, match="METRIX_TEST_MILVUS_TOKEN, which is not set"):
        open_index(tmp_path / "idx")


def test_cli_builds_into_milvus_and_a_killed_upload_rerun_gives_the_same_collection(milvus_uri: str,
                                                                                  tmp_path: Path):
    from retrieval.cli import app

    g, labels = clustered(6000, 8, 30, seed=7)
    np.save(tmp_path / "emb.npy", g)
    np.save(tmp_path / "labels.npy", labels)
    out = tmp_path / "idx"
    args = ["index", "--from-embeddings", str(tmp_path / "emb.npy"), "--labels", str(tmp_path / "labels.npy"),
            "--out", str(out), "--no-gpu", "--index-type", "flat", "--store", "milvus", "--milvus-uri", milvus_uri,
            "--collection", "resumable", "--upload-batch", "20"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "retrieval", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    client = connect(MilvusStoreRecord(milvus_uri, "resumable"))
    deadline = time.monotonic() + 120
    seen = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            seen = count_rows(client, "resumable") if client.has_collection("resumable") else 0
        except Exception:
            seen = 0
        if seen >= 200:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < seen < len(g) and not (out / "meta.json").exists(), "the upload was not killed midway"

    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "6,000 items" in " ".join(res.output.split())
    index = open_index(out, use_gpu=False)
    np.testing.assert_array_equal(index.index.keys, np.arange(len(g)))
    np.testing.assert_array_equal(index.exact_gallery_vectors(), g)
    assert index.items.labels == labels.tolist() and index.items.item_ids[17] == "17"

    np.save(tmp_path / "q.npy", g[[4, 9]])
    res = CliRunner().invoke(app, ["search", "--index", str(out), "--embeddings", str(tmp_path / "q.npy"), "-k", "3",
                                   "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    brute = np.argsort(-(g[[4, 9]] @ g.T), axis=1, kind="stable")[:, :3]
    assert [[h["gallery_index"] for h in r["hits"]] for r in json.loads(res.output)["results"]] == brute.tolist()


def _serve_process(index_dir: Path, port: int, log: Path) -> subprocess.Popen:
    """A `retrieval serve` process of its own (a replica), watching its folder."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.Popen([sys.executable, "-m", "retrieval", "serve", "--index", str(index_dir), "--port",
                             str(port), "--device", "cpu", "--watch-interval", "0.2"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"))


def _wait_ready(client, proc: subprocess.Popen, log: Path, timeout_s: float = 180.0) -> None:
    from retrieval.client import SearchApiError

    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"retrieval serve exited: {log.read_text()[-2000:]}"
        try:
            if client.ready():
                return
        except SearchApiError:
            pass
        assert time.monotonic() < deadline, f"retrieval serve was not ready in {timeout_s:.0f} s"
        time.sleep(0.3)


@pytest.mark.slow
def test_two_serve_processes_over_one_collection_answer_identically_and_both_see_add_and_remove(milvus_uri: str,
                                                                                             tmp_path: Path):
    """Two `retrieval serve` processes (replicas behind a load balancer) over one Milvus collection, with a tiny
    untrained embedder over a generated In-Shop dataset: the same answers, and one `retrieval index --add` /
    `--remove` command is served by both without a restart."""
    from app.live_index import version_of
    from app.serve import free_port
    from retrieval.client import SearchClient
    from retrieval.data import load_dataset
    from retrieval.embed.spec import EmbedderSpec, open_embedder
    from retrieval.index.build import build_index
    from tests.fakes import make_fake_inshop, make_image_folder

    data = make_fake_inshop(tmp_path / "inshop", train_items=1, test_items=6, per_item=4, size=32)
    backend = open_embedder(EmbedderSpec.untrained("resnet18", embedding_size=16, image_size=32), "cpu")
    out = tmp_path / "idx"
    build_index(load_dataset("inshop", data), backend, out, IndexConfig(use_gpu=False), progress=False,
                store=MilvusStoreRecord(milvus_uri, "replicas"))
    logs = [tmp_path / f"serve-{i}.log" for i in range(2)]
    ports = [free_port() for _ in logs]
    procs = [_serve_process(out, port, log) for port, log in zip(ports, logs)]
    try:
        clients = [SearchClient(f"http://127.0.0.1:{port}", timeout=60) for port in ports]
        for client, proc, log in zip(clients, procs, logs):
            _wait_ready(client, proc, log)
        first = Searcher.open(out, backend, device="cpu")
        query = first.query_paths[1]
        category = first.index.items.attributes[0]["category"]

        def answers(**kw):
            return [[(h.gallery_index, h.item_id, round(h.score, 5)) for h in c.search(query, k=5, **kw).hits]
                    for c in clients]

        a, b = answers()
        assert a == b and len(a) == 5
        a, b = answers(filter={"category": category}, rerank="qe")
        assert a == b and all(first.index.items.attributes[i]["category"] == category for i, _, _ in a)

        def served_everywhere(n: int, what: str) -> None:
            deadline = time.monotonic() + 120
            while not all(c.info()["n_items"] == n for c in clients):
                assert time.monotonic() < deadline, f"{what} was not served by both processes"
                time.sleep(0.2)

        def cli(*args: str) -> None:
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            done = subprocess.run([sys.executable, "-m", "retrieval", "index", "--out", str(out), *args,
                                   "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]

        folder = make_image_folder(tmp_path / "new", classes=1, per_class=2, size=32)
        cli("--add", str(folder))
        version = Searcher.open(out, backend, device="cpu").meta
        served_everywhere(version.n_items, "the --add")
        assert {c.info()["index_version"] for c in clients} == {version_of(version).id}
        new_path = sorted(str(p) for p in folder.rglob("*") if p.is_file())[0]
        hits = [c.search(new_path, k=1).hits[0] for c in clients]
        assert hits[0].score == pytest.approx(1.0, abs=1e-4) and hits[0].path == hits[1].path

        cli("--remove-path", new_path)
        served_everywhere(version.n_items - 1, "the --remove-path")
        after = [[h.path for h in c.search(new_path, k=3).hits] for c in clients]
        assert after[0] == after[1] and hits[0].path not in after[0]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_embedding_parts_build_into_milvus_and_evaluate_as_the_faiss_index(milvus_uri: str, tmp_path: Path):
    from retrieval.embed.job import write_arrays
    from retrieval.errors import UsageError
    from retrieval.index.sharded_build import ShardOptions, build_from_parts

    g, labels = clustered(400, 16, 10, seed=8)
    q, q_labels = clustered(30, 16, 10, seed=8)
    parts = tmp_path / "emb"
    write_arrays(parts, {"gallery": (g, labels.tolist(), [str(v) for v in labels]),
                         "query": (q, q_labels.tolist(), [str(v) for v in q_labels])},
                 fingerprint="parts-fp", part_size=64)
    cfg = IndexConfig(index_type="flat", use_gpu=False)
    build_from_parts(parts, tmp_path / "faiss", cfg, progress=False)
    record = MilvusStoreRecord(milvus_uri, "from_parts")
    build_from_parts(parts, tmp_path / "milvus", cfg, progress=False, store=record)
    assert read_meta(tmp_path / "milvus" / "meta.json").store["collection"] == "from_parts"
    milvus_s, faiss_s = Searcher.open(tmp_path / "milvus", device="cpu"), Searcher.open(tmp_path / "faiss", device="cpu")
    assert milvus_s.has_stored_queries and milvus_s.index.fingerprint == "parts-fp"
    assert milvus_s.evaluate() == pytest.approx(faiss_s.evaluate(), abs=1e-9)
    assert milvus_s.gallery_item_ids == faiss_s.gallery_item_ids
    with pytest.raises(UsageError, match="drop --shards"):
        build_from_parts(parts, tmp_path / "sharded", cfg, ShardOptions(shards=2), progress=False, store=record)


@pytest.mark.ray
def test_parts_upload_in_parallel_on_ray_into_the_same_collection(ray_runtime, milvus_uri: str, tmp_path: Path):
    from retrieval.embed.job import write_arrays
    from retrieval.embed.ray_engine import RayOptions
    from retrieval.index.sharded_build import ShardOptions, build_from_parts

    g, labels = clustered(600, 16, 12, seed=9)
    parts = tmp_path / "emb"
    write_arrays(parts, {"gallery": (g, labels.tolist(), [f"sku{i}" for i in range(len(g))])},
                 fingerprint="ray-fp", part_size=50)
    for index_type in ("flat", "hnsw"):  # hnsw: the rows held out for calibration are added by the driver
        out = tmp_path / index_type
        build_from_parts(parts, out, IndexConfig(index_type=index_type, use_gpu=False),
                         ShardOptions(engine="ray"), ray_options=RayOptions(workers=2), progress=False,
                         calib=CalibrationConfig(queries=60), store=MilvusStoreRecord(milvus_uri, f"ray_{index_type}"))
        index = open_index(out, use_gpu=False)
        np.testing.assert_array_equal(index.exact_gallery_vectors(), g)
        assert index.items.item_ids == [f"sku{i}" for i in range(len(g))] and index.items.labels == labels.tolist()
    assert read_meta(tmp_path / "hnsw" / "meta.json").calibration["held_out"]
