"""BodyLimit: request bodies over ``service.max_body_mb`` are refused (413) while they arrive.

Two checks, so the server never holds more than the limit of one body: a declared
``Content-Length`` over the limit is answered at once, before any of the body is read; a
body without one (chunked) is counted as the application reads it, and the read that goes
over raises :class:`BodyTooLarge`, which the app answers with 413. uvicorn itself holds
at most its flow-control high-water mark (64 KiB) of a body the app has not read.

A run's streamed stdin (``POST /v1/runs/{id}/stdin``) is exempt: it is a stream of any
length, read only as fast as the command takes it (see :mod:`stdin`), never held whole.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandbox_core.errors import BodyTooLarge


class BodyLimit:
    """ASGI middleware refusing HTTP request bodies larger than ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_stdin_stream(scope):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await too_large_response(self.error(f"a body of {declared} bytes"))(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def error(self, what: str) -> BodyTooLarge:
        mib = self.max_bytes / (1024 * 1024)
        return BodyTooLarge(
            f"{what} is over the limit of {self.max_bytes} bytes (service.max_body_mb = {mib:g})",
            data={"setting": "service.max_body_mb", "limit": self.max_bytes},
        )

    def _counting(self, receive: Receive) -> Receive:
        """``receive``, raising BodyTooLarge once the body read so far is over the limit."""
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self.error("the request body")
            return message

        return counted


def _is_stdin_stream(scope: Scope) -> bool:
    """A run's streamed stdin, or a tar upload (bounded by ``limits.transfer_mb`` instead)."""
    path = str(scope.get("path", ""))
    if scope.get("method") == "PUT" and path == "/v1/files":
        return True
    return scope.get("method") == "POST" and path.startswith("/v1/runs/") and path.endswith("/stdin")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


def too_large_response(exc: BodyTooLarge) -> Response:
    """The 413 answer to ``exc``: a JSON error naming the limit; the connection is closed."""
    body = {"error": exc.message, "setting": exc.setting, "limit": exc.limit}
    return JSONResponse(body, status_code=413, headers={"Connection": "close"})


async def body_too_large(request: Request, exc: Exception) -> Response:
    """Starlette exception handler for a body that went over the limit while being read."""
    assert isinstance(exc, BodyTooLarge)
    return too_large_response(exc)
