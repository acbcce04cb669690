"""A small Python client of the search server's JSON API (`retrieval serve`), standard library only.

    from retrieval.client import SearchClient

    client = SearchClient("http://127.0.0.1:7860", token=None)
    result = client.search("photo.jpg", k=5, filter={"category": "Dresses"}, rerank="qe")
    for hit in result.hits:                     # retrieval.search.hits.Hit, the record `retrieval search --json` prints
        print(hit.rank, hit.item_id, hit.score, hit.path)
    result.index_version                        # the index version that answered
    client.thumbnail(result, 0)                 # the first result's JPEG thumbnail (bytes)
    client.info(), client.ready(), client.reload(), client.health()

Every failure raises `SearchApiError` carrying the API's status, stable code and message (and the
request id to quote); a server that cannot be reached is status 0, code `unreachable`. Images are sent
as multipart uploads (a path, bytes, or a PIL image, sent as PNG).
"""

from __future__ import annotations

import io
import json
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.search.hits import HIT_FIELDS, Hit

API = "api/v1/"
DEFAULT_TIMEOUT_S = 60.0


class SearchApiError(Exception):
    """An answer other than success: `status` (HTTP; 0 = no answer), `code` (stable), `message`, `request_id`."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (request {request_id})" if request_id else ""))
        self.status, self.code, self.message, self.request_id = status, code, message, request_id


@dataclass(frozen=True)
class SearchResult:
    """One search's answer: ranked hits, and where they came from."""

    hits: list[Hit]
    thumbnail_urls: list[str]  # one per hit, relative to the server's URL
    index_version: str
    k: int
    filter: dict[str, list[str]] | None
    rerank: str
    batch_size: int
    timings_ms: dict[str, float]
    fingerprint: str
    request_id: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class ReloadResult:
    """What `reload()` did: outcome reloaded / unchanged / refused (then `message` says why)."""

    outcome: str
    index_version: str
    previous_version: str
    message: str
    seconds: float


class SearchClient:
    """The JSON API of one server; `token`: the server's --api-token, sent as a Bearer token."""

    def __init__(self, url: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self.token, self.timeout = token, float(timeout)

    # -- routes ---------------------------------------------------------------------------------------
    def search(
        self,
        image: str | os.PathLike[str] | bytes | Any,
        k: int = 10,
        filter: Mapping[str, str | Sequence[str]] | Sequence[str] | str | None = None,
        rerank: str = "none",
        request_id: str | None = None,
    ) -> SearchResult:
        """The k nearest gallery items to `image`; `filter` as {"category": "Dresses"} (or a list of values),
        ["category=Dresses"] or "category=Dresses"; `rerank`: none, qe, dba or kreciprocal."""
        name, data = _image_bytes(image)
        fields: list[tuple[str, str]] = [("k", str(int(k))), ("rerank", str(rerank))]
        fields += [("filter", term) for term in _filter_terms(filter)]
        body, content_type = _multipart(fields, ("image", name, data))
        answer, rid = self._call("POST", "search", body, content_type, request_id)
        hits = [Hit(**{key: raw[key] for key in HIT_FIELDS}) for raw in answer["results"]]
        return SearchResult(
            hits,
            [raw["thumbnail_url"] for raw in answer["results"]],
            answer.get("index_version", ""),
            answer["k"],
            answer.get("filter"),
            answer["rerank"],
            answer["batch_size"],
            answer["timings_ms"],
            answer["fingerprint"],
            rid,
            answer,
        )

    def info(self) -> dict[str, Any]:
        """What the server searches: index type and size, the version served, embedder, filters, limits."""
        return self._call("GET", "info")[0]

    def health(self) -> bool:
        """True when the process answers (liveness)."""
        return self._call("GET", "health")[0].get("status") == "ok"

    def ready(self) -> bool:
        """True when the server is ready; False while it warms up or serves a version older than its folder's."""
        try:
            self._call("GET", "ready")
        except SearchApiError as exc:
            if exc.status == 503 and exc.code == "not_ready":
                return False
            raise
        return True

    def reload(self) -> ReloadResult:
        """Ask the server to load its index folder now if it was republished."""
        answer = self._call("POST", "admin/reload", b"", "application/json")[0]
        return ReloadResult(
            answer["outcome"],
            answer["index_version"],
            answer["previous_version"],
            answer["message"],
            float(answer["seconds"]),
        )

    def thumbnail(self, result: SearchResult, i: int) -> bytes:
        """The JPEG thumbnail of hit `i` of `result`, of the index version that answered."""
        return self._request("GET", urllib.parse.urljoin(self.url, result.thumbnail_urls[i].lstrip("/")))[0]

    # -- transport ------------------------------------------------------------------------------------
    def _call(
        self,
        method: str,
        route: str,
        body: bytes | None = None,
        content_type: str | None = None,
        request_id: str | None = None,
    ) -> tuple[dict[str, Any], str | None]:
        data, rid = self._request(method, urllib.parse.urljoin(self.url, API + route), body, content_type, request_id)
        try:
            return json.loads(data), rid
        except ValueError:
            raise SearchApiError(200, "bad_answer", f"the server's answer to {route} is not JSON", rid) from None

    def _request(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        content_type: str | None = None,
        request_id: str | None = None,
    ) -> tuple[bytes, str | None]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if request_id:
            headers["X-Request-ID"] = request_id
        request = urllib.request.Request(url, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read(), response.headers.get("X-Request-ID")
        except urllib.error.HTTPError as exc:
            raise _api_error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SearchApiError(0, "unreachable", f"cannot reach {self.url}: {reason}") from None


def _api_error(exc: urllib.error.HTTPError) -> SearchApiError:
    rid = exc.headers.get("X-Request-ID") if exc.headers else None
    try:
        body = json.loads(exc.read() or b"{}")
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    return SearchApiError(
        int(exc.code),
        str(body.get("error") or "http_error"),
        str(body.get("message") or exc.reason),
        body.get("request_id") or rid,
    )


def _image_bytes(image: Any) -> tuple[str, bytes]:
    """(file name, encoded bytes) of a path, bytes or PIL image."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "query", bytes(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return path.name, path.read_bytes()
    if hasattr(image, "save"):  # a PIL image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return "query.png", buf.getvalue()
    raise TypeError(f"image must be a path, bytes or a PIL image, not {type(image).__name__}")


def _filter_terms(value: Any) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        terms = []
        for key, values in value.items():
            values = [values] if isinstance(values, str) else list(values)
            terms += [f"{key}={v}" for v in values]
        return terms
    return [str(term) for term in value]


def _multipart(fields: list[tuple[str, str]], upload: tuple[str, str, bytes]) -> tuple[bytes, str]:
    """A multipart/form-data body of text fields and one file."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    field_name, file_name, data = upload
    safe = file_name.replace('"', "_").replace("\r", "_").replace("\n", "_")
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{safe}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"
