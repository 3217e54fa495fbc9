"""The thin client of the service: health, a run's events, its stdin and cancel, on a Unix socket.

What ``sandbox exec`` and ``sandbox run`` need from a running service, in plain asyncio
HTTP/1.1 (one connection per request, ``Connection: close``), so that a client process
does not import an HTTP library (httpx2 and httpcore2 take longer to import than the
service takes to run ``true``). Every connection passes the same trust checks as the full
client's (:mod:`sandbox_core.service.trust`) before a byte is written on it. The full
client (:class:`~sandbox_core.service.client.ServiceClient`) is built on first use of
anything else (stats, workers, terminals).

The error classes and the SSE parser it shares with the other clients are in
:mod:`sandbox_core.service.wire` (asyncio is imported only when this client is used).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox_core.errors import from_wire
from sandbox_core.events import Event
from sandbox_core.service.trust import check_peer, open_checked, trusted_uids
from sandbox_core.service.wire import (
    MAX_BODY,
    MAX_LINE,
    LineSplitter,
    ServiceError,
    ServiceUnreachable,
    SseReader,
    check_status,
)

if TYPE_CHECKING:
    import asyncio


async def parse_sse(lines: AsyncIterator[str]) -> AsyncIterator[tuple[int | None, str, str]]:
    """``(id, event, data)`` for each SSE event in ``lines`` (comments skipped)."""
    reader = SseReader()
    async for raw in lines:
        if (event := reader.feed(raw)) is not None:
            yield event


class _Response:
    """One HTTP/1.1 answer being read: status, headers, then the body (chunked or not)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self.status = 0
        self.headers: dict[str, str] = {}

    async def _line(self) -> bytes:
        import asyncio

        line = bytearray()
        while True:
            try:
                part = await self._reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:  # a long line: take what is buffered, go on
                part = await self._reader.readexactly(exc.consumed)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise ServiceError("the service closed the connection mid-line") from None
                return b""
            line += part
            if len(line) > MAX_LINE:
                raise ServiceError(f"a line from the service is over {MAX_LINE} bytes")
            if line.endswith(b"\n"):
                return bytes(line)

    async def start(self) -> None:
        status = (await self._line()).decode("latin-1").split()
        if len(status) < 2 or not status[0].startswith("HTTP/1.") or not status[1].isdigit():
            raise ServiceError(f"not an HTTP answer from the service: {' '.join(status)[:80]!r}")
        self.status = int(status[1])
        while header := (await self._line()).rstrip(b"\r\n"):
            name, _, value = header.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""
        import asyncio

        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = (await self._line()).split(b";", 1)[0].strip()
                try:
                    size = int(size_line, 16)
                except ValueError:
                    raise ServiceError("a malformed chunk from the service") from None
                if size == 0:
                    return
                try:
                    data = await self._reader.readexactly(size)
                    await self._reader.readexactly(2)
                except asyncio.IncompleteReadError:
                    raise ServiceError("the service closed the connection mid-answer") from None
                yield data
        elif "content-length" in self.headers:
            left = int(self.headers["content-length"])
            while left > 0:
                data = await self._reader.read(min(left, 256 * 1024))
                if not data:
                    raise ServiceError("the service closed the connection mid-answer")
                left -= len(data)
                yield data
        else:
            while data := await self._reader.read(256 * 1024):
                yield data

    async def body(self, limit: int = MAX_BODY) -> bytes:
        out = bytearray()
        async for data in self.chunks():
            out += data
            if len(out) > limit:
                raise ServiceError(f"an answer from the service is over {limit} bytes")
        return bytes(out)

    async def lines(self) -> AsyncIterator[str]:
        splitter = LineSplitter()
        async for data in self.chunks():
            for line in splitter.feed(data):
                yield line
        for line in splitter.end():
            yield line

    def close(self) -> None:
        self._writer.close()


class ThinClient:
    """The service on a Unix socket, for one command's run: ``health``, ``stream``, ``send_stdin``, ``cancel``.

    Any other method of :class:`~sandbox_core.service.client.ServiceClient` is that of the
    full client ``full()`` builds on first use (and closed with this one).
    """

    def __init__(
        self, path: Path, *, server_uids: Iterable[str | int] = (), full: Callable[[], Any] | None = None,
    ) -> None:
        self._path = path
        self._trusted = trusted_uids(server_uids)
        self._make_full = full
        self._full: Any = None
        self.last_run_id: str | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.full(), name)

    def full(self) -> Any:
        """The full client (a :class:`~sandbox_core.service.client.ServiceClient`: not imported here,
        which would make the service's modules import each other), for what this one does not do."""
        if self._full is None:
            if self._make_full is None:
                raise AttributeError("this thin client has no full client to fall back on")
            self._full = self._make_full()
        return self._full

    async def __aenter__(self) -> ThinClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._full is not None:
            await self._full.aclose()

    async def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None, stream: AsyncIterable[bytes] | None = None
    ) -> _Response:
        """Send one request on a new checked connection; the answer with its status and headers read.

        ``stream`` is sent as a chunked body as it is produced (writes wait while the service is behind).
        """
        import asyncio

        try:
            with open_checked(self._path, self._trusted) as address:
                reader, writer = await asyncio.open_unix_connection(address, limit=256 * 1024)
        except OSError as exc:
            raise ServiceUnreachable(f"cannot reach the service: {self._path}: {exc.strerror or exc}") from exc
        response = _Response(reader, writer)
        try:
            check_peer(writer.get_extra_info("socket"), self._path, self._trusted)
            payload = b"" if body is None else json.dumps(body).encode()
            head = f"{method} {path} HTTP/1.1\r\nHost: sandbox\r\nConnection: close\r\nAccept: */*\r\n"
            if stream is not None:
                head += "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                writer.write(head.encode("latin-1"))
                async for chunk in stream:
                    if chunk:
                        writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                        await writer.drain()
                writer.write(b"0\r\n\r\n")
            else:
                if body is not None:
                    head += "Content-Type: application/json\r\n"
                head += f"Content-Length: {len(payload)}\r\n\r\n"
                writer.write(head.encode("latin-1") + payload)
            await writer.drain()
            await response.start()
        except OSError as exc:
            response.close()
            raise ServiceUnreachable(f"cannot reach the service: {exc.strerror or exc}") from exc
        except BaseException:
            response.close()
            raise
        return response

    async def _json(
        self, method: str, path: str, body: dict[str, Any] | None = None, stream: AsyncIterable[bytes] | None = None
    ) -> Any:
        response = await self._request(method, path, body, stream)
        try:
            text = (await response.body()).decode(errors="replace")
        except OSError as exc:
            raise ServiceError(f"lost the service connection: {exc}") from exc
        finally:
            response.close()
        check_status(response.status, text)
        try:
            return json.loads(text)
        except ValueError:
            raise ServiceError(f"the service answered {text[:200]!r}, not JSON") from None

    async def health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._json("GET", "/v1/health")
        return result

    async def cancel(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._json("POST", f"/v1/runs/{run_id}/cancel")
        return result

    async def send_stdin(self, run_id: str, chunks: AsyncIterable[bytes]) -> dict[str, Any]:
        """Stream ``chunks`` as the stdin of a run started with ``stdin_stream: true``."""
        try:
            result: dict[str, Any] = await self._json("POST", f"/v1/runs/{run_id}/stdin", stream=chunks)
        except ServiceUnreachable as exc:
            raise ServiceUnreachable(f"lost the service connection while sending stdin: {exc}") from exc
        return result

    async def stream(self, kind: str, body: dict[str, Any]) -> AsyncGenerator[Event, None]:
        """Start a run (``agent`` or ``exec``) and yield its events; errors raise typed."""
        response = await self._request("POST", f"/v1/runs/{kind}", body)
        try:
            if response.status != 200:
                check_status(response.status, (await response.body()).decode(errors="replace"))
            self.last_run_id = response.headers.get("x-run-id")
            async for seq, event, data in parse_sse(response.lines()):
                payload = json.loads(data)
                if event == "error":
                    raise from_wire(payload)
                yield Event.from_dict({"type": event, "seq": seq or 0, "data": payload})
        except OSError as exc:
            raise ServiceError(f"lost the service connection: {exc}") from exc
        finally:
            response.close()
