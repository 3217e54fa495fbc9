"""The worker's ends of its pipes to the host: control frames, calls to the host, output.

:class:`Channel` writes whole control frames (they never interleave) and makes calls to the
host (the model gateway), matching their answers by id; :class:`OutputPipe` writes command
output as binary frames (:mod:`sandbox_core.datapipe`); :class:`RequestContext` is what a
method handler gets: its request, a way to emit events, and the executor's state.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import os
import stat
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

from sandbox_core import datapipe
from sandbox_core.errors import ProtocolError, from_wire
from sandbox_core.events import EVENT_METHOD, EventType
from sandbox_core.inside.pipestream import wake
from sandbox_core.protocol import Notification, Request, RequestId, Response, encode

if TYPE_CHECKING:
    from pathlib import Path

    from sandbox_core.inside.pipestream import PipeStream


class Executor(Protocol):
    """What a request context needs of the worker's executor."""

    state: dict[str, Any]

    def require_workspace(self) -> str: ...


class OutputPipe:
    """The worker's end of the data pipe: output frames, each written whole, in order.

    Written directly (nonblocking ``writev``, and ``splice`` for a command's output pipe:
    :meth:`splice`), one frame after the other: each frame is a task of its own that starts
    when the one before it is written, so a sender that is cancelled (a request's pump at its
    end) never leaves half a frame on the pipe, after which the host could read no frame
    again. A sender waits for its frame to be written, so a host that reads slowly slows it.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._last: asyncio.Task[OSError | None] | None = None

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
        os.set_blocking(fd, False)
        return cls(fd)

    def waiting(self) -> bool:
        """Whether a frame waits for room in the host's end (the host is behind)."""
        return self._last is not None and not self._last.done()

    async def send(self, request_id: int, kind: int, payload: bytes = b"") -> None:
        """One frame; waits while the host is not reading (that slows the command)."""
        await self._queue(datapipe.frame(request_id, kind, payload), payload, None)

    async def splice(self, request_id: int, kind: int, source: PipeStream, length: int) -> None:
        """A frame of the next ``length`` bytes of ``source``, which must be in it already
        (:meth:`PipeStream.ready`): the kernel moves them from pipe to pipe, no copy here."""
        await self._queue(datapipe.HEADER.pack(request_id, kind, length), b"", (source, length))

    async def _queue(self, header: bytes, payload: bytes, spliced: tuple[PipeStream, int] | None) -> None:
        before = self._last
        parts = [memoryview(header), memoryview(payload)] if payload else [memoryview(header)]
        if before is None or before.done():  # the pipe is ours: most frames are written at once
            self._last = None
            left = self._write_now(parts, *spliced) if spliced is not None else self._write_now(parts, None, 0)
            if not parts and not left:
                return
            spliced = (spliced[0], left) if spliced is not None else None
        if spliced is not None:
            spliced[0].lend()
        frame = self._loop.create_task(self._write(before, parts, spliced))
        self._last = frame
        error = await asyncio.shield(frame)  # written whole even if this sender is cancelled
        if error is not None:
            raise error

    def _write_now(self, parts: list[memoryview], source: PipeStream | None, length: int) -> int:
        """Write what the pipe takes now (``parts`` shrinks to what is left); the bytes left to move."""
        try:
            _advance(parts, os.writev(self._fd, parts))
            while not parts and length:
                assert source is not None
                length -= self._splice_some(source, length)
        except (BlockingIOError, InterruptedError):
            pass
        return length

    def _splice_some(self, source: PipeStream, length: int) -> int:
        """Move up to ``length`` bytes of ``source`` into the pipe; BlockingIOError while it is full."""
        moved = os.splice(source.fd, self._fd, length, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        if moved == 0:  # cannot happen (only this worker reads the source); a short frame would break the pipe
            raise OSError(f"the output pipe ran dry {length} bytes before the end of its frame")
        return moved

    async def _write(self, before: asyncio.Task[OSError | None] | None, parts: list[memoryview],
                     spliced: tuple[PipeStream, int] | None) -> OSError | None:  # fmt: skip
        try:
            if before is not None:
                await asyncio.wait([before])
            await self._write_all(parts)
            if spliced is not None:
                await self._move(*spliced)
        except OSError as exc:  # the host closed its end: every later frame fails the same way
            return exc
        finally:
            if spliced is not None:
                spliced[0].give_back()
        return None

    async def _write_all(self, parts: list[memoryview]) -> None:
        while parts:
            try:
                written = os.writev(self._fd, parts)
            except (BlockingIOError, InterruptedError):
                await self._writable()
                continue
            _advance(parts, written)

    async def _move(self, source: PipeStream, length: int) -> None:
        while length:
            try:
                length -= self._splice_some(source, length)
            except (BlockingIOError, InterruptedError):
                await self._writable()  # the bytes are in the source: it is the host's end that is full

    async def _writable(self) -> None:
        waiter = self._loop.create_future()
        self._loop.add_writer(self._fd, wake, waiter)
        try:
            await waiter
        finally:
            self._loop.remove_writer(self._fd)


def _advance(parts: list[memoryview], written: int) -> None:
    """Drop the first ``written`` bytes of ``parts`` (in place)."""
    while parts and written >= len(parts[0]):
        written -= len(parts[0])
        parts.pop(0)
    if parts:
        parts[0] = parts[0][written:]


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
