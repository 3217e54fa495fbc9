"""The local end of a terminal session: this terminal in raw mode, wired to a sandbox pty.

:func:`attach` runs a program on a pseudo-terminal inside the user's sandbox (the pool's
``terminal()``, in-process or through the service) and connects it to the CLI's own
terminal: keys go there as bytes (Ctrl-C, Ctrl-Z and Ctrl-\\ too: in raw mode they are
characters, not signals), the program's bytes are written here unfiltered (the session
is the user's own terminal, as with ``ssh`` or ``docker exec -t``), and the window size
follows SIGWINCH.

The local terminal's mode is restored on every way out: the program's end, the worker
crashing, the service going away, SIGTERM, SIGHUP and SIGINT (which end the session:
128+N). Pending input is dropped when the mode is restored (``TCSAFLUSH``), so an answer
the terminal gives to a query the sandbox sent last is not typed into the shell here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import tty
from collections.abc import Callable, Iterator
from typing import Any, Protocol

DEFAULT_WINDOW = (24, 80)
EOF_KEY = b"\x04"
_ENDING = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
MODES_OFF = b"\x1b[?2004l\x1b[?1l\x1b>\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1006l\x1b[?25h\r\n"
"""Written when a session ends before its program did: bracketed paste, application cursor
keys and keypad and mouse reporting off, cursor shown (a program that dies cannot undo
them), and a fresh line for what the CLI prints next."""


class TerminalLike(Protocol):
    """What :func:`attach` needs of an open terminal session (library or service)."""

    async def write(self, data: bytes) -> None: ...
    async def read(self) -> bytes: ...
    async def resize(self, rows: int, cols: int) -> None: ...
    async def close_stdin(self) -> None: ...

    @property
    def exit_code(self) -> int | None: ...


class SessionOpener(Protocol):
    def __call__(self, *, rows: int, cols: int, term: str | None, stdin: bool) -> Any: ...


def _term_name() -> str | None:
    """This terminal's ``TERM`` when it is a plain name (else the sandbox's default, xterm)."""
    from sandbox_core.requests import TERM_NAME

    name = os.environ.get("TERM")
    return name if name and TERM_NAME.match(name) else None


def window_of(fd: int) -> tuple[int, int]:
    """``(rows, cols)`` of the terminal behind ``fd`` (24×80 when it is none or says 0)."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return DEFAULT_WINDOW
    return (size.lines or DEFAULT_WINDOW[0], size.columns or DEFAULT_WINDOW[1])


@contextlib.contextmanager
def raw_mode(fd: int | None) -> Iterator[None]:
    """This terminal in raw mode while inside (nothing when ``fd`` is None); restored on exit."""
    if fd is None:
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _keys(term: TerminalLike, fd: int) -> None:
    """This terminal's (or pipe's) bytes to the session until end of input.

    The end of a piped stdin is sent as the terminal's end-of-file key (Ctrl-D), which a
    program on a terminal reads as the end of its input: ``echo ls | sandbox shell`` ends.
    """
    loop = asyncio.get_running_loop()
    piped = not os.isatty(fd)
    selectable = True
    while True:
        if selectable:
            try:
                await _readable(loop, fd)
            except (OSError, ValueError):  # a regular file: epoll takes none, but reads never block
                selectable = False
        data = await asyncio.to_thread(os.read, fd, 65536) if not selectable else os.read(fd, 65536)
        if not data:
            if piped:
                await term.write(EOF_KEY)
            await term.close_stdin()
            return
        await term.write(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


async def attach(open_session: SessionOpener, *, interactive: bool) -> int:
    """Run the session ``open_session`` opens on this terminal; the program's exit code.

    ``interactive`` sends this process's stdin to the program (``-i``); with a terminal as
    stdin, that terminal is put in raw mode for the session.
    """
    in_fd, out_fd = sys.stdin.fileno(), sys.stdout.fileno()
    local_tty = interactive and os.isatty(in_fd)
    rows, cols = window_of(out_fd if os.isatty(out_fd) else in_fd)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    ended_by: list[int] = []

    def end(sig: int) -> None:
        if not ended_by:
            ended_by.append(sig)
            if main is not None:
                main.cancel()

    sys.stdout.flush()
    finished = False
    with raw_mode(in_fd if local_tty else None), _signals(loop, end), _tidy(out_fd, lambda: finished):
        try:
            async with open_session(rows=rows, cols=cols, term=_term_name(), stdin=interactive) as term:

                sizes: list[tuple[int, int]] = []
                sender: list[asyncio.Task[None]] = []

                async def send_sizes() -> None:
                    sent = (rows, cols)
                    while sizes and sizes[-1] != sent:
                        sent = sizes[-1]
                        await term.resize(*sent)

                def resized() -> None:  # a burst of SIGWINCH sends the latest size, once
                    sizes[:] = [window_of(out_fd if os.isatty(out_fd) else in_fd)]
                    if not sender or sender[0].done():
                        sender[:] = [loop.create_task(send_sizes())]

                loop.add_signal_handler(signal.SIGWINCH, resized)
                keys = asyncio.create_task(_keys(term, in_fd)) if interactive else None
                try:
                    while chunk := await term.read():
                        _write_all(out_fd, chunk)
                finally:
                    loop.remove_signal_handler(signal.SIGWINCH)
                    for task in sender:
                        task.cancel()
                    if keys is not None:
                        keys.cancel()
                        with contextlib.suppress(BaseException):
                            await keys
                finished = term.exit_code is not None
                return term.exit_code if term.exit_code is not None else 1
        except asyncio.CancelledError:
            if ended_by:
                return 128 + ended_by[0]
            raise


@contextlib.contextmanager
def _tidy(out_fd: int, finished: Callable[[], bool]) -> Iterator[None]:
    """On a way out other than the program's end, switch off the modes it may have left on."""
    try:
        yield
    finally:
        if not finished() and os.isatty(out_fd):
            with contextlib.suppress(OSError):
                _write_all(out_fd, MODES_OFF)


@contextlib.contextmanager
def _signals(loop: asyncio.AbstractEventLoop, end: Any) -> Iterator[None]:
    """SIGTERM, SIGHUP and SIGINT end the session (the finally blocks restore the terminal)."""
    installed = []
    for sig in _ENDING:
        try:
            loop.add_signal_handler(sig, end, int(sig))
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
