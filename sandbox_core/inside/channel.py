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
from sandbox_core.inside.pipestream import hung_up, in_pipe, writable
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
                await writable(self._fd)
                continue
            _advance(parts, written)

    async def _move(self, source: PipeStream, length: int) -> None:
        while length:
            try:
                length -= self._splice_some(source, length)
            except (BlockingIOError, InterruptedError):
                await writable(self._fd)  # the bytes are in the source: it is the host's end that is full



def _advance(parts: list[memoryview], written: int) -> None:
    """Drop the first ``written`` bytes of ``parts`` (in place)."""
    while parts and written >= len(parts[0]):
        written -= len(parts[0])
        parts.pop(0)
    if parts:
        parts[0] = parts[0][written:]


class StdinTaker(Protocol):
    """Where the payloads of one request's stdin frames go (:class:`sandbox_core.inside.runner.StdinSink`)."""

    closed: bool

    def ready(self) -> bool:
        """Whether it takes bytes now; one that does not calls :meth:`InputPipe.resume` once it does."""
        ...

    def take(self, source: int, n: int) -> int:
        """Move up to ``n`` bytes from the pipe ``source``; 0 when none are in it (or it is full itself)."""
        ...

    def end(self) -> None:
        """The stdin's end frame: its command's stdin is closed."""
        ...


STEPS_PER_TURN = 32
"""Headers and payload moves the input pipe takes in one turn of the event loop at most: a
stream that never runs dry must not keep the worker's other requests (and its control
channel) waiting."""


class InputPipe:
    """The worker's end of the input pipe: each frame's header is read here, its payload is
    taken from the pipe by its request's sink (``route``), spliced into the command's stdin.

    Frames are taken one at a time, in order: while the sink of the frame at the head is not
    ready (its command not started yet, or its stdin full), nothing more is read, so the
    host's writes wait and the pipe itself holds what has not been taken: nothing is
    buffered here. A frame of a request that has no sink (over, or never streamed) is read
    and dropped; bytes that are not frames end the reading (the host never sends them).
    """

    def __init__(self, fd: int, route: Callable[[int], StdinTaker | None]) -> None:
        self._fd = fd
        self._route = route
        self._loop = asyncio.get_running_loop()
        self._head = b""
        self._frame: tuple[int, int] | None = None
        """(kind, bytes still to take) of the frame being taken."""
        self._sink: StdinTaker | None = None
        self._paused = False
        self._closed = False
        self._loop.add_reader(fd, self._step)

    @classmethod
    def open(cls, fd: int, route: Callable[[int], StdinTaker | None]) -> InputPipe:
        """Take the input pipe's read end ``fd`` (kept from every command: close-on-exec)."""
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise ProtocolError(f"stdin_fd {fd} is not a pipe")
        os.set_inheritable(fd, False)
        os.set_blocking(fd, False)
        return cls(fd, route)

    def resume(self) -> None:
        """The sink at the head is ready again: go on taking (also a frame already read whole)."""
        if self._paused and not self._closed:
            self._paused = False
            self._loop.add_reader(self._fd, self._step)
            self._loop.call_soon(self._step)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if not self._paused:
                self._loop.remove_reader(self._fd)
            os.close(self._fd)

    def _step(self) -> None:
        try:
            for _ in range(STEPS_PER_TURN):
                if self._closed or self._paused or not self._advance():
                    return
        except (datapipe.FrameError, OSError):  # garbage, or the pipe broke: nothing more can be read
            self.close()
            return
        if not in_pipe(self._fd):  # more to do that no byte will wake: after the loop's other callbacks
            self._loop.call_soon(self._step)

    def _advance(self) -> bool:
        """Take what the pipe holds of the frame at the head; whether to go on at once."""
        if self._frame is None:
            return self._read_header()
        kind, left = self._frame
        sink = self._sink
        if sink is not None and not sink.closed and not sink.ready():
            self._pause()
            return False
        if left:
            moved = self._drop(left) if sink is None or sink.closed else sink.take(self._fd, left)
            if moved:
                self._frame = (kind, left - moved)
                return True
            if sink is not None and not sink.closed and not sink.ready():
                self._pause()  # its command's stdin is full
            elif _ended(self._fd):
                self.close()
            return False
        self._frame, self._sink = None, None
        if kind == datapipe.KIND_END and sink is not None and not sink.closed:
            sink.end()
        return True

    def _read_header(self) -> bool:
        try:
            self._head, header = datapipe.read_header(self._fd, self._head, datapipe.INPUT_KINDS)
        except (BlockingIOError, InterruptedError):
            return False
        except EOFError:  # the host closed its end
            self.close()
            return False
        if header is not None:
            request_id, kind, length = header
            self._frame, self._sink = (kind, length), self._route(request_id)
        return True

    def _drop(self, left: int) -> int:
        try:
            return len(os.read(self._fd, left))  # at most one payload (MAX_PAYLOAD)
        except (BlockingIOError, InterruptedError):
            return 0

    def _pause(self) -> None:
        self._paused = True
        self._loop.remove_reader(self._fd)


def _ended(fd: int) -> bool:
    """Whether every writer of the pipe ``fd`` has gone and it is empty (its end reached)."""
    return not in_pipe(fd) and hung_up(fd)


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
