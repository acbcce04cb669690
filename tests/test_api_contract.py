"""The JSON API against its own OpenAPI document: schemathesis, every check, a real server.

The server runs on a loopback port with a token (so the document declares the Bearer scheme and 401,
and `ignored_auth` checks that leaving the token out is refused) and is ready (warmed up) before the run.
Schemathesis's CLI runs every phase (examples, coverage, fuzzing, stateful: search -> thumbnail of the
index version that answered, by the declared link) with every check enabled and deterministic
generation (the same requests on every run) over every operation: search, info, the thumbnails with
their `v`, the probes health and ready, POST admin/reload and /metrics; tests/contract_hooks.py teaches
its generator real image files for the two image formats the document names. Any contract failure,
any 5xx or any error of the run fails the test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("schemathesis", reason="the contract test needs the `test` extra: pip install -e .[test]")

TOKEN = "contract-token"
MAX_EXAMPLES = 50  # per operation and phase: ~800 test cases, 30-60 s on a quiet 2-core machine
OPERATIONS = {"GET /api/v1/health", "GET /api/v1/ready", "GET /api/v1/info", "POST /api/v1/admin/reload",
              "POST /api/v1/search", "GET /api/v1/thumbnails/{index}.jpg", "GET /metrics"}
OPEN = {"/api/v1/health", "/api/v1/ready"}  # the probes: no token
RUN_TIMEOUT_S = 240  # a loaded machine runs the same requests slower; this only stops a hung run
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(small_index_dir: Path) -> Iterator[Any]:
    from app.serve import free_port, launch
    from retrieval.search.searcher import Searcher

    running = launch(Searcher.open(small_index_dir, device="cpu"), port=free_port(), index_dir=small_index_dir,
                     api_token=TOKEN, max_upload_bytes=300 * 1024)
    try:
        deadline = time.time() + 120  # warmed up before the run, so /ready answers the same on every run
        while httpx.get(running.url + "api/v1/ready", timeout=30).status_code != 200:
            assert time.time() < deadline, "the server did not become ready"
            time.sleep(0.05)
        yield running
    finally:
        running.close()


def test_the_document_declares_what_the_server_enforces(server: Any) -> None:
    """The parts of the document a generated client relies on, read from a live server."""
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        document = http.get("openapi.json").json()
        info = http.get("api/v1/info").json()
    paths = document["paths"]
    assert {f"{method.upper()} {path}" for path, operations in paths.items() for method in operations} == OPERATIONS
    thumbnail = paths["/api/v1/thumbnails/{index}.jpg"]["get"]
    assert set(thumbnail["responses"]["200"]["content"]) == {"image/jpeg"}
    index, version = thumbnail["parameters"]
    assert index["schema"]["maximum"] == info["n_items"] - 1
    assert version["name"] == "v" and version["in"] == "query" and not version["required"]
    assert re.fullmatch(version["schema"]["pattern"], info["index_version"]) and version["schema"]["type"] == "string"
    assert document["info"]["x-index-version"] == info["index_version"]
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert paths["/api/v1/ready"]["get"]["responses"]["503"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/ErrorBody"}
    link = paths["/api/v1/search"]["post"]["responses"]["200"]["links"]["thumbnail"]
    assert link["parameters"] == {"index": "$response.body#/results/0/gallery_index",
                                  "v": "$response.body#/index_version"}
    error = document["components"]["schemas"]["ErrorBody"]
    assert set(error["properties"]) == {"error", "message", "request_id"} and error["required"] == ["error", "message"]
    search = paths["/api/v1/search"]["post"]
    assert {"400", "401", "405", "413", "415", "422", "500", "503"} <= set(search["responses"])
    for path, operations in paths.items():
        for operation in operations.values():
            for status, answer in operation["responses"].items():
                if status != "200":
                    assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
            assert ("401" in operation["responses"]) == (path not in OPEN), path
            assert (operation.get("security") == []) == (path in OPEN), path
            assert operation["responses"]["405"]["headers"]["Allow"]
    body = document["components"]["schemas"]["SearchQuery"]
    assert body["additionalProperties"] is False and body["required"] == ["image"]
    assert body["properties"]["k"]["maximum"] == info["max_k"]
    assert body["properties"]["rerank"]["enum"] == info["rerank"]
    assert set(body["properties"]["filter"]["properties"]) == set(info["filters"])
    form = document["components"]["schemas"]["SearchForm"]["properties"]
    assert form["image"]["format"] == "binary" and form["rerank"]["enum"] == info["rerank"]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_unknown_methods_answer_405_with_allow(server: Any) -> None:
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        for method, path, allow in [("PUT", "api/v1/search", "POST"), ("GET", "api/v1/search", "POST"),
                                    ("TRACE", "api/v1/info", "GET"), ("DELETE", "api/v1/thumbnails/0.jpg", "GET"),
                                    ("POST", "api/v1/health", "GET"), ("POST", "api/v1/ready", "GET"),
                                    ("GET", "api/v1/admin/reload", "POST"), ("POST", "metrics", "GET")]:
            response = http.request(method, path)
            assert response.status_code == 405, (method, path, response.text)
            assert response.headers["allow"] == allow and response.json()["error"] == "method_not_allowed"
        assert http.get("api/v1/nothing-here").status_code == 404


def test_schemathesis_finds_no_contract_failure_and_no_server_error(server: Any, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", server.url + "openapi.json",
        "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic", "--workers", "1",
        "--header", f"Authorization: Bearer {TOKEN}", "--request-timeout", "60",
        "--continue-on-failure", "--no-color", "--report", "json", "--report-dir", str(tmp_path),
    ]
    count_file = tmp_path / "requests.txt"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.contract_hooks", "CONTRACT_REQUEST_COUNT": str(count_file),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    seconds = time.perf_counter() - t0
    reports = list(tmp_path.glob("*.json"))
    assert reports, run.stdout[-5000:] + run.stderr[-3000:]
    report = json.loads(reports[0].read_text())
    generated = report["test_cases"]["generated"]
    sent = int(count_file.read_text()) if count_file.exists() else -1
    print(f"\nschemathesis {report['schemathesis_version']}: checks all, {generated} test cases, {sent} requests "
          f"over {report['operations']['tested']} operations in {seconds:.0f} s; phases "
          + ", ".join(f"{name} {phase['status']}" for name, phase in report["phases"].items()))
    assert report["failures"] == [] and report["errors"] == [], run.stdout[-12000:]
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-3000:]
    assert report["complete"] and generated >= 300 and sent >= 300  # the run did what it says
    assert report["operations"]["tested"] == len(OPERATIONS), report["operations"]
    assert all(report["phases"][name]["status"] == "success" for name in ("coverage", "fuzzing", "stateful"))
