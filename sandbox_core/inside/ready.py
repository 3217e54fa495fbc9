"""Waiting on the worker's loop for one descriptor to be readable or writable."""

from __future__ import annotations

import asyncio


async def fd_ready(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool = False) -> None:
    """Until ``fd`` has something to read (or its writers are gone), or, with ``write``, can be written."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)
