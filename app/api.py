"""The JSON search API, served by the same FastAPI application (one port, one model, one index) as the UI.

    POST /api/v1/search      multipart (form field `image`, plus `k`, `filter`, `rerank`) or JSON
                             {"image": "<base64 or data: URL>", "k": 10, "filter": {"category": "Dresses"},
                             "rerank": "qe"} -> ranked results, timings and the embedder fingerprint
    GET  /api/v1/health      cheap liveness (never needs a token: load balancers call it)
    GET  /api/v1/ready       readiness: 200 once a warm-up batch has run, 503 not_ready before, and while the
                             folder holds a newer index version that was refused (the older one still answers);
                             never needs a token either
    GET  /api/v1/info        index type and size, embedding size, backend and device, fingerprint, build date,
                             filterable attributes, re-ranking methods available, the index version served
    GET  /api/v1/thumbnails/{index}.jpg?v=VERSION   the downscaled gallery image of result `index` of that
                             index version (originals are never served; without `v`, of the version served now)
    POST /api/v1/admin/reload  load the index folder now if it was republished (as the watcher does)
    GET  /metrics            Prometheus metrics (app.metrics), behind the token unless made public
    GET  /docs, /openapi.json         FastAPI's schema

Every answer names the index version it came from (app.live_index) and carries an X-Request-ID header
(the client's, or a generated one; error bodies name it too).

The OpenAPI document is exact: response models (app.schemas), every error status of every route with
its schema (app.api_errors), the thumbnails as image/jpeg and /metrics as text, and the request bodies
with the served index's bounds (app.search_request: k up to the maximum, the filterable attributes,
the re-ranking methods it offers); the server refuses what the document calls invalid. It is rebuilt
when the served index version changes. An unknown method on an API path answers 405 with `Allow`.

Errors are JSON {"error": code, "message": text, "request_id": id} with a stable code and status
(app.api_errors): 400 bad_request, 401 unauthorized, 404 not_found, 405 method_not_allowed,
413 too_large, 415 not_an_image, 422 undecodable_image, 503 queue_full or not_ready, 500 internal
(never a traceback). The server never fetches a URL on a client's behalf. Images are taken in by the
query intake the UI and `retrieval search` use too (retrieval.query_intake: one set of limits, one
size rule, the same refusals); sizes are checked on the encoded bytes (request length, then the file
or the base64 text) before anything is decoded. The token (when set) is checked once, for every path
of the server, by app.access.AccessGate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam

from app import request_ids
from app.access import PROBE_PATHS, token_from_env  # noqa: F401  (re-exported: app.serve and older callers)
from app.api_errors import API_ERRORS, ApiError, ErrorDeclarations, error_response
from app.batching import BatchingWorker, QueueFull
from app.live_index import LiveIndex, ServedIndex
from app.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from app.metrics import ServerMetrics
from app.schemas import Health, InfoResponse, Ready, ReloadResponse, SearchResponse
from app.search_request import MAX_FILTER_FIELDS, SearchContract, SearchParams, contract_for
from retrieval.index.filters import FilterError, format_where, parse_where
from retrieval.query_intake import QueryIntake, QueryLimits, QueryRejected
from retrieval.search.rerank import RerankError

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
METRICS_PATH = "/metrics"
DEFAULT_K, MAX_K = 10, 100
MULTIPART_OVERHEAD = 64 * 1024  # form boundaries and fields on top of the image itself
UPLOAD = "the upload"  # how messages name a multipart upload; a JSON body's image is "`image`"
THUMBNAIL_ROUTE = f"{API_PREFIX}/thumbnails/{{index}}.jpg"
# an index version id (app.live_index.version_of): publish time digits, `Z-`, 8 hex digits of the files' hash
VERSION_PATTERN = r"^[0-9A-Za-z]{1,40}Z-[0-9a-f]{8}$"


@dataclass(frozen=True)
class ApiSettings:
    limits: QueryLimits = field(default_factory=QueryLimits)  # query images: the UI's limits too
    max_k: int = MAX_K
    token: str | None = None  # when set, app.access.AccessGate requires it everywhere but the open paths
    metrics: bool = True  # serve /metrics
    public_paths: frozenset[str] = frozenset()  # open with a token too, beside the probes (e.g. /metrics)

    @property
    def max_upload_bytes(self) -> int:
        return self.limits.max_bytes

    def is_open(self, path: str) -> bool:
        """Whether `path` answers without the token (what the document declares: no 401, no security)."""
        return self.token is None or path in PROBE_PATHS or path in self.public_paths


def thumbnail_url(gallery_index: int, version: str) -> str:
    """The API path of a gallery item's thumbnail in one index version (relative to the server's root)."""
    return f"{API_PREFIX}/thumbnails/{int(gallery_index)}.jpg?v={quote(version, safe='')}"


def is_api_path(path: str) -> bool:
    """The paths the API answers in its own error format (the UI mounted at / answers the others)."""
    return path == API_PREFIX or path.startswith(API_PREFIX + "/") or path == METRICS_PATH


# --- the application ----------------------------------------------------------------------------------


class SearchApi:
    """Routes of the API over the served index (app.live_index), its BatchingWorker and the thumbnail stores."""

    def __init__(
        self,
        live: LiveIndex,
        worker: BatchingWorker,
        thumbnails: Any,
        settings: ApiSettings,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.live, self.worker, self.thumbnails, self.settings = live, worker, thumbnails, settings
        self.metrics = metrics
        self.intake = QueryIntake(settings.limits)
        # (version id, its contract): keyed by the id, never the Searcher, so a replaced version's memory is freed
        self._contract: tuple[str, SearchContract] | None = None

    @property
    def searcher(self) -> Any:
        """The Searcher of the version served now (validation of a request; its batch may take a newer one)."""
        return self.live.searcher

    @property
    def max_k(self) -> int:
        return self.contract().max_k

    def contract(self, served: ServedIndex | None = None) -> SearchContract:
        """What a search request may ask of the index version served now (rebuilt when the version changes)."""
        served = served or self.live.current
        cached = self._contract
        if cached is None or cached[0] != served.version.id:
            searcher = served.searcher
            cached = (
                served.version.id,
                contract_for(
                    searcher, self.settings.max_k, self.rerank_methods(searcher), self.settings.max_upload_bytes
                ),
            )
            self._contract = cached
        return cached[1]

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): warm once the first batch has run; not ready while the served version is stale."""
        if not self.worker.warmed.is_set():
            return False, "warming up: the embedder's first batch has not run yet"
        stale = self.live.stale
        if stale is not None:
            return False, (
                f"serving index version {stale.version}, older than the index folder, whose newer "
                "version was refused (the reason is in the server log and /api/v1/info); republish a "
                "good version. The older version keeps answering searches meanwhile"
            )
        return True, ""

    def rerank_methods(self, searcher: Any = None) -> list[str]:
        searcher = searcher if searcher is not None else self.searcher
        methods = ["none", "qe", "kreciprocal"]
        if searcher.index.neighbours is not None:
            methods.insert(2, "dba")
        return methods

    def info(self) -> dict[str, Any]:
        served = self.live.current  # read once: every fact of one version
        searcher = served.searcher
        meta, backend = searcher.index.meta, searcher.backend
        last = self.live.last
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
            "rerank": self.rerank_methods(searcher),
            "max_k": self.contract(served).max_k,
            "max_upload_bytes": self.settings.max_upload_bytes,
            "batching": {
                "max_batch": self.worker.max_batch,
                "max_wait_ms": self.worker.max_wait * 1000,
                "queue_size": self.worker.queue_size,
            },
            "index_version": served.version.id,
            "version": served.version.to_json(),
            "reloading": {
                "watching": self.live.watching,
                "last_outcome": last.outcome if last else None,
                "last_message": last.message if last else None,
                "stale": self.live.stale is not None,
            },
        }

    def image_from_text(self, text: str) -> bytes:
        """A JSON body's `image` -> bytes: URLs refused, size checked (413) before decoding, then the
        document's pattern (what the intake tolerates beyond it, e.g. whitespace, is refused too)."""
        data = self.intake.base64_bytes(text, subject="`image`")
        if not self.contract().image_text_ok(text):
            raise ApiError(
                400,
                "bad_request",
                "`image` is not valid base64 image data: send the file's bytes in "
                "base64 (no whitespace), bare or as data:<type>/<subtype>;base64,...",
            )
        return data

    async def search(self, data: bytes, params: SearchParams, subject: str = UPLOAD) -> dict[str, Any]:
        """The search answer (app.schemas.SearchResponse) for encoded image bytes; `subject` names the image
        in refusals."""
        t0 = time.perf_counter()
        self.intake.check_bytes(data, subject)
        try:
            where = parse_where(params.where) if params.where else None
            if where:
                self.searcher.subset(where)  # an attribute the index lost since the contract was made
        except FilterError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self.worker.pool, self._prepare, data, subject)
        try:
            future = self.worker.submit(prepared.pixels, params.k, where, params.rerank)
        except QueueFull as exc:
            raise ApiError(503, "queue_full", str(exc)) from None
        try:
            result = await asyncio.wrap_future(future)
        except (FilterError, RerankError) as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        except QueueFull as exc:
            raise ApiError(503, "queue_full", str(exc)) from None
        served = result.served if result.served is not None else self.live.current
        version = served.version.id
        self._thumbnails_of(served)  # registers the version, so its thumbnail URLs resolve
        timings = {
            "decode": round(prepared.decode_seconds * 1e3, 3),
            "embed": round(result.embed_seconds * 1e3, 3),
            "search": round(result.search_seconds * 1e3, 3),
            "total": round((time.perf_counter() - t0) * 1e3, 3),
        }
        record = request_ids.current()
        if record is not None:
            record.note(
                batch=result.batch_size,
                k=params.k,
                filter=format_where(where) if where else "",
                rerank=params.rerank,
                index_version=version,
            )
        if self.metrics is not None:
            self.metrics.observe_search(timings)
        return {
            "results": [self._hit(h, version) for h in result.hits],
            "k": params.k,
            "filter": {key: sorted(v) for key, v in where.items()} if where else None,
            "filter_text": format_where(where) if where else "",
            "rerank": params.rerank,
            "batch_size": result.batch_size,
            "timings_ms": timings,
            "fingerprint": served.searcher.backend.fingerprint,
            "index_version": version,
        }

    def _thumbnails_of(self, served: ServedIndex) -> Any:
        """The thumbnail store of the version that answered."""
        return self.thumbnails.for_version(served.version.id, served.searcher.gallery_paths)

    def thumbnail_path(self, gallery_index: int, version: str | None) -> Any:
        """The thumbnail file of row `gallery_index` of `version` (default: the served one); ApiError 404 else."""
        served = self.live.current
        if version is None or version == served.version.id:
            store = self._thumbnails_of(served)
        else:
            store = self.thumbnails.for_version(version)
        if store is None:
            raise ApiError(
                404,
                "not_found",
                f"index version {version!r} is no longer served; search again (now serving {served.version.id})",
            )
        if not 0 <= gallery_index < len(store.gallery_paths):
            raise ApiError(
                404,
                "not_found",
                f"no thumbnail {gallery_index}.jpg in index version "
                f"{version or served.version.id}; use a result's thumbnail_url",
            )
        return store.path_for(gallery_index)

    def _prepare(self, data: bytes, subject: str) -> Any:
        t0 = time.perf_counter()
        image = self.intake.decode(data, subject)
        return self.worker.prepare(image, time.perf_counter() - t0)

    def _hit(self, hit: Any, version: str) -> dict[str, Any]:
        """The search hit record (retrieval.search.hits.Hit) plus the URL of its thumbnail in that index version."""
        return {**hit.to_json(), "thumbnail_url": thumbnail_url(hit.gallery_index, version)}


def build_api(search_api: SearchApi) -> FastAPI:
    """The FastAPI application with the API routes (the UI is mounted on it by app.serve)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = search_api.settings
    errors = ErrorDeclarations(auth=settings.token is not None)
    api = FastAPI(
        title="metrix-retrieval search API",
        version="1",
        description='Search a gallery index by photo. Errors: {"error": code, "message": text, '
        '"request_id": id}; with a token set, send `Authorization: Bearer <token>`.',
    )

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @api.exception_handler(QueryRejected)
    async def _rejected(request: Request, exc: QueryRejected) -> JSONResponse:
        return error_response(exc.status, exc.code, str(exc))

    @api.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", []))
        return error_response(400, "bad_request", f"{where}: {first.get('msg', 'invalid')}")

    api.add_middleware(ApiGuard, settings=settings, router=api.router)

    def declare(path: str, *statuses: int) -> dict[int | str, dict[str, Any]]:
        return errors.declare(*statuses, public=settings.is_open(path))

    @api.get(
        f"{API_PREFIX}/health", response_model=Health, responses=declare(f"{API_PREFIX}/health"), operation_id="health"
    )
    async def health() -> dict[str, Any]:
        """Liveness: the process answers (no token needed)."""
        return {"status": "ok"}

    @api.get(
        f"{API_PREFIX}/ready", response_model=Ready, responses=declare(f"{API_PREFIX}/ready", 503), operation_id="ready"
    )
    async def ready() -> dict[str, Any]:
        """Readiness: 503 `not_ready` while warming up, and while the folder holds a newer, refused version
        (no token needed)."""
        ok, why = search_api.readiness()
        if not ok:
            raise ApiError(503, "not_ready", why)
        return {"status": "ready", "index_version": search_api.live.version.id}

    @api.get(
        f"{API_PREFIX}/info", response_model=InfoResponse, responses=declare(f"{API_PREFIX}/info"), operation_id="info"
    )
    async def info() -> dict[str, Any]:
        """What this server searches and how: its bounds for a search request too, and the version served."""
        return search_api.info()

    @api.post(
        f"{API_PREFIX}/admin/reload",
        response_model=ReloadResponse,
        responses=declare(f"{API_PREFIX}/admin/reload"),
        operation_id="reload",
    )
    async def reload() -> dict[str, Any]:
        """Load the index folder now if it was republished: verified, warmed up and swapped in between batches.
        A version that fails verification is refused (outcome `refused`, the reason in `message`) and the
        served one keeps answering."""
        outcome = await asyncio.to_thread(search_api.live.reload, "request")
        body = outcome.to_json()
        body.pop("trigger")
        return body

    @api.post(
        f"{API_PREFIX}/search",
        response_model=SearchResponse,
        responses=declare(f"{API_PREFIX}/search", 400, 413, 415, 422, 503),
        operation_id="search",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/SearchQuery"}},
                    "multipart/form-data": {"schema": {"$ref": "#/components/schemas/SearchForm"}},
                },
            }
        },
    )
    async def search(request: Request) -> dict[str, Any]:
        """Search by photo: results (rank, item id, label, relative path, score, thumbnail URL), timings and
        the index version that answered."""
        contract = search_api.contract()
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            try:
                body = await request.json()
            except ValueError:
                raise ApiError(400, "bad_request", "the request body is not valid JSON") from None
            text, params = contract.json_params(body)
            data = search_api.image_from_text(text)
            return await search_api.search(data, params, subject="`image`")
        if kind != "multipart/form-data":
            raise ApiError(400, "bad_request", "send multipart/form-data with the field `image`, or JSON")
        form = await request.form(max_files=1, max_fields=2 + MAX_FILTER_FIELDS)
        upload, params = contract.form_params(list(form.multi_items()))
        if upload is None or isinstance(upload, str):
            if isinstance(upload, str):
                search_api.intake.refuse_url(upload, UPLOAD)
            raise ApiError(400, "bad_request", "no image: send the file in the form field `image`")
        size = getattr(upload, "size", None)
        if size is not None:
            search_api.intake.check_encoded_size(size, UPLOAD)
        data = await upload.read(settings.max_upload_bytes + 1)
        return await search_api.search(data, params)

    jpeg = {
        "description": "The thumbnail: a JPEG, longest side at most 384 px.",
        "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
    }

    @api.get(
        THUMBNAIL_ROUTE,
        response_class=FileResponse,
        responses={200: jpeg, **declare(THUMBNAIL_ROUTE, 400, 404)},
        operation_id="thumbnail",
    )
    async def thumbnail(
        index: int = PathParam(
            ge=0,
            description="a result's gallery_index (the maximum is the served version's; "
            "an older version's rows are answered while it is kept)",
        ),
        v: str = Query(
            None,
            pattern=VERSION_PATTERN,
            max_length=64,  # optional, never null
            description="the index version of the result (its answer's index_version); "
            "without it, the version served now. A version no longer kept "
            "answers 404: search again",
        ),
    ) -> Any:
        """The downscaled gallery image of a search result (its `thumbnail_url`) in the version that answered."""
        loop = asyncio.get_running_loop()
        path = await loop.run_in_executor(search_api.worker.pool, search_api.thumbnail_path, index, v)
        return FileResponse(path, media_type="image/jpeg")

    if settings.metrics and search_api.metrics is not None:
        metrics = search_api.metrics
        text = {
            "description": "Prometheus metrics in the text exposition format 0.0.4 (app.metrics).",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }

        @api.get(
            METRICS_PATH,
            response_class=Response,
            responses={200: text, **declare(METRICS_PATH)},
            operation_id="metrics",
        )
        async def metrics_route() -> Any:
            """Prometheus metrics (text format); behind the token when one is set, unless made public."""
            return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Any:
        if is_api_path(request.url.path):
            status = exc.status_code if exc.status_code in API_ERRORS else 400
            return error_response(status, API_ERRORS[status].code, str(exc.detail))
        from fastapi.exception_handlers import http_exception_handler

        return await http_exception_handler(request, exc)

    api.openapi = OpenApiDocument(api, search_api)  # type: ignore[method-assign]
    return api


class OpenApiDocument:
    """FastAPI's document plus what depends on the served index version: the search request bodies, the
    thumbnails' index range, and the Bearer scheme when a token is set. Rebuilt when the version changes
    (app.live_index swaps it in while the server runs)."""

    def __init__(self, api: FastAPI, search_api: SearchApi) -> None:
        self.api, self.search_api = api, search_api
        self._cached: tuple[str, dict[str, Any]] | None = None  # (version id, its document)

    def __call__(self) -> dict[str, Any]:
        from fastapi.openapi.utils import get_openapi

        served = self.search_api.live.current  # read once: the whole document describes one version
        if self._cached is not None and self._cached[0] == served.version.id:
            return self._cached[1]
        contract = self.search_api.contract(served)
        n_items = len(served.searcher.gallery_paths)
        api, settings = self.api, self.search_api.settings
        document = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        document["info"]["x-index-version"] = served.version.id
        components = document.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        schemas["SearchQuery"] = contract.json_schema()
        schemas["SearchForm"] = contract.form_schema()
        for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422; ours is 400 ErrorBody
            schemas.pop(name, None)
        for path, operations in document.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if "HTTPValidationError" in str(responses.get("422", "")):
                    responses.pop("422")
                for parameter in operation.get("parameters", []):
                    if path == THUMBNAIL_ROUTE and parameter.get("name") == "index":
                        parameter["schema"]["maximum"] = max(0, n_items - 1)
                if settings.token is not None and settings.is_open(path):
                    operation["security"] = []
        search = document["paths"][f"{API_PREFIX}/search"]["post"]
        search["responses"]["200"]["links"] = {
            "thumbnail": {
                "operationId": "thumbnail",
                "parameters": {
                    "index": "$response.body#/results/0/gallery_index",
                    "v": "$response.body#/index_version",
                },
                "description": "the thumbnail of the first result, in the index version that answered",
            }
        }
        if settings.token is not None:
            components["securitySchemes"] = {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the server's --api-token (browsers: a session from /login)",
                }
            }
            document["security"] = [{"bearer": []}]
        self._cached = (served.version.id, document)
        return document


def iter_routes(routes: list[Any], prefix: str = "") -> Any:
    """(full path template, methods) of every HTTP route, through mounts and included routers."""
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI's include_router() entry
        if included is not None:
            yield from iter_routes(included.routes, prefix + route.include_context.prefix)
        elif getattr(route, "methods", None):
            yield prefix + route.path, set(route.methods)
        elif getattr(route, "routes", None) is not None and hasattr(route, "path"):  # a Mount
            yield from iter_routes(route.routes, prefix + route.path)


class RouteTable:
    """The API's routes as (path regex, methods), to tell an unknown path (404) from an unknown method (405)."""

    def __init__(self, router: Any) -> None:
        self.router = router
        self._table: list[tuple[Any, set[str]]] = []
        self._size = -1

    def allowed_methods(self, path: str) -> set[str] | None:
        """The methods of the API routes matching `path`; None when none does."""
        from starlette.routing import compile_path

        if len(self.router.routes) != self._size:  # routes are added before the server starts
            self._table = [
                (compile_path(template)[0], methods)
                for template, methods in iter_routes(self.router.routes)
                if is_api_path(template)
            ]
            self._size = len(self.router.routes)
        found = [methods for regex, methods in self._table if regex.match(path)]
        return set().union(*found) if found else None


class ApiGuard:
    """ASGI middleware for the API's paths (/api/v1 and /metrics) only: an unknown path answers 404 and an
    unknown method 405 with `Allow` (before the UI mounted at / would answer either), the request size is
    checked before a body is read, and any unexpected failure is answered as a bare JSON 500 (never a
    traceback). Other paths (the UI, its event streams) pass straight through. The token is checked
    before this, for every path, by app.access.AccessGate."""

    def __init__(self, app: Any, settings: ApiSettings, router: Any = None) -> None:
        self.app, self.settings = app, settings
        self.routes = RouteTable(router) if router is not None else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope.get("type") != "http" or not is_api_path(path):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            self._check_route(path, scope.get("method", "GET"))
            length = headers.get("content-length", "")
            limit = self.settings.limits.max_base64_chars + MULTIPART_OVERHEAD  # base64 JSON is 4/3 larger
            if length.isdigit() and int(length) > limit:
                raise ApiError(
                    413,
                    "too_large",
                    f"the request is {int(length) / 2**20:.1f} MB, over the "
                    f"{self.settings.max_upload_bytes / 2**20:.0f} MB upload limit",
                )
        except ApiError as exc:
            await error_response(exc.status, exc.code, exc.message, exc.headers)(scope, receive, send)
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

    def _check_route(self, path: str, method: str) -> None:
        if self.routes is None:
            return
        methods = self.routes.allowed_methods(path)
        if methods is None:
            where = "see /docs" if path != METRICS_PATH else "metrics are switched off (--no-metrics)"
            raise ApiError(404, "not_found", f"no API route {path}; {where}")
        if method not in methods:
            allow = ", ".join(sorted(methods))
            raise ApiError(405, "method_not_allowed", f"{path} answers {allow}, not {method}", {"Allow": allow})
