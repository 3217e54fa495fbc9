"""The host's end of a worker's output pipe: each frame read as what it is.

A stream transport reads whatever the pipe holds, up to its size, and the frames are then cut
out of those reads: each payload copied once more, twice when it spans two reads. Here the
header is read (13 bytes), then the payload with a read of exactly its length, so a payload
that is in the pipe (almost all: the worker writes each frame whole) becomes the bytes handed
on by the kernel's copy alone, and the reads fit the cache (the worker's frames are
:data:`sandbox_core.inside.runner._READ` at most). Nothing is read ahead of what the frame
needs; while paused (the caller is behind) nothing is read at all.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from sandbox_core import datapipe

FRAMES_PER_TURN = 16
"""Frames read in one turn of the event loop at most (then other readers get theirs)."""


class FrameReader:
    """Reads frames from ``fd`` on the loop and hands each to ``deliver(request_id, kind, payload)``.

    ``broken(exc)`` hears of bytes that are not frames (:class:`sandbox_core.datapipe.FrameError`)
    or a failed read; the reader has stopped then. At the pipe's end it closes itself.
    """

    def __init__(self, fd: int, deliver: Callable[[int, int, bytes], None], broken: Callable[[Exception], None],
                 kinds: frozenset[int] = datapipe.OUTPUT_KINDS) -> None:  # fmt: skip
        os.set_blocking(fd, False)
        self._fd = fd
        self._deliver, self._broken, self._kinds = deliver, broken, kinds
        self._loop = asyncio.get_running_loop()
        self._head = b""
        self._frame: tuple[int, int, int] | None = None
        self._parts: list[bytes] = []
        self._have = 0
        self._reading = False
        self._closed = False
        self.resume_reading()

    def _readable(self) -> None:
        try:
            for _ in range(FRAMES_PER_TURN):
                if not self._reading or not self._step():
                    return
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, datapipe.FrameError) as exc:
            self.close()
            self._broken(exc)

    def _step(self) -> bool:
        """Read the rest of the header or of the payload; False at the pipe's end."""
        if self._frame is None:
            try:
                self._head, header = datapipe.read_header(self._fd, self._head, self._kinds)
            except EOFError:
                self.close()
                return False
            if header is None:
                return True
            request_id, kind, length = header
            if not length:
                self._deliver(request_id, kind, b"")
                return True
            self._frame = (request_id, kind, length)
        request_id, kind, length = self._frame
        data = os.read(self._fd, length - self._have)
        if not data:
            self.close()
            return False
        self._have += len(data)
        if self._have < length:
            self._parts.append(data)
            return True
        if self._parts:
            self._parts.append(data)
            data = b"".join(self._parts)
        self._frame, self._parts, self._have = None, [], 0
        self._deliver(request_id, kind, data)
        return True

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closed:
            self._reading = True
            self._loop.add_reader(self._fd, self._readable)

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if not self._closed:
            self.pause_reading()
            self._closed = True
            os.close(self._fd)
