"""The outermost ASGI middleware: a request id on every answer, one access-log line and one count per request.

Every HTTP answer (API, `/metrics`, the web UI and its assets) carries `X-Request-ID`: the client's, or a
generated one (app.request_ids), and the JSON API's error bodies name it too. The request is counted in
`retrieval_http_requests_total` when its status is sent, before the client can read the answer, so a
client that counts its own answers and then scrapes `/metrics` sees the same numbers.
"""

from __future__ import annotations

import time
from typing import Any

from app import request_ids
from app.access_log import AccessLog
from app.metrics import ServerMetrics

UI_ROUTE = "ui"  # every path the web UI (Gradio) answers: one label, so metrics stay bounded
HEADER_KEY = request_ids.HEADER.lower().encode("latin-1")


class RequestObserver:
    """Sets the request id, counts the answer by route template and status, writes the access-log line."""

    def __init__(
        self,
        app: Any,
        routes_of: Any,
        access_log: AccessLog | None = None,
        metrics: ServerMetrics | None = None,
        api_prefix: str = "/api/v1",
    ) -> None:
        self.app, self.routes_of = app, routes_of  # routes_of: the FastAPI app whose route templates label requests
        self.access_log, self.metrics, self.api_prefix = access_log, metrics, api_prefix

    def route_label(self, path: str) -> str:
        """The template of the API route or `/metrics` that `path` matches, else `ui`."""
        if not (path.startswith(self.api_prefix) or path == "/metrics"):
            return UI_ROUTE
        for route in getattr(self.routes_of, "routes", []):
            regex, template = getattr(route, "path_regex", None), getattr(route, "path", None)
            if regex is not None and template and getattr(route, "methods", None) and regex.match(path):
                return str(template)
        return UI_ROUTE

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == HEADER_KEY), None)
        path = str(scope.get("path", ""))
        record = request_ids.RequestRecord(
            request_ids.request_id_from(given), str(scope.get("method", "")), path, self.route_label(path)
        )
        token = request_ids.enter(record)
        started = time.perf_counter()
        counted = False

        async def observed_send(message: dict) -> None:
            nonlocal counted
            if message.get("type") == "http.response.start":
                record.status = int(message.get("status", 0))
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER_KEY]
                message = {**message, "headers": headers + [(HEADER_KEY, record.id.encode("latin-1"))]}
                if self.metrics is not None and not counted:
                    counted = True
                    self.metrics.count_request(record.route, record.method, record.status)
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except BaseException:
            record.status = record.status or 500
            raise
        finally:
            record.ms = (time.perf_counter() - started) * 1000
            if self.metrics is not None and not counted and record.status:
                self.metrics.count_request(record.route, record.method, record.status)
            if self.access_log is not None:
                self.access_log.write(record)
            request_ids.leave(token)
