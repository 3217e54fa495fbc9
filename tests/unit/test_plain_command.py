"""A command without stdin, started and watched with no asyncio transport in between
(:class:`sandbox_core.inside.runner._PlainCommand`): its output arrives whole and stays in its
pipe while nobody reads (:class:`sandbox_core.inside.pipestream.PipeStream`), its exit is its
status, and it is reaped however the wait ends.

In-process on the host (the mechanism); the worker runs it under isolation in the
integration tests of ``exec``."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import threading

import pytest

from sandbox_core.inside import runner
from sandbox_core.inside.confine import _is_open
from sandbox_core.inside.pipestream import PipeStream, in_pipe
from tests.helpers import wait_for


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _reaped(pid: int) -> bool:
    """Neither running nor a zombie: nothing is left of ``pid``."""
    return not os.path.exists(f"/proc/{pid}")


async def test_output_exit_status_and_reaping() -> None:
    before = _fds()
    command = runner._PlainCommand(["sh", "-c", "echo out; echo err >&2; exit 7"], "/")
    out, err, code = await asyncio.gather(command.stdout.read(), command.stderr.read(), command.exit())
    assert (out, err, code) == (b"out\n", b"err\n", 7)
    assert command.has_exited()
    command.close()
    assert _reaped(command.pid)
    assert _fds() == before  # pipes and pidfd closed


async def test_a_signal_is_its_exit_status() -> None:
    command = runner._PlainCommand(["sh", "-c", "kill -9 $$"], "/")
    assert await command.exit() == -signal.SIGKILL
    command.close()
    assert _reaped(command.pid)


async def test_a_command_that_cannot_start_leaves_nothing_open() -> None:
    before = _fds()
    for piped in (False, True):
        with pytest.raises(FileNotFoundError):
            runner._PlainCommand(["/nonexistent/command"], "/", piped)
        with pytest.raises(FileNotFoundError):
            runner._PlainCommand(["true"], "/nonexistent/dir", piped)
    assert _fds() == before


async def test_a_piped_command_reads_what_its_stdin_pipe_is_given() -> None:
    before = _fds()
    command = runner._PlainCommand(["sha256sum"], "/", piped=True)
    stdin = command.take_stdin()
    assert stdin is not None and command.take_stdin() is None  # handed over once
    data = os.urandom(3 * 1024 * 1024)  # more than the pipe holds: the feed waits for the reader
    feeding = asyncio.create_task(runner._feed_fd(stdin, data))
    out, code = await asyncio.gather(command.stdout.read(), command.exit())
    await feeding
    assert code == 0 and out.split()[0].decode() == hashlib.sha256(data).hexdigest()
    command.close()
    assert _fds() == before  # the feed closed the stdin it was given


async def test_an_untaken_stdin_is_closed_with_the_command() -> None:
    before = _fds()
    command = runner._PlainCommand(["cat"], "/", piped=True)
    command.close()  # cat reads the end of its stdin now
    assert await asyncio.wait_for(command.exit(), 10) == 0
    assert _fds() == before


async def test_a_wait_that_is_cancelled_still_reaps_the_command() -> None:
    command = runner._PlainCommand(["sleep", "300"], "/")
    waiter = asyncio.create_task(command.exit())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    command.close()
    os.kill(command.pid, signal.SIGKILL)  # what the request's clean-up does (its process group)
    await wait_for(lambda: _reaped(command.pid), 10, "the killed command reaped")  # by the loop's pidfd reader


async def test_the_stream_reads_nothing_ahead_and_loses_nothing() -> None:
    size = 12 * runner._READ  # more than the pipe (1 MiB at most) holds
    data = os.urandom(size)
    r, w = os.pipe()
    stream = PipeStream(r)

    def write() -> None:
        with os.fdopen(w, "wb") as pipe:
            pipe.write(data)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        await wait_for(lambda: in_pipe(r) > 0, 10, "bytes in the pipe")
        assert await stream.ready(runner._READ) == min(in_pipe(r), runner._READ)  # counted, not read
        assert writer.is_alive()  # held back by the full pipe: nothing was read ahead
        got = bytearray()
        while chunk := await stream.read(runner._READ):
            got += chunk
    finally:
        writer.join(10)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert await stream.ready(runner._READ) == 0  # at the end
    stream.close()
    assert stream.is_closing()


async def test_ready_says_the_end_only_once_the_pipe_is_empty() -> None:
    r, w = os.pipe()
    stream = PipeStream(r)
    os.write(w, b"last words")
    os.close(w)  # hung up with bytes still in the pipe
    assert await stream.ready(4) == 4
    await stream.skip(4)
    assert await stream.ready(100) == 6
    assert await stream.read(100) == b" words"
    assert await stream.ready(100) == 0
    stream.close()


async def test_close_wakes_a_waiting_read_and_a_lent_descriptor_stays_open_until_given_back() -> None:
    before = _fds()
    r, w = os.pipe()
    stream = PipeStream(r)
    waiting = asyncio.create_task(stream.read(10))
    await wait_for(stream.waiting, 10, "the read waiting")
    stream.lend()
    stream.close()
    assert await asyncio.wait_for(waiting, 10) == b""
    assert _is_open(r)  # a frame still splices from it
    stream.give_back()
    assert not _is_open(r)
    os.close(w)
    assert _fds() == before
