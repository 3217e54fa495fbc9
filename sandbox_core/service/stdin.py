"""Streamed stdin of a service run: bytes POSTed to ``/v1/runs/{id}/stdin``, read by the command.

The route and the command meet in a :class:`StdinRelay`, a queue of a few chunks: the route
waits while it is full, so a command that reads slowly slows the HTTP client (through TCP
flow control) instead of filling the server's memory. When the run ends the relay closes
and the route stops reading the body at once.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

DEPTH = 4
"""Chunks the relay holds at most."""


class StdinRelay:
    """A bounded hand-over of stdin chunks from one HTTP body to one command."""

    def __init__(self, depth: int = DEPTH) -> None:
        self._chunks: collections.deque[bytes | None] = collections.deque()
        self._depth = depth
        self._changed = asyncio.Condition()
        self.attached = False
        """A body has been attached (a run takes one stdin stream)."""
        self.closed = False
        """The run is over: nothing more is read."""

    async def put(self, chunk: bytes | None) -> bool:
        """Queue one chunk (``None`` = end of input); False once the run no longer reads."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.closed or len(self._chunks) < self._depth)
            if self.closed:
                return False
            self._chunks.append(chunk)
            self._changed.notify_all()
            return True

    async def close(self) -> None:
        """The run is over: wake the route so it stops reading the body."""
        async with self._changed:
            self.closed = True
            self._chunks.clear()
            self._changed.notify_all()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: self.closed or bool(self._chunks))
                if self.closed:
                    return
                chunk = self._chunks.popleft()
                self._changed.notify_all()
            if chunk is None:
                return
            if chunk:
                yield chunk
