"""A size limit on the bodies of the web UI's event requests, enforced before Gradio reads them.

The UI's events carry references to files uploaded through Gradio's upload route (which has its own
limit, `max_file_size`), never the files themselves. A client of Gradio's HTTP API can nevertheless put
a whole image in an event as a base64 data URL; Gradio then keeps that payload in memory after the
event has been answered (measured: +35 MiB of server RSS per 33 MB paste, without bound), although the
app refuses the image. Event bodies above `max_bytes` are answered 413 here, unread. The JSON API
(/api/v1) has its own limits (app.api.ApiGuard).
"""

from __future__ import annotations

import json
from typing import Any

EVENT_MAX_BYTES = 256 * 1024  # event JSON is a few hundred bytes; images go through the upload route
EVENT_ROUTES = ("/gradio_api/queue/join", "/gradio_api/call/", "/gradio_api/run/", "/gradio_api/api/")


class EventBodyLimit:
    """ASGI middleware: POSTs to Gradio's event routes larger than `max_bytes` get 413 before any is read."""

    def __init__(self, app: Any, max_bytes: int = EVENT_MAX_BYTES) -> None:
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope.get("type") != "http" or scope.get("method") != "POST" or not any(r in path for r in EVENT_ROUTES):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0

        async def counting_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # a body without Content-Length that turns out too large
                raise _TooLarge()
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(
            {
                "error": "too_large",
                "message": f"event requests are limited to {self.max_bytes:,} "
                "bytes; upload images through the upload route (or POST them to /api/v1/search)",
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})


class _TooLarge(Exception):
    pass
