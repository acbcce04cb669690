"""The JSON API through a real loopback server (uvicorn + FastAPI, the UI mounted beside it), driven with httpx.

Index: the small demo dataset (In-Shop layout; category = the product's shape family) embedded by an
untrained resnet18 (64 px, 32-d), with gallery neighbour lists for DBA.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

UPLOAD_LIMIT = 300 * 1024


@pytest.fixture(scope="module")
def index_dir(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from retrieval.index.build import build_index
    from retrieval.embed.spec import EmbedderSpec, open_embedder
    from retrieval.data.inshop import load_inshop

    backend = open_embedder(EmbedderSpec.untrained("resnet18", embedding_size=32, image_size=64), "cpu")
    out = tmp_path_factory.mktemp("api-index") / "demo-index"
    build_index(load_inshop(demo_root, name="demo"), backend, out, progress=False, rerank_neighbours=8)
    return out


@pytest.fixture(scope="module")
def searcher(index_dir: Path) -> Any:
    from retrieval.search.searcher import Searcher

    return Searcher.open(index_dir, device="cpu")


@pytest.fixture(scope="module")
def server(searcher: Any, index_dir: Path) -> Iterator[Any]:
    from app.serve import free_port, launch

    running = launch(searcher, port=free_port(), index_dir=index_dir, max_upload_bytes=UPLOAD_LIMIT)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def http(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def _bytes(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def _search(http: httpx.Client, data: bytes, **fields: Any) -> httpx.Response:
    form = {key: str(value) for key, value in fields.items() if not isinstance(value, list)}
    files: list[tuple[str, Any]] = [("image", ("query.jpg", data, "image/jpeg"))]
    files += [(key, (None, str(v))) for key, values in fields.items() if isinstance(values, list) for v in values]
    return http.post("api/v1/search", data=form, files=files)


def _ids(response: httpx.Response) -> list[int]:
    return [r["gallery_index"] for r in response.json()["results"]]


# --- health, info, schema ----------------------------------------------------------------------------


def test_health_info_and_openapi_schema(http: httpx.Client, searcher: Any) -> None:
    assert http.get("api/v1/health").json() == {"status": "ok"}
    info = http.get("api/v1/info").json()
    meta = searcher.meta
    assert info["index_type"] == "flat" and info["n_items"] == len(searcher.gallery_paths)
    assert info["embedding_size"] == 32 and info["fingerprint"] == searcher.backend.fingerprint == meta.fingerprint
    assert info["backend"] == "torch" and info["device"] == "cpu" and info["built_at"] == meta.created_at
    assert info["filters"]["category"] == sorted({a["category"] for a in searcher.index.items.attributes})
    assert info["rerank"] == ["none", "qe", "dba", "kreciprocal"]
    schema = http.get("openapi.json").json()
    assert {"/api/v1/search", "/api/v1/health", "/api/v1/info"} <= set(schema["paths"])
    assert http.get("config").status_code == 200  # the UI is served by the same process on the same port


# --- search ------------------------------------------------------------------------------------------


def test_multipart_search_returns_the_searchers_ranking_with_timings(http: httpx.Client, searcher: Any) -> None:
    from retrieval.images import open_image

    query = searcher.gallery_paths[5]
    response = _search(http, _bytes(query), k=7)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = searcher.search_images([open_image(query)], 7)[0]
    assert _ids(response) == [h.gallery_index for h in expected]
    first = body["results"][0]
    assert first["rank"] == 1 and first["gallery_index"] == 5 and first["score"] == pytest.approx(1.0, abs=1e-3)
    assert first["item_id"] == searcher.gallery_item_ids[5] and first["label"] == searcher.gallery_labels[5]
    assert first["path"] == searcher.relative_path(5) and not first["path"].startswith("/")
    assert first["attributes"]["category"] == Path(query).parts[-3]
    assert set(body["timings_ms"]) == {"decode", "embed", "search", "total"} and body["timings_ms"]["embed"] > 0
    assert body["fingerprint"] == searcher.backend.fingerprint and body["k"] == 7
    thumb = http.get(first["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 384


def test_json_base64_search_equals_the_multipart_one(http: httpx.Client, searcher: Any) -> None:
    data = _bytes(searcher.gallery_paths[9])
    multipart = _ids(_search(http, data, k=5))
    plain = http.post("api/v1/search", json={"image": base64.b64encode(data).decode(), "k": 5})
    data_url = http.post("api/v1/search", json={"image": "data:image/jpeg;base64," + base64.b64encode(data).decode(),
                                                "k": 5})
    assert plain.status_code == data_url.status_code == 200
    assert _ids(plain) == _ids(data_url) == multipart


def test_filter_restricts_results_to_the_exact_top_k_of_the_subset(http: httpx.Client, searcher: Any) -> None:
    from retrieval.images import open_image

    attributes = searcher.index.items.attributes
    category = attributes[0]["category"]
    query = searcher.query_paths[3]
    emb = searcher.backend.embed_images([open_image(query)])[0]
    vectors = searcher.index.exact_gallery_vectors()
    keep = np.flatnonzero([a["category"] == category for a in attributes])
    expected = keep[np.argsort(-(vectors[keep] @ emb), kind="stable")][:6].tolist()
    form = _search(http, _bytes(query), k=6, filter=f"category={category}")
    as_json = http.post("api/v1/search", json={"image": base64.b64encode(_bytes(query)).decode(), "k": 6,
                                               "filter": {"category": category}})
    assert form.status_code == as_json.status_code == 200, form.text
    assert _ids(form) == _ids(as_json) == expected
    assert all(r["attributes"]["category"] == category for r in form.json()["results"])
    assert form.json()["filter"] == {"category": [category]}
    two = sorted({a["category"] for a in attributes})[:2]
    both = _search(http, _bytes(query), k=20, filter=[f"category={c}" for c in two])
    assert {r["attributes"]["category"] for r in both.json()["results"]} <= set(two)


@pytest.mark.parametrize("method", ["qe", "dba", "kreciprocal"])
def test_rerank_returns_the_searchers_reranked_results(http: httpx.Client, searcher: Any, method: str) -> None:
    from retrieval.images import open_image

    query = searcher.query_paths[1]
    response = _search(http, _bytes(query), k=8, rerank=method)
    assert response.status_code == 200, response.text
    expected = searcher.search_images([open_image(query)], 8, rerank=method)[0]
    assert _ids(response) == [h.gallery_index for h in expected]
    assert [r["score"] for r in response.json()["results"]] == pytest.approx([h.score for h in expected], abs=1e-5)
    assert response.json()["rerank"] == method


# --- errors from real bad requests ---------------------------------------------------------------------


def _png_with_claimed_size(width: int, height: int) -> bytes:
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def test_every_error_has_its_status_and_stable_code(http: httpx.Client, searcher: Any) -> None:
    good = _bytes(searcher.gallery_paths[0])
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    truncated = jpeg.getvalue()[: len(jpeg.getvalue()) // 3]
    cases = [
        (_search(http, good, k=0), 400, "bad_request", "`k` must be between 1"),
        (_search(http, good, k="ten"), 400, "bad_request", "`k` must be an integer"),
        (_search(http, good, rerank="magic"), 400, "bad_request", "unknown `rerank`"),
        (_search(http, good, filter="colour=red"), 400, "bad_request", "unknown filter attribute 'colour'"),
        (_search(http, good, filter="category"), 400, "bad_request", "KEY=VALUE"),
        (http.post("api/v1/search", data={"k": "3"}, files={"other": ("x", b"x")}), 400, "bad_request", "`image`"),
        (http.post("api/v1/search", json={"image": "https://example.com/cat.jpg"}), 400, "bad_request",
         "never fetches URLs"),
        (http.post("api/v1/search", json={"image": "@@@ not base64 @@@"}), 400, "bad_request", "not valid base64"),
        (http.post("api/v1/search", content=b"{", headers={"content-type": "application/json"}), 400,
         "bad_request", "not valid JSON"),
        (_search(http, b"\0" * (UPLOAD_LIMIT + 1)), 413, "too_large", "limit"),
        (http.post("api/v1/search", json={"image": base64.b64encode(b"\0" * (UPLOAD_LIMIT + 10)).decode()}), 413,
         "too_large", "limit"),
        (_search(http, _png_with_claimed_size(9000, 9000)), 413, "too_large", "9000x9000 pixels"),
        (_search(http, b"this is a text file, not a photo\n" * 4), 415, "not_an_image", "not an image"),
        (_search(http, truncated), 422, "undecodable_image", "truncated"),
        (http.get("api/v1/nothing-here"), 404, "not_found", ""),
    ]
    for response, status, code, words in cases:
        assert response.status_code == status, (status, response.text)
        body = response.json()
        assert body["error"] == code and words in body["message"], body
        assert "Traceback" not in response.text and 'File "' not in response.text
    assert _search(http, good, k=3).status_code == 200  # and the server keeps serving


class GatedEngine:
    """The real embed+search behind a gate the test opens: lets a test hold the worker busy on demand."""

    def __init__(self, searcher: Any) -> None:
        from app.batching import SearcherEngine

        self.inner = SearcherEngine(searcher)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.forward_passes: list[int] = []

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(timeout=60)
        self.forward_passes.append(len(pixels))
        return self.inner.embed(pixels)

    def search(self, emb: np.ndarray, k: int, where: Any, rerank: str) -> list[list[Any]]:
        return self.inner.search(emb, k, where, rerank)


def _gated_server(searcher: Any, index_dir: Path, **kwargs: Any) -> tuple[Any, GatedEngine]:
    from app.serve import free_port, launch

    engine = GatedEngine(searcher)
    return launch(searcher, port=free_port(), index_dir=index_dir, engine=engine, **kwargs), engine


def _wait_for(condition: Any, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_a_full_queue_answers_503_at_once(searcher: Any, index_dir: Path) -> None:
    running, engine = _gated_server(searcher, index_dir, worker_queue_size=1, max_batch_size=1)
    data = _bytes(searcher.gallery_paths[0])
    try:
        with httpx.Client(base_url=running.url, timeout=60) as http, ThreadPoolExecutor(2) as pool:
            busy = pool.submit(_search, http, data, k=3)  # taken by the worker, held at the gate
            assert engine.entered.wait(30)
            waiting = pool.submit(_search, http, data, k=3)  # fills the queue of one
            _wait_for(lambda: running.worker._queue.qsize() == 1)
            t0 = time.perf_counter()
            refused = _search(http, data, k=3)
            assert refused.status_code == 503 and refused.json()["error"] == "queue_full"
            assert time.perf_counter() - t0 < 5  # refused at once, not after waiting
            engine.gate.set()
            assert busy.result().status_code == waiting.result().status_code == 200
    finally:
        engine.gate.set()
        running.close()


def test_concurrent_requests_share_one_forward_pass(searcher: Any, index_dir: Path) -> None:
    running, engine = _gated_server(searcher, index_dir, max_batch_size=16, max_wait_ms=1)
    paths = searcher.gallery_paths[:7]
    try:
        with httpx.Client(base_url=running.url, timeout=60) as http, ThreadPoolExecutor(8) as pool:
            first = pool.submit(_search, http, _bytes(paths[0]), k=4)
            assert engine.entered.wait(30)  # the worker is busy with the first query...
            rest = [pool.submit(_search, http, _bytes(p), k=4) for p in paths[1:]]
            _wait_for(lambda: running.worker._queue.qsize() == len(paths) - 1)  # ...while six more queue up
            engine.gate.set()
            responses = [first.result()] + [f.result() for f in rest]
        assert [r.status_code for r in responses] == [200] * len(paths)
        assert engine.forward_passes == [1, len(paths) - 1]  # one forward pass served the six waiting queries
        assert [r.json()["batch_size"] for r in responses] == [1] + [len(paths) - 1] * (len(paths) - 1)
        for path, response in zip(paths, responses):  # and each got its own answer
            assert response.json()["results"][0]["path"] == searcher.relative_path(searcher.gallery_paths.index(path))
    finally:
        engine.gate.set()
        running.close()


def test_the_token_is_required_when_set_and_compared_in_constant_time(
    searcher: Any, index_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hmac

    import app.access as access_module  # the token is checked there, for every path
    from app.serve import free_port, launch

    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(access_module.hmac, "compare_digest", spy)
    running = launch(searcher, port=free_port(), index_dir=index_dir, api_token="s3cret-token")
    data = _bytes(searcher.gallery_paths[0])
    try:
        with httpx.Client(base_url=running.url, timeout=60) as http:
            assert http.get("api/v1/health").status_code == 200  # liveness needs no token
            for headers in ({}, {"Authorization": "Bearer wrong-token!"}, {"Authorization": "Bearer s3cret"},
                            {"Authorization": "Basic s3cret-token"}):
                for response in (http.get("api/v1/info", headers=headers),
                                 http.post("api/v1/search", files={"image": ("q.jpg", data)}, headers=headers)):
                    assert response.status_code == 401 and response.json()["error"] == "unauthorized", headers
            ok = {"Authorization": "Bearer s3cret-token"}
            assert http.get("api/v1/info", headers=ok).status_code == 200
            assert http.post("api/v1/search", files={"image": ("q.jpg", data)}, headers=ok).status_code == 200
        assert (b"s3cret-token", b"s3cret-token") in compared and (b"wrong-token!", b"s3cret-token") in compared
    finally:
        running.close()


def test_ui_searches_go_through_the_same_worker(server: Any, searcher: Any) -> None:
    from gradio_client import Client, handle_file

    worker = server.worker
    before = worker.batches_run
    client = Client(server.url, verbose=False, download_files=False)
    category = searcher.index.items.attributes[0]["category"]
    gallery, status = client.predict(handle_file(searcher.gallery_paths[2]), 5, category, "qe", api_name="/search")
    assert worker.batches_run > before
    assert len(gallery) == 5 and f"where category = {category}" in status and "re-ranked (qe)" in status
