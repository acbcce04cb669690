"""One key for every door: when the server has a token, every path it serves needs it.

`AccessGate` is ASGI middleware around the whole application (the JSON API, the Gradio UI and
Gradio's own HTTP API, its uploads, event streams and files). It runs before any routing, so a door
added later (a Gradio route, a new API route) is closed by default. A request passes with either

- `Authorization: Bearer <token>` (API clients, gradio_client with `headers=`), or
- the session cookie set by our login page (/login: the browser asks for the token once; the cookie
  is HttpOnly, SameSite=Strict, signed with a key derived from the token and a per-process secret,
  and expires after SESSION_SECONDS; a restart or a new token ends every session).

Open without it: the probes /api/v1/health (liveness) and /api/v1/ready (readiness), which load
balancers call and which reveal no data, /login and /logout, and the paths the caller names in
`public_paths` (a /metrics endpoint whose own setting makes it public). Refused requests get the API's
error body (app.api_errors: 401 {"error": "unauthorized", "message": ..., "request_id": ...}) with
`WWW-Authenticate: Bearer`; a browser asking for a page is sent to /login instead. This is the one
token check of the server: /metrics and POST /api/v1/admin/reload are covered here like every other
path. Tokens are compared in constant time (hmac.compare_digest).

The request-id middleware (app.request_middleware) runs outside this gate, so a refusal carries an
X-Request-ID too, is counted in the metrics and has its access-log line.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from app.api_errors import error_response

HEALTH_PATH = "/api/v1/health"
READY_PATH = "/api/v1/ready"
PROBE_PATHS = (HEALTH_PATH, READY_PATH)  # liveness and readiness: never a token (they reveal no data)
LOGIN_PATH = "/login"
LOGOUT_PATH = "/logout"
SESSION_COOKIE = "retrieval_session"
SESSION_SECONDS = 12 * 3600
LOGIN_BODY_MAX = 8 * 1024
TOKEN_ENV = "RETRIEVAL_API_TOKEN"


def token_from_env(token: str | None) -> str | None:
    """The --api-token value, else the RETRIEVAL_API_TOKEN environment variable, else None (no token)."""
    return token or os.environ.get(TOKEN_ENV) or None


@dataclass(frozen=True)
class AccessPolicy:
    """The token, the session signing key, and the paths that stay open."""

    token: str
    public_paths: frozenset[str] = frozenset()
    _secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def is_public(self, path: str) -> bool:
        return path in PROBE_PATHS or path in (LOGIN_PATH, LOGOUT_PATH) or path in self.public_paths

    def token_ok(self, given: str) -> bool:
        return hmac.compare_digest(given.encode("utf-8"), self.token.encode("utf-8"))

    def bearer_ok(self, header: str | None) -> bool:
        scheme, _, given = (header or "").partition(" ")
        ok = self.token_ok(given.strip())  # compared even for a wrong scheme: same time either way
        return scheme.lower() == "bearer" and ok

    # --- sessions ----------------------------------------------------------------------------------

    def _key(self) -> bytes:
        return hashlib.sha256(self._secret + self.token.encode("utf-8")).digest()

    def new_session(self, now: float | None = None) -> str:
        issued = str(int(time.time() if now is None else now))
        nonce = secrets.token_urlsafe(16)
        return f"{issued}.{nonce}.{self._mac(issued, nonce)}"

    def session_ok(self, value: str | None, now: float | None = None) -> bool:
        issued, _, rest = (value or "").partition(".")
        nonce, _, mac = rest.partition(".")
        if not (issued.isdigit() and nonce and mac):
            return False
        if not hmac.compare_digest(mac.encode(), self._mac(issued, nonce).encode()):
            return False
        age = (time.time() if now is None else now) - int(issued)
        return 0 <= age <= SESSION_SECONDS

    def _mac(self, issued: str, nonce: str) -> str:
        return hmac.new(self._key(), f"{issued}.{nonce}".encode(), hashlib.sha256).hexdigest()

    def allows(self, headers: dict[str, str]) -> bool:
        """Whether a request with these (lower-cased) headers carries the token or a live session."""
        if "authorization" in headers:
            return self.bearer_ok(headers["authorization"])
        return self.session_ok(_cookies(headers.get("cookie", "")).get(SESSION_COOKIE))


class AccessGate:
    """ASGI middleware enforcing an AccessPolicy on every HTTP and WebSocket request (module docstring)."""

    def __init__(self, app: Any, policy: AccessPolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope["type"] == "http" and path in (LOGIN_PATH, LOGOUT_PATH):
            await self._login_routes(scope, receive, send, path, headers)
            return
        if self.policy.is_public(path) or self.policy.allows(headers):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope.get("method") == "GET" and "text/html" in headers.get("accept", "") and not path.startswith("/api/"):
            target = path + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
            await _send(send, 303, b"", [(b"location", _root(scope, f"{LOGIN_PATH}?next={quote(target)}"))])
            return
        refusal = error_response(
            401,
            "unauthorized",
            "this server needs its token: send `Authorization: Bearer "
            "<token>` (the server's --api-token), or log in at /login",
            {"WWW-Authenticate": 'Bearer realm="retrieval"', "Cache-Control": "no-store"},
        )
        await refusal(scope, receive, send)

    async def _login_routes(self, scope: dict, receive: Any, send: Any, path: str, headers: dict[str, str]) -> None:
        method = scope.get("method")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        next_path = _safe_next((query.get("next") or ["/"])[0])
        if path == LOGOUT_PATH:
            if method not in ("GET", "POST"):
                await _send(send, 405, b"", [(b"allow", b"GET, POST")])
                return
            await _send(
                send,
                303,
                b"",
                [(b"location", _root(scope, LOGIN_PATH)), (b"set-cookie", self._cookie(scope, headers, "", 0))],
            )
            return
        if method == "GET":
            await _send_page(send, 200, next_path, "")
            return
        if method != "POST":
            await _send(send, 405, b"", [(b"allow", b"GET, POST")])
            return
        form = await _read_form(receive, headers)
        if form is None:
            await _send_page(send, 413, next_path, "That request was too large.")
            return
        next_path = _safe_next((form.get("next") or [next_path])[0])
        if not self.policy.token_ok((form.get("token") or [""])[0]):
            await _send_page(send, 401, next_path, "That is not the token this server was started with.")
            return
        cookie = self._cookie(scope, headers, self.policy.new_session(), SESSION_SECONDS)
        await _send(send, 303, b"", [(b"location", _root(scope, next_path)), (b"set-cookie", cookie)])

    @staticmethod
    def _cookie(scope: dict, headers: dict[str, str], value: str, max_age: int) -> bytes:
        secure = scope.get("scheme") == "https" or headers.get("x-forwarded-proto", "").startswith("https")
        path = scope.get("root_path", "") or "/"
        return (
            f"{SESSION_COOKIE}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict"
            + ("; Secure" if secure else "")
        ).encode("latin-1")


# --- helpers -------------------------------------------------------------------------------------------


def _cookies(header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            out.setdefault(name, value)
    return out


def _safe_next(target: str) -> str:
    """A same-site path to return to after login (never another host)."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    return target


def _root(scope: dict, path: str) -> bytes:
    return (scope.get("root_path", "") + path).encode("latin-1")


async def _read_form(receive: Any, headers: dict[str, str]) -> dict[str, list[str]] | None:
    """The url-encoded login form, or None when it is over LOGIN_BODY_MAX."""
    length = headers.get("content-length", "")
    if length.isdigit() and int(length) > LOGIN_BODY_MAX:
        return None
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > LOGIN_BODY_MAX:
            return None
        if not message.get("more_body"):
            break
    return parse_qs(body.decode("utf-8", "replace"))


async def _send(send: Any, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]]) -> None:
    all_headers = [(b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store"), *headers]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def _send_page(send: Any, status: int, next_path: str, problem: str) -> None:
    note = f'<p class="problem">{html.escape(problem)}</p>' if problem else ""
    page = LOGIN_PAGE.format(next=html.escape(next_path, quote=True), note=note).encode("utf-8")
    await _send(
        send,
        status,
        page,
        [
            (b"content-type", b"text/html; charset=utf-8"),
            (b"x-frame-options", b"DENY"),
            (
                b"content-security-policy",
                b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
            ),
        ],
    )


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>metrix-retrieval search: log in</title>
<style>
body {{ font-family: system-ui, sans-serif; display: flex; justify-content: center; margin-top: 12vh; }}
form {{ display: flex; flex-direction: column; gap: .6rem; width: 20rem; }}
input, button {{ font-size: 1rem; padding: .5rem; }}
.problem {{ color: #b00020; }}
</style></head>
<body><form method="post" action="login">
<h1>Search by photo</h1>
<label for="token">This server needs its access token (the one it was started with, <code>--api-token</code>).</label>
{note}
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<input type="hidden" name="next" value="{next}">
<button id="login-button" type="submit">Log in</button>
</form></body></html>
"""
