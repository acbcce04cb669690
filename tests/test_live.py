"""The live search service through a real loopback server and real clients (retrieval.client.SearchClient, httpx):
the client, request ids and the access log, Prometheus metrics, index reloads under load, a corrupt republished
version refused, and readiness.

Index: a small generated In-Shop-layout gallery (8 products x 2 gallery photos, 32 px) embedded by an untrained
resnet18 (16-d). The module's server watches the index folder every 0.1 s; the tests that republish the folder
run after those that compare answers with the index as first built.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from retrieval.client import SearchApiError, SearchClient
from tests.fakes import make_fake_inshop

pytestmark = pytest.mark.slow

SPEC = dict(arch="resnet18", embedding_size=16, image_size=32)
WATCH_S = 0.1


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_inshop(tmp_path_factory.mktemp("data") / "inshop", train_items=1, test_items=8, per_item=4,
                            size=32)


@pytest.fixture(scope="module")
def backend() -> Any:
    from retrieval.embed.spec import EmbedderSpec, open_embedder

    return open_embedder(EmbedderSpec.untrained(SPEC["arch"], embedding_size=SPEC["embedding_size"],
                                                image_size=SPEC["image_size"]), "cpu")


@pytest.fixture(scope="module")
def index_dir(dataset: Path, backend: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from retrieval.index.config import IndexConfig
    from retrieval.data import load_dataset
    from retrieval.index.build import build_index

    out = tmp_path_factory.mktemp("indexes") / "live-index"
    build_index(load_dataset("inshop", dataset), backend, out, IndexConfig(use_gpu=False), progress=False)
    return out


@pytest.fixture(scope="module")
def first(index_dir: Path) -> Any:
    """A Searcher of the index as first built, in the test process (what answers are compared with)."""
    from retrieval.search.searcher import Searcher

    return Searcher.open(index_dir, device="cpu")


@pytest.fixture(scope="module")
def server(index_dir: Path) -> Iterator[Any]:
    from app.serve import free_port, launch
    from retrieval.search.searcher import Searcher

    running = launch(Searcher.open(index_dir, device="cpu"), port=free_port(), index_dir=index_dir,
                     watch_interval_s=WATCH_S, log_format="json")
    try:
        _wait_for(lambda: SearchClient(running.url).ready(), "the server to be ready")
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def client(server: Any) -> SearchClient:
    return SearchClient(server.url, timeout=60)


def _wait_for(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _access_ids(caplog: pytest.LogCaptureFixture) -> set[str]:
    """The request ids of the access log lines captured so far."""
    return {json.loads(r.getMessage())["id"] for r in caplog.records if r.name == "retrieval.access"}


def _metrics(url: str, token: str | None = None) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a /metrics scrape, through the Prometheus text parser."""
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(url + "metrics", headers=headers, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def _value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


# --- the client ---------------------------------------------------------------------------------------------


def test_the_client_searches_with_typed_hits_equal_to_the_searchers(client: SearchClient, first: Any) -> None:
    from retrieval.images import open_image
    from retrieval.search.hits import Hit

    query = first.query_paths[3]
    result = client.search(query, k=5)
    expected = first.search_images([open_image(query)], 5)[0]
    assert all(isinstance(h, Hit) for h in result.hits)
    assert [(h.gallery_index, h.item_id, h.path) for h in result.hits] == \
           [(h.gallery_index, h.item_id, h.path) for h in expected]
    assert [h.score for h in result.hits] == pytest.approx([h.score for h in expected], abs=1e-5)
    assert result.k == 5 and result.rerank == "none" and result.fingerprint == first.backend.fingerprint
    info = client.info()
    assert result.index_version == info["index_version"] == info["version"]["id"]
    assert info["version"]["n_items"] == info["n_items"] == len(first.gallery_paths)
    assert info["version"]["built_at"] == first.meta.created_at and info["reloading"]["watching"] is True
    category = first.index.items.attributes[0]["category"]
    filtered = client.search(query, k=3, filter={"category": category}, rerank="qe")
    assert filtered.filter == {"category": [category]} and filtered.rerank == "qe" and len(filtered.hits) == 3
    jpeg = client.thumbnail(result, 0)
    assert jpeg[:2] == b"\xff\xd8"
    assert client.health() and client.ready()


def test_the_client_raises_the_apis_code_status_and_message(client: SearchClient, server: Any, first: Any) -> None:
    with pytest.raises(SearchApiError) as refused:
        client.search(b"this is a text file, not a photo\n" * 4, k=3, request_id="bad-upload-1")
    assert (refused.value.status, refused.value.code) == (415, "not_an_image")
    assert "not an image" in refused.value.message and refused.value.request_id == "bad-upload-1"
    with pytest.raises(SearchApiError) as bad_k:
        client.search(first.query_paths[0], k=0)
    assert (bad_k.value.status, bad_k.value.code) == (400, "bad_request") and "`k`" in bad_k.value.message
    from app.serve import free_port

    with pytest.raises(SearchApiError) as unreachable:
        SearchClient(f"http://127.0.0.1:{free_port()}", timeout=5).info()
    assert (unreachable.value.status, unreachable.value.code) == (0, "unreachable")


# --- request ids and the access log ---------------------------------------------------------------------------


def test_a_request_id_round_trips_and_each_request_is_one_access_log_line(
    server: Any, first: Any, caplog: pytest.LogCaptureFixture
) -> None:
    query = Path(first.query_paths[1]).read_bytes()
    secret = "Bearer never-logged-token"
    with caplog.at_level(logging.INFO, logger="retrieval.access"), httpx.Client(base_url=server.url,
                                                                                timeout=60) as http:
        ok = http.post("api/v1/search", files={"image": ("q.jpg", query)}, data={"k": "4", "rerank": "qe",
                       "filter": "category=Dresses"}, headers={"X-Request-ID": "order-17:a", "Authorization": secret})
        refused = http.post("api/v1/search", files={"image": ("q.jpg", b"not a photo")},
                            headers={"X-Request-ID": "order-17:b"})
        forged = http.get("api/v1/info", headers={"X-Request-ID": "x" * 65})
        spaced = http.get("api/v1/health", headers={"X-Request-ID": "two words"})
        ui = http.get("config", headers={"X-Request-ID": "ui-1"})
        # a line of an earlier test's request can arrive here too: wait for these requests' own lines
        _wait_for(lambda: {"order-17:a", "order-17:b", "ui-1"} <= _access_ids(caplog)
                  and len(_access_ids(caplog)) >= 5, "the access log")
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "order-17:a"
    assert refused.status_code == 415 and refused.headers["x-request-id"] == "order-17:b"
    assert refused.json()["request_id"] == "order-17:b"  # the error body names it too
    for answer in (forged, spaced):  # not a plausible id: replaced, never echoed
        generated = answer.headers["x-request-id"]
        assert len(generated) == 32 and int(generated, 16) >= 0
    assert ui.status_code == 200 and ui.headers["x-request-id"] == "ui-1"  # the web UI's answers too
    lines = {entry["id"]: entry for entry in
             (json.loads(r.getMessage()) for r in caplog.records if r.name == "retrieval.access")}
    search = lines["order-17:a"]
    assert search["route"] == "/api/v1/search" and search["status"] == 200 and search["ms"] > 0
    assert search["k"] == 4 and search["rerank"] == "qe" and search["filter"] == "category=Dresses"
    assert search["batch"] >= 1 and search["index_version"] == ok.json()["index_version"]
    assert lines["order-17:b"]["status"] == 415 and lines["ui-1"]["route"] == "ui"
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "never-logged-token" not in text and "\\xff\\xd8" not in text and "JFIF" not in text


def test_the_text_access_log_keeps_one_request_on_one_line() -> None:
    from app.access_log import AccessLog
    from app.request_ids import RequestRecord

    record = RequestRecord("id-1", "POST", "/api/v1/search", "/api/v1/search", 200, 12.345)
    record.note(k=5, filter='category=a b\n"x"', rerank="none", batch=3)
    line = AccessLog("text").line(record)
    assert "\n" not in line and line.startswith("id=id-1 method=POST route=/api/v1/search")
    assert 'filter="category=a b\\n\\"x\\""' in line and "ms=12.35" in line and "batch=3" in line


# --- metrics ------------------------------------------------------------------------------------------------------


def test_metrics_parse_and_agree_with_the_clients_counts(server: Any, client: SearchClient, first: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    before = _metrics(server.url)
    queries = [first.query_paths[i % len(first.query_paths)] for i in range(12)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda q: client.search(q, k=3), queries))
    refusals = 0
    for bad in (b"", b"not a photo at all"):
        with pytest.raises(SearchApiError):
            client.search(bad, k=3)
        refusals += 1
    after = _metrics(server.url)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    search = dict(route="/api/v1/search", method="POST")
    assert delta("retrieval_http_requests_total", **search, status="200") == len(answers)
    assert delta("retrieval_http_requests_total", **search, status="400") + \
           delta("retrieval_http_requests_total", **search, status="415") == refusals
    for stage in ("decode", "embed", "search", "total"):
        assert delta("retrieval_search_seconds_count", stage=stage) == len(answers)
    batches = delta("retrieval_batch_size_count")
    assert 1 <= batches <= len(answers)
    assert delta("retrieval_batch_size_sum") == len(answers)  # every query was embedded in exactly one batch
    info = client.info()
    assert _value(after, "retrieval_index_items") == info["n_items"]
    version = [labels for (name, labels), _ in after.items() if name == "retrieval_index_version_info"]
    assert len(version) == 1 and dict(version[0])["version"] == info["index_version"]
    embedder = [dict(labels) for (name, labels), _ in after.items() if name == "retrieval_embedder_info"]
    assert embedder == [{"fingerprint": info["fingerprint"], "backend": "torch", "device": "cpu"}]
    assert _value(after, "retrieval_queue_depth") == 0 and _value(after, "retrieval_ready") == 1
    assert ("retrieval_index_reloads_total", (("outcome", "refused"),)) in after


# --- reloads -------------------------------------------------------------------------------------------------------


class Load:
    """Clients searching without pause on threads; every answer kept with when it was sent and received."""

    def __init__(self, url: str, queries: list[str], clients: int = 3) -> None:
        self.url, self.queries = url, queries
        self.answers: list[tuple[int, float, float, Any]] = []  # (client, sent, received, SearchResult)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in range(clients)]

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _run(self, c: int) -> None:
        client, i = SearchClient(self.url, timeout=60), c
        while not self._stop.is_set():
            sent = time.perf_counter()
            try:
                result = client.search(self.queries[i % len(self.queries)], k=6)
            except Exception as exc:  # noqa: BLE001  any failure is what the test counts
                with self._lock:
                    self.failures.append(repr(exc))
            else:
                with self._lock:
                    self.answers.append((c, sent, time.perf_counter(), result))
            i += 1


def _published(index_dir: Path) -> tuple[str, list[str]]:
    """(version id, dataset-relative path of each gallery row) of the folder as it is now."""
    from app.live_index import version_of
    from retrieval.index.folder import GalleryIndex
    from retrieval.search.hits import dataset_relative

    index = GalleryIndex.load(index_dir, verify_checksums=False, use_gpu=False)
    return version_of(index.meta).id, [dataset_relative(p, index.meta.data_root) for p in index.items.paths]


def test_republished_versions_are_swapped_in_under_load_and_every_answer_is_one_version(
    server: Any, client: SearchClient, first: Any, index_dir: Path, dataset: Path, backend: Any
) -> None:
    from retrieval.index.build import add_images, remove_items

    before = _metrics(server.url)
    versions = dict([_published(index_dir)])
    order = list(versions)
    a, b = first.gallery_item_ids[0], sorted(set(first.gallery_item_ids))[3]
    absent: dict[str, set[str]] = {order[0]: set()}  # version -> item ids it does not hold
    steps = [(lambda: remove_items(index_dir, [a]), {a}), (lambda: remove_items(index_dir, [b]), {a, b}),
             (lambda: add_images(index_dir, [Path(first.gallery_paths[0]).parent], backend, progress=False), {b})]
    with Load(server.url, list(first.query_paths)) as load:
        _wait_for(lambda: len(load.answers) >= 3, "answers before the first republish")
        for publish, missing in steps:
            publish()
            version, paths = _published(index_dir)
            versions[version], absent[version] = paths, missing
            order.append(version)
            _wait_for(lambda: client.info()["index_version"] == version, f"version {version} to be served")
            _wait_for(lambda: sum(r.index_version == version for *_, r in list(load.answers)) >= 3,
                      f"answers from version {version} under load")
    assert load.failures == [] and len(load.answers) > 12
    rank = {v: i for i, v in enumerate(order)}
    seen_by_client: dict[int, int] = {}
    newest_answered: list[tuple[float, int]] = []  # (received, version rank)
    for c, sent, received, result in sorted(load.answers, key=lambda a: a[2]):
        assert result.index_version in versions, result.index_version
        paths = versions[result.index_version]
        for hit in result.hits:  # every hit is the right row of the version the answer names: no mixed results
            assert hit.path == paths[hit.gallery_index], (result.index_version, hit)
        assert rank[result.index_version] >= seen_by_client.get(c, 0)  # a client never goes back to an older one
        seen_by_client[c] = rank[result.index_version]
        newest_answered.append((received, rank[result.index_version]))
    for _, sent, _, result in load.answers:  # sent after a newer version answered someone: never an older one
        newer = max((r for t, r in newest_answered if t < sent), default=0)
        assert rank[result.index_version] >= newer, (result.index_version, order[newer])
    for *_, result in load.answers:  # no removed item after its removal is served
        assert not {h.item_id for h in result.hits} & absent[result.index_version]
    after = _metrics(server.url)
    reloaded = _value(after, "retrieval_index_reloads_total", outcome="reloaded") - \
        _value(before, "retrieval_index_reloads_total", outcome="reloaded")
    assert reloaded == 3 and _value(after, "retrieval_index_items") == len(versions[order[-1]])
    assert server.live.released.wait(30) and server.live.release_ok  # nothing holds the replaced version any more


def test_thumbnails_follow_the_version_that_answered(server: Any, client: SearchClient, first: Any,
                                                     index_dir: Path, tmp_path: Path) -> None:
    from app.thumbnails import ThumbnailStore
    from retrieval.index.build import remove_items

    def expected_jpeg(path: str) -> bytes:
        store = ThumbnailStore([path], tmp_path / f"t{len(list(tmp_path.iterdir()))}")
        return store.path_for(0).read_bytes()

    old = client.search(first.query_paths[0], k=3)
    _, old_paths = _published(index_dir)
    old_row0 = client.thumbnail(old, 0)
    remove_items(index_dir, [sorted(set(first.gallery_item_ids))[5]])
    version, new_paths = _published(index_dir)
    _wait_for(lambda: client.info()["index_version"] == version, "the new version")
    row = old.hits[0].gallery_index
    assert old_row0 == client.thumbnail(old, 0) == expected_jpeg(str(Path(first.meta.data_root) / old_paths[row]))
    with httpx.Client(base_url=server.url, timeout=30) as http:  # the served version's row: its own image
        shifted = next(i for i in range(len(new_paths)) if new_paths[i] != old_paths[i])
        now = http.get(f"api/v1/thumbnails/{shifted}.jpg")
        assert now.content == expected_jpeg(str(Path(first.meta.data_root) / new_paths[shifted]))
        gone = http.get("api/v1/thumbnails/0.jpg?v=19700101T000000Z-00000000")
        assert gone.status_code == 404 and "no longer served" in gone.json()["message"]


def test_ui_tiles_and_the_openapi_document_follow_the_served_version(server: Any, first: Any, index_dir: Path,
                                                                    tmp_path: Path) -> None:
    """A UI answer's tiles are the API's thumbnail URLs of the version that answered: after a swap that moves
    every row they still show that version's images; /openapi.json is rebuilt for the version served."""
    from gradio_client import Client, handle_file

    from app.thumbnails import ThumbnailStore
    from retrieval.index.build import remove_items
    from retrieval.index.folder import GalleryIndex

    def expected_jpeg(relative: str) -> bytes:
        store = ThumbnailStore([Path(first.meta.data_root) / relative], tmp_path / f"t{len(list(tmp_path.iterdir()))}")
        return store.path_for(0).read_bytes()

    def document() -> dict[str, Any]:
        return httpx.get(server.url + "openapi.json", timeout=30).json()

    def thumbnail_maximum(doc: dict[str, Any]) -> int:
        return doc["paths"]["/api/v1/thumbnails/{index}.jpg"]["get"]["parameters"][0]["schema"]["maximum"]

    old_version, old_paths = _published(index_dir)
    _wait_for(lambda: server.live.version.id == old_version, "the folder's version to be served")
    before = document()
    assert before["info"]["x-index-version"] == old_version and thumbnail_maximum(before) == len(old_paths) - 1
    ui = Client(server.url, verbose=False, download_files=False)
    gallery, status = ui.predict(handle_file(first.query_paths[2]), 4, None, "none", api_name="/search")
    assert f"index version `{old_version}`" in status and len(gallery) == 4
    rows = []
    for tile in gallery:
        match = re.fullmatch(re.escape(server.url) + r"api/v1/thumbnails/(\d+)\.jpg\?v=(.+)", tile["image"]["url"])
        assert match and match.group(2) == old_version, tile["image"]
        rows.append(int(match.group(1)))
    remove_items(index_dir, [GalleryIndex.load(index_dir, verify_checksums=False, use_gpu=False).items.item_ids[0]])
    new_version, new_paths = _published(index_dir)  # the first item's rows are gone: every later row moved up
    _wait_for(lambda: server.live.version.id == new_version, "the new version")
    assert any(row >= len(new_paths) or new_paths[row] != old_paths[row] for row in rows)
    for tile, row in zip(gallery, rows):  # the old answer's tiles still show the old version's rows
        assert httpx.get(tile["image"]["url"], timeout=30).content == expected_jpeg(old_paths[row])
    after = document()
    assert after["info"]["x-index-version"] == new_version
    assert thumbnail_maximum(after) == len(new_paths) - 1 < thumbnail_maximum(before)


def _republish_altered(source: Path, index_dir: Path, alter: Any) -> None:
    """Publish a copy of `source` changed by `alter(copy)` as `index_dir`, by the renames `retrieval index` uses."""
    from retrieval.atomic import swap_in_folder

    copy = index_dir.parent / f".{index_dir.name}.building-test"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(source, copy)
    alter(copy)
    swap_in_folder(copy, index_dir)


def test_a_corrupt_republished_version_is_refused_and_the_old_one_keeps_serving(
    server: Any, client: SearchClient, first: Any, index_dir: Path, tmp_path: Path
) -> None:
    from retrieval.index.folder import GalleryIndex

    served = client.info()["index_version"]
    good = tmp_path / "good"
    shutil.copytree(index_dir, good)

    def flip_bytes(folder: Path) -> None:  # same size, other content: only the checksum tells
        data = bytearray((folder / "index.faiss").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / "index.faiss").write_bytes(bytes(data))

    def other_embedder(folder: Path) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        meta["fingerprint"] = "0" * len(meta["fingerprint"])
        (folder / "meta.json").write_text(json.dumps(meta))

    for alter, reason in ((flip_bytes, "SHA-256"), (other_embedder, "fingerprint")):
        refused_before = _value(_metrics(server.url), "retrieval_index_reloads_total", outcome="refused")
        _republish_altered(good, index_dir, alter)
        _wait_for(lambda: client.info()["reloading"]["last_outcome"] == "refused"
                  and _value(_metrics(server.url), "retrieval_index_reloads_total", outcome="refused")
                  > refused_before, "the refusal")
        info = client.info()
        assert info["index_version"] == served and info["reloading"]["stale"] is True
        assert reason in info["reloading"]["last_message"]
        assert client.search(first.query_paths[0], k=3).index_version == served  # the old one keeps serving
        assert client.ready() is False  # the served version is older than the folder's
        refusals = _value(_metrics(server.url), "retrieval_index_reloads_total", outcome="refused")
        time.sleep(10 * WATCH_S)  # the watcher retries only when the folder changes again
        assert _value(_metrics(server.url), "retrieval_index_reloads_total", outcome="refused") == refusals
        asked = client.reload()  # asking loads it again, and refuses it again
        assert asked.outcome == "refused" and reason in asked.message and asked.index_version == served

    GalleryIndex.load(good, use_gpu=False).save(index_dir)  # a good version: served, ready again
    _wait_for(lambda: client.info()["index_version"] != served, "the good version")
    assert client.ready() and client.info()["reloading"]["stale"] is False
    assert client.reload().outcome == "unchanged"


# --- readiness and the token --------------------------------------------------------------------------------------


class GatedBackend:
    """The real embedder behind a gate the test opens: holds the warm-up batch."""

    def __init__(self, inner: Any) -> None:
        self._inner, self.gate = inner, threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def embed_tensor(self, batch: Any) -> Any:
        assert self.gate.wait(timeout=120)
        return self._inner.embed_tensor(batch)


def test_readiness_is_503_until_warm_and_the_token_covers_metrics_and_reload(index_dir: Path, backend: Any) -> None:
    from app.serve import free_port, launch
    from retrieval.index.folder import GalleryIndex
    from retrieval.search.searcher import Searcher

    gated = GatedBackend(backend)
    searcher = Searcher(GalleryIndex.load(index_dir, use_gpu=False), gated, device="cpu")
    running = launch(searcher, port=free_port(), index_dir=index_dir, api_token="t0ken", watch=False)
    try:
        with httpx.Client(base_url=running.url, timeout=60) as http:
            auth = {"Authorization": "Bearer t0ken"}
            not_ready = http.get("api/v1/ready")  # probes need no token
            assert not_ready.status_code == 503 and not_ready.json()["error"] == "not_ready"
            assert "warming up" in not_ready.json()["message"]
            assert http.get("api/v1/health").status_code == 200  # alive all the same
            assert _value(_metrics(running.url, "t0ken"), "retrieval_ready") == 0
            assert http.get("metrics").status_code == 401 and http.get("metrics").json()["error"] == "unauthorized"
            assert http.post("api/v1/admin/reload").status_code == 401
            gated.gate.set()
            _wait_for(lambda: http.get("api/v1/ready").status_code == 200, "readiness")
            assert http.get("api/v1/ready").json() == {"status": "ready",
                                                       "index_version": running.live.version.id}
            assert _value(_metrics(running.url, "t0ken"), "retrieval_ready") == 1
            reload = http.post("api/v1/admin/reload", headers=auth)
            assert reload.status_code == 200 and reload.json()["outcome"] == "unchanged"
    finally:
        gated.gate.set()
        running.close()


def test_metrics_can_be_switched_off(index_dir: Path) -> None:
    from app.serve import free_port, launch
    from retrieval.search.searcher import Searcher

    running = launch(Searcher.open(index_dir, device="cpu"), port=free_port(), index_dir=index_dir, metrics=False,
                     watch=False)
    try:
        response = httpx.get(running.url + "metrics", timeout=30)
        assert response.status_code == 404 and running.metrics is None
    finally:
        running.close()


def test_serve_command_offers_the_service_flags_and_refuses_an_unknown_log_format(index_dir: Path) -> None:
    from typer.testing import CliRunner

    from retrieval.cli import app as cli

    help_text = CliRunner().invoke(cli, ["serve", "--help"]).output
    for flag in ("--watch", "--no-watch", "--metrics", "--no-metrics", "--log-format"):
        assert flag in help_text
    result = CliRunner().invoke(cli, ["serve", "--index", str(index_dir), "--log-format", "xml"])
    assert result.exit_code == 2 and "--log-format xml" in result.output


def test_the_live_update_benchmark_finds_mixed_and_stale_answers() -> None:
    from benchmarks.live_update import Answer, consistency

    versions = {"v1": {"paths": ["a.jpg", "b.jpg"], "items": ["A", "B"], "item_set": {"A", "B"}},
                "v2": {"paths": ["b.jpg"], "items": ["B"], "item_set": {"B"}}}
    order = ["v1", "v2"]
    good = [Answer(0, 0.0, 1.0, "v1", [(0, "a.jpg", "A"), (1, "b.jpg", "B")]),
            Answer(0, 1.0, 2.0, "v2", [(0, "b.jpg", "B")])]
    assert consistency(good, versions, order) == []
    mixed = Answer(1, 0.5, 1.5, "v2", [(0, "b.jpg", "B"), (1, "b.jpg", "B")])  # a row v2 does not have
    assert any("is not row 1 of v2" in p for p in consistency(good + [mixed], versions, order))
    older = Answer(1, 2.5, 3.0, "v1", [(0, "a.jpg", "A")])  # sent after v2 answered, answered by v1
    problems = consistency(good + [older], versions, order)
    assert any("request sent after v2 answered got v1" in p for p in problems)
