"""One access-log line per request, as text (`key=value`) or JSON, on the `retrieval.access` logger.

Written: request id, method, route, path, status, milliseconds, and for searches the batch size, k,
filter, re-ranking and index version. Never written: headers (tokens), query strings, bodies (image
bytes). Values are quoted or escaped so one request is always one line. `retrieval serve` sends the
logger to stderr (`--log-format text|json`); a library user attaches a handler of their own.
"""

from __future__ import annotations

import json
import logging
from typing import Literal

from app.request_ids import RequestRecord

LOGGER = "retrieval.access"
LOG_FORMATS = ("text", "json")
LogFormat = Literal["text", "json"]
MAX_VALUE_CHARS = 200  # a long filter or path is cut, so a line stays readable
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./:{}=|,+@")


class AccessLog:
    """Formats and emits the access-log line of each finished request."""

    def __init__(self, log_format: str = "text", logger: logging.Logger | None = None) -> None:
        if log_format not in LOG_FORMATS:
            raise ValueError(f"log format {log_format!r}: choose one of {', '.join(LOG_FORMATS)}")
        self.format = log_format
        self.logger = logger or logging.getLogger(LOGGER)

    def entry(self, record: RequestRecord) -> dict[str, object]:
        """The fields of one line, in a fixed order."""
        entry: dict[str, object] = {
            "id": record.id,
            "method": record.method,
            "route": record.route,
            "path": _cut(record.path),
            "status": record.status,
            "ms": round(record.ms, 2),
        }
        for key in ("batch", "k", "filter", "rerank", "index_version"):
            if key in record.fields:
                value = record.fields[key]
                entry[key] = _cut(value) if isinstance(value, str) else value
        return entry

    def line(self, record: RequestRecord) -> str:
        entry = self.entry(record)
        if self.format == "json":
            return json.dumps(entry, separators=(",", ":"), ensure_ascii=True)
        return " ".join(f"{key}={_text_value(value)}" for key, value in entry.items())

    def write(self, record: RequestRecord) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info(self.line(record))


def _cut(value: object) -> str:
    text = str(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "..."


def _text_value(value: object) -> str:
    """Plain values as they are; anything with spaces, quotes or control characters as a JSON string."""
    text = str(value)
    if text and all(c in _PLAIN for c in text):
        return text
    return json.dumps(text, ensure_ascii=True)
