"""An httpx2 transport that carries the SDK's HTTP requests over the worker's JSON-RPC channel.

Inside the sandbox there is no network and no API key. The ``anthropic`` client is given
this transport, a placeholder key and the placeholder base URL; each request becomes one
``gateway.request`` call to the host, whose gateway checks it, adds the real credentials,
performs it and streams the answer back as chunks:

    {"kind": "start", "status": 200, "headers": [[name, value], ...]}    first, once
    {"kind": "body", "data_b64": "..."}                                  zero or more
    (end of the call)                                                    end of body

The response body is a stream: the SDK's server-sent-event parser sees each chunk as soon
as the host sends it. How failures look to the SDK:

- the gateway refuses the request (bad host/path, budget, no key): :class:`GatewayRefused`,
  an ``anthropic.AnthropicError`` that the SDK neither wraps nor retries, carrying the
  original :class:`~sandbox_core.errors.SandboxError` as ``error`` and ``__cause__``;
- the gateway is busy (reason ``overloaded``: a user's or a worker's cap on calls in flight):
  the answer the API gives when it is busy, 503 ``overloaded_error`` with ``retry-after`` and
  ``x-should-retry: true``, so the SDK waits what the host asks, then retries (and in the end
  raises the 503 as ``InternalServerError``);
- the gateway could not reach the API (``data["retryable"]``: reasons ``unreachable``,
  ``timeout``): ``httpx2.ConnectError``, which the SDK turns into ``APIConnectionError`` and
  retries like any connection failure;
- the call fails after the response started (a stream cut off upstream):
  ``httpx2.RemoteProtocolError`` from the SDK's stream, as a dropped connection would.

If the SDK closes a response before its end (cancellation, an abandoned stream), the host
call is abandoned too and, when a ``cancel`` callback is given, the host is told so that
it stops the upstream request.

No run id is sent: the host binds each call to the request the worker is serving.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anthropic
import httpx2

from sandbox_core.errors import SandboxError
from sandbox_core.shared import GATEWAY_METHOD

CallHost = Callable[[str, dict[str, Any]], AsyncIterator[dict[str, Any]]]
CancelHostCall = Callable[[Any], Awaitable[None]]
_LOCAL_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding", "connection"})


class GatewayRefused(anthropic.AnthropicError):
    """The host's model gateway refused or failed a request before any response."""

    def __init__(self, error: SandboxError) -> None:
        super().__init__(f"model gateway: {error.message}")
        self.error = error


class GatewayTransport(httpx2.AsyncBaseTransport):
    """Send each request through ``call_host("gateway.request", ...)``; stream the answer."""

    def __init__(self, call_host: CallHost, *, cancel: CancelHostCall | None = None) -> None:
        self._call_host = call_host
        self._cancel = cancel

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        body = await request.aread()
        params: dict[str, Any] = {
            "method": request.method,
            "url": str(request.url),
            "headers": [[k, v] for k, v in request.headers.multi_items()],
            "body_b64": base64.b64encode(body).decode("ascii"),
        }
        chunks = self._call_host(GATEWAY_METHOD, params)
        stream = _HostBody(chunks, request, self._cancel)
        try:
            first = await stream.first()
        except _Busy as busy:
            await stream.aclose()
            return busy.response(request)
        except BaseException:
            await stream.aclose()
            raise
        return httpx2.Response(first[0], headers=first[1], stream=stream, request=request)


class _Busy(Exception):
    """The gateway refused a call as ``overloaded``: answered as the API answers when busy."""

    def __init__(self, error: SandboxError) -> None:
        super().__init__(error.message)
        self.error = error

    def response(self, request: httpx2.Request) -> httpx2.Response:
        import json

        headers = [("content-type", "application/json"), ("x-should-retry", "true")]
        wait = self.error.data.get("retry_after")
        if isinstance(wait, int) and not isinstance(wait, bool) and 0 < wait <= 60:
            headers.append(("retry-after", str(wait)))
        body = {"type": "error", "error": {"type": "overloaded_error", "message": self.error.message}}
        return httpx2.Response(503, headers=headers, content=json.dumps(body).encode(), request=request)


class _HostBody(httpx2.AsyncByteStream):
    """The chunks of one host call: the ``start`` chunk, then the body as it arrives."""

    def __init__(self, chunks: AsyncIterator[dict[str, Any]], request: httpx2.Request, cancel: CancelHostCall | None):
        self._chunks = chunks
        self._request = request
        self._cancel = cancel
        self._call_id: Any = None
        self._ended = False

    async def _next(self) -> dict[str, Any] | None:
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self._ended = True
            return None
        except SandboxError:
            self._ended = True
            raise
        if self._call_id is None:
            self._call_id = chunk.get("call_id")
        return chunk

    async def first(self) -> tuple[int, list[tuple[str, str]]]:
        try:
            chunk = await self._next()
        except SandboxError as exc:
            if exc.data.get("reason") == "overloaded":
                raise _Busy(exc) from exc
            if exc.data.get("retryable"):
                raise httpx2.ConnectError(f"model gateway: {exc.message}", request=self._request) from exc
            raise GatewayRefused(exc) from exc
        if chunk is None or chunk.get("kind") != "start" or not isinstance(chunk.get("status"), int):
            raise httpx2.RemoteProtocolError("model gateway sent no response start", request=self._request)
        raw = chunk.get("headers") or []
        headers = [
            (str(pair[0]), str(pair[1]))
            for pair in raw
            if isinstance(pair, list | tuple) and len(pair) == 2 and str(pair[0]).lower() not in _LOCAL_HEADERS
        ]
        return chunk["status"], headers

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            try:
                chunk = await self._next()
            except SandboxError as exc:
                raise httpx2.RemoteProtocolError(f"model gateway: {exc.message}", request=self._request) from exc
            if chunk is None:
                return
            if chunk.get("kind") != "body":
                continue
            try:
                data = base64.b64decode(str(chunk.get("data_b64", "")), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise httpx2.RemoteProtocolError("model gateway sent a malformed chunk", request=self._request) from exc
            if data:
                yield data

    async def aclose(self) -> None:
        if self._ended:
            return
        self._ended = True
        closer = getattr(self._chunks, "aclose", None)
        if closer is not None:
            await closer()
        if self._cancel is not None and self._call_id is not None:
            await self._cancel(self._call_id)
