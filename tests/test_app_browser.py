"""End to end in a real browser: Playwright drives Debian's headless Chromium against the served app.

A second test serves the app with a token: the browser logs in once at /login and its session opens the
UI, its event streams and the result thumbnails.

Playwright cannot download its own browser offline; the test launches the distribution's Chromium
(`scripts/install_browser.sh` installs it) through `executable_path`. Screenshots are written to
test-artifacts/ for a human to look at.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def chromium_path() -> str:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(
            f"!!! BROWSER TEST SKIPPED: Chromium not found at {CHROMIUM}. Install it with "
            "`scripts/install_browser.sh` (apt-get install chromium, as root) or set CHROMIUM_PATH. !!!"
        )
    return CHROMIUM


@pytest.fixture(scope="module")
def app_url(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object]]:
    from app.serve import free_port, launch
    from retrieval.index.build import build_index
    from retrieval.embed.spec import EmbedderSpec, open_embedder
    from retrieval.data.inshop import load_inshop
    from retrieval.search.searcher import Searcher

    backend = open_embedder(EmbedderSpec.untrained("resnet18", embedding_size=32, image_size=64), "cpu")
    index_dir = tmp_path_factory.mktemp("browser-index") / "demo-index"
    build_index(load_inshop(demo_root, name="demo"), backend, index_dir, progress=False)
    running = launch(Searcher.open(index_dir, backend, device="cpu"), port=free_port(), index_dir=index_dir)
    try:
        yield running.url, running.search_app
    finally:
        running.close()


def test_upload_search_examples_and_recall_table_render_in_chromium(
    chromium_path: str, app_url: tuple[str, object]
) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, search_app = app_url
    k = search_app.default_k  # type: ignore[attr-defined]
    query = search_app.searcher.gallery_paths[0]  # type: ignore[attr-defined]
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)

            # upload a photo through the file input (what drag-and-drop and the picker feed)
            page.locator("#query-image input[type=file]").set_input_files(query)
            thumbs = page.locator("#results-gallery .thumbnail-item")
            expect(thumbs).to_have_count(k)
            expect(page.locator("#search-status")).to_contain_text(f"Top {k}")
            expect(page.locator("#search-status")).to_contain_text("embed + search")
            expect(page.locator("#results-gallery .caption-label").first).to_contain_text("#1 · 1.000")
            page.wait_for_function(  # the thumbnails were fetched and decoded, not just laid out
                "() => [...document.querySelectorAll('#results-gallery .thumbnail-item img')]"
                ".every(img => img.complete && img.naturalWidth > 0)"
            )
            page.screenshot(path=str(ARTIFACTS / "app_search_upload.png"), full_page=True)

            # one click on a stored example query: its item's results get a tick
            page.locator("#example-queries button").nth(_example_with_a_hit_in_top(search_app, k)).click()
            status = page.locator("#search-status")
            expect(status).to_contain_text("first correct match at rank", timeout=TIMEOUT_MS)
            expect(page.locator("#results-gallery .caption-label", has_text="✓").first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "app_search_example.png"), full_page=True)

            # "more like this": a click on a result puts that gallery image in the query box and searches by it
            second = thumbs.nth(1).locator("img")
            clicked = _gallery_index_of(second.get_attribute("src") or "")
            thumbs.nth(1).click()
            item = search_app.searcher.gallery_item_ids[clicked]  # type: ignore[attr-defined]
            expect(page.locator("#query-image img").first).to_have_attribute("src", re.compile(rf"/{clicked}\.jpg$"))
            expect(status).to_contain_text(f"Gallery image of item {item}")
            expect(page.locator("#results-gallery .caption-label").first).to_contain_text("(the query itself)")
            first_src = thumbs.first.locator("img").get_attribute("src") or ""
            assert _gallery_index_of(first_src) == clicked
            page.screenshot(path=str(ARTIFACTS / "app_more_like_this.png"), full_page=True)

            # the category filter: every result now has the chosen category
            attributes = search_app.searcher.index.items.attributes  # type: ignore[attr-defined]
            category = next(c for c in search_app.filter_choices[1:] if c != attributes[clicked]["category"])  # type: ignore[attr-defined]
            page.locator("#filter-dropdown input").click()
            page.get_by_role("option", name=category, exact=True).click()
            expect(status).to_contain_text(f"where category = {category}")
            expect(thumbs).to_have_count(k)
            sources = [thumbs.nth(i).locator("img").get_attribute("src") or "" for i in range(k)]
            assert all(attributes[_gallery_index_of(src)]["category"] == category for src in sources), sources
            page.screenshot(path=str(ARTIFACTS / "app_filtered.png"), full_page=True)

            # evaluation tab: Recall@K table for In-Shop's K list, MAP@R, and the plot
            page.get_by_role("tab", name="Evaluation").click()
            table = page.locator("#recall-table")
            for name in ["Recall@1", "Recall@10", "Recall@20", "Recall@30", "Recall@40", "Recall@50", "MAP@R"]:
                expect(table).to_contain_text(name)
            expect(page.locator("#facts-table")).to_contain_text("Embedder fingerprint")
            expect(page.locator("#recall-plot canvas, #recall-plot svg").first).to_be_visible()
            expect(page.locator("#eval-status")).to_contain_text(re.compile(r"Computed .* in "))
            page.screenshot(path=str(ARTIFACTS / "app_evaluation.png"), full_page=True)
        finally:
            browser.close()


TOKEN = "browser-door-key"


@pytest.fixture(scope="module")
def token_app_url(small_index_dir: Path) -> Iterator[tuple[str, object]]:
    from app.serve import free_port, launch
    from retrieval.search.searcher import Searcher

    running = launch(Searcher.open(small_index_dir, device="cpu"), port=free_port(), index_dir=small_index_dir,
                     api_token=TOKEN)
    try:
        yield running.url, running.search_app
    finally:
        running.close()


def test_with_a_token_the_browser_logs_in_once_and_the_ui_works(
    chromium_path: str, token_app_url: tuple[str, object]
) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, search_app = token_app_url
    query = search_app.searcher.gallery_paths[0]  # type: ignore[attr-defined]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            expect(page).to_have_url(re.compile(r"/login\?next=/$"))  # asked for the token, once
            page.locator("#token").fill("wrong")
            page.locator("#login-button").click()
            expect(page.locator(".problem")).to_contain_text("not the token")
            page.locator("#token").fill(TOKEN)
            page.locator("#login-button").click()
            expect(page).to_have_url(url)

            page.locator("#query-image input[type=file]").set_input_files(query)
            thumbs = page.locator("#results-gallery .thumbnail-item")
            expect(thumbs).to_have_count(search_app.default_k)  # type: ignore[attr-defined]
            page.wait_for_function(  # the session cookie fetched the API's thumbnails too
                "() => [...document.querySelectorAll('#results-gallery .thumbnail-item img')]"
                ".every(img => img.complete && img.naturalWidth > 0)"
            )
            src = thumbs.first.locator("img").get_attribute("src") or ""
            assert re.fullmatch(re.escape(url) + r"api/v1/thumbnails/\d+\.jpg\?v=[0-9A-Za-z]+Z-[0-9a-f]{8}", src), src
            thumbs.nth(1).click()  # "more like this" still works through the session
            expect(page.locator("#search-status")).to_contain_text("Gallery image of item")
            page.screenshot(path=str(ARTIFACTS / "app_with_token.png"), full_page=True)
            page.reload()  # the session is kept: no second login
            expect(page.locator("#query-image")).to_be_visible()
            assert "/login" not in page.url
        finally:
            browser.close()


def _gallery_index_of(src: str) -> int:
    """Gallery row of a result tile, from its thumbnail URL (/api/v1/thumbnails/<row>.jpg?v=<version>)."""
    match = re.search(r"/(\d+)\.jpg(?:\?v=[^&]+)?$", src)
    assert match, src
    return int(match.group(1))


def _example_with_a_hit_in_top(search_app: object, k: int) -> int:
    """Position of the first example query whose item appears in its top k (the embedder is untrained)."""
    from retrieval.images import open_image

    for i, example in enumerate(search_app.examples):  # type: ignore[attr-defined]
        hits = search_app.searcher.search_images([open_image(example.path)], k)[0]  # type: ignore[attr-defined]
        if any(h.label == example.label for h in hits):
            return i
    pytest.fail(f"no example query finds its item in the top {k}; the demo index is unusable")
