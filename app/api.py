"""The JSON search API, served by the same FastAPI application (one port, one model, one index) as the UI.

    POST /api/v1/search      multipart (form field `image`, plus `k`, `filter`, `rerank`) or JSON
                             {"image": "<base64 or data: URL>", "k": 10, "filter": {"category": "Dresses"},
                             "rerank": "qe"} -> ranked results, timings and the embedder fingerprint
    GET  /api/v1/health      cheap liveness (never needs a token: load balancers call it)
    GET  /api/v1/ready       readiness: 200 once a warm-up batch has run, 503 not_ready before, and while the
                             folder holds a newer index version that was refused (the older one still answers)
    GET  /api/v1/info        index type and size, embedding size, backend and device, fingerprint, build date,
                             filterable attributes, re-ranking methods available, the index version served
    GET  /api/v1/thumbnails/{i}.jpg?v=VERSION   the downscaled gallery image of result i of that index version
                             (originals are never served; without `v`, of the version served now)
    POST /api/v1/admin/reload  load the index folder now if it was republished (as the watcher does)
    GET  /metrics            Prometheus metrics (app.metrics), behind the same token as the API
    GET  /docs, /openapi.json         FastAPI's schema

Every answer names the index version it came from (app.live_index) and carries an X-Request-ID header
(the client's, or a generated one; error bodies name it too).

Errors are JSON {"error": code, "message": text} with a stable code and status: 400 bad_request,
401 unauthorized, 413 too_large, 415 not_an_image, 422 undecodable_image, 503 queue_full, 500 internal
(never a traceback). The server never fetches a URL on a client's behalf. Images are taken in by the
query intake the UI and `retrieval search` use too (retrieval.query_intake: one set of limits, one
size rule, the same refusals); sizes are checked on the encoded bytes (request length, then the file
or the base64 text) before anything is decoded. Answers have response models (app.schemas), so
/openapi.json documents their fields.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from fastapi import FastAPI, Request

from app import request_ids
from app.batching import BatchingWorker, QueueFull
from app.live_index import LiveIndex
from app.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from app.metrics import ServerMetrics
from app.schemas import ErrorBody, Health, InfoResponse, Ready, ReloadResponse, SearchResponse
from retrieval.index.filters import FilterError, format_where, parse_where
from retrieval.query_intake import QueryIntake, QueryLimits, QueryRejected
from retrieval.search.rerank import RERANK_METHODS, RerankError

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
TOKEN_ENV = "RETRIEVAL_API_TOKEN"
DEFAULT_K, MAX_K = 10, 100
MULTIPART_OVERHEAD = 64 * 1024  # form boundaries and fields on top of the image itself
UPLOAD = "the upload"  # how messages name a multipart upload; a JSON body's image is "`image`"
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "default": {"model": ErrorBody, "description": "An error: its stable code and a one-line message."}}
NOT_READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorBody, "description": "Not ready (error `not_ready`): warming up, or the index folder "
                                             "holds a newer version that was refused."}, **ERROR_RESPONSES}
METRICS_PATH = "/metrics"
OPEN_PATHS = (f"{API_PREFIX}/health", f"{API_PREFIX}/ready")  # probes: never a token (they reveal no data)


class ApiError(Exception):
    """An expected failure with its HTTP status and stable error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class ApiSettings:
    limits: QueryLimits = field(default_factory=QueryLimits)  # query images: the UI's limits too
    max_k: int = MAX_K
    token: str | None = None  # when set, every route but /health and /ready needs "Authorization: Bearer <token>"
    metrics: bool = True  # serve /metrics (behind the token when one is set)

    @property
    def max_upload_bytes(self) -> int:
        return self.limits.max_bytes


# --- request checks (images are checked by retrieval.query_intake) ------------------------------------


def parse_k(value: Any, max_k: int) -> int:
    if value is None or value == "":
        return DEFAULT_K
    try:
        k = int(value)
        if isinstance(value, float) and value != k:
            raise ValueError
    except (TypeError, ValueError):
        raise ApiError(400, "bad_request", f"`k` must be an integer, got {value!r}") from None
    if not 1 <= k <= max_k:
        raise ApiError(400, "bad_request", f"`k` must be between 1 and {max_k}, got {k}")
    return k


def parse_rerank(value: Any, available: list[str]) -> str:
    method = str(value or "none").lower()
    if method not in RERANK_METHODS:
        raise ApiError(400, "bad_request", f"unknown `rerank` {value!r}; choose one of {', '.join(RERANK_METHODS)}")
    if method not in available:
        raise ApiError(400, "bad_request", f"`rerank` {method} is not available on this index "
                                           f"(available: {', '.join(available)}); build its neighbour lists with "
                                           "`retrieval index --out DIR --rerank-neighbours 10`")
    return method


def parse_filter(value: Any, searcher: Any) -> Any:
    """`filter`: {"key": value or [values]}, a list of "key=value", or "key=value[;key=value]" (form fields)."""
    if value is None or value == "" or value == [] or value == {}:
        return None
    if isinstance(value, str):
        value = [t for t in re.split(r"[;&]", value) if t.strip()]
    try:
        where = parse_where(value)
        searcher.subset(where)  # unknown attributes fail here, with what exists
    except FilterError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    return where or None


def check_token(header: str | None, token: str | None) -> None:
    """Constant-time comparison of a Bearer token (hmac.compare_digest); ApiError 401 when wrong or missing."""
    if not token:
        return
    scheme, _, given = (header or "").partition(" ")
    ok = hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8"))
    if scheme.lower() != "bearer" or not ok:
        raise ApiError(401, "unauthorized", "this API needs `Authorization: Bearer <token>` (the server's --api-token)")


# --- the application ----------------------------------------------------------------------------------


class SearchApi:
    """Routes of the API over the served index (app.live_index), its BatchingWorker and the thumbnail stores."""

    def __init__(self, live: LiveIndex, worker: BatchingWorker, thumbnails: Any, settings: ApiSettings,
                 metrics: ServerMetrics | None = None) -> None:
        self.live, self.worker, self.thumbnails, self.settings = live, worker, thumbnails, settings
        self.metrics = metrics
        self.intake = QueryIntake(settings.limits)

    @property
    def searcher(self) -> Any:
        """The Searcher of the version served now (validation of a request; its batch may take a newer one)."""
        return self.live.searcher

    @property
    def max_k(self) -> int:
        return max(1, min(self.settings.max_k, len(self.searcher.gallery_paths)))

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): warm once the first batch has run; not ready while the served version is stale."""
        if not self.worker.warmed.is_set():
            return False, "warming up: the embedder's first batch has not run yet"
        stale = self.live.stale
        if stale is not None:
            return False, (f"serving index version {stale.version}, older than the index folder, whose newer "
                           "version was refused (the reason is in the server log and /api/v1/info); republish a "
                           "good version. The older version keeps answering searches meanwhile")
        return True, ""

    def rerank_methods(self) -> list[str]:
        methods = ["none", "qe", "kreciprocal"]
        if self.searcher.index.neighbours is not None:
            methods.insert(2, "dba")
        return methods

    def info(self) -> dict[str, Any]:
        searcher = self.searcher
        meta, backend = searcher.index.meta, searcher.backend
        return {
            "dataset": meta.dataset,
            "index_type": meta.index_type,
            "index_factory": meta.index_factory,
            "n_items": len(searcher.gallery_paths),
            "embedding_size": meta.embedding_size,
            "backend": backend.name,
            "device": backend.device,
            "search_device": searcher.devices.get("index"),
            "fingerprint": backend.fingerprint,
            "built_at": meta.created_at,
            "updated_at": meta.updated_at,
            "filters": searcher.attribute_values,
            "rerank": self.rerank_methods(),
            "max_k": self.max_k,
            "max_upload_bytes": self.settings.max_upload_bytes,
            "batching": {"max_batch": self.worker.max_batch, "max_wait_ms": self.worker.max_wait * 1000,
                         "queue_size": self.worker.queue_size},
            "index_version": self.live.version.id,
            "version": self.live.version.to_json(),
            "reloading": {"watching": self.live.watching,
                          "last_outcome": self.live.last.outcome if self.live.last else None,
                          "last_message": self.live.last.message if self.live.last else None,
                          "stale": self.live.stale is not None},
        }

    async def search(self, data: bytes, k: Any, filter_: Any, rerank: Any, subject: str = UPLOAD) -> dict[str, Any]:
        """The search answer (app.schemas.SearchResponse) for encoded image bytes; `subject` names the image
        in refusals."""
        t0 = time.perf_counter()
        self.intake.check_bytes(data, subject)
        k = parse_k(k, self.max_k)
        method = parse_rerank(rerank, self.rerank_methods())
        where = parse_filter(filter_, self.searcher)
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self.worker.pool, self._prepare, data, subject)
        try:
            future = self.worker.submit(prepared.pixels, k, where, method)
        except QueueFull as exc:
            raise ApiError(503, "queue_full", str(exc)) from None
        try:
            result = await asyncio.wrap_future(future)
        except (FilterError, RerankError) as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        except QueueFull as exc:
            raise ApiError(503, "queue_full", str(exc)) from None
        version = result.served.version.id if result.served is not None else self.live.version.id
        self._thumbnails_of(result.served)  # registers the version, so its thumbnail URLs resolve
        timings = {"decode": round(prepared.decode_seconds * 1e3, 3), "embed": round(result.embed_seconds * 1e3, 3),
                   "search": round(result.search_seconds * 1e3, 3),
                   "total": round((time.perf_counter() - t0) * 1e3, 3)}
        record = request_ids.current()
        if record is not None:
            record.note(batch=result.batch_size, k=k, filter=format_where(where) if where else "", rerank=method,
                        index_version=version)
        if self.metrics is not None:
            self.metrics.observe_search(timings)
        return {
            "results": [self._hit(h, version) for h in result.hits],
            "k": k,
            "filter": {key: sorted(v) for key, v in where.items()} if where else None,
            "filter_text": format_where(where) if where else "",
            "rerank": method,
            "batch_size": result.batch_size,
            "timings_ms": timings,
            "fingerprint": self.searcher.backend.fingerprint,
            "index_version": version,
        }

    def _thumbnails_of(self, served: Any) -> Any:
        """The thumbnail store of the version that answered."""
        if served is None:
            served = self.live.current
        return self.thumbnails.for_version(served.version.id, served.searcher.gallery_paths)

    def thumbnail_path(self, gallery_index: int, version: str | None) -> Any:
        """The thumbnail file of row `gallery_index` of `version` (default: the served one); ApiError 404 else."""
        served = self.live.current
        if version is None or version == served.version.id:
            store = self.thumbnails.for_version(served.version.id, served.searcher.gallery_paths)
        else:
            store = self.thumbnails.for_version(version)
        if store is None:
            raise ApiError(404, "not_found", f"index version {version!r} is no longer served; search again "
                                             f"(now serving {served.version.id})")
        if not 0 <= gallery_index < len(store.gallery_paths):
            raise ApiError(404, "not_found", f"no thumbnail {gallery_index}.jpg in index version "
                                             f"{version or served.version.id}; use a result's thumbnail_url")
        return store.path_for(gallery_index)

    def _prepare(self, data: bytes, subject: str) -> Any:
        t0 = time.perf_counter()
        image = self.intake.decode(data, subject)
        return self.worker.prepare(image, time.perf_counter() - t0)

    def _hit(self, hit: Any, version: str) -> dict[str, Any]:
        """The search hit record (retrieval.search.hits.Hit) plus the URL of its thumbnail in that index version."""
        return {**hit.to_json(), "thumbnail_url": f"{API_PREFIX}/thumbnails/{int(hit.gallery_index)}.jpg?v={version}"}


def build_api(search_api: SearchApi) -> FastAPI:
    """The FastAPI application with the API routes (the UI is mounted on it by app.serve)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = search_api.settings
    api = FastAPI(title="metrix-retrieval search API", version="1",
                  description="Search a gallery index by photo. Errors: {\"error\": code, \"message\": text}.")

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @api.exception_handler(QueryRejected)
    async def _rejected(request: Request, exc: QueryRejected) -> JSONResponse:
        return error_response(exc.status, exc.code, str(exc))

    @api.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", []))
        return error_response(400, "bad_request", f"{where}: {first.get('msg', 'invalid')}")

    api.add_middleware(ApiGuard, settings=settings)

    @api.get(f"{API_PREFIX}/health", response_model=Health, responses=ERROR_RESPONSES)
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @api.get(f"{API_PREFIX}/ready", response_model=Ready, responses=NOT_READY_RESPONSES)
    async def ready() -> dict[str, Any]:
        """Readiness: 503 `not_ready` while warming up, and while the folder holds a newer, refused version."""
        ok, why = search_api.readiness()
        if not ok:
            raise ApiError(503, "not_ready", why)
        return {"status": "ready", "index_version": search_api.live.version.id}

    @api.get(f"{API_PREFIX}/info", response_model=InfoResponse, responses=ERROR_RESPONSES)
    async def info() -> dict[str, Any]:
        return search_api.info()

    @api.post(f"{API_PREFIX}/admin/reload", response_model=ReloadResponse, responses=ERROR_RESPONSES)
    async def reload() -> dict[str, Any]:
        """Load the index folder now if it was republished: verified, warmed up and swapped in between batches.
        A version that fails verification is refused (outcome `refused`, the reason in `message`) and the
        served one keeps answering."""
        outcome = await asyncio.to_thread(search_api.live.reload, "request")
        body = outcome.to_json()
        body.pop("trigger")
        return body

    @api.post(f"{API_PREFIX}/search", response_model=SearchResponse, responses=ERROR_RESPONSES,
              openapi_extra={"requestBody": {"content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary"}, "k": {"type": "integer", "default": DEFAULT_K},
            "filter": {"type": "string", "description": "key=value; several joined by ';'"},
            "rerank": {"type": "string", "enum": list(RERANK_METHODS)}}}},
        "application/json": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "description": "base64 image bytes or a data: URL"},
            "k": {"type": "integer"}, "filter": {"type": "object"},
            "rerank": {"type": "string", "enum": list(RERANK_METHODS)}}}}}}})
    async def search(request: Request) -> dict[str, Any]:
        """Search by photo: results (rank, item id, label, relative path, score, thumbnail URL) and timings."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            try:
                body = await request.json()
            except ValueError:
                raise ApiError(400, "bad_request", "the request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise ApiError(400, "bad_request", "the JSON body must be an object with `image`")
            data = search_api.intake.base64_bytes(body.get("image"), subject="`image`")
            return await search_api.search(data, body.get("k"), body.get("filter"), body.get("rerank"),
                                           subject="`image`")
        if kind != "multipart/form-data":
            raise ApiError(400, "bad_request", "send multipart/form-data with the field `image`, or JSON")
        form = await request.form(max_files=1, max_fields=16)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            if isinstance(upload, str):
                search_api.intake.refuse_url(upload, UPLOAD)
            raise ApiError(400, "bad_request", "no image: send the file in the form field `image`")
        size = getattr(upload, "size", None)
        if size is not None:
            search_api.intake.check_encoded_size(size, UPLOAD)
        data = await upload.read(settings.max_upload_bytes + 1)
        filters = form.getlist("filter")
        return await search_api.search(data, form.get("k"), ";".join(str(f) for f in filters) or None,
                                       form.get("rerank"))

    @api.get(f"{API_PREFIX}/thumbnails/{{name}}")
    async def thumbnail(name: str, v: Optional[str] = None) -> Any:
        """The thumbnail of result `name` (`<gallery_index>.jpg`) of index version `v` (a result's thumbnail_url)."""
        match = re.fullmatch(r"(\d{1,12})\.jpg", name)
        if not match:
            raise ApiError(404, "not_found", f"no thumbnail {name!r}; use a result's thumbnail_url")
        loop = asyncio.get_running_loop()
        path = await loop.run_in_executor(search_api.worker.pool, search_api.thumbnail_path, int(match.group(1)), v)
        return FileResponse(path, media_type="image/jpeg")

    if settings.metrics and search_api.metrics is not None:
        metrics = search_api.metrics

        @api.get(METRICS_PATH, include_in_schema=False)
        async def metrics_route(request: Request) -> Any:
            """Prometheus metrics (text format); the API token covers it when one is set."""
            from fastapi.responses import Response

            check_token(request.headers.get("authorization"), settings.token)
            return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @api.api_route(f"{API_PREFIX}/{{rest:path}}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
                   include_in_schema=False)
    async def unknown(rest: str) -> Any:
        """Unknown API paths answer in the API's own error format (the UI mounted at / would answer otherwise)."""
        raise ApiError(404, "not_found", f"no API route {API_PREFIX}/{rest}; see /docs")

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Any:
        if request.url.path.startswith(API_PREFIX):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
            return error_response(exc.status_code, code, str(exc.detail))
        from fastapi.exception_handlers import http_exception_handler

        return await http_exception_handler(request, exc)

    return api


class ApiGuard:
    """ASGI middleware for /api/v1 only: token and request size checked before a body is read, and any
    unexpected failure answered as a bare JSON 500 (never a traceback). Other paths (the UI, its event
    streams) pass straight through."""

    def __init__(self, app: Any, settings: ApiSettings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope.get("type") != "http" or not path.startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            if path not in OPEN_PATHS:
                check_token(headers.get("authorization"), self.settings.token)
            length = headers.get("content-length", "")
            limit = self.settings.limits.max_base64_chars + MULTIPART_OVERHEAD  # base64 JSON is 4/3 larger
            if length.isdigit() and int(length) > limit:
                raise ApiError(413, "too_large", f"the request is {int(length) / 2**20:.1f} MB, over the "
                                                 f"{self.settings.max_upload_bytes / 2**20:.0f} MB upload limit")
        except ApiError as exc:
            await error_response(exc.status, exc.code, exc.message)(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("API request failed")
            if not started:
                message = "the server failed to answer this request; it keeps running"
                await error_response(500, "internal", message)(scope, receive, send)


def token_from_env(token: str | None) -> str | None:
    """The --api-token value, else the RETRIEVAL_API_TOKEN environment variable, else None (no token)."""
    return token or os.environ.get(TOKEN_ENV) or None


def error_response(status: int, code: str, message: str) -> Any:
    """The JSON error answer (app.schemas.ErrorBody) with its status, naming the request's id."""
    from fastapi.responses import JSONResponse

    body = ErrorBody(error=code, message=message, request_id=request_ids.current_id())
    return JSONResponse(body.model_dump(), status_code=status)
