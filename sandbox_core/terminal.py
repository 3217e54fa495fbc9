"""The host end of the terminal crossing: an interactive session on a pty inside the sandbox.

``pool.terminal(user_id, argv, rows=, cols=)`` runs a command on a pseudo-terminal that
the worker makes inside the sandbox (:mod:`sandbox_core.inside.terminal`) and gives the
caller its two byte streams and its window size::

    async with pool.terminal("alice", LOGIN_SHELL, rows=24, cols=80) as term:
        await term.write(b"ls\\r")
        chunk = await term.read()          # the terminal's bytes, b"" once it has ended
        await term.resize(40, 120)         # the program gets SIGWINCH
        code = await term.wait()           # the program's exit code

It is an ``exec`` request like any other (``ExecRequest(tty=(rows, cols))``): it holds a
worker of the user busy while it is open, and ``request_timeout`` (or ``timeout=``) ends
it. Keys are sent in order as :meth:`Terminal.write` is called, a few writes ahead at most
(a program that does not read its terminal holds the writer); output waits for
:meth:`Terminal.read`, and a caller that stops reading stops the program's output.
Leaving the ``async with`` block before the program ended cancels it (the worker kills
what it started).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from types import TracebackType
from typing import Any

from sandbox_core.events import Event
from sandbox_core.requests import ExecRequest, Window, check_window

LOGIN_SHELL = (
    "/bin/sh", "-c", "if command -v bash >/dev/null 2>&1; then exec bash -l; fi; exec sh -l",
)
"""The user's login shell: bash when the sandbox has it, else sh (cwd: the workspace)."""
AHEAD = 16
"""Writes (and window sizes) queued for the worker before :meth:`Terminal.write` waits."""

StreamOpener = Callable[[ExecRequest], AsyncGenerator[Event, None]]


async def _until_none(queue: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    while (item := await queue.get()) is not None:
        yield item


class Terminal:
    """One open terminal session: write keys, read output, resize, wait for the exit code.

    A task takes the request's events as they come into a short queue (:data:`AHEAD`
    chunks), so :meth:`read` can be cancelled (``asyncio.wait_for``) without ending the
    session, and a caller that stops reading still stops the program's output.
    """

    def __init__(self, events: AsyncGenerator[Event, None], keys: asyncio.Queue[bytes | None] | None,
                 sizes: asyncio.Queue[Window | None]) -> None:
        self._events = events
        self._keys = keys
        self._sizes = sizes
        self._output: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(AHEAD)
        self._pump: asyncio.Task[None] | None = None
        self._ended = False
        self.result: dict[str, Any] | None = None
        """The request's ``done`` data once the program has ended (``exit_code``, ...)."""
        self.worker_id: str | None = None

    @property
    def exit_code(self) -> int | None:
        """The program's exit code, once it has ended (128+N for a signal N)."""
        code = self.result.get("exit_code") if self.result is not None else None
        return code if isinstance(code, int) else None

    def start(self) -> None:
        """Send the request (done by the first read at the latest)."""
        if self._pump is None:
            self._pump = asyncio.create_task(self._take_events())

    async def _take_events(self) -> None:
        try:
            async for event in self._events:
                if event.type == "started":
                    self.worker_id = str(event.data.get("worker_id") or "") or None
                elif event.type in ("stdout", "stderr"):
                    chunk = event.chunk()
                    if chunk:
                        await self._output.put(chunk)
                elif event.type == "done":
                    self.result = dict(event.data)
        except Exception as exc:  # noqa: BLE001 - raised to the reader, in order
            await self._output.put(exc)
            return
        await self._output.put(None)

    async def write(self, data: bytes) -> None:
        """Send ``data`` to the terminal as typed keys (waits while the worker is behind)."""
        if self._keys is None:
            raise ValueError("this terminal takes no more input")
        self.start()
        if data:
            await self._keys.put(bytes(data))

    async def close_stdin(self) -> None:
        """No more keys (the program keeps its terminal; most shells exit on Ctrl-D instead)."""
        if self._keys is not None:
            await self._keys.put(None)
            self._keys = None

    async def resize(self, rows: int, cols: int) -> None:
        """Give the terminal a new window size (the program gets SIGWINCH)."""
        check_window(rows, cols)
        self.start()
        await self._sizes.put((rows, cols))

    async def read(self) -> bytes:
        """The next bytes the terminal wrote; ``b""`` once the program has ended.

        A request that failed (timed out, its worker crashed) raises its error here.
        """
        if self._ended:
            return b""
        self.start()
        item = await self._output.get()
        if item is None:
            self._ended = True
            return b""
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        return item

    async def wait(self) -> int | None:
        """Read (and drop) what is left until the program ends; its exit code."""
        while await self.read():
            pass
        return self.exit_code

    async def aclose(self) -> None:
        """End the session: a program still running is cancelled (and killed)."""
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
            with contextlib.suppress(BaseException):
                await self._pump
        await self._events.aclose()


class TerminalSession:
    """``async with`` a :class:`Terminal`; leaving it early cancels the program."""

    def __init__(self, open_stream: StreamOpener, request: ExecRequest,
                 keys: asyncio.Queue[bytes | None] | None, sizes: asyncio.Queue[Window | None]) -> None:
        self._terminal = Terminal(open_stream(request), keys, sizes)

    async def __aenter__(self) -> Terminal:
        return self._terminal

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(self._terminal.aclose())


def terminal_session(
    open_stream: StreamOpener,
    argv: tuple[str, ...] | list[str] = LOGIN_SHELL,
    *,
    rows: int = 24,
    cols: int = 80,
    term: str | None = None,
    timeout: float | None = None,
    stdin: bool = True,
    network: tuple[str, ...] | None = None,
) -> TerminalSession:
    """A terminal session running ``argv`` through ``open_stream`` (a pool's ``execute_stream``);
    ``network`` narrows the network policy as :attr:`ExecRequest.network`."""
    keys: asyncio.Queue[bytes | None] | None = asyncio.Queue(AHEAD) if stdin else None
    sizes: asyncio.Queue[Window | None] = asyncio.Queue(AHEAD)
    request = ExecRequest(
        argv=tuple(argv), tty=(rows, cols), term=term, timeout=timeout,
        stdin=_until_none(keys) if keys is not None else None, resize=_until_none(sizes), network=network,
    )
    return TerminalSession(open_stream, request, keys, sizes)
