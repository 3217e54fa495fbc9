"""What ``sandbox exec`` does, without its typer signature (:mod:`cli.commands.exec_cmd`).

Kept apart so the fast entry point (:mod:`cli.main`) runs it without importing typer or rich.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from cli import output
from cli.commands.common import client_settings, effective_config
from cli.runtime import run_job, service_target, warn_ignored

if TYPE_CHECKING:
    from cli.remote import Target
    from cli.runtime import Pool
    from cli.state import AppState
    from cli.termfilter import TerminalFilter
    from sandbox_core.config import ProcessSandboxConfig
    from sandbox_core.events import Event
    from sandbox_core.head_start import HeadStart


def exec_main(
    state: AppState,
    command: list[str],
    *,
    user: str | None = None,
    timeout: float | None = None,
    profile: str | None = None,
    shell: bool = False,
    raw: bool = False,
    tty: bool | None = None,
    interactive: bool = False,
    network: tuple[str, ...] | None = None,
) -> int:
    """Run ``command`` in the user's sandbox as ``sandbox exec`` does; the exit code to leave with."""
    target = service_target(state)
    warn_ignored(target, profile=profile)
    if tty is None and not shell and output.is_tty(sys.stdin) and output.is_tty(sys.stdout) and _is_shell(command):
        tty = interactive = True  # `sandbox exec -- bash` at a terminal: an interactive shell, as expected
    piped = sys.stdin is not None and not sys.stdin.isatty()
    if target is not None and not target.tcp and not tty and profile is None:
        if interactive:
            output.warn("-i only matters with -t (without it, piped stdin streams to the command anyway)")
        return _exec_on_service(state, target, command, shell=shell, timeout=timeout, raw=raw, piped=piped,
                                processes=client_settings(state).processes, user=user, network=network)
    config = effective_config(state, profile, min_idle=0, warn=target is None)
    user_id = state.user_id(user)
    if tty:
        argv = ["/bin/sh", "-c", " ".join(command)] if shell else list(command)
        return run_terminal_job(state, config, target, user_id, argv, timeout=timeout, interactive=interactive,
                                user=user, network=network)
    if interactive:
        output.warn("-i only matters with -t (without it, piped stdin streams to the command anyway)")
    if target is not None and not target.tcp:
        return _exec_on_service(state, target, command, shell=shell, timeout=timeout, raw=raw, piped=piped,
                                processes=config.limits.processes, user=user, network=network)

    head = head_start(config, user_id) if target is None and network is None else None

    async def job(pool: Pool) -> int:
        from sandbox_core.requests import ExecRequest

        stdin = read_stdin() if piped else None
        request = (
            ExecRequest(shell=" ".join(command), stdin=stdin, timeout=timeout, network=network)
            if shell
            else ExecRequest(argv=tuple(command), stdin=stdin, timeout=timeout, network=network)
        )
        printer = _Printer(raw, config.limits.processes)
        try:
            async for event in pool.execute_stream(user_id, request):
                printer.show(event)
        finally:
            printer.close()
        return printer.code

    return run_job(config, job, verbose=state.verbose, target=target, user=user or state.user, head_start=head)


def head_start(config: ProcessSandboxConfig, user_id: str) -> HeadStart | None:
    """The one worker of this in-process command, spawned now (:mod:`sandbox_core.head_start`).

    None when the ``head_start`` setting is off or it cannot be spawned here: the pool then
    starts the worker itself and reports the same error the usual way.
    """
    if not config.head_start:
        return None
    from sandbox_core import head_start as early
    from sandbox_core.errors import SandboxError

    try:
        return early.begin(config, user_id)
    except (SandboxError, OSError):
        return None


class _Printer:
    """A command's events on our stdout and stderr; its exit code once ``done`` came."""

    def __init__(self, raw: bool, processes: int) -> None:
        self.code = output.EXIT_FAILURE
        self._out, self._err = Sink(sys.stdout.buffer, raw), Sink(sys.stderr.buffer, raw)
        self._processes = processes

    def show(self, event: Event) -> None:
        if event.type == "stdout":
            self._out.write(event.chunk())
        elif event.type == "stderr":
            self._err.write(event.chunk())
        elif event.type == "done":
            self.close()
            self.code = int(event.data.get("exit_code", output.EXIT_FAILURE))
            for line in limit_notes(event.data, self._processes):
                output.error(line)

    def close(self) -> None:
        self._out.close()
        self._err.close()


def _exec_on_service(
    state: AppState, target: Target, command: list[str], *, shell: bool, timeout: float | None, raw: bool,
    piped: bool, processes: int, user: str | None, network: tuple[str, ...] | None = None,
) -> int:
    """``exec`` on the service at a Unix socket, without an event loop (see :mod:`sandbox_core.service.blocking`).

    The same requests and the same output as through :class:`~cli.remote.RemotePool`: the
    service decides the user (an explicit, different ``--user`` is warned about), piped
    stdin streams in a second request once the run has started, Ctrl-C cancels the run on
    the service and waits (up to :data:`~cli.remote.CANCEL_TIMEOUT`) for it to stop.
    """
    from pathlib import Path

    from cli.remote import CANCEL_TIMEOUT, request_body, unix_identity
    from cli.runtime import report
    from sandbox_core.errors import SandboxError
    from sandbox_core.requests import ExecRequest
    from sandbox_core.service.blocking import BlockingClient

    requested = user or state.user
    identity = unix_identity()
    if requested and requested != identity:
        output.warn(f"the service runs your requests as user {identity!r} (from your credentials); "
                    f"--user {requested} is ignored in client mode")
    client = BlockingClient(Path(target.address.removeprefix("unix:")), server_uids=target.server_uids)
    run_id: str | None = None
    printer = _Printer(raw, processes)
    try:
        request = (ExecRequest(shell=" ".join(command), timeout=timeout, network=network) if shell
                   else ExecRequest(argv=tuple(command), timeout=timeout, network=network))
        _, body = request_body(request)
        if piped:
            body["stdin_stream"] = True
        for event in client.events("exec", body):
            if event.type == "started" and run_id is None:
                run_id = str(event.data.get("run_id") or "") or None
                if run_id is not None and piped:
                    _send_stdin(client, run_id)
            printer.show(event)
    except SandboxError as exc:
        printer.close()
        return report(exc, verbose=state.verbose)
    except KeyboardInterrupt:
        printer.close()
        if run_id is not None:
            _cancel_quietly(client, run_id, CANCEL_TIMEOUT)
        output.console(stderr=True).print("interrupted", style="dim")
        return output.EXIT_INTERRUPTED
    except BaseException:  # our stdout went away (EPIPE), say: the run must not go on without us
        if run_id is not None:
            _cancel_quietly(client, run_id, CANCEL_TIMEOUT)
        raise
    finally:
        printer.close()
    return printer.code


def _cancel_quietly(client: Any, run_id: str, timeout: float) -> None:
    with contextlib.suppress(Exception):
        client.cancel(run_id, timeout)


def _send_stdin(client: Any, run_id: str, size: int = 256 * 1024) -> None:
    """Stream this process's stdin to the run from a daemon thread (a writer that never closes it
    cannot keep the CLI from exiting; a failure here shows as the command's own end)."""

    def chunks() -> Iterator[bytes]:
        try:
            fd = sys.stdin.fileno()
        except (OSError, ValueError):  # not a real descriptor (an embedding program's stream)
            yield from iter(functools.partial(sys.stdin.buffer.read, size), b"")
            return
        while True:
            try:
                chunk = os.read(fd, size)
            except OSError:
                return
            if not chunk:
                return
            yield chunk

    def send() -> None:
        with contextlib.suppress(Exception):
            client.send_stdin(run_id, chunks())

    threading.Thread(target=send, name="sandbox-stdin", daemon=True).start()


def run_terminal_job(
    state: AppState,
    config: ProcessSandboxConfig,
    target: Target | None,
    user_id: str,
    argv: list[str],
    *,
    timeout: float | None,
    interactive: bool,
    user: str | None,
    network: tuple[str, ...] | None = None,
) -> int:
    """Run ``argv`` on a sandbox pty attached to this terminal (``exec -t``, ``shell``); its exit code."""
    from cli.terminal import attach

    async def job(pool: Pool) -> int:
        def open_session(**window: Any) -> Any:
            return pool.terminal(user_id, argv, timeout=timeout, network=network, **window)

        return await attach(open_session, interactive=interactive)

    return run_job(config, job, verbose=state.verbose, target=target, user=user or state.user)


def _is_shell(command: list[str]) -> bool:
    from cli.terminal import is_shell

    return is_shell(command)


class Sink:
    """One of our output streams: the command's bytes as they are, or filtered for a terminal.

    A terminal acts on escape sequences (see :mod:`cli.termfilter`); a pipe or a file gets
    the bytes unchanged, and so does a terminal with ``--raw``.
    """

    def __init__(self, stream: BinaryIO, raw: bool) -> None:
        self._stream = stream
        self._filter: TerminalFilter | None = None
        if not raw and output.is_tty(stream):
            from cli.termfilter import TerminalFilter

            self._filter = TerminalFilter()

    def write(self, chunk: bytes) -> None:
        self._stream.write(chunk if self._filter is None else self._filter.feed(chunk))
        self._stream.flush()

    def close(self) -> None:
        """Write what the filter still holds (an unfinished sequence is dropped); idempotent."""
        if self._filter is not None:
            self._stream.write(self._filter.flush())
            self._stream.flush()


def limit_notes(done: dict[str, object], processes: int) -> list[str]:
    """What to tell the user about limits a command struck (from its ``done`` data)."""
    notes: list[str] = []
    reason = done.get("kill_reason")
    if isinstance(reason, str):
        notes.append(f"killed: {reason}")
    hit = done.get("limits_hit")
    if isinstance(hit, list) and "processes" in hit:
        notes.append(f"process limit {processes} reached: the sandbox refused to start more processes")
    return notes


async def read_stdin(size: int = 256 * 1024, ahead: int = 4) -> AsyncIterator[bytes]:
    """This process's stdin as it arrives (a pipe, a file or a socket), until end of file.

    A daemon thread reads at most ``ahead`` chunks ahead of the consumer, so memory is
    bounded, and a writer that never closes the pipe cannot keep the CLI from exiting.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes] = asyncio.Queue()
    room = threading.Semaphore(ahead)
    try:
        fd = sys.stdin.fileno()
        read: Callable[[], bytes] = functools.partial(os.read, fd, size)
    except (OSError, ValueError):  # not a real descriptor (an embedding program's stream)
        read = functools.partial(sys.stdin.buffer.read, size)

    def reader() -> None:
        while True:
            room.acquire()
            try:
                chunk = read()
            except (OSError, ValueError):
                chunk = b""
            try:
                loop.call_soon_threadsafe(chunks.put_nowait, chunk)
            except RuntimeError:  # the loop is gone: the command is over
                return
            if not chunk:
                return

    threading.Thread(target=reader, name="sandbox-stdin", daemon=True).start()
    while chunk := await chunks.get():
        room.release()
        yield chunk
