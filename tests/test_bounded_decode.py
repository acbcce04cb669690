"""Hostile images cost bounded memory: extreme aspect ratios are refused from the header (both
orientations) on every decoding path, base64 uploads are size-checked before decoding, and odd file
types named like images are reported as what they are."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.index.build import build_index
from retrieval.embed.spec import EmbedderSpec, open_embedder
from retrieval.index.config import IndexConfig
from retrieval.data import load_dataset
from retrieval.images import DEFAULT_MAX_ASPECT_RATIO, ImageLoadError, open_image
from retrieval.preprocess import Preprocessing, preprocess_eval, resize_short_side
from tests.fakes import make_fake_inshop

TINY = dict(arch="resnet18", embedding_size=16, image_size=64, seed=0)


def png_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_fake_inshop(tmp_path_factory.mktemp("inshop"), train_items=2, test_items=4, per_item=3, size=64)
    out = tmp_path_factory.mktemp("idx") / "inshop"
    backend = open_embedder(EmbedderSpec.untrained(**TINY), "cpu")
    build_index(load_dataset("inshop", root), backend, out, IndexConfig(use_gpu=False), progress=False)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    out = {"normal": folder / "normal.png", "wide": folder / "wide.png", "tall": folder / "tall.png",
           "long_but_allowed": folder / "long.png"}
    out["normal"].write_bytes(png_bytes(80, 60))
    out["wide"].write_bytes(png_bytes(60000, 1))  # about 1 KB on disk
    out["tall"].write_bytes(png_bytes(1, 60000))
    out["long_but_allowed"].write_bytes(png_bytes(int(DEFAULT_MAX_ASPECT_RATIO) * 10, 10))
    return out


@pytest.mark.parametrize("size", [(60000, 1), (1, 60000), (6500, 100), (100, 6500)])
def test_extreme_aspect_ratios_are_refused_before_decoding(size: tuple[int, int]) -> None:
    with pytest.raises(ImageLoadError, match=r"aspect ratio of .* above the limit of 64:1"):
        open_image(png_bytes(*size))


def test_the_resize_itself_refuses_an_unbounded_output() -> None:
    with pytest.raises(ImageLoadError, match="aspect ratio"):
        resize_short_side(Image.new("RGB", (60000, 1)), 256)


def test_an_elongated_image_within_the_limit_is_used() -> None:
    img = open_image(png_bytes(640, 10))
    out = preprocess_eval(img, Preprocessing(image_size=64, resize_size=73))
    assert out.shape == (3, 64, 64) and np.isfinite(out).all()


@pytest.mark.parametrize("kind,expected", [("dir", "is a directory"), ("fifo", "FIFO"), ("missing", "not found")])
def test_files_that_are_not_images_are_named_for_what_they_are(tmp_path: Path, kind: str, expected: str) -> None:
    path = tmp_path / "x.jpg"
    if kind == "dir":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    with pytest.raises(ImageLoadError, match=expected):
        open_image(path)  # a FIFO must not be opened: that would block


def test_a_device_node_is_named_for_what_it_is() -> None:
    with pytest.raises(ImageLoadError, match="device node"):
        open_image("/dev/null")


def _search_peak_rss(index_dir: Path, image: Path) -> dict:
    """Run `retrieval search` in a child process; its peak RSS (KiB), exit status and output."""
    code = ("import json, resource, subprocess, sys\n"
            "r = subprocess.run([sys.executable, '-m', 'retrieval', 'search', *sys.argv[1:]], capture_output=True, text=True)\n"
            "print(json.dumps({'rss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 'rc': r.returncode,"
            " 'stdout': r.stdout, 'stderr': r.stderr}))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-c", code, str(image), "--index", str(index_dir), "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=300, check=True)
    return json.loads(res.stdout)


def test_search_refuses_extreme_images_with_bounded_memory(index_dir: Path, images: dict[str, Path]) -> None:
    normal = _search_peak_rss(index_dir, images["normal"])
    assert normal["rc"] == 0, normal["stderr"]
    for name in ("wide", "tall"):
        hostile = _search_peak_rss(index_dir, images[name])
        assert hostile["rc"] == 1 and hostile["stdout"] == ""
        first = hostile["stderr"].splitlines()[0]
        assert first.startswith("error: ") and f"{name}.png" in first and "aspect ratio" in first
        # without the guard the 64 px model's resize (short side 73) of this 1 KB file costs about 1 GB
        assert hostile["rss_kib"] < normal["rss_kib"] + 64 * 1024, (name, hostile["rss_kib"], normal["rss_kib"])


@pytest.fixture(scope="module")
def search_app(index_dir: Path):
    from app.ui import SearchApp
    from retrieval.search.searcher import Searcher

    searcher = Searcher.open(index_dir, device="cpu")
    app = SearchApp(searcher, num_examples=0, max_upload_bytes=1_000_000)
    yield app
    app.thumbnails.cleanup()


@pytest.mark.parametrize("name", ["wide", "tall"])
def test_the_ui_refuses_extreme_images_and_keeps_answering(search_app, images: dict[str, Path], name: str) -> None:
    galleries, statuses = search_app.search_batch([str(images[name]), str(images["normal"])], [5, 5])
    assert galleries[0] == [] and "aspect ratio" in statuses[0]
    assert len(galleries[1]) == 5 and not statuses[1].startswith("⚠️")


def test_an_oversized_base64_paste_is_refused_before_it_is_decoded(search_app) -> None:
    payload = {"url": "data:image/png;base64," + "A" * (8 * search_app.max_upload_bytes)}
    tracemalloc.start()
    try:
        galleries, statuses = search_app.search_batch([payload], [5])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert galleries == [[]] and "over the upload size limit" in statuses[0]
    assert peak < search_app.max_upload_bytes // 4, peak  # decoding first would allocate 6 MB here


def test_a_base64_paste_within_the_limit_is_searched(search_app, images: dict[str, Path]) -> None:
    import base64

    url = "data:image/png;base64," + base64.b64encode(images["normal"].read_bytes()).decode()
    galleries, statuses = search_app.search_batch([{"url": url}], [3])
    assert len(galleries[0]) == 3, statuses
