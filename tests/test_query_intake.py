"""One query intake and one hit record behind every door.

The JSON API (multipart and base64 JSON), the web UI's search handler (an uploaded file and a pasted
data: URL) and `retrieval search` refuse the same hostile image with the same code and the same reason;
a search answers the same hit record through the API and `retrieval search --json`; /openapi.json
documents the answers' fields.

Server: a real loopback server (API + UI) over a small generated In-Shop-layout index, with the default
limits, which are the command line's.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from retrieval.query_intake import DEFAULT_MAX_BYTES, REFUSALS, QueryIntake, QueryRejected
from tests.fakes import make_fake_inshop

pytestmark = pytest.mark.slow


# --- a served index -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_inshop(tmp_path_factory.mktemp("data") / "inshop", train_items=1, test_items=4, per_item=3,
                            size=64)


@pytest.fixture(scope="module")
def index_dir(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from retrieval.index.config import IndexConfig
    from retrieval.data import load_dataset
    from retrieval.embed.spec import EmbedderSpec, open_embedder
    from retrieval.index.build import build_index

    backend = open_embedder(EmbedderSpec.untrained("resnet18", embedding_size=16, image_size=32), "cpu")
    out = tmp_path_factory.mktemp("indexes") / "inshop-index"
    build_index(load_dataset("inshop", dataset), backend, out, IndexConfig(use_gpu=False), progress=False)
    return out


@pytest.fixture(scope="module")
def running(index_dir: Path) -> Iterator[Any]:
    from app.serve import free_port, launch
    from retrieval.search.searcher import Searcher

    app = launch(Searcher.open(index_dir, device="cpu"), port=free_port(), index_dir=index_dir, num_examples=0)
    try:
        yield app
    finally:
        app.close()


@pytest.fixture(scope="module")
def http(running: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=running.url, timeout=120) as client:
        yield client


# --- hostile images ----------------------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose header claims width x height pixels."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 3]


def elongated_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (60000, 1), (120, 30, 200)).save(buf, format="PNG")  # about 1 KB
    return buf.getvalue()


@dataclass(frozen=True)
class Hostile:
    name: str  # also the file name the UI and the command line are given
    data: Callable[[], bytes]
    code: str  # the refusal users rely on
    words: str  # what its reason says


HOSTILE = [
    Hostile("text.jpg", lambda: b"this is a text file, not a photo\n" * 8, "not_an_image", "not an image file"),
    Hostile("empty.png", lambda: b"", "bad_request", "empty (0 bytes)"),
    Hostile("truncated.jpg", truncated_jpeg, "undecodable_image", "corrupt or truncated"),
    Hostile("too_many_pixels.png", lambda: png_claiming(10_000, 10_000), "too_large", "exceeds the limit"),
    Hostile("bomb.png", lambda: png_claiming(40_000, 40_000), "too_large", "decompression bomb"),
    Hostile("elongated.png", elongated_png, "undecodable_image", "aspect ratio"),
    Hostile("oversized.jpg", lambda: b"\xff\xd8\xff" + bytes(DEFAULT_MAX_BYTES - 2), "too_large",
            "over the upload size limit"),
]


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    for case in HOSTILE:
        (folder / case.name).write_bytes(case.data())
    return {case.name: folder / case.name for case in HOSTILE}


def _after(prefix: str, text: str, suffix: str = "") -> str:
    """The reason in a refusal `prefix + reason + suffix` (fails the test when the shape differs)."""
    assert text.startswith(prefix) and text.endswith(suffix), (prefix, text)
    return text[len(prefix): len(text) - len(suffix)]


def _api_reason(response: httpx.Response, subject: str) -> tuple[int, str, str]:
    body = response.json()
    assert set(body) == {"error", "message", "request_id"} and "Traceback" not in response.text, body
    assert body["request_id"] == response.headers["x-request-id"]
    return response.status_code, body["error"], _after(f"{subject}: ", body["message"])


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# Each door returns (HTTP status or None, code or None, reason); the UI's status line and the command line's
# error line show no code, only the reason.
def api_upload(ctx: dict[str, Any], path: Path) -> tuple[int | None, str | None, str]:
    response = ctx["http"].post("api/v1/search", files={"image": (path.name, path.read_bytes(), "image/jpeg")})
    return _api_reason(response, "the upload")


def api_base64(ctx: dict[str, Any], path: Path) -> tuple[int | None, str | None, str]:
    response = ctx["http"].post("api/v1/search", json={"image": _data_url(path.read_bytes()), "k": 3})
    return _api_reason(response, "`image`")


def ui_upload(ctx: dict[str, Any], path: Path) -> tuple[int | None, str | None, str]:
    galleries, statuses = ctx["search_app"].search_batch([str(path)], [5])
    assert galleries == [[]]
    return None, None, _after(f"⚠️ Cannot use {path.name}: ", statuses[0], ".")


def ui_paste(ctx: dict[str, Any], path: Path) -> tuple[int | None, str | None, str]:
    galleries, statuses = ctx["search_app"].search_batch([{"url": _data_url(path.read_bytes()), "path": None}], [5])
    assert galleries == [[]]
    return None, None, _after("⚠️ Cannot use the pasted image: ", statuses[0], ".")


def cli_search(ctx: dict[str, Any], path: Path) -> tuple[int | None, str | None, str]:
    from retrieval.cli import app

    result = CliRunner().invoke(app, ["search", str(path), "--index", str(ctx["index_dir"]), "--device", "cpu"])
    assert result.exit_code == 1 and result.stdout == "", (result.exit_code, result.output)
    return None, None, _after(f"error: {path}: ", result.stderr.splitlines()[0])


DOORS = {"api upload": api_upload, "api base64": api_base64, "ui upload": ui_upload, "ui paste": ui_paste,
         "cli": cli_search}


@pytest.fixture(scope="module")
def doors(http: httpx.Client, running: Any, index_dir: Path) -> dict[str, Any]:
    return {"http": http, "search_app": running.search_app, "index_dir": index_dir}


@pytest.mark.parametrize("door", list(DOORS))
@pytest.mark.parametrize("case", HOSTILE, ids=[c.name for c in HOSTILE])
def test_a_hostile_image_gets_the_same_refusal_through_every_door(
    doors: dict[str, Any], hostile_files: dict[str, Path], running: Any, case: Hostile, door: str
) -> None:
    """The same code and the same one-line reason as the intake itself gives, whichever door it came in by."""
    path = hostile_files[case.name]
    with pytest.raises(QueryRejected) as refused:
        QueryIntake(running.search_app.limits).decode(path.read_bytes())
    assert refused.value.code == case.code and case.words in refused.value.reason
    status, code, reason = DOORS[door](doors, path)
    assert reason == refused.value.reason
    if code is not None:
        assert (status, code) == (REFUSALS[case.code].status, case.code)


TEXT = [  # (text, words of the reason, doors): a form field is refused as text unless it is a URL
    ("@@@ not base64 @@@", "not valid base64", ("api json", "ui paste")),
    ("https://example.com/cat.jpg", "never fetches URLs", ("api json", "api form field", "ui paste")),
]


@pytest.mark.parametrize("text, words, door", [(t, w, d) for t, w, doors in TEXT for d in doors],
                         ids=[f"{w} via {d}" for _, w, doors in TEXT for d in doors])
def test_text_that_is_no_image_gets_the_same_refusal_from_the_api_and_the_ui(
    doors: dict[str, Any], text: str, words: str, door: str
) -> None:
    with pytest.raises(QueryRejected) as refused:
        QueryIntake().base64_bytes(text)
    assert refused.value.code == "bad_request" and words in refused.value.reason
    if door == "api json":
        status, code, reason = _api_reason(doors["http"].post("api/v1/search", json={"image": text}), "`image`")
    elif door == "api form field":
        status, code, reason = _api_reason(doors["http"].post("api/v1/search", files={"image": (None, text)}),
                                           "the upload")
    else:
        galleries, statuses = doors["search_app"].search_batch([{"url": text, "path": None}], [5])
        assert galleries == [[]]
        status, code, reason = None, None, _after("⚠️ Cannot use the pasted image: ", statuses[0], ".")
    assert reason == refused.value.reason
    if code is not None:
        assert (status, code) == (400, "bad_request")


# --- one hit record --------------------------------------------------------------------------------------


def test_the_api_and_search_json_answer_the_same_hit_record(
    http: httpx.Client, running: Any, index_dir: Path, dataset: Path
) -> None:
    from retrieval.cli import app
    from retrieval.search.hits import HIT_FIELDS

    searcher = running.search_app.searcher
    query = Path(searcher.query_paths[2])
    api = http.post("api/v1/search", files={"image": (query.name, query.read_bytes(), "image/jpeg")}, data={"k": "6"})
    assert api.status_code == 200, api.text
    cli = CliRunner().invoke(app, ["search", str(query), "--index", str(index_dir), "-k", "6", "--json",
                                   "--device", "cpu"])
    assert cli.exit_code == 0, cli.output
    cli_hits = json.loads(cli.stdout)["results"][0]["hits"]
    api_hits = api.json()["results"]
    assert len(cli_hits) == 6 and list(cli_hits[0]) == list(HIT_FIELDS)
    assert [{k: v for k, v in h.items() if k != "thumbnail_url"} for h in api_hits] == cli_hits
    version = api.json()["index_version"]  # thumbnails are per index version (app.live_index)
    assert version and all(h["thumbnail_url"] == f"/api/v1/thumbnails/{h['gallery_index']}.jpg?v={version}"
                           for h in api_hits)
    for hit in cli_hits:  # paths relative to the dataset root, attributes as the index holds them
        assert hit["path"] == Path(searcher.gallery_paths[hit["gallery_index"]]).relative_to(dataset).as_posix()
        assert hit["attributes"] == searcher.index.items.attributes[hit["gallery_index"]] and hit["attributes"]
    assert [h["rank"] for h in cli_hits] == list(range(1, 7))


# --- the documented answers --------------------------------------------------------------------------------


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def test_openapi_documents_the_search_info_health_and_error_answers(http: httpx.Client) -> None:
    from retrieval.search.hits import HIT_FIELDS

    schema = http.get("openapi.json").json()
    paths = schema["paths"]

    def answer(path: str, method: str, status: str = "200") -> dict[str, Any]:
        return _resolve(schema, paths[path][method]["responses"][status]["content"]["application/json"]["schema"])

    search = answer("/api/v1/search", "post")
    assert {"results", "k", "filter", "rerank", "batch_size", "timings_ms", "fingerprint"} <= set(search["properties"])
    hit = _resolve(schema, search["properties"]["results"]["items"])
    assert list(hit["properties"]) == [*HIT_FIELDS, "thumbnail_url"]
    assert hit["properties"]["score"]["type"] == "number" and hit["properties"]["rank"]["type"] == "integer"
    assert "relative to the dataset root" in hit["properties"]["path"]["description"]
    timings = _resolve(schema, search["properties"]["timings_ms"])
    assert set(timings["properties"]) == {"decode", "embed", "search", "total"}
    info = answer("/api/v1/info", "get")
    assert {"n_items", "embedding_size", "fingerprint", "filters", "rerank", "max_upload_bytes"} <= set(info["properties"])
    assert answer("/api/v1/health", "get")["properties"]["status"]["const"] == "ok"
    assert answer("/api/v1/ready", "get")["properties"]["status"]["const"] == "ready"
    assert set(answer("/api/v1/admin/reload", "post")["properties"]["outcome"]["enum"]) == {"reloaded", "unchanged",
                                                                                          "refused"}
    for path, method in (("/api/v1/search", "post"), ("/api/v1/info", "get"), ("/api/v1/health", "get"),
                         ("/api/v1/ready", "get"), ("/api/v1/admin/reload", "post"),
                         ("/api/v1/thumbnails/{index}.jpg", "get")):
        statuses = [s for s in paths[path][method]["responses"] if s != "200"]  # each error status, declared
        assert "default" not in statuses and {"405", "500"} <= set(statuses), statuses
        for status in statuses:
            error = answer(path, method, status)
            assert set(error["properties"]) == {"error", "message", "request_id"}
            assert error["required"] == ["error", "message"]
