"""One key for every door: with a token set, no route of the served application (the JSON API, the UI,
Gradio's HTTP API, uploads, event streams and files) answers a search result or a gallery image
without it; with it (Bearer header for clients, the session from /login for browsers) they work.

A real server on a loopback port, driven with httpx and gradio_client.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

TOKEN = "door-key-7"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
JPEG = b"\xff\xd8\xff"
PUBLIC = {"/api/v1/health", "/api/v1/ready", "/login", "/logout"}  # the probes, the login page


@pytest.fixture(scope="module")
def server(small_index_dir: Path) -> Iterator[Any]:
    from app.serve import free_port, launch
    from retrieval.search.searcher import Searcher

    running = launch(Searcher.open(small_index_dir, device="cpu"), port=free_port(), index_dir=small_index_dir,
                     api_token=TOKEN)
    try:
        yield running
    finally:
        running.close()


def all_routes(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, set[str]]]:
    """(path template, methods) of every HTTP route of an application: its own, mounted apps' (Gradio's)
    and included routers'."""
    for route in routes:
        if getattr(route, "original_router", None) is not None:
            yield from all_routes(route.original_router.routes, prefix + route.include_context.prefix)
        elif getattr(route, "methods", None):
            yield prefix + route.path, set(route.methods)
        elif getattr(route, "routes", None) is not None:
            yield from all_routes(route.routes, prefix + route.path)
        elif hasattr(route, "path"):  # a WebSocket route
            yield prefix + route.path, {"WEBSOCKET"}


def _file_payload(path: str) -> dict[str, Any]:
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


def _event_result(http: httpx.Client, event_id: str, **kwargs: Any) -> str:
    """The text of a /gradio_api/call/search/<event_id> stream."""
    return http.get(f"gradio_api/call/search/{event_id}", **kwargs).text


@pytest.fixture(scope="module")
def artifacts(server: Any) -> dict[str, str]:
    """Real identifiers a client with the token created: an upload, a finished search event, a session."""
    search_app = server.search_app
    query = Path(search_app.searcher.gallery_paths[0])
    with httpx.Client(base_url=server.url, timeout=60, headers=BEARER) as http:
        with open(query, "rb") as f:
            uploaded = http.post("gradio_api/upload", files={"files": (query.name, f)}).json()[0]
        event_id = http.post("gradio_api/call/search",
                             json={"data": [_file_payload(uploaded), 3, None, "none"]}).json()["event_id"]
        result = _event_result(http, event_id)
        assert "event: complete" in result and "/api/v1/thumbnails/" in result, result  # the door works with the key
        config = http.get("config").json()
    fn_index = next(i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == "search")
    thumb = str(search_app.thumbnails.path_for(0))
    return {"upload": uploaded, "event_id": event_id, "fn_index": str(fn_index), "thumb": thumb,
            "session_hash": "s3ss10nhash", "query": str(query)}


def _fill(template: str, values: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1).split(":")[0]
        return values.get(name, "0")

    return re.sub(r"\{([^}]+)\}", value, template)


def _refused(response: httpx.Response, what: str) -> None:
    assert response.status_code == 401, (what, response.status_code, response.text[:300])
    assert JPEG not in response.content and "thumbnails/" not in response.text and "gallery_index" not in response.text
    if response.request.method != "HEAD":
        assert response.json()["error"] == "unauthorized", what
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_no_route_answers_a_search_or_a_gallery_image_without_the_token(server: Any, artifacts: dict[str, str]) -> None:
    routes = sorted(set((path, frozenset(methods)) for path, methods in all_routes(server.api.routes)))
    paths = {path for path, _ in routes}
    doors = {"/api/v1/search", "/api/v1/thumbnails/{index}.jpg", "/gradio_api/upload", "/gradio_api/call/{api_name}",
             "/gradio_api/call/{api_name}/{event_id}", "/gradio_api/queue/join", "/gradio_api/queue/data",
             "/gradio_api/file={path_or_url:path}", "/gradio_api/run/{api_name}", "/config", "/"}
    assert doors <= paths, doors - paths  # the walk reaches Gradio's routes too
    values = {"path_or_url": artifacts["thumb"], "path": artifacts["thumb"], "event_id": artifacts["event_id"],
              "api_name": "search", "session_hash": artifacts["session_hash"], "index": "0", "size": "192",
              "url_path": server.url + "api/v1/thumbnails/0.jpg", "ext": "ts"}
    search_body = {"data": [_file_payload(artifacts["upload"]), 3, None, "none"],
                   "fn_index": int(artifacts["fn_index"]), "session_hash": artifacts["session_hash"],
                   "event_data": None, "trigger_id": None}
    tried = 0
    with httpx.Client(base_url=server.url.rstrip("/"), timeout=60) as http:
        for template, methods in routes:
            url = _fill(template, values)
            for method in sorted(methods - {"WEBSOCKET"}):
                if method == "POST" and template.endswith("/upload"):
                    with open(artifacts["query"], "rb") as f:
                        response = http.post(url, files={"files": ("q.jpg", f)})
                elif method == "POST" and template.startswith("/api/v1/search"):
                    with open(artifacts["query"], "rb") as f:
                        response = http.post(url, files={"image": ("q.jpg", f)})
                elif method == "POST":
                    response = http.post(url, json=search_body)
                else:
                    response = http.request(method, url, params={"session_hash": artifacts["session_hash"]})
                tried += 1
                if template in PUBLIC:  # the probes, the login page (a failed login answers 401 too), logout
                    assert JPEG not in response.content, template
                    assert "thumbnails/" not in response.text and "gallery_index" not in response.text, template
                else:
                    _refused(response, f"{method} {url}")
        # a legitimate user's finished search cannot be read by someone without the key
        _refused(http.get(f"/gradio_api/call/search/{artifacts['event_id']}"), "another user's event")
        _refused(http.get("/", headers={"Accept": "application/json"}), "the page")
        page = http.get("/", headers={"Accept": "text/html"})
        assert page.status_code == 303 and page.headers["location"] == "/login?next=/"  # browsers go to the login page
        with httpx.stream("GET", server.url + "gradio_api/queue/data",
                          params={"session_hash": artifacts["session_hash"]}) as stream:
            assert stream.status_code == 401
    assert tried >= 60


def test_the_token_opens_every_door_it_closes(server: Any, artifacts: dict[str, str]) -> None:
    with httpx.Client(base_url=server.url, timeout=60, headers=BEARER) as http:
        assert http.get("api/v1/thumbnails/0.jpg").content.startswith(JPEG)
        assert http.get("gradio_api/file=" + artifacts["thumb"]).content.startswith(JPEG)
        with open(artifacts["query"], "rb") as f:
            found = http.post("api/v1/search", files={"image": ("q.jpg", f)}, data={"k": "3"})
        assert found.status_code == 200 and len(found.json()["results"]) == 3
        event = http.post("gradio_api/call/search", json={"data": [_file_payload(artifacts["upload"]), 2, None, "qe"]})
        assert "/api/v1/thumbnails/" in _event_result(http, event.json()["event_id"])  # (an event is read once)
        assert http.get("config").status_code == 200 and http.get("openapi.json").status_code == 200
    assert httpx.get(server.url + "api/v1/health", timeout=30).json() == {"status": "ok"}  # liveness stays open


def _requests_counted(url: str, route: str, status: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "metrics", headers=BEARER, timeout=30).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "retrieval_http_requests_total" and s.labels == {"route": route, "method": "GET",
                                                                            "status": status})


def test_a_refusal_carries_a_request_id_and_is_counted_and_logged(server: Any,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The request-id middleware is outside the gate: a 401 is a request like any other."""
    before = _requests_counted(server.url, "/api/v1/info", "401")
    with caplog.at_level(logging.INFO, logger="retrieval.access"):
        refused = httpx.get(server.url + "api/v1/info", headers={"X-Request-ID": "no-key-1"}, timeout=30)
        deadline = time.time() + 30
        while not any("id=no-key-1" in r.getMessage() for r in caplog.records if r.name == "retrieval.access"):
            assert time.time() < deadline, "no access-log line for the refusal"
            time.sleep(0.02)
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "no-key-1"
    assert refused.json() == {"error": "unauthorized", "message": refused.json()["message"], "request_id": "no-key-1"}
    assert _requests_counted(server.url, "/api/v1/info", "401") == before + 1
    line = next(r.getMessage() for r in caplog.records if "id=no-key-1" in r.getMessage())
    assert "route=/api/v1/info" in line and "status=401" in line


def test_metrics_made_public_need_no_token_and_the_document_says_so(small_index_dir: Path) -> None:
    from app.serve import free_port, launch
    from retrieval.search.searcher import Searcher

    running = launch(Searcher.open(small_index_dir, device="cpu"), port=free_port(), index_dir=small_index_dir,
                     api_token=TOKEN, public_paths=("/metrics",), watch=False)
    try:
        scrape = httpx.get(running.url + "metrics", timeout=30)
        assert scrape.status_code == 200 and "retrieval_http_requests_total" in scrape.text
        assert httpx.get(running.url + "api/v1/info", timeout=30).status_code == 401  # the rest stays closed
        document = httpx.get(running.url + "openapi.json", headers=BEARER, timeout=30).json()
        operation = document["paths"]["/metrics"]["get"]
        assert "401" not in operation["responses"] and operation["security"] == []
    finally:
        running.close()


def test_the_browser_logs_in_once_and_keeps_a_session(server: Any) -> None:
    from app.access import SESSION_COOKIE

    with httpx.Client(base_url=server.url, timeout=60) as browser:
        login = browser.get("login", params={"next": "/?view=api"})
        assert login.status_code == 200 and 'type="password"' in login.text and 'value="/?view=api"' in login.text
        wrong = browser.post("login", data={"token": "not-it", "next": "/"})
        assert wrong.status_code == 401 and "not the token this server was started with" in wrong.text
        assert SESSION_COOKIE not in browser.cookies
        ok = browser.post("login", data={"token": TOKEN, "next": "/?view=api"})
        assert ok.status_code == 303 and ok.headers["location"] == "/?view=api"
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
        # the session opens the UI, its configuration, Gradio's files and the API's thumbnails
        assert browser.get("/", headers={"Accept": "text/html"}).status_code == 200
        assert browser.get("config").status_code == 200
        assert browser.get("api/v1/thumbnails/1.jpg").content.startswith(JPEG)
        # a forged or tampered session is refused
        value = browser.cookies[SESSION_COOKIE]
        issued, nonce, mac = value.split(".")
        for forged in (f"{int(issued) + 1}.{nonce}.{mac}", f"{issued}.{nonce}.{'0' * len(mac)}", "1.2.3", ""):
            assert httpx.get(server.url + "config", cookies={SESSION_COOKIE: forged}, timeout=30).status_code == 401
        # never sent elsewhere after login
        for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
            away = httpx.post(server.url + "login", data={"token": TOKEN, "next": target}, timeout=30)
            assert away.headers["location"] == "/", target
        out = browser.get("logout")
        assert out.status_code == 303 and browser.get("config").status_code == 401


def test_sessions_expire_and_end_with_the_process() -> None:
    from app.access import SESSION_SECONDS, AccessPolicy

    policy = AccessPolicy("t")
    now = time.time()
    value = policy.new_session(now)
    assert policy.session_ok(value, now + SESSION_SECONDS - 1)
    assert not policy.session_ok(value, now + SESSION_SECONDS + 1)
    assert not AccessPolicy("t").session_ok(value, now)  # another process (a restart): another key
    assert not AccessPolicy("t2", _secret=policy._secret).session_ok(value, now)  # another token
    assert AccessPolicy("t", frozenset({"/metrics"})).is_public("/metrics")  # the hook for a public /metrics
    assert not policy.is_public("/metrics") and policy.is_public("/api/v1/health")


def test_gradio_client_searches_with_the_token_and_answers_name_no_server_path(server: Any) -> None:
    from gradio_client import Client, handle_file

    search_app = server.search_app
    query = search_app.searcher.gallery_paths[2]
    with pytest.raises(Exception):  # noqa: B017 - gradio_client's own error type varies
        Client(server.url, verbose=False, download_files=False)
    client = Client(server.url, verbose=False, download_files=False, headers=BEARER)
    gallery, status = client.predict(handle_file(query), 4, None, "none", api_name="/search")
    assert len(gallery) == 4 and status.startswith("**Top 4**")
    answer = json.dumps(gallery)
    assert str(search_app.thumbnails.folder) not in answer and "/tmp/" not in answer
    for tile in gallery:
        url = tile["image"]["url"]
        version = server.live.version.id  # the index version that answered
        assert re.fullmatch(re.escape(server.url) + r"api/v1/thumbnails/\d+\.jpg\?v=" + version, url), url
        assert httpx.get(url, headers=BEARER, timeout=30).content.startswith(JPEG)
        assert httpx.get(url, timeout=30).status_code == 401
