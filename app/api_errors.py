"""The JSON API's errors: one registry of statuses and codes, the answer built from it, and the
OpenAPI declarations routes make from it.

Every error answer is app.schemas.ErrorBody ({"error": code, "message": text, "request_id": the
request's X-Request-ID}), whichever status it has and whoever answers it (a route, app.api.ApiGuard,
or app.access.AccessGate's 401). A route declares the errors it can answer in one line:

    @api.post(..., responses=errors.declare(400, 413, 415, 422, 503))

`ErrorDeclarations.declare` adds the statuses every API route can answer (405 for an unknown
method, with its `Allow` header; 413 for a request over the size limit; 500) and, when the server
has a token, 401 (with its `WWW-Authenticate` header); `public=True` leaves 401 out (the probes
/api/v1/health and /api/v1/ready, and /metrics when it is made public).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app import request_ids
from app.schemas import ErrorBody


@dataclass(frozen=True)
class ErrorStatus:
    """One HTTP error status of the API: its stable codes (the first is the usual one) and when it is answered."""

    status: int
    codes: tuple[str, ...]
    meaning: str
    headers: tuple[tuple[str, str], ...] = ()  # (header, what it holds), declared in the OpenAPI document

    @property
    def code(self) -> str:
        return self.codes[0]


API_ERRORS: dict[int, ErrorStatus] = {
    e.status: e
    for e in (
        ErrorStatus(
            400,
            ("bad_request",),
            "The request does not follow this document: a field out of its bounds, an unknown field, a filter "
            "on an attribute the index lacks, text that is not base64, a URL instead of image bytes (URLs are "
            "never fetched).",
        ),
        ErrorStatus(
            401,
            ("unauthorized",),
            "The server has a token and the request carries neither `Authorization: Bearer <token>` nor a "
            "session opened at /login.",
            (("WWW-Authenticate", "the scheme to use: Bearer"),),
        ),
        ErrorStatus(
            404,
            ("not_found",),
            "No such resource (an unknown API path, a thumbnail of no gallery item, or of an index version "
            "no longer served).",
        ),
        ErrorStatus(
            405,
            ("method_not_allowed",),
            "The path exists but not with this method; `Allow` lists its methods.",
            (("Allow", "the methods this path answers, comma-separated"),),
        ),
        ErrorStatus(
            413,
            ("too_large",),
            "The request, the image's encoded bytes or its pixel count is over the server's limit (see "
            "max_upload_bytes in /api/v1/info).",
        ),
        ErrorStatus(
            415, ("not_an_image",), "The image is not in a format that can be read (JPEG, PNG, WebP, GIF, BMP, TIFF)."
        ),
        ErrorStatus(
            422,
            ("undecodable_image",),
            "The image cannot be decoded (corrupt or truncated) or used (zero size, an extreme aspect ratio).",
        ),
        ErrorStatus(500, ("internal",), "The server failed to answer this request (a bug); it keeps running."),
        ErrorStatus(
            503,
            ("queue_full", "not_ready"),
            "`queue_full`: the server is busy, its queue of waiting queries is full; retry shortly. "
            "`not_ready` (/api/v1/ready): warming up, or the index folder holds a newer version that was "
            "refused (the older one keeps answering).",
        ),
    )
}

ALWAYS = (405, 413, 500)  # answerable by every API route (ApiGuard: method, request size, failures)


class ApiError(Exception):
    """An expected failure with its HTTP status and stable error code (API_ERRORS)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Any:
    """The JSON error answer (app.schemas.ErrorBody) with its status, naming the request's id (app.request_ids)."""
    from fastapi.responses import JSONResponse

    body = ErrorBody(error=code, message=message, request_id=request_ids.current_id()).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass(frozen=True)
class ErrorDeclarations:
    """Builds a route's `responses=` from its error statuses (see the module docstring)."""

    auth: bool = False  # the server has a token: protected routes can answer 401

    def declare(self, *statuses: int, public: bool = False) -> dict[int | str, dict[str, Any]]:
        wanted = set(statuses) | set(ALWAYS) | ({401} if self.auth and not public else set())
        return {status: _declaration(API_ERRORS[status]) for status in sorted(wanted)}


def _declaration(error: ErrorStatus) -> dict[str, Any]:
    meaning = error.meaning if len(error.codes) > 1 else f"`{error.code}`: {error.meaning}"
    declared: dict[str, Any] = {"model": ErrorBody, "description": meaning}
    if error.headers:
        declared["headers"] = {
            name: {"description": text, "schema": {"type": "string"}} for name, text in error.headers
        }
    return declared
