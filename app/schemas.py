"""The JSON API's answers as pydantic models: FastAPI validates each answer against its model and
`/openapi.json` documents their fields. Declared here, in one place; a new answer gets its model here.

A search result is the search hit record (retrieval.search.hits.Hit, fields and descriptions read
from it) plus the URL of its thumbnail, so the API, `retrieval search --json` and the UI cannot drift.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, Field, create_model

from retrieval.search.hits import Hit


class ErrorBody(BaseModel):
    """Every error answer: a stable code (e.g. too_large) and a one-line message for a human.

    One model for every error status (app.api_errors declares it on each route); a field added here
    (optional, so older answers stay valid) appears in every error answer and in the document."""

    error: str = Field(
        pattern=r"^[a-z_]+$",
        description="stable error code: bad_request, unauthorized, not_found, method_not_allowed, "
        "too_large, not_an_image, undecodable_image, queue_full, not_ready, internal",
    )
    message: str = Field(description="what went wrong and what to do, one line")
    request_id: str | None = Field(
        None,
        description="this request's id (also the X-Request-ID header): quote "
        "it to the operator, it is in the server's access log",
    )


class Health(BaseModel):
    """Liveness: the process answers."""

    status: Literal["ok"]


def _hit_model() -> type[BaseModel]:
    """SearchHit: the fields of the hit record, with their types and descriptions, plus thumbnail_url."""
    hints = get_type_hints(Hit)
    hit_fields: dict[str, Any] = {
        f.name: (hints[f.name], Field(description=f.metadata.get("description"))) for f in dataclasses.fields(Hit)
    }
    hit_fields["thumbnail_url"] = (str, Field(description="the downscaled gallery image (JPEG) of this result"))
    return create_model(
        "SearchHit", __doc__="One search result: the search hit record and its thumbnail.", **hit_fields
    )


SearchHit = _hit_model()


class Timings(BaseModel):
    """Milliseconds spent on this request."""

    decode: float = Field(description="decoding the upload")
    embed: float = Field(description="the embedding forward pass (shared with the batch)")
    search: float = Field(description="the index search (shared with the batch)")
    total: float = Field(description="the whole request on the server")


class SearchResponse(BaseModel):
    """Ranked gallery items for one query photo."""

    results: list[SearchHit] = Field(description="best first")  # type: ignore[valid-type]
    k: int = Field(description="results asked for")
    filter: dict[str, list[str]] | None = Field(description="attribute -> accepted values; null = none")
    filter_text: str = Field(description="the filter as `key=value` terms; empty = none")
    rerank: str = Field(description="the re-ranking applied (none, qe, dba, kreciprocal)")
    batch_size: int = Field(description="queries embedded in the same forward pass")
    timings_ms: Timings
    fingerprint: str = Field(description="the embedder's fingerprint (the one the index was built with)")
    index_version: str = Field(
        description="the index version that answered (the whole batch searched it; see /api/v1/info)"
    )


class Ready(BaseModel):
    """Readiness: the embedder and index are loaded, a warm-up batch has run, and the served index is the
    folder's current version. Not ready answers 503 with error `not_ready` and the reason."""

    status: Literal["ready"]
    index_version: str = Field(description="the index version being served")


class ReloadResponse(BaseModel):
    """What a reload did. `refused`: the folder's new version failed verification (`message` says why) and
    the previous version keeps serving."""

    outcome: Literal["reloaded", "unchanged", "refused"]
    index_version: str = Field(description="the version served after this reload")
    previous_version: str = Field(description="the version served before it")
    message: str = Field(description="what happened, one line")
    seconds: float = Field(description="how long verifying, loading and warming up took")


class IndexVersionInfo(BaseModel):
    """The served index version."""

    id: str = Field(description="publish time and a short hash of the folder's file checksums")
    built_at: str = Field(description="when the index was built")
    updated_at: str | None = Field(description="the last --add or --remove; null = never")
    published_at: str = Field(description="when this copy of the folder was written")
    n_items: int = Field(description="gallery items in this version")


class Reloading(BaseModel):
    """How the server follows its index folder."""

    watching: bool = Field(description="the folder is watched and reloaded when republished (--watch)")
    last_outcome: Literal["reloaded", "unchanged", "refused"] | None = Field(
        description="the last reload's outcome; null = none since start"
    )
    last_message: str | None = Field(description="the last reload's message")
    stale: bool = Field(description="the folder holds a newer version that was refused; the served one is older")


class Batching(BaseModel):
    """The server's batching worker."""

    max_batch: int
    max_wait_ms: float
    queue_size: int


class InfoResponse(BaseModel):
    """What this server searches and how."""

    dataset: str
    index_type: str
    index_factory: str = Field(description="the FAISS index factory string")
    n_items: int = Field(description="gallery items in the index")
    embedding_size: int
    backend: str = Field(description="the embedding runtime (torch, onnxruntime)")
    device: str = Field(description="where embedding runs")
    search_device: str | None = Field(description="where the index search runs")
    fingerprint: str = Field(description="the embedder's fingerprint")
    built_at: str
    updated_at: str | None = Field(description="the last --add or --remove; null = never")
    filters: dict[str, list[str]] = Field(description="filterable attribute -> its values")
    rerank: list[str] = Field(description="re-ranking methods this index offers")
    max_k: int
    max_upload_bytes: int
    batching: Batching
    index_version: str = Field(description="the index version served now")
    version: IndexVersionInfo
    reloading: Reloading
