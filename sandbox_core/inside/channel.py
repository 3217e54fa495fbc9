"""The worker's ends of its pipes to the host: control frames, calls to the host, output.

:class:`Channel` writes whole control frames (they never interleave) and makes calls to the
host (the model gateway), matching their answers by id; :class:`OutputPipe` writes command
output as binary frames (:mod:`sandbox_core.datapipe`); :class:`RequestContext` is what a
method handler gets: its request, a way to emit events, and the executor's state.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import itertools
import os
import stat
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

from sandbox_core import datapipe
from sandbox_core.errors import ProtocolError, from_wire
from sandbox_core.events import EVENT_METHOD, EventType
from sandbox_core.protocol import Notification, Request, RequestId, Response, encode

if TYPE_CHECKING:
    from pathlib import Path


class Executor(Protocol):
    """What a request context needs of the worker's executor."""

    state: dict[str, Any]

    def require_workspace(self) -> str: ...


class OutputPipe:
    """The worker's end of the data pipe: output frames, each written whole, in order.

    A frame is a header and a payload that is either bytes (:meth:`send`) or moved from
    another pipe without passing through the worker (:meth:`splice`: a command's output goes
    from its pipe to this one page by page, never copied into Python). The pipe is written
    without blocking the loop: what the pipe does not take at once waits for it to drain, in
    order, and a frame once begun is always finished, even when the request that sent it is
    cancelled meanwhile (a frame cut short would leave the host reading a payload as headers).
    """

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._queue: collections.deque[_Frame] = collections.deque()
        self._writer: asyncio.Task[None] | None = None
        self._failed: OSError | None = None

    @classmethod
    async def open(cls, fd: int) -> OutputPipe:
        """Take the data pipe's write end ``fd`` (kept from every command: close-on-exec)."""
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise ProtocolError(f"data_fd {fd} is not a pipe")
        os.set_inheritable(fd, False)
        try:
            fcntl.fcntl(fd, datapipe.F_SETPIPE_SZ, datapipe.PIPE_BYTES)
        except OSError:
            pass
        return cls(fd)

    async def send(self, request_id: int, kind: int, payload: bytes = b"") -> None:
        """One frame; waits while the host is not reading (that slows the command)."""
        await self._write(_Frame(datapipe.frame(request_id, kind, payload), payload))

    async def splice(self, request_id: int, kind: int, source: int, count: int) -> None:
        """One frame of the next ``count`` bytes of pipe ``source``, which holds at least that
        many and is read by nobody else until this returns (or, when cancelled, until
        :meth:`close_source` closes it, after the frame)."""
        await self._write(_Frame(datapipe.HEADER.pack(request_id, kind, count), b"", source, count))

    def close_source(self, source: int) -> None:
        """Close pipe ``source`` now, or once the frame still moving its bytes is written."""
        for frame in self._queue:
            if frame.source == source:
                frame.close_source = True
                return
        os.close(source)

    async def _write(self, frame: _Frame) -> None:
        if self._failed is not None:
            raise self._failed
        if not self._queue and frame.advance(self._fd):  # the pipe took it all at once: the common case
            frame.finished()
            return
        frame.done = asyncio.get_running_loop().create_future()
        self._queue.append(frame)
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain())
        await asyncio.shield(frame.done)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                frame = self._queue[0]
                while not frame.advance(self._fd):
                    await _writable(loop, self._fd)
                self._queue.popleft()
                frame.finished()
        except OSError as exc:  # the host closed its end: nothing more can be sent
            self._failed = exc
            while self._queue:
                self._queue.popleft().finished(exc)
        finally:
            self._writer = None


class _Frame:
    """One frame on its way into the data pipe: what of it is still to be written."""

    __slots__ = ("close_source", "count", "done", "parts", "source")

    def __init__(self, header: bytes, payload: bytes, source: int = -1, count: int = 0) -> None:
        # a small payload goes out in one write with its header; a large one after it, not copied
        joined = len(payload) < _JOIN_BELOW
        self.parts = [memoryview(header + payload)] if joined else [memoryview(header), memoryview(payload)]
        self.source, self.count = source, count
        """The pipe the rest of the payload is moved from, and how many bytes of it are still to go."""
        self.close_source = False
        self.done: asyncio.Future[None] | None = None
        """Set once the frame is queued behind others (or behind a full pipe)."""

    def advance(self, fd: int) -> bool:
        """Write what the pipe takes now; whether the frame is complete (OSError: it cannot be)."""
        try:
            while self.parts:
                part = self.parts[0]
                written = os.write(fd, part)
                if written == len(part):
                    del self.parts[0]
                else:
                    self.parts[0] = part[written:]
            while self.count:
                moved = os.splice(self.source, fd, self.count, flags=_SPLICE_FLAGS)
                if moved == 0:
                    raise OSError(f"pipe {self.source} ran dry with {self.count} bytes of a frame to go")
                self.count -= moved
        except BlockingIOError:
            return False
        return True

    def finished(self, error: OSError | None = None) -> None:
        """The frame is written (or cannot be): close its source if asked, wake its sender."""
        if self.close_source:
            self.close_source = False
            os.close(self.source)
        if self.done is not None and not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)


_JOIN_BELOW = 4096
"""Payloads smaller than this are copied behind their header (one write instead of two)."""
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Until ``fd`` can be written."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


class InputPipe(asyncio.Protocol):
    """The worker's end of the input pipe: stdin frames go to ``route`` as they arrive.

    Reading pauses while any sink asks (a command not reading, or not started yet), so the
    host's writes wait: what is buffered here is bounded by the pipe and one read.
    """

    def __init__(self, route: Callable[[int, int, bytes], None]) -> None:
        self._split = datapipe.DataSplitter(route)
        self._transport: asyncio.ReadTransport | None = None
        self._pausers: set[object] = set()

    @classmethod
    async def open(cls, fd: int, route: Callable[[int, int, bytes], None]) -> InputPipe:
        """Take the input pipe's read end ``fd`` (kept from every command: close-on-exec)."""
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise ProtocolError(f"stdin_fd {fd} is not a pipe")
        os.set_inheritable(fd, False)
        pipe = cls(route)
        await asyncio.get_running_loop().connect_read_pipe(lambda: pipe, os.fdopen(fd, "rb", 0))
        return pipe

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.ReadTransport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self._split.feed(data)
        except datapipe.FrameError:  # the host never sends this; stop reading garbage
            if self._transport is not None:
                self._transport.close()

    def pause(self, who: object) -> None:
        self._pausers.add(who)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume(self, who: object) -> None:
        self._pausers.discard(who)
        if not self._pausers and self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()


class _HostCall:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any] | Response] = asyncio.Queue()


class Channel:
    """The worker's end of the pipe: writes frames and makes calls to the host."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._ids = itertools.count(1)
        self._calls: dict[RequestId, _HostCall] = {}

    def send_nowait(self, msg: Request | Notification | Response) -> None:
        """Queue one whole frame on the pipe (frames never interleave)."""
        self._writer.write(encode(msg))

    async def send(self, msg: Request | Notification | Response) -> None:
        """Send a frame and wait while the pipe is backed up (the host reads slowly)."""
        self._writer.write(encode(msg))
        await self._writer.drain()

    async def call_host(self, method: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Call the host; yield each streamed chunk, end when the final response arrives."""
        call_id = f"w{next(self._ids)}"
        call = _HostCall()
        self._calls[call_id] = call
        answered = False
        try:
            await self.send(Request(call_id, method, params))
            while True:
                item = await call.queue.get()
                if isinstance(item, Response):
                    answered = True
                    if item.error is not None:
                        raise from_wire(item.error)
                    return
                yield item
        finally:
            self._calls.pop(call_id, None)
            if not answered:  # the caller gave up (cancel, error): the host stops the call too
                self.send_nowait(Notification("cancel", {"id": call_id}))

    async def ask_host(self, method: str, params: dict[str, Any]) -> Any:
        """Call the host and return its answer's result (a call that streams nothing)."""
        call_id = f"w{next(self._ids)}"
        call = _HostCall()
        self._calls[call_id] = call
        try:
            await self.send(Request(call_id, method, params))
            while True:
                item = await call.queue.get()
                if isinstance(item, Response):
                    if item.error is not None:
                        raise from_wire(item.error)
                    return item.result
        finally:
            self._calls.pop(call_id, None)

    def route(self, msg: Response | Notification) -> bool:
        """Deliver a host response or chunk to its pending call; False if none matches."""
        if isinstance(msg, Response):
            call = self._calls.get(msg.id) if msg.id is not None else None
            if call is None:
                return False
            call.queue.put_nowait(msg)
            return True
        call_id = msg.params.get("call_id")
        call = self._calls.get(call_id) if isinstance(call_id, str | int) else None
        if call is None:
            return False
        call.queue.put_nowait(msg.params)
        return True


class RequestContext:
    """What a method handler gets: its request, a way to emit events, the executor state."""

    def __init__(self, request: Request, channel: Channel, executor: Executor) -> None:
        self.request = request
        self.channel = channel
        self.executor = executor
        self._seq = itertools.count(1)

    async def emit(self, kind: EventType, data: dict[str, Any]) -> None:
        await self.channel.send(
            Notification(
                EVENT_METHOD,
                {"request_id": self.request.id, "seq": next(self._seq), "type": kind, "data": data},
            )
        )

    @property
    def workspace(self) -> Path:
        """The user's workspace (pathlib is imported here, for the requests that want it)."""
        from pathlib import Path

        return Path(self.executor.require_workspace())

    @property
    def cwd(self) -> str:
        """The user's workspace as a string, for a command's working directory."""
        return self.executor.require_workspace()
