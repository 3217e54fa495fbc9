"""The model endpoint: a loopback HTTP/1.1 server inside the sandbox that relays Messages API calls
to the host's gateway, so that any client (the ``anthropic`` SDK, ``curl``, ``urllib``, another
agent CLI) reaches the model with a placeholder key.

Started by the worker in the strict profile only, on ``127.0.0.1:MODEL_ENDPOINT_PORT`` of the
sandbox's own network namespace, where no other tenant can connect (in the ``process``
profile a loopback port would be the host's, open to every local user, so there is none).
Commands get ``ANTHROPIC_BASE_URL`` pointing here and ``ANTHROPIC_API_KEY`` set to the
placeholder. Each request becomes one ``gateway.request`` host call, the same call the agent
runtime's SDK transport makes; the host decides everything (route, headers, body, model,
budgets) and adds the real key, which never enters the sandbox.

The answer is relayed as it arrives: the status and headers of the host's ``start`` chunk,
then each ``body`` chunk as one HTTP chunk (server-sent events reach the client one by one).
A refusal becomes an API-shaped error (``{"type": "error", "error": {"type", "message"}}``)
with the status a client understands and ``x-sandbox-gateway-reason`` naming the reason
code; an upstream stream that breaks mid-way drops the connection, as the API's would. A
client that goes away (noticed at once, also while the host has nothing to send) cancels its
host call.

A host that is busy (the user's ``model.max_user_calls`` calls in flight, or the worker's
host-call cap) refuses with reason ``overloaded``: the client gets what the API sends when it
is busy, 503 ``overloaded_error`` with ``retry-after`` and ``x-should-retry: true``, so the
SDK (and any client that honours ``retry-after``) waits and retries.

Bounded: at most :data:`MAX_CONNECTIONS` connections (more get 503) and
:data:`MAX_CALLS` calls to the host at once (more wait), request heads of
:data:`MAX_HEAD` bytes, bodies of ``max_body`` bytes (the host's ``model.max_body_bytes``,
lowered to what one channel frame carries; 413 ``request_too_large`` beyond, answered before
the body is read, so a sandbox cannot make either side buffer more), and idle or slow clients
are dropped after :data:`IDLE_SECONDS`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from sandbox_core.errors import SandboxError
from sandbox_core.shared import GATEWAY_BASE_URL, GATEWAY_METHOD

CallHost = Callable[[str, dict[str, Any]], AsyncIterator[dict[str, Any]]]

MAX_CONNECTIONS = 32
MAX_CALLS = 3
"""Host calls at once (the host takes 4 per worker; one is left for the agent runtime)."""
MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
DEFAULT_MAX_BODY = 6 * 1024 * 1024
IDLE_SECONDS = 60.0
_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer",
                  "upgrade", "proxy-connection", "expect", "host"})  # fmt: skip
_REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 413: "Payload Too Large", 429: "Too Many Requests",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}  # fmt: skip
_STATUS_OF_REASON: dict[str, tuple[int, str, bool]] = {
    "path": (404, "not_found_error", False),
    "method": (405, "invalid_request_error", False),
    "query": (400, "invalid_request_error", False),
    "body": (400, "invalid_request_error", False),
    "max_tokens": (400, "invalid_request_error", False),
    "tools": (400, "invalid_request_error", False),
    "no_api_key": (401, "authentication_error", False),
    "user_budget": (429, "rate_limit_error", False),
    "request_budget": (429, "rate_limit_error", False),
    "overloaded": (503, "overloaded_error", True),
    "unreachable": (502, "api_error", True),
    "timeout": (504, "api_error", True),
    "internal": (500, "api_error", False),
}
"""A gateway reason code -> (HTTP status, API error type, whether a client should retry).
Other refusals (a field, a tool, a model, a host the policy does not allow) are 403."""


class BadRequest(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


class _Request:
    __slots__ = ("body", "headers", "method", "target", "version")

    def __init__(self, method: str, target: str, version: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.method, self.target, self.version, self.headers, self.body = method, target, version, headers, body

    @property
    def path_and_query(self) -> str:
        """The target as ``/path?query`` (an absolute-form target loses its scheme and authority)."""
        target = self.target.partition("#")[0]
        if "://" in target:
            rest = target.split("://", 1)[1]
            slash = rest.find("/")
            target = rest[slash:] if slash >= 0 else "/"
        return target

    @property
    def keep_alive(self) -> bool:
        connection = ",".join(v for k, v in self.headers if k == "connection").lower()
        return "close" not in connection if self.version == "HTTP/1.1" else "keep-alive" in connection


class ModelEndpoint:
    """``await ModelEndpoint(call_host).start(host, port)``; ``await close()`` at the end."""

    def __init__(self, call_host: CallHost, *, max_body: int = DEFAULT_MAX_BODY) -> None:
        self._call_host = call_host
        self._max_body = max_body
        self._server: asyncio.Server | None = None
        self._calls = asyncio.Semaphore(MAX_CALLS)
        self._connections: set[asyncio.Task[None]] = set()
        self.served = 0

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self._accept), host, port, backlog=MAX_CONNECTIONS)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Connection) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= MAX_CONNECTIONS:
            with contextlib.suppress(ConnectionError):
                await _error(writer, 503, "overloaded_error", f"over {MAX_CONNECTIONS} connections", close=True)
            writer.close()
            return
        self._connections.add(task)
        try:
            while True:
                try:
                    request = await asyncio.wait_for(self._read(reader, writer), IDLE_SECONDS)
                except BadRequest as exc:
                    await _error(writer, exc.status, exc.kind, str(exc), close=True)
                    break
                if request is None:
                    break
                if not await self._relay(request, writer, conn):
                    break
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            if not conn.gone:  # the endpoint is closing, not the client going away
                raise
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Request | None:
        """One request (None at a clean end of the connection), or BadRequest."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise BadRequest(400, "incomplete request head") from None
            return None
        except asyncio.LimitOverrunError:
            raise BadRequest(400, f"request head over {MAX_HEAD} bytes") from None
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
            raise BadRequest(400, "malformed request line")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise BadRequest(400, "malformed header line")
            headers.append((name.lower(), value.strip()))
        if len(headers) > MAX_HEADERS:
            raise BadRequest(400, f"over {MAX_HEADERS} headers")
        request = _Request(parts[0].upper(), parts[1], parts[2], headers, b"")
        fields = dict(headers)
        if fields.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in fields.get("transfer-encoding", "").lower():
            request.body = await self._read_chunked(reader)
        elif "content-length" in fields:
            length = fields["content-length"]
            if not length.isdigit():
                raise BadRequest(400, "malformed content-length")
            if int(length) > self._max_body:
                raise self._too_large(f"a request body of {int(length)} bytes")
            request.body = await reader.readexactly(int(length))
        return request

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        body = bytearray()
        while True:
            line = await reader.readuntil(b"\r\n")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadRequest(400, "malformed chunk size") from None
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return bytes(body)
            if len(body) + size > self._max_body:
                raise self._too_large("a chunked request body")
            body += await reader.readexactly(size)
            await reader.readexactly(2)

    def _too_large(self, what: str) -> BadRequest:
        """413 before the body is read: the host never buffers (nor is asked to carry) more."""
        return BadRequest(413, f"{what} is over the model endpoint's limit of {self._max_body} bytes "
                          "(model.max_body_bytes); send a smaller request", "request_too_large")

    async def _relay(self, request: _Request, writer: asyncio.StreamWriter, conn: _Connection) -> bool:
        """Answer one request through the host; whether the connection may carry another."""
        path = request.path_and_query
        if not path.startswith("/"):
            await _error(writer, 400, "invalid_request_error", "request target must be a path", close=True)
            return False
        params: dict[str, Any] = {
            "method": request.method,
            "url": GATEWAY_BASE_URL + path,
            "headers": [[k, v] for k, v in request.headers if k not in _HOP],
            "body_b64": base64.b64encode(request.body).decode("ascii"),
        }
        keep = request.keep_alive
        chunked = request.version == "HTTP/1.1"
        async with self._calls:
            if conn.gone:
                return False
            chunks = self._call_host(GATEWAY_METHOD, params)
            conn.relaying = asyncio.current_task()  # the client going away cancels it (and so the call)
            try:
                try:
                    first = await anext(chunks)
                except StopAsyncIteration:
                    await _error(writer, 502, "api_error", "the model gateway sent no answer", close=not keep)
                    return keep
                except SandboxError as exc:
                    status, kind, retry = _STATUS_OF_REASON.get(str(exc.data.get("reason")), (403, "permission_error",
                                                                                         False))
                    extra = [("x-sandbox-gateway-reason", str(exc.data.get("reason", "refused"))[:64]),
                             ("x-should-retry", "true" if retry else "false")]  # fmt: skip
                    wait = exc.data.get("retry_after")
                    if isinstance(wait, int) and not isinstance(wait, bool) and 0 < wait <= 60:
                        extra.append(("retry-after", str(wait)))
                    await _error(writer, status, kind, exc.message, close=not keep, headers=extra)
                    return keep
                code = first.get("status")
                if first.get("kind") != "start" or not isinstance(code, int):
                    await _error(writer, 502, "api_error", "the model gateway sent no response start", close=True)
                    return False
                self.served += 1
                head = [f"{request.version} {code} {_REASONS.get(code, 'Status')}"]
                for pair in first.get("headers") or []:
                    if isinstance(pair, list) and len(pair) == 2 and str(pair[0]).lower() not in _HOP:
                        head.append(f"{_field(pair[0])}: {_field(pair[1])}")
                head.append("transfer-encoding: chunked" if chunked else "connection: close")
                if chunked and not keep:
                    head.append("connection: close")
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "replace"))
                await writer.drain()
                async for chunk in chunks:
                    if chunk.get("kind") != "body":
                        continue
                    try:
                        data = base64.b64decode(str(chunk.get("data_b64", "")), validate=True)
                    except (binascii.Error, ValueError):
                        break
                    if data:
                        writer.write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
                        await writer.drain()
            except SandboxError:  # the stream broke after the answer began: drop the connection, as the API would
                writer.transport.abort()
                return False
            finally:
                conn.relaying = None
                closer = getattr(chunks, "aclose", None)
                if closer is not None:
                    await closer()
        if chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        return keep and chunked


class _Connection(asyncio.StreamReaderProtocol):
    """A client connection that cancels the request it is relaying as soon as the client goes
    away (closes, resets or shuts its side): the host call stops with it, with no cost per chunk."""

    def __init__(self, serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter, _Connection], Any]) -> None:
        self.gone = False
        self.relaying: asyncio.Task[Any] | None = None
        super().__init__(asyncio.StreamReader(limit=MAX_HEAD), lambda r, w: serve(r, w, self))

    def _end(self) -> None:
        self.gone = True
        if self.relaying is not None:
            self.relaying.cancel()

    def eof_received(self) -> bool:
        self._end()
        return bool(super().eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()
        super().connection_lost(exc)


def _field(value: Any) -> str:
    return "".join(ch for ch in str(value) if " " <= ch <= "~")


async def _error(writer: asyncio.StreamWriter, status: int, kind: str, message: str, *, close: bool,
                 headers: list[tuple[str, str]] | None = None) -> None:  # fmt: skip
    body = json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "content-type: application/json",
            f"content-length: {len(body)}", *(f"{k}: {_field(v)}" for k, v in headers or [])]  # fmt: skip
    if close:
        head.append("connection: close")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "replace") + body)
    await writer.drain()
