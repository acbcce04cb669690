"""Request ids, and what one request did, for the access log, metrics and error bodies.

A client's `X-Request-ID` is kept when it is a plausible id (1-64 characters of letters, digits and
`-_.:`); anything else (too long, spaces, control characters, non-ASCII) is replaced by a generated
one, so a log line can never be forged or flooded through the header. The id of the request being
answered is in a context variable: the JSON error bodies (app.api_errors.error_response) name it.
"""

from __future__ import annotations

import contextvars
import re
import uuid
from dataclasses import dataclass, field

HEADER = "X-Request-ID"
MAX_LENGTH = 64
_VALID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:-]{{0,{MAX_LENGTH - 1}}}")


def request_id_from(header: str | None) -> str:
    """The client's id when it is acceptable, else a new one (32 hex digits)."""
    if header is not None and _VALID.fullmatch(header):
        return header
    return uuid.uuid4().hex


@dataclass
class RequestRecord:
    """One request as the access log writes it; routes fill in what they know (a search: k, filter, ...)."""

    id: str
    method: str
    path: str
    route: str = ""
    status: int = 0
    ms: float = 0.0
    fields: dict[str, object] = field(default_factory=dict)  # batch, k, filter, rerank, index_version

    def note(self, **values: object) -> None:
        self.fields.update({k: v for k, v in values.items() if v is not None})


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("request_record", default=None)


def current() -> RequestRecord | None:
    """The request being answered on this task (None outside a request)."""
    return _current.get()


def current_id() -> str | None:
    record = _current.get()
    return record.id if record is not None else None


def enter(record: RequestRecord) -> contextvars.Token:
    return _current.set(record)


def leave(token: contextvars.Token) -> None:
    _current.reset(token)
