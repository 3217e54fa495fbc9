"""The input pipe end to end on real pipes: the host's frames (:func:`datapipe.frame`), the
worker's reader (:class:`InputPipe`) and each request's sink (:class:`StdinSink`), which has
the kernel splice every payload into its command's stdin pipe.

Payloads arrive whole, in order, at the stdin of their own request; nothing is read ahead
(while a sink cannot take, the bytes stay in the input pipe); a command that closes its
stdin mid-frame is told to the host once and the rest of its frame is dropped without
losing the next request's; garbage, and the host going away, end the reading."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from sandbox_core import datapipe
from sandbox_core.inside.channel import STEPS_PER_TURN, InputPipe
from sandbox_core.inside.pipestream import in_pipe
from sandbox_core.inside.runner import StdinSink
from tests.helpers import wait_for


def _fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
async def _nothing_left_open() -> AsyncIterator[set[int]]:
    """Each test closes its own ends; the pipe and the sinks must have closed theirs (no leak)."""
    before = _fds()
    yield before
    await wait_for(lambda: _fds() == before, 10, "every descriptor of the test closed")


class _Worker:
    """The routing of :meth:`SandboxExecutor.route_stdin`: a sink per known request, else a drop."""

    def __init__(self) -> None:
        self.sinks: dict[int, StdinSink] = {}
        self.closed: list[int] = []
        self.pipe: InputPipe | None = None

    def open(self) -> int:
        r, w = os.pipe2(os.O_CLOEXEC)
        self.pipe = InputPipe.open(r, self.route)
        self.read_end = r
        return w

    def sink(self, request_id: int) -> StdinSink:
        assert self.pipe is not None
        return self.sinks.setdefault(request_id, StdinSink(self.pipe, lambda: self.closed.append(request_id)))

    def route(self, request_id: int) -> StdinSink | None:
        return self.sinks.get(request_id) if request_id < 100 else None  # 100 and up: requests already over


def _send(fd: int, request_id: int, payload: bytes) -> None:
    """What the host's feed writes: the payload as frames of at most MAX_PAYLOAD, then nothing more."""
    for at in range(0, len(payload), datapipe.MAX_PAYLOAD):
        piece = payload[at : at + datapipe.MAX_PAYLOAD]
        _write_all(fd, datapipe.frame(request_id, datapipe.KIND_STDIN, piece) + piece)


def _end(fd: int, request_id: int) -> None:
    _write_all(fd, datapipe.frame(request_id, datapipe.KIND_END))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _command_stdin() -> tuple[int, int]:
    """A command's stdin pipe: (its read end, nonblocking, for the test; the write end for the sink)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(r, False)
    return r, w


def _one_command(request_id: int) -> tuple[_Worker, int, tuple[int, int]]:
    """A worker's input pipe (and the host's end of it) with request ``request_id`` running a command."""
    worker = _Worker()
    host = worker.open()
    stdin = _command_stdin()
    worker.sink(request_id).attach_fd(stdin[1])
    return worker, host, stdin


def _two_commands() -> tuple[_Worker, int, int, int]:
    """The same with requests 1 and 2 each running a command; the read end of each one's stdin."""
    worker, host, (a_r, _) = _one_command(1)
    b_r, b_w = _command_stdin()
    worker.sink(2).attach_fd(b_w)
    return worker, host, a_r, b_r


async def _read_to_end(fd: int, timeout: float = 30) -> bytes:
    """Everything the command would read from its stdin, up to the end the sink gives it."""
    parts: list[bytes] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            assert loop.time() < deadline, "stdin did not end"
            await asyncio.sleep(0.005)
            continue
        if not chunk:
            os.close(fd)
            return b"".join(parts)
        parts.append(chunk)


async def test_interleaved_requests_each_get_their_own_bytes_whole_and_in_order() -> None:
    worker, host, a_r, b_r = _two_commands()
    a_bytes, b_bytes = os.urandom(3 * datapipe.MAX_PAYLOAD + 17), os.urandom(200_000)

    def host_writes() -> None:
        _send(host, 1, a_bytes[:1000])
        _send(host, 2, b_bytes[:100_000])
        _send(host, 1, a_bytes[1000:])
        _send(host, 2, b_bytes[100_000:])
        _end(host, 2)
        _end(host, 1)

    writing = asyncio.create_task(asyncio.to_thread(host_writes))
    got_a, got_b = await asyncio.gather(_read_to_end(a_r), _read_to_end(b_r))
    await writing
    assert got_a == a_bytes and got_b == b_bytes  # each to its end: the end frame closed each command's stdin
    assert worker.closed == []  # ended, not closed by the command: the host is not told to stop
    os.close(host)


async def test_nothing_is_taken_before_the_command_starts_nor_while_its_stdin_is_full() -> None:
    worker = _Worker()
    host = worker.open()
    sink = worker.sink(1)
    data = os.urandom(3 * 1024 * 1024)
    writing = asyncio.create_task(asyncio.to_thread(_send, host, 1, data))
    await wait_for(lambda: in_pipe(worker.read_end) >= 60_000, 10, "the host's bytes in the input pipe")
    await asyncio.sleep(0)
    assert not sink.ready() and in_pipe(worker.read_end) >= 60_000  # not started: nothing taken

    r, w = _command_stdin()
    sink.attach_fd(w)  # started; but it reads nothing yet
    await wait_for(lambda: not sink.ready(), 10, "the command's stdin full")
    held = in_pipe(r)
    assert held > 0 and in_pipe(worker.read_end) > 0 and not writing.done()  # the rest waits in the pipes
    await asyncio.sleep(0.05)
    assert in_pipe(r) == held  # and stays there: nothing is read ahead into the worker

    async def reader() -> bytes:
        parts: list[bytes] = []
        have = 0
        while have < len(data):
            try:
                chunk = os.read(r, 1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.002)
                continue
            parts.append(chunk)
            have += len(chunk)
        return b"".join(parts)

    got = await asyncio.wait_for(reader(), 30)
    await writing
    assert got == data
    sink.close()
    os.close(r)
    os.close(host)


async def test_a_command_that_closes_its_stdin_is_told_once_and_the_next_request_loses_nothing() -> None:
    worker, host, a_r, b_r = _two_commands()
    os.close(a_r)  # request 1's command closed its stdin (exec 0<&-)
    b_bytes = os.urandom(500_000)

    def host_writes() -> None:
        _send(host, 1, os.urandom(2 * datapipe.MAX_PAYLOAD))  # two frames: both dropped
        _send(host, 2, b_bytes)
        _end(host, 2)

    writing = asyncio.create_task(asyncio.to_thread(host_writes))
    assert await _read_to_end(b_r) == b_bytes
    await writing
    assert worker.closed == [1]
    assert worker.sinks[1].closed  # and its stdin's write end closed (checked as the test ends)
    os.close(host)


async def test_frames_of_requests_that_are_over_are_dropped_and_the_next_arrives() -> None:
    worker, host, (r, _w) = _one_command(3)

    def host_writes() -> None:
        _send(host, 100, os.urandom(300_000))  # the request ended before its stdin was all sent
        _end(host, 100)
        _send(host, 3, b"after")
        _end(host, 3)

    writing = asyncio.create_task(asyncio.to_thread(host_writes))
    assert await _read_to_end(r) == b"after"
    await writing
    assert worker.closed == []
    os.close(host)


async def test_bytes_that_are_not_input_frames_end_the_reading(_nothing_left_open: set[int]) -> None:
    for garbage in (
        datapipe.HEADER.pack(1, datapipe.KIND_STDOUT, 4) + b"oops",  # an output kind on the input pipe
        datapipe.HEADER.pack(1, datapipe.KIND_STDIN, datapipe.MAX_PAYLOAD + 1),
        datapipe.HEADER.pack(1, datapipe.KIND_END, 3) + b"abc",
    ):
        worker = _Worker()
        host = worker.open()
        os.write(host, garbage)
        only_host = _nothing_left_open | {host}  # the host's end still open: the garbage closed the reader
        await wait_for(lambda: _fds() == only_host, 10, f"the input pipe closed after {garbage[:13]!r}")  # noqa: B023
        os.close(host)


async def test_the_host_going_away_ends_the_reading_also_mid_frame(_nothing_left_open: set[int]) -> None:
    worker, host, (r, w) = _one_command(1)
    os.write(host, datapipe.HEADER.pack(1, datapipe.KIND_STDIN, 1000) + b"x" * 10)
    await wait_for(lambda: in_pipe(r) == 10, 10, "the first bytes in the command's stdin")
    os.close(host)  # the worker's host is gone: the frame never completes
    left = _nothing_left_open | {r, w}  # the command's stdin, both ends: all that is left
    await wait_for(lambda: _fds() == left, 10, "the input pipe closed at its end")
    worker.sinks[1].close()
    os.close(r)


class _CountingSink:
    """A sink that reads what it takes and notes the event loop's heartbeat at each take."""

    closed = False

    def __init__(self, beats: list[int]) -> None:
        self.beats = beats
        self.seen: list[int] = []
        self.got = b""
        self.ended = False

    def ready(self) -> bool:
        return True

    def take(self, source: int, n: int) -> int:
        try:
            data = os.read(source, n)
        except BlockingIOError:
            return 0
        self.seen.append(self.beats[0])
        self.got += data
        return len(data)

    def end(self) -> None:
        self.ended = True


async def test_a_stream_that_never_runs_dry_leaves_the_loop_turns_for_others() -> None:
    """Frames waiting back to back are taken a bounded number per turn of the event loop."""
    loop = asyncio.get_running_loop()
    beats = [0]
    sink = _CountingSink(beats)
    r, host = os.pipe2(os.O_CLOEXEC)
    pipe = InputPipe.open(r, lambda request_id: sink)
    frames = 200
    _write_all(host, b"".join(datapipe.frame(1, datapipe.KIND_STDIN, b"%03d" % i) + b"%03d" % i
                              for i in range(frames)) + datapipe.frame(1, datapipe.KIND_END))

    def beat() -> None:  # another callback that wants its turn, every turn
        beats[0] += 1
        if not sink.ended:
            loop.call_soon(beat)

    loop.call_soon(beat)
    await wait_for(lambda: sink.ended, 10, "the end frame")
    assert sink.got == b"".join(b"%03d" % i for i in range(frames))
    assert len(set(sink.seen)) >= 2 * frames // STEPS_PER_TURN  # the other callback ran in between
    pipe.close()
    os.close(host)
