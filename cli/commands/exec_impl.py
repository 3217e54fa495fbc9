"""What ``sandbox exec`` does, without its typer signature (:mod:`cli.commands.exec_cmd`).

Kept apart so the fast entry point (:mod:`cli.main`) runs it without importing typer or rich.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from cli import output
from cli.commands.common import client_settings, effective_config
from cli.runtime import run_job, service_target, warn_ignored
from cli.service_exec import Printer, exec_body, run_on_service, shell_at_terminal, stdin_to_stream

if TYPE_CHECKING:
    from cli.remote import Target
    from cli.runtime import Pool
    from cli.state import AppState
    from sandbox_core.config import ProcessSandboxConfig
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
    if shell_at_terminal(command, tty=tty, shell=shell):
        tty = interactive = True  # `sandbox exec -- bash` at a terminal: an interactive shell, as expected
    if target is not None and not target.tcp and not tty and profile is None:
        if interactive:
            output.warn("-i only matters with -t (without it, piped stdin streams to the command anyway)")
        return _exec_on_service(state, target, command, shell=shell, timeout=timeout, raw=raw,
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
        return _exec_on_service(state, target, command, shell=shell, timeout=timeout, raw=raw,
                                processes=config.limits.processes, user=user, network=network)

    head = head_start(config, user_id) if target is None and network is None else None

    async def job(pool: Pool) -> int:
        from sandbox_core.requests import ExecRequest

        stdin = read_stdin() if stdin_to_stream() else None
        request = (
            ExecRequest(shell=" ".join(command), stdin=stdin, timeout=timeout, network=network)
            if shell
            else ExecRequest(argv=tuple(command), stdin=stdin, timeout=timeout, network=network)
        )
        printer = Printer(raw, config.limits.processes)
        try:
            async for event in pool.execute_stream(user_id, request):
                printer.show(event.type, event.data)
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


def _exec_on_service(
    state: AppState, target: Target, command: list[str], *, shell: bool, timeout: float | None, raw: bool,
    processes: int, user: str | None, network: tuple[str, ...] | None = None,
) -> int:
    """``exec`` on the service at a Unix socket, without an event loop (:func:`cli.service_exec.run_on_service`).

    The same requests and the same output as through :class:`~cli.remote.RemotePool`: the
    service decides the user (an explicit, different ``--user`` is warned about).
    """
    from cli.remote import unix_identity
    from sandbox_core.service.blocking import BlockingClient

    requested = user or state.user
    identity = unix_identity()
    if requested and requested != identity:
        output.warn(f"the service runs your requests as user {identity!r} (from your credentials); "
                    f"--user {requested} is ignored in client mode")
    client = BlockingClient(target.address.removeprefix("unix:"), server_uids=target.server_uids)
    body = exec_body(command, shell=shell, timeout=timeout, network=network)
    return run_on_service(client, body, raw=raw, processes=processes, verbose=state.verbose)


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
