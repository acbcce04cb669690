"""What the web UI hands out: example queries only as thumbnails (never the full-size originals), and no
absolute server path (index folder, data root, evaluation cache) on the page or in /config."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from retrieval.index.build import build_index
from retrieval.embed.spec import EmbedderSpec, open_embedder
from retrieval.index.config import IndexConfig
from retrieval.data import load_dataset
from tests.fakes import make_fake_inshop

pytestmark = pytest.mark.slow
THUMB = 24  # thumbnails' longest side here; the dataset's photos are 64 px


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, Path, Path]]:
    from app.serve import free_port, launch
    from app.thumbnails import ThumbnailStore
    from retrieval.search.searcher import Searcher

    root = make_fake_inshop(tmp_path_factory.mktemp("data") / "inshop", train_items=1, test_items=4, per_item=3,
                            size=64)
    index_dir = tmp_path_factory.mktemp("indexes") / "shop-index"
    backend = open_embedder(EmbedderSpec.untrained("resnet18", 8, image_size=32), "cpu")
    build_index(load_dataset("inshop", root), backend, index_dir, IndexConfig(use_gpu=False), progress=False)
    searcher = Searcher.open(index_dir, device="cpu")
    app = launch(searcher, port=free_port(), index_dir=index_dir,
                 thumbnails=ThumbnailStore(searcher.gallery_paths, max_side=THUMB))
    try:
        yield app, index_dir, root
    finally:
        app.close()


def test_example_queries_are_served_as_thumbnails(served) -> None:
    app, _, _ = served
    config = httpx.get(app.url + "config", timeout=30).text
    files = sorted(set(re.findall(r'"(/[^"]+\.(?:jpg|jpeg|png))"', config)))
    examples = app.search_app.examples
    assert examples and len(files) >= len(examples)
    originals = {q.path.read_bytes() for q in examples}
    with httpx.Client(timeout=30) as http:
        for path in files:
            r = http.get(app.url + "gradio_api/file=" + path)
            assert r.status_code == 200, path
            assert r.content not in originals
            assert max(Image.open(io.BytesIO(r.content)).size) <= THUMB, path


def test_an_example_thumbnail_is_searched_as_its_original(served) -> None:
    app, _, _ = served
    search_app = app.search_app
    thumb = search_app.example_thumbnails.path_for(0)
    galleries, statuses = search_app.search_batch([str(thumb)], [3])
    assert len(galleries[0]) == 3 and f"Example query of item `{search_app.examples[0].item_id}`" in statuses[0]
    # same results as the original file gives
    original, _ = search_app.search_batch([str(search_app.examples[0].path)], [3])
    assert [c for _, c in galleries[0]] == [c for _, c in original[0]]


def test_no_absolute_server_path_is_shown(served) -> None:
    app, index_dir, root = served
    search_app = app.search_app
    secrets = [str(index_dir.resolve()), str(root.resolve()), str(index_dir.parent.resolve())]
    config = httpx.get(app.url + "config", timeout=30).text
    page = httpx.get(app.url, timeout=30).text
    _, _, facts, status = search_app.evaluation()
    shown = [config, page, facts.to_csv(), status, search_app.header_markdown()]
    for text in shown:
        for secret in secrets:
            assert secret not in text
    assert "shop-index" in facts.to_csv() and "eval_cache.json" in status


def test_an_oversized_event_body_is_refused_before_gradio_reads_it(served) -> None:
    from app.event_limit import EVENT_MAX_BYTES

    app, _, _ = served
    paste = {"url": "data:image/png;base64," + "A" * (2 * EVENT_MAX_BYTES), "path": None,
             "meta": {"_type": "gradio.FileData"}}
    with httpx.Client(base_url=app.url, timeout=30) as http:
        r = http.post("gradio_api/call/search", json={"data": [paste, 5, None, "none"]})
        assert r.status_code == 413 and r.json()["error"] == "too_large"
        query = app.search_app.examples[0].path
        with open(query, "rb") as f:
            uploaded = http.post("gradio_api/upload", files={"files": (query.name, f)}).json()[0]
        ok = http.post("gradio_api/call/search",
                       json={"data": [{"path": uploaded, "meta": {"_type": "gradio.FileData"}}, 5, None, "none"]})
        assert ok.status_code == 200 and "event_id" in ok.json()
