"""The JSON search API, served by the same FastAPI application (one port, one model, one index) as the UI.

    POST /api/v1/search      multipart (form field `image`, plus `k`, `filter`, `rerank`) or JSON
                             {"image": "<base64 or data: URL>", "k": 10, "filter": {"category": "Dresses"},
                             "rerank": "qe"} -> ranked results, timings and the embedder fingerprint
    GET  /api/v1/health      cheap liveness (never needs a token: load balancers call it)
    GET  /api/v1/info        index type and size, embedding size, backend and device, fingerprint, build date,
                             filterable attributes, re-ranking methods available
    GET  /api/v1/thumbnails/{index}.jpg   the downscaled gallery image of result `index` (originals are never served)
    GET  /docs, /openapi.json         FastAPI's schema

The OpenAPI document is exact: response models (app.schemas), every error status of every route with
its schema (app.api_errors), the thumbnails as image/jpeg, and the request bodies with the served
index's bounds (app.search_request: k up to the maximum, the filterable attributes, the re-ranking
methods it offers); the server refuses what the document calls invalid. It is rebuilt when the
served index changes. An unknown method on an API path answers 405 with `Allow`.

Errors are JSON {"error": code, "message": text} with a stable code and status (app.api_errors):
400 bad_request, 401 unauthorized, 404 not_found, 405 method_not_allowed, 413 too_large,
415 not_an_image, 422 undecodable_image, 503 queue_full, 500 internal (never a traceback). The
server never fetches a URL on a client's behalf. Images are taken in by the query intake the UI and
`retrieval search` use too (retrieval.query_intake: one set of limits, one size rule, the same
refusals); sizes are checked on the encoded bytes (request length, then the file or the base64
text) before anything is decoded. The token (when set) is checked for every path of the server by
app.access.AccessGate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Path as PathParam, Request

from app.access import token_from_env  # noqa: F401  (re-exported: app.serve and older callers import it here)
from app.api_errors import API_ERRORS, ApiError, ErrorDeclarations, error_response
from app.batching import BatchingWorker, QueueFull
from app.schemas import Health, InfoResponse, SearchResponse
from app.search_request import MAX_FILTER_FIELDS, SearchContract, SearchParams, contract_for
from retrieval.query_intake import QueryIntake, QueryLimits, QueryRejected
from retrieval.search.filters import FilterError, format_where, parse_where
from retrieval.search.rerank import RerankError

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
DEFAULT_K, MAX_K = 10, 100
MULTIPART_OVERHEAD = 64 * 1024  # form boundaries and fields on top of the image itself
UPLOAD = "the upload"  # how messages name a multipart upload; a JSON body's image is "`image`"
THUMBNAIL_ROUTE = f"{API_PREFIX}/thumbnails/{{index}}.jpg"


@dataclass(frozen=True)
class ApiSettings:
    limits: QueryLimits = field(default_factory=QueryLimits)  # query images: the UI's limits too
    max_k: int = MAX_K
    token: str | None = None  # when set, app.access.AccessGate requires it everywhere but /health

    @property
    def max_upload_bytes(self) -> int:
        return self.limits.max_bytes


def thumbnail_url(gallery_index: int) -> str:
    """The API path of a gallery item's thumbnail (relative to the server's root)."""
    return f"{API_PREFIX}/thumbnails/{int(gallery_index)}.jpg"


# --- the application ----------------------------------------------------------------------------------


class SearchApi:
    """Routes of the API over one Searcher, its BatchingWorker and the thumbnail store."""

    def __init__(self, searcher: Any, worker: BatchingWorker, thumbnails: Any, settings: ApiSettings) -> None:
        self.searcher, self.worker, self.thumbnails, self.settings = searcher, worker, thumbnails, settings
        self.intake = QueryIntake(settings.limits)
        self._contract: tuple[Any, SearchContract] | None = None

    @property
    def max_k(self) -> int:
        return self.contract().max_k

    def contract(self) -> SearchContract:
        """What a search request may ask of the index served now (rebuilt when the searcher changes)."""
        cached = self._contract
        if cached is None or cached[0] is not self.searcher:
            searcher = self.searcher
            cached = (searcher, contract_for(searcher, self.settings.max_k, self.rerank_methods(),
                                             self.settings.max_upload_bytes))
            self._contract = cached
        return cached[1]

    def rerank_methods(self) -> list[str]:
        methods = ["none", "qe", "kreciprocal"]
        if self.searcher.index.neighbours is not None:
            methods.insert(2, "dba")
        return methods

    def info(self) -> dict[str, Any]:
        meta, backend = self.searcher.index.meta, self.searcher.backend
        return {
            "dataset": meta.dataset,
            "index_type": meta.index_type,
            "index_factory": meta.index_factory,
            "n_items": len(self.searcher.gallery_paths),
            "embedding_size": meta.embedding_size,
            "backend": backend.name,
            "device": backend.device,
            "search_device": self.searcher.devices.get("index"),
            "fingerprint": backend.fingerprint,
            "built_at": meta.created_at,
            "updated_at": meta.updated_at,
            "filters": self.searcher.attribute_values,
            "rerank": self.rerank_methods(),
            "max_k": self.max_k,
            "max_upload_bytes": self.settings.max_upload_bytes,
            "batching": {"max_batch": self.worker.max_batch, "max_wait_ms": self.worker.max_wait * 1000,
                         "queue_size": self.worker.queue_size},
        }

    def image_from_text(self, text: str) -> bytes:
        """A JSON body's `image` -> bytes: URLs refused, size checked (413) before decoding, then the
        document's pattern (what the intake tolerates beyond it, e.g. whitespace, is refused too)."""
        data = self.intake.base64_bytes(text, subject="`image`")
        if not self.contract().image_text_ok(text):
            raise ApiError(400, "bad_request", "`image` is not valid base64 image data: send the file's bytes in "
                                               "base64 (no whitespace), bare or as data:<type>/<subtype>;base64,...")
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
        return {
            "results": [self._hit(h) for h in result.hits],
            "k": params.k,
            "filter": {key: sorted(v) for key, v in where.items()} if where else None,
            "filter_text": format_where(where) if where else "",
            "rerank": params.rerank,
            "batch_size": result.batch_size,
            "timings_ms": {"decode": round(prepared.decode_seconds * 1e3, 3),
                           "embed": round(result.embed_seconds * 1e3, 3),
                           "search": round(result.search_seconds * 1e3, 3),
                           "total": round((time.perf_counter() - t0) * 1e3, 3)},
            "fingerprint": self.searcher.backend.fingerprint,
        }

    def _prepare(self, data: bytes, subject: str) -> Any:
        t0 = time.perf_counter()
        image = self.intake.decode(data, subject)
        return self.worker.prepare(image, time.perf_counter() - t0)

    def _hit(self, hit: Any) -> dict[str, Any]:
        """The search hit record (retrieval.search.hits.Hit) plus its thumbnail's URL."""
        return {**hit.to_json(), "thumbnail_url": thumbnail_url(hit.gallery_index)}


def build_api(search_api: SearchApi) -> FastAPI:
    """The FastAPI application with the API routes (the UI is mounted on it by app.serve)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = search_api.settings
    errors = ErrorDeclarations(auth=settings.token is not None)
    api = FastAPI(title="metrix-retrieval search API", version="1",
                  description="Search a gallery index by photo. Errors: {\"error\": code, \"message\": text}; "
                              "with a token set, send `Authorization: Bearer <token>`.")

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

    @api.get(f"{API_PREFIX}/health", response_model=Health, responses=errors.declare(public=True),
             operation_id="health")
    async def health() -> dict[str, Any]:
        """Liveness: the process answers (no token needed)."""
        return {"status": "ok"}

    @api.get(f"{API_PREFIX}/info", response_model=InfoResponse, responses=errors.declare(), operation_id="info")
    async def info() -> dict[str, Any]:
        """What this server searches and how: its bounds for a search request too."""
        return search_api.info()

    @api.post(f"{API_PREFIX}/search", response_model=SearchResponse,
              responses=errors.declare(400, 413, 415, 422, 503), operation_id="search",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/SearchQuery"}},
                  "multipart/form-data": {"schema": {"$ref": "#/components/schemas/SearchForm"}}}}})
    async def search(request: Request) -> dict[str, Any]:
        """Search by photo: results (rank, item id, label, relative path, score, thumbnail URL) and timings."""
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

    jpeg = {"description": "The thumbnail: a JPEG, longest side at most 384 px.",
            "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}

    @api.get(THUMBNAIL_ROUTE, response_class=FileResponse, responses={200: jpeg, **errors.declare(400, 404)},
             operation_id="thumbnail")
    async def thumbnail(index: int = PathParam(ge=0, description="a result's gallery_index")) -> Any:
        """The downscaled gallery image of a search result (its `thumbnail_url`)."""
        if index >= len(search_api.searcher.gallery_paths):
            raise ApiError(404, "not_found", f"no thumbnail {index}.jpg; use a result's thumbnail_url")
        loop = asyncio.get_running_loop()
        path = await loop.run_in_executor(search_api.worker.pool, search_api.thumbnails.path_for, index)
        return FileResponse(path, media_type="image/jpeg")

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Any:
        if request.url.path.startswith(API_PREFIX):
            status = exc.status_code if exc.status_code in API_ERRORS else 400
            return error_response(status, API_ERRORS[status].code, str(exc.detail))
        from fastapi.exception_handlers import http_exception_handler

        return await http_exception_handler(request, exc)

    api.openapi = OpenApiDocument(api, search_api)  # type: ignore[method-assign]
    return api


class OpenApiDocument:
    """FastAPI's document plus what depends on the served index: the search request bodies, the
    thumbnails' index range, and the Bearer scheme when a token is set. Rebuilt when the contract changes."""

    def __init__(self, api: FastAPI, search_api: SearchApi) -> None:
        self.api, self.search_api = api, search_api
        self._cached: tuple[Any, dict[str, Any]] | None = None

    def __call__(self) -> dict[str, Any]:
        from fastapi.openapi.utils import get_openapi

        contract = self.search_api.contract()
        n_items = len(self.search_api.searcher.gallery_paths)
        key = (contract, n_items)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        api = self.api
        document = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
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
        search = document["paths"][f"{API_PREFIX}/search"]["post"]
        search["responses"]["200"]["links"] = {"thumbnail": {
            "operationId": "thumbnail", "parameters": {"index": "$response.body#/results/0/gallery_index"},
            "description": "the thumbnail of the first result"}}
        if self.search_api.settings.token is not None:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer", "description":
                                                        "the server's --api-token (browsers: a session from /login)"}}
            document["security"] = [{"bearer": []}]
            document["paths"][f"{API_PREFIX}/health"]["get"]["security"] = []
        self._cached = (key, document)
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
            self._table = [(compile_path(template)[0], methods) for template, methods in iter_routes(self.router.routes)
                           if template.startswith(API_PREFIX)]
            self._size = len(self.router.routes)
        found = [methods for regex, methods in self._table if regex.match(path)]
        return set().union(*found) if found else None


class ApiGuard:
    """ASGI middleware for /api/v1 only: an unknown path answers 404 and an unknown method 405 with `Allow`
    (before the UI mounted at / would answer either), the request size is checked before a body is read,
    and any unexpected failure is answered as a bare JSON 500 (never a traceback). Other paths (the UI, its
    event streams) pass straight through. The token is checked before this, for every path, by
    app.access.AccessGate."""

    def __init__(self, app: Any, settings: ApiSettings, router: Any = None) -> None:
        self.app, self.settings = app, settings
        self.routes = RouteTable(router) if router is not None else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope.get("type") != "http" or not (path == API_PREFIX or path.startswith(API_PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            self._check_route(path, scope.get("method", "GET"))
            length = headers.get("content-length", "")
            limit = self.settings.limits.max_base64_chars + MULTIPART_OVERHEAD  # base64 JSON is 4/3 larger
            if length.isdigit() and int(length) > limit:
                raise ApiError(413, "too_large", f"the request is {int(length) / 2**20:.1f} MB, over the "
                                                 f"{self.settings.max_upload_bytes / 2**20:.0f} MB upload limit")
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
            raise ApiError(404, "not_found", f"no API route {path}; see /docs")
        if method not in methods:
            allow = ", ".join(sorted(methods))
            raise ApiError(405, "method_not_allowed", f"{path} answers {allow}, not {method}", {"Allow": allow})
