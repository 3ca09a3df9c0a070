"""Pure ASGI middleware (not BaseHTTPMiddleware, which hides client disconnects from the routes).

From the outside in: `ErrorCountMiddleware` (every 4xx/5xx into
``minisys:request_errors_total{code}``), `ApiKeyMiddleware` (401 before the
body is read), `BodyLimitMiddleware` (413 before the body is parsed).
"""
from __future__ import annotations

import asyncio
import hmac
from typing import Any, Awaitable, Callable

from fastapi.responses import JSONResponse

from .errors import error_body

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


PROTECTED = ("/v1", "/tokenize", "/detokenize", "/version", "/minisys")     # behind the key (and /metrics unless open)


class ApiKeyMiddleware:
    """401 on the protected paths (`PROTECTED`, and ``/metrics`` unless left open) without ``Bearer KEY``."""

    def __init__(self, app, api_key: str, protect_metrics: bool = True) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()
        self.prefixes = PROTECTED + (("/metrics",) if protect_metrics else ())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefixes):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(auth, self.expected):
                body = error_body("missing or wrong API key: send 'Authorization: Bearer <key>'",
                                  code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(error_body(f"the request body is over the limit of {limit} bytes (--max-body-bytes)",
                                   code="max_body_bytes"), status_code=413)


def _too_slow(timeout_s: float) -> JSONResponse:
    """408, and ``connection: close`` (uvicorn then closes the connection: the rest of the body never comes)."""
    return JSONResponse(error_body(f"the request body did not arrive within {timeout_s:g} s (--timeout-body-s)",
                                   code="timeout_body"), status_code=408, headers={"connection": "close"})


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``, before the app reads (let alone parses) any of it; 408 for a body
    that is not all there within ``timeout_s`` (a client stalled mid-body: `timeouts`).

    A ``Content-Length`` over the limit is refused at once, unread; otherwise
    the body is read here while counting (chunked bodies have no length) and
    handed to the app whole. Invariant: the app never sees more than
    ``max_bytes`` of body, nor waits more than ``timeout_s`` for it; messages
    after the body (a disconnect) pass through.
    """

    def __init__(self, app, max_bytes: int, timeout_s: float = 60.0) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _too_large(self.max_bytes)(scope, receive, send)
            return
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                await _too_slow(self.timeout_s)(scope, receive, send)
                return
            if message["type"] != "http.request":          # the client left while sending
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _too_large(self.max_bytes)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ErrorCountMiddleware:
    """Counts every response with status >= 400 by status (``count(code: str)``); an exception that
    escapes the app (Starlette's outermost handler turns it into a 500) counts as ``"500"``."""

    def __init__(self, app, count: Callable[[str], None]) -> None:
        self.app, self.count = app, count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def counting_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400:
                    self.count(str(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:
                self.count("500")
            raise
