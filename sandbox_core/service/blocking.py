"""The thin client without an event loop: one run on a Unix socket, for a one-shot ``sandbox exec``.

Importing asyncio costs more than the service takes to run ``true`` in a warm worker, and
a command that only sends a request, prints its events and passes on its stdin needs no
event loop: blocking sockets and one thread for stdin do. The protocol and its checks are
those of :class:`~sandbox_core.service.thin.ThinClient` (HTTP/1.1, one connection per
request, ``Connection: close``; every connection passes the trust checks of
:mod:`sandbox_core.service.trust` before a byte is written on it).

A fresh process pays for every module it imports before the run can start, so this one
imports only C-level pieces and the light modules of the wire: no ``socket`` (its enum
constants), no ``json`` (see :mod:`sandbox_core.service.wire`), no ``pathlib``, no
``typing`` and no :class:`~sandbox_core.events.Event` (a dataclass): a run's events come
as ``(type, data)`` pairs.
"""

from __future__ import annotations

import io
import os

from sandbox_core.errors import from_wire
from sandbox_core.service.trust import connect_unix, trusted_uids
from sandbox_core.service.wire import (
    MAX_BODY,
    MAX_LINE,
    LineSplitter,
    ServiceError,
    ServiceUnreachable,
    SseReader,
    check_status,
)
from sandbox_core.wirejson import json_text, json_value

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import _socket
    from collections.abc import Iterable, Iterator
    from typing import Any

REQUEST_TIMEOUT = 30.0
"""Seconds a plain request (not a run's stream) may take."""
_READ = 256 * 1024


class _SocketReader(io.RawIOBase):
    """A C-level socket as a raw stream, for ``io.BufferedReader`` (what ``socket.makefile`` does)."""

    def __init__(self, sock: _socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._sock.recv_into(buffer)


class _Answer:
    """One HTTP/1.1 answer on a blocking socket: status and headers read, then the body."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self._file = io.BufferedReader(_SocketReader(sock), _READ)
        self.status = 0
        self.headers: dict[str, str] = {}

    def _line(self) -> bytes:
        line = self._file.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise ServiceError(f"a line from the service is over {MAX_LINE} bytes")
        return line

    def start(self) -> None:
        status = self._line().decode("latin-1").split()
        if len(status) < 2 or not status[0].startswith("HTTP/1.") or not status[1].isdigit():
            raise ServiceError(f"not an HTTP answer from the service: {' '.join(status)[:80]!r}")
        self.status = int(status[1])
        while header := self._line().rstrip(b"\r\n"):
            name, _, value = header.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def chunks(self) -> Iterator[bytes]:
        """The body as it arrives."""
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                try:
                    size = int(self._line().split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ServiceError("a malformed chunk from the service") from None
                if size == 0:
                    return
                data = self._file.read(size)
                if len(data) != size or len(self._file.read(2)) != 2:
                    raise ServiceError("the service closed the connection mid-answer")
                yield data
        elif "content-length" in self.headers:
            left = int(self.headers["content-length"])
            while left > 0:
                data = self._file.read1(min(left, _READ))
                if not data:
                    raise ServiceError("the service closed the connection mid-answer")
                left -= len(data)
                yield data
        else:
            while data := self._file.read1(_READ):
                yield data

    def body(self) -> bytes:
        out = bytearray()
        for data in self.chunks():
            out += data
            if len(out) > MAX_BODY:
                raise ServiceError(f"an answer from the service is over {MAX_BODY} bytes")
        return bytes(out)

    def lines(self) -> Iterator[str]:
        splitter = LineSplitter()
        for data in self.chunks():
            yield from splitter.feed(data)
        yield from splitter.end()

    def close(self) -> None:
        self._file.close()
        self.sock.close()


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[int | None, str, str]]:
    """``(id, event, data)`` for each SSE event in ``lines`` (comments skipped)."""
    reader = SseReader()
    for raw in lines:
        if (event := reader.feed(raw)) is not None:
            yield event


class BlockingClient:
    """``sandbox serve`` on a Unix socket: a run's events, its stdin, cancel; no event loop."""

    def __init__(self, path: str | os.PathLike[str], *, server_uids: Iterable[str | int] = ()) -> None:
        self.path = os.fspath(path)
        self._trusted = trusted_uids(server_uids)

    def connect(self, timeout: float | None = REQUEST_TIMEOUT) -> _socket.socket:
        """A new connection to the service, checked (:class:`ServiceUnreachable` if none answers).

        :class:`~sandbox_core.errors.UntrustedService` when something is there that cannot be
        trusted; either way nothing was sent.
        """
        try:
            return connect_unix(self.path, self._trusted, timeout or REQUEST_TIMEOUT)
        except OSError as exc:
            raise ServiceUnreachable(f"cannot reach the service at unix:{self.path}: {exc.strerror or exc}") from None

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None, stream: Iterable[bytes] | None = None,
        timeout: float | None = REQUEST_TIMEOUT, sock: _socket.socket | None = None,
    ) -> _Answer:
        sock = self.connect(timeout) if sock is None else sock
        sock.settimeout(timeout)
        answer = _Answer(sock)
        try:
            head = f"{method} {path} HTTP/1.1\r\nHost: sandbox\r\nConnection: close\r\nAccept: */*\r\n"
            if stream is not None:
                sock.sendall(f"{head}Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                             .encode("latin-1"))
                for chunk in stream:
                    if chunk:
                        sock.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                sock.sendall(b"0\r\n\r\n")
            else:
                payload = b"" if body is None else json_text(body).encode()
                if body is not None:
                    head += "Content-Type: application/json\r\n"
                sock.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode("latin-1") + payload)
            answer.start()
        except OSError as exc:
            answer.close()
            raise ServiceUnreachable(f"lost the service connection: {exc.strerror or exc}") from None
        except BaseException:
            answer.close()
            raise
        return answer

    def json(self, method: str, path: str, body: dict[str, Any] | None = None,
             stream: Iterable[bytes] | None = None, timeout: float | None = REQUEST_TIMEOUT) -> Any:
        answer = self._request(method, path, body, stream, timeout)
        try:
            text = answer.body().decode(errors="replace")
        except OSError as exc:
            raise ServiceError(f"lost the service connection: {exc}") from None
        finally:
            answer.close()
        check_status(answer.status, text)
        try:
            return json_value(text)
        except ValueError:
            raise ServiceError(f"the service answered {text[:200]!r}, not JSON") from None

    def cancel(self, run_id: str, timeout: float) -> None:
        self.json("POST", f"/v1/runs/{run_id}/cancel", timeout=timeout)

    def send_stdin(self, run_id: str, chunks: Iterable[bytes]) -> None:
        """Stream ``chunks`` as the stdin of a run started with ``stdin_stream: true``."""
        self.json("POST", f"/v1/runs/{run_id}/stdin", stream=chunks, timeout=None)

    def events(self, kind: str, body: dict[str, Any], sock: _socket.socket | None = None,
               ) -> Iterator[tuple[int, str, dict[str, Any]]]:  # fmt: skip
        """Start a run (``exec`` or ``agent``) and yield its events as ``(seq, type, data)``; errors raise typed.

        ``sock``: a connection from :meth:`connect` to send it on (else a new one).
        """
        answer = self._request("POST", f"/v1/runs/{kind}", body, timeout=None, sock=sock)
        try:
            if answer.status != 200:
                check_status(answer.status, answer.body().decode(errors="replace"))
            for seq, event, data in parse_sse(answer.lines()):
                try:
                    payload = json_value(data)
                except ValueError:
                    raise ServiceError(f"the service sent an event that is not JSON: {data[:80]!r}") from None
                if event == "error":
                    raise from_wire(payload)
                yield seq or 0, event, payload if isinstance(payload, dict) else {}
        except OSError as exc:
            raise ServiceError(f"lost the service connection: {exc}") from None
        finally:
            answer.close()
