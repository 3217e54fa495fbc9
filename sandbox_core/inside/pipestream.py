"""The reading end of a command's output pipe, read only when its reader asks.

:class:`asyncio.StreamReader` copies every byte twice on its way through (each read into
its buffer, then each ``read(n)`` out of it) and reads ahead until its buffer is twice its
limit. A command's output on its way to the host needs neither. On the output pipe it is
not read here at all: :meth:`PipeStream.ready` says how many bytes wait in the pipe and
:meth:`sandbox_core.inside.channel.OutputPipe.splice` has the kernel move them to the host's
pipe; elsewhere :meth:`PipeStream.read` is one ``os.read`` per chunk. Either way the pipe
itself holds what is not yet asked for: a command that writes faster than the host takes
blocks in its own ``write``.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import sys
import termios


class PipeStream:
    """``await read(n)``: up to ``n`` bytes as soon as any are in the pipe; ``b""`` at its end.

    Nonblocking reads on the loop's reader callback; :meth:`close` (also while a read waits:
    it then returns ``b""``) removes the callback before the descriptor is closed.
    """

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._ended = False
        self._lent = 0
        """Frames being spliced from the pipe: its descriptor is closed once the last is written."""

    @property
    def fd(self) -> int:
        return self._fd

    async def ready(self, n: int) -> int:
        """How many bytes (at most ``n``) are in the pipe, once there are any; 0 at its end or closed.

        Nothing is read: the bytes stay in the pipe for :meth:`OutputPipe.splice` or :meth:`skip`.
        """
        while not self._closed and not self._ended:
            if waiting := in_pipe(self._fd):
                return min(waiting, n)
            if hung_up(self._fd):  # every writer has closed its end: nothing more can come
                if waiting := in_pipe(self._fd):  # written just before the last one closed
                    return min(waiting, n)
                self._ended = True
                break
            await self._readable()
        return 0

    async def skip(self, n: int) -> None:
        """Read and drop ``n`` bytes (past an output limit)."""
        while n > 0 and (chunk := await self.read(min(n, 1024 * 1024))):
            n -= len(chunk)

    def lend(self) -> None:
        """A frame will splice from the descriptor: :meth:`close` leaves it open until :meth:`give_back`."""
        self._lent += 1

    def give_back(self) -> None:
        self._lent -= 1
        if self._closed and not self._lent:
            os.close(self._fd)

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (everything to the end for ``n < 0``); ``b""`` once at its end or closed."""
        if n < 0:
            parts = []
            while chunk := await self.read(1024 * 1024):
                parts.append(chunk)
            return b"".join(parts)
        while not self._closed and not self._ended:
            try:
                data = os.read(self._fd, n)
            except (BlockingIOError, InterruptedError):
                await self._readable()
                continue
            if not data:
                self._ended = True
            return data
        return b""

    async def _readable(self) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        self._loop.add_reader(self._fd, wake, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if not self._closed:
                self._loop.remove_reader(self._fd)

    def waiting(self) -> bool:
        """Whether a read is waiting for bytes (the pipe is empty and the reader asked)."""
        return self._waiter is not None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._waiter is not None:
            self._loop.remove_reader(self._fd)
            wake(self._waiter)
        if not self._lent:
            os.close(self._fd)

    def is_closing(self) -> bool:
        return self._closed


def wake(waiter: asyncio.Future[None]) -> None:
    """A loop callback's end of a wait for a descriptor (the waiter may be gone: cancelled)."""
    if not waiter.done():
        waiter.set_result(None)


async def writable(fd: int) -> None:
    """Until the nonblocking pipe ``fd`` takes a write (or has no reader left: the write then says so)."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    loop.add_writer(fd, wake, waiter)
    try:
        await waiter
    finally:
        loop.remove_writer(fd)


def in_pipe(fd: int) -> int:
    """The bytes waiting in the pipe ``fd`` (``FIONREAD``: a C int)."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), sys.byteorder)


def hung_up(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(events & select.POLLHUP for _, events in poller.poll(0))
