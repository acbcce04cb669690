"""The web UI served in-process on a free loopback port and driven through gradio_client.

Index: the small demo dataset (In-Shop layout) embedded by an untrained resnet18 (64 px, 32-d).
"""

from __future__ import annotations

import io
import json
import re
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

gradio_client = pytest.importorskip("gradio_client")


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def index_dir(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from retrieval.index.build import build_index
    from retrieval.embed.spec import EmbedderSpec, open_embedder
    from retrieval.data.inshop import load_inshop

    dataset = load_inshop(demo_root, name="demo")
    backend = open_embedder(EmbedderSpec.untrained("resnet18", embedding_size=32, image_size=64), "cpu")
    out = tmp_path_factory.mktemp("app-index") / "demo-index"
    build_index(dataset, backend, out, progress=False)
    return out


@pytest.fixture(scope="module")
def running(index_dir: Path) -> Iterator[object]:
    from app.serve import free_port, launch
    from retrieval.search.searcher import Searcher

    searcher = Searcher.open(index_dir, device="cpu")
    app = launch(searcher, port=free_port(), index_dir=index_dir, max_upload_bytes=2 * 2**20)
    try:
        yield app
    finally:
        app.close()


@pytest.fixture(scope="module")
def client(running: object) -> object:
    return gradio_client.Client(running.url, verbose=False, download_files=False)  # type: ignore[attr-defined]


def _search(client: object, path: Path, k: int = 5) -> tuple[list[dict], str]:
    gallery, status = client.predict(gradio_client.handle_file(str(path)), k, api_name="/search")  # type: ignore[attr-defined]
    return gallery, status


# --- search ---------------------------------------------------------------------------------------


def test_upload_returns_k_ranked_thumbnails_with_timing_and_backend(running: object, client: object) -> None:
    app = running.search_app  # type: ignore[attr-defined]
    query = Path(app.searcher.gallery_paths[3])
    gallery, status = _search(client, query, k=7)
    assert len(gallery) == 7
    captions = [g["caption"] for g in gallery]
    assert captions[0].startswith("#1 · ")
    assert [c.split(" · ")[0] for c in captions] == [f"#{r}" for r in range(1, 8)]
    scores = [float(c.split(" · ")[1]) for c in captions]
    assert scores == sorted(scores, reverse=True)
    # a gallery image searching the gallery finds itself first with cosine similarity 1
    assert scores[0] == pytest.approx(1.0, abs=1e-3)
    assert "embed + search" in status and " ms" in status
    assert "torch on cpu" in status
    assert "label unknown" in status
    assert CORRECT not in "".join(captions)  # an upload's label is unknown: nothing is marked


CORRECT = "✓"


def test_example_query_marks_correct_results_and_first_correct_rank(running: object, client: object) -> None:
    app = running.search_app  # type: ignore[attr-defined]
    assert app.examples, "the app should offer stored queries as examples"
    example = app.examples[0]
    gallery, status = _search(client, example.path, k=app.max_k)
    marked = [i for i, g in enumerate(gallery) if g["caption"].startswith(CORRECT)]
    in_gallery = sum(1 for lab in app.searcher.gallery_labels if int(lab) == example.label)
    assert marked, "the query's item should appear among the top results"
    assert len(marked) <= in_gallery
    if app.max_k >= app.gallery_size:  # every gallery photo is shown, so every photo of the item is marked
        assert len(marked) == in_gallery
    assert f"first correct match at rank **{marked[0] + 1}**" in status
    assert example.item_id in status
    for g in gallery:
        assert (example.item_id in g["caption"]) == g["caption"].startswith(CORRECT)


def test_k_is_clamped_to_the_allowed_range(client: object, running: object) -> None:
    app = running.search_app  # type: ignore[attr-defined]
    query = Path(app.searcher.gallery_paths[0])
    assert len(_search(client, query, k=0)[0]) == 1
    assert len(_search(client, query, k=10_000)[0]) == app.max_k


# --- bad input --------------------------------------------------------------------------------------


def _png_with_claimed_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height pixels (a decompression-bomb stand-in)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8  # signature, then the IHDR chunk: length(4) type(4) data(13) crc(4)
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 8 + 13])) & 0xFFFFFFFF
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", crc)
    return bytes(data)


@pytest.fixture(scope="module")
def nasty(tmp_path_factory: pytest.TempPathFactory, running: object) -> dict[str, Path]:
    """Files users upload: unusable ones (must give a message) and odd but valid ones (must search)."""
    folder = tmp_path_factory.mktemp("nasty")
    src = Image.open(running.search_app.searcher.gallery_paths[0]).convert("RGB").resize((96, 64))  # type: ignore[attr-defined]
    out: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        out[name] = folder / name
        out[name].write_bytes(data)

    def save(name: str, img: Image.Image, fmt: str, **kw: object) -> None:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        put(name, buf.getvalue())

    put("not_an_image.jpg", b"this is a text file, not a photo\n" * 20)
    put("empty.png", b"")
    save("good.jpg", src, "JPEG", quality=90)
    good = out["good.jpg"].read_bytes()
    put("truncated.jpg", good[: len(good) * 2 // 3])  # headers intact, pixel data cut off
    put("corrupt.png", b"\x89PNG\r\n\x1a\n" + bytes(np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8)))
    put("bomb.png", _png_with_claimed_size(40_000, 40_000))  # refused by Pillow itself
    put("huge.png", _png_with_claimed_size(10_000, 10_000))  # refused by the app's own pixel limit
    put("too_big.bin", b"\0" * (3 * 2**20))  # over the 2 MB upload limit of this test app
    save("gray.png", src.convert("L"), "PNG")
    save("rgba.png", src.convert("RGBA"), "PNG")
    save("palette.gif", src.convert("P", palette=Image.Palette.ADAPTIVE), "GIF")
    save("cmyk.jpg", src.convert("CMYK"), "JPEG")
    save("sixteen_bit.png", Image.fromarray((np.asarray(src.convert("L"), np.uint16) * 257)), "PNG")
    save("upright.png", src, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": pixels stored rotated 90 degrees CCW
    save("exif_rotated.png", src.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif)
    return out


@pytest.mark.parametrize(
    "name, expected",
    [
        ("not_an_image.jpg", "not an image file"),
        ("empty.png", "Cannot use"),
        ("truncated.jpg", "corrupt or truncated"),
        ("corrupt.png", "Cannot use"),
        ("bomb.png", "decompression bomb"),
        ("huge.png", "exceeds the limit"),
    ],
)
def test_unusable_files_get_a_message_not_an_error(client: object, nasty: dict[str, Path], name: str, expected: str) -> None:
    gallery, status = _search(client, nasty[name])
    assert gallery == []
    assert status.startswith("⚠️") and expected in status
    assert str(nasty[name].parent) not in status  # no server paths leak into messages


def test_an_upload_over_the_size_limit_is_refused_and_the_server_keeps_serving(
    client: object, nasty: dict[str, Path], running: object
) -> None:
    with pytest.raises(Exception, match=r"(?i)too large|413|size"):
        _search(client, nasty["too_big.bin"])
    gallery, _ = _search(client, nasty["good.jpg"])
    assert len(gallery) == 5


@pytest.mark.parametrize("name", ["gray.png", "rgba.png", "palette.gif", "cmyk.jpg", "sixteen_bit.png"])
def test_odd_but_valid_photos_are_searched(client: object, nasty: dict[str, Path], name: str) -> None:
    gallery, status = _search(client, nasty[name])
    assert len(gallery) == 5, status
    assert status.startswith("**Top 5**")


def test_exif_rotation_is_applied_before_embedding(client: object, nasty: dict[str, Path]) -> None:
    upright, _ = _search(client, nasty["upright.png"])
    rotated, _ = _search(client, nasty["exif_rotated.png"])
    assert [g["caption"] for g in rotated] == [g["caption"] for g in upright]


def test_empty_query_gets_instructions(running: object) -> None:
    galleries, statuses = running.search_app.search_batch([None, {"path": None}], [5, 5])  # type: ignore[attr-defined]
    assert galleries == [[], []]
    assert all("Upload a photo" in s for s in statuses)


def test_one_bad_file_in_a_batch_does_not_spoil_the_others(running: object, nasty: dict[str, Path]) -> None:
    app = running.search_app  # type: ignore[attr-defined]
    galleries, statuses = app.search_batch([str(nasty["good.jpg"]), str(nasty["not_an_image.jpg"]),
                                            str(nasty["gray.png"])], [3, 3, 4])
    assert [len(g) for g in galleries] == [3, 0, 4]
    assert statuses[1].startswith("⚠️") and not statuses[0].startswith("⚠️")


# --- files the server hands out ---------------------------------------------------------------------


def test_only_gallery_thumbnails_can_be_fetched(running: object, index_dir: Path, tmp_path: Path) -> None:
    app = running.search_app  # type: ignore[attr-defined]
    base = running.url  # type: ignore[attr-defined]
    thumb = app.thumbnails.path_for(0)
    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (8, 8)).save(secret)
    refused = [
        "/etc/passwd",
        str(secret),
        str(index_dir / "meta.json"),
        str(app.searcher.gallery_paths[0]),  # originals stay private: only thumbnails are served
        str(app.examples[0].path.resolve()),
        f"{thumb.parent}/../{secret.name}",
        str(Path(__file__).resolve()),
    ]
    with httpx.Client(timeout=10) as http:
        for path in refused:
            for route in ("gradio_api/file=", "gradio_api/file/"):
                r = http.get(base + route + path)
                assert r.status_code in (403, 404), (route, path, r.status_code)
        ok = http.get(base + "gradio_api/file=" + str(thumb))
        assert ok.status_code == 200 and ok.content[:2] == b"\xff\xd8"
    assert running.allowed_paths == [str(app.thumbnails.folder)]  # type: ignore[attr-defined]


def test_result_tiles_are_thumbnail_urls_naming_no_server_path(running: object, client: object) -> None:
    """Tiles are the API's thumbnail URLs on the origin the request came to, of the index version that
    answered: the answer names no server folder, Gradio neither hashes nor copies a file per response, and
    the URL serves the thumbnail file."""
    app = running.search_app  # type: ignore[attr-defined]
    gallery, _ = _search(client, Path(app.searcher.gallery_paths[1]), k=3)
    folder = str(app.thumbnails.folder)
    assert folder not in json.dumps(gallery)
    for tile in gallery:
        url = tile["image"]["url"]
        match = re.fullmatch(re.escape(running.url) + r"api/v1/thumbnails/(\d+)\.jpg\?v=(.+)", url)  # type: ignore[attr-defined]
        assert match and tile["image"]["path"] == url, tile["image"]
        assert match.group(2) == running.live.version.id  # type: ignore[attr-defined]
        assert httpx.get(url, timeout=30).content == app.thumbnails.path_for(int(match.group(1))).read_bytes()


def test_closing_an_app_stops_serving_its_thumbnail_folder(index_dir: Path) -> None:
    from gradio.data_classes import _StaticFiles

    from app.serve import free_port, launch
    from retrieval.search.searcher import Searcher

    app = launch(Searcher.open(index_dir, device="cpu"), port=free_port(), index_dir=index_dir)
    folder = app.search_app.thumbnails.folder
    assert folder in _StaticFiles.all_paths
    app.close()
    assert folder not in _StaticFiles.all_paths and not folder.exists()


def test_server_listens_on_loopback_only(running: object) -> None:
    assert running.host == "127.0.0.1"  # type: ignore[attr-defined]
    assert running.url.startswith("http://127.0.0.1:")  # type: ignore[attr-defined]


# --- evaluation -------------------------------------------------------------------------------------


def _table(value: dict) -> dict[str, float]:
    return {row[0]: float(row[1]) for row in value["data"]}


def test_evaluation_matches_the_searcher_and_is_cached_beside_the_index(
    client: object, running: object, index_dir: Path
) -> None:
    app = running.search_app  # type: ignore[attr-defined]
    table, plot, facts, status = client.predict(api_name="/evaluation")  # type: ignore[attr-defined]
    expected = app.searcher.evaluate()
    got = _table(table)
    assert list(got)[: len(app.recall_ks)] == [f"Recall@{k}" for k in (1, 10, 20, 30, 40, 50)]
    for k in app.recall_ks:
        assert got[f"Recall@{k}"] == pytest.approx(100 * expected[f"R@{k}"], abs=0.01)
    assert got["MAP@R"] == pytest.approx(100 * expected["MAP@R"], abs=0.01)
    assert [row[0] for row in plot["data"]] == list(app.recall_ks)
    fact_rows = {row[0]: row[1] for row in facts["data"]}
    assert fact_rows["Dataset"] == "demo"
    assert fact_rows["Embedding size"] == "32"
    assert fact_rows["Gallery size"] == f"{app.gallery_size:,}"
    assert fact_rows["Index type"] == "flat"
    assert fact_rows["Embedder fingerprint"] == app.backend.fingerprint
    assert fact_rows["Built"]
    cache = json.loads((index_dir / "eval_cache.json").read_text())
    assert cache["metrics"]["R@1"] == pytest.approx(expected["R@1"])
    # second request: served from the cache; the button recomputes
    assert "read from the cache" in client.predict(api_name="/evaluation")[3]  # type: ignore[attr-defined]
    assert "computed now" in client.predict(api_name="/recompute_evaluation")[3]  # type: ignore[attr-defined]


def test_evaluation_cache_is_ignored_for_another_index(tmp_path: Path) -> None:
    from app.eval_cache import EvaluationCache, index_cache_key

    calls: list[int] = []

    def compute() -> dict[str, float]:
        calls.append(1)
        return {"R@1": 0.25, "MAP@R": 0.1}

    key_a = index_cache_key({"files": {"index.faiss": {"sha256": "aa"}}}, "fp1", "torch")
    key_b = index_cache_key({"files": {"index.faiss": {"sha256": "bb"}}}, "fp1", "torch")
    assert key_a != key_b
    first = EvaluationCache(tmp_path, key_a, compute).get()
    assert not first.from_cache and calls == [1]
    again = EvaluationCache(tmp_path, key_a, compute).get()  # a new process reading the file
    assert again.from_cache and again.metrics == first.metrics and calls == [1]
    EvaluationCache(tmp_path, key_b, compute).get()  # rebuilt index: recomputed
    assert calls == [1, 1]
    (tmp_path / "eval_cache.json").write_text("{ truncated")
    assert not EvaluationCache(tmp_path, key_a, compute).get().from_cache


# --- import hygiene ---------------------------------------------------------------------------------


def test_the_app_modules_import_without_torch() -> None:
    code = (
        "import sys; import app.ui, app.serve, app.eval_cache, app.thumbnails, retrieval.cli.serve; "
        "bad = [m for m in ('torch', 'torchvision') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_serve_command_refuses_a_missing_index_with_a_clear_message(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from retrieval.cli import app as cli

    result = CliRunner().invoke(cli, ["serve", "--index", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "index folder not found" in result.output
    help_text = CliRunner().invoke(cli, ["serve", "--help"]).output
    assert "--share" in help_text and "127.0.0.1" in help_text
