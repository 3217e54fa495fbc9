"""A command without stdin, started and watched with no asyncio transport in between
(:class:`sandbox_core.inside.runner._PlainCommand`): its output arrives whole, its reader
pauses while nobody reads, its exit is its status, and it is reaped however the wait ends.

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
    with pytest.raises(FileNotFoundError):
        runner._PlainCommand(["/nonexistent/command"], "/")
    with pytest.raises(FileNotFoundError):
        runner._PlainCommand(["true"], "/nonexistent/dir")
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


async def test_the_reader_pauses_while_nobody_reads_and_loses_nothing() -> None:
    size = 12 * runner._READ  # more than the pipe (1 MiB at most) and the reader's buffer hold
    data = os.urandom(size)
    r, w = os.pipe()
    reader = runner._PipeReader.open(r)

    def write() -> None:
        with os.fdopen(w, "wb") as pipe:
            pipe.write(data)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        await wait_for(lambda: not reader.is_reading(), 10, "reader paused")
        buffered = len(vars(reader.stream)["_buffer"])
        assert buffered <= 3 * runner._READ  # past twice its limit it pauses: one read more at most
        assert writer.is_alive()  # held back by the full pipe, not buffered here
        got = bytearray()
        while chunk := await reader.stream.read(runner._READ):
            got += chunk
    finally:
        writer.join(10)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert reader.is_closing() and not reader.is_reading()
