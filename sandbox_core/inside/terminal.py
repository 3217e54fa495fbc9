"""The inside end of the terminal crossing: a pseudo-terminal made in the sandbox.

An ``exec`` request with ``"tty": {"rows", "cols", "term"?}`` runs its command on a pty
that the worker opens here, in the sandbox's own ``/dev/pts`` (bwrap's ``--dev`` mounts a
fresh devpts instance): the command is a session leader with the pty's slave as its
controlling terminal and as its stdin, stdout and stderr. Nothing of the host's terminal
is reachable from inside; the host's end is two byte streams and a window size.

Bytes from the master go to the host as ``stdout`` frames on the output pipe (each write
waits for the pipe, so a host that stops reading stops the command's output); the host's
``stdin`` frames are written to the master as they come (the streamed-stdin sink of
:mod:`sandbox_core.inside.runner`, with its pausing). A window size change is the control
notification ``exec.resize {id, rows, cols}``: the master gets ``TIOCSWINSZ``, and the
kernel sends ``SIGWINCH`` to the terminal's foreground process group. ``TIOCSTI`` stays
refused by the seccomp filter: a program cannot type into its own terminal either.

The exit code is the command's. When it exits, everything the request started is killed
(as for any ``exec``), the rest of the output is read until the pty hangs up, and the pty
is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import struct
import termios
import time
from typing import TYPE_CHECKING, Any

from sandbox_core import datapipe
from sandbox_core.errors import ProtocolError
from sandbox_core.inside.runner import (
    NOT_EXECUTABLE,
    NOT_FOUND,
    Alone,
    ExitWatch,
    OutputBudget,
    command_argv,
    exit_result,
    kill_group,
    kill_strays,
    never_alone,
    output_limit,
)
from sandbox_core.process_tree import boot_ticks
from sandbox_core.requests import MAX_WINDOW_SIDE as MAX_SIDE
from sandbox_core.requests import TERM_NAME

if TYPE_CHECKING:
    from sandbox_core.inside.channel import OutputPipe, RequestContext
    from sandbox_core.inside.runner import StdinSink

_READ = 64 * 1024
_DRAIN_AFTER_EXIT = 2.0
DEFAULT_TERM = "xterm"
_IUTF8 = getattr(termios, "IUTF8", 0o40000)


def window(params: dict[str, Any]) -> tuple[int, int]:
    """``(rows, cols)`` from a request's ``tty`` or ``exec.resize`` params; ProtocolError if bad."""
    rows, cols = params.get("rows"), params.get("cols")
    for name, value in (("rows", rows), ("cols", cols)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIDE:
            raise ProtocolError(f"tty {name} must be an integer from 1 to {MAX_SIDE}")
    assert isinstance(rows, int) and isinstance(cols, int)
    return rows, cols


def set_window(fd: int, rows: int, cols: int) -> None:
    """Give the terminal behind ``fd`` a window size (the kernel signals its foreground group)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_terminal() -> None:
    """In the child, after ``setsid``: make stdin (the pty slave) the controlling terminal.

    Python 3.11's subprocess has no option for this, so it is a ``preexec_fn``: one ioctl
    between fork and exec (what ``pty.fork`` does too), taking no lock another thread of the
    worker could hold.
    """
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminals:
    """The ptys of running terminal requests, by request id (for ``exec.resize``)."""

    def __init__(self) -> None:
        self._masters: dict[int, int] = {}

    def resize(self, params: dict[str, Any]) -> None:
        """An ``exec.resize`` notification; one for no running terminal is ignored."""
        request_id = params.get("id")
        master = self._masters.get(request_id) if isinstance(request_id, int) else None
        if master is None:
            return
        try:
            rows, cols = window(params)
        except ProtocolError:
            return
        with contextlib.suppress(OSError):
            set_window(master, rows, cols)

    def add(self, request_id: int, master: int) -> None:
        self._masters[request_id] = master

    def remove(self, request_id: int) -> None:
        self._masters.pop(request_id, None)


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


class _Pump(OutputBudget):
    """The master's bytes to the host until the pty hangs up (EIO once no slave is open), and
    ``limits.output_mb``: past it the program's group is killed and the output stops there."""

    def __init__(self, master: int, pipe: OutputPipe, request_id: int, limit: int) -> None:
        super().__init__(limit)
        self._master, self._pipe, self._request_id = master, pipe, request_id

    async def run(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                chunk = os.read(self._master, _READ)
            except BlockingIOError:
                await _readable(loop, self._master)
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return
                raise
            if not chunk:
                return
            if chunk := self.take(chunk):  # past the limit: drain what is left without sending it
                await self._pipe.send(self._request_id, datapipe.KIND_STDOUT, chunk)


def _environment(params: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    term = params.get("term")
    env["TERM"] = term if isinstance(term, str) and TERM_NAME.match(term) else env.get("TERM") or DEFAULT_TERM
    return env


async def run_terminal(
    ctx: RequestContext,
    params: dict[str, Any],
    sink: StdinSink | None,
    pipe: OutputPipe | None,
    terminals: Terminals,
    *,
    alone: Alone = never_alone,
) -> dict[str, Any]:
    """Run the command of a ``tty`` exec on a pty of its own; the result carries ``exit_code``."""
    if pipe is None or not isinstance(ctx.request.id, int):
        raise ProtocolError("a terminal needs the worker's output pipe")
    request_id = ctx.request.id
    try:
        return await _run(ctx, params, sink, pipe, terminals, request_id, alone)
    finally:
        if sink is not None:
            sink.close()
        task = asyncio.current_task()
        if task is None or task.cancelling() == 0:
            await pipe.send(request_id, datapipe.KIND_END)


async def _run(
    ctx: RequestContext,
    params: dict[str, Any],
    sink: StdinSink | None,
    pipe: OutputPipe,
    terminals: Terminals,
    request_id: int,
    alone: Alone,
) -> dict[str, Any]:
    argv = command_argv(params)
    tty = params.get("tty")
    rows, cols = window(tty if isinstance(tty, dict) else {})
    loop = asyncio.get_running_loop()
    master, slave = os.openpty()
    writer: asyncio.StreamWriter | None = None
    try:
        set_window(slave, rows, cols)
        attrs = termios.tcgetattr(slave)
        attrs[0] |= _IUTF8  # erase a whole UTF-8 character, as local terminals do
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        os.set_blocking(master, False)
        started = time.monotonic()
        since = boot_ticks()
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: ExitWatch(loop),
                *argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=ctx.cwd,
                env=_environment(tty if isinstance(tty, dict) else {}),
                start_new_session=True,
                preexec_fn=_take_terminal,
            )
        except FileNotFoundError:
            await pipe.send(request_id, datapipe.KIND_STDOUT, f"{argv[0]}: command not found\r\n".encode())
            return {"exit_code": NOT_FOUND, "duration_s": 0.0}
        except PermissionError:
            await pipe.send(request_id, datapipe.KIND_STDOUT, f"{argv[0]}: permission denied\r\n".encode())
            return {"exit_code": NOT_EXECUTABLE, "duration_s": 0.0}
        finally:
            os.close(slave)
            slave = -1
        pid = transport.get_pid()
        terminals.add(request_id, master)
        if sink is not None:
            wtransport, wprotocol = await loop.connect_write_pipe(
                asyncio.streams.FlowControlMixin, os.fdopen(os.dup(master), "wb", 0)
            )
            writer = asyncio.StreamWriter(wtransport, wprotocol, None, loop)
            sink.attach(writer)
        pump = _Pump(master, pipe, request_id, output_limit(params))
        pump.pgid = pid
        reader = asyncio.create_task(pump.run(loop))
        try:
            await protocol.exited
            returncode = transport.get_returncode()
            kill_group(pid)
            kill_strays(since, frozenset({pid}), alone=alone())
            if sink is not None:
                sink.close()
            _done, pending = await asyncio.wait({reader}, timeout=_DRAIN_AFTER_EXIT)
            for task in pending:  # something outside the request still holds the slave
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        except BaseException:
            kill_group(pid)
            kill_strays(since, frozenset({pid}), alone=alone())
            reader.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.shield(asyncio.wait({reader}))
            transport.close()
            raise
        finally:
            if transport.get_returncode() is not None:
                transport.close()
    finally:
        terminals.remove(request_id)
        if writer is not None:
            writer.close()
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert returncode is not None
    return exit_result(returncode, started, pump)
