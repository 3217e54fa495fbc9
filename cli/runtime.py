"""Running an async pool job from a command, and mapping errors to exit codes and hints.

This is the one place that decides where a command's pool lives (:func:`service_target`):
a running ``sandbox serve`` (``--connect``, ``SANDBOX_URL``, or the default socket when a
server answers there; ``--local`` forces in-process), else a fresh in-process
orchestrator. :func:`run_job` hands the job either a ``SandboxOrchestrator`` or a
:class:`~cli.remote.RemotePool`; :func:`pool_stats` and :func:`pool_workers` read both.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, overload

from cli import output
from cli.remote import RemotePool, Target

if TYPE_CHECKING:
    from rich.console import Console

    from cli.state import AppState
    from sandbox_core.config import ProcessSandboxConfig
    from sandbox_core.head_start import HeadStart
    from sandbox_core.orchestrator import SandboxOrchestrator
    from sandbox_core.record import Record

    Pool: TypeAlias = SandboxOrchestrator | RemotePool
    """What a command's job runs on: an in-process orchestrator or the service."""

T = TypeVar("T")

UNREACHABLE_HINT = (
    "is `sandbox serve` running there? check --connect / SANDBOX_URL, or pass --local to run in-process"
)


def _service_error(exc: BaseException) -> tuple[bool, int | None]:
    """Whether ``exc`` says the service is unreachable, and its HTTP status (if it answered one)."""
    if "sandbox_core.service.wire" not in sys.modules:  # in-process: no service error can be here
        return False, None
    from sandbox_core.service.wire import ServiceError, ServiceUnreachable

    if isinstance(exc, ServiceUnreachable):
        return True, None
    if isinstance(exc, ServiceError):
        status = exc.data.get("status")
        return False, status if isinstance(status, int) else None
    return False, None


def exit_code_for(exc: BaseException) -> int:
    from sandbox_core import errors

    if _service_error(exc)[0] or isinstance(exc, errors.UntrustedService):
        return output.EXIT_SANDBOX
    if isinstance(exc, errors.RequestTimeout):
        return output.EXIT_TIMEOUT
    if isinstance(exc, errors.ConfigError):
        return output.EXIT_USAGE
    if isinstance(exc, errors.IsolationUnavailable | errors.WorkerStartError | errors.WorkerCrashed):
        return output.EXIT_SANDBOX
    return output.EXIT_FAILURE


def hint_for(exc: BaseException) -> str | None:
    from sandbox_core import errors

    unreachable, status = _service_error(exc)
    if unreachable:
        return UNREACHABLE_HINT
    if isinstance(exc, errors.UntrustedService):
        return str(exc.data.get("fix") or "") or None
    if status == 401:
        return "set SANDBOX_TOKEN (or SANDBOX_TOKEN_FILE) to a token from the service's tokens file"
    if status == 403:
        return ("pool stats and worker control are for operators: root or the service's own uid on its socket, "
                "service.operator_uids, or an operator token")
    if isinstance(exc, errors.PoolClosed) and status == 503:
        return "the service is shutting down; retry when it is back, or pass --local to run in-process"
    if isinstance(exc, errors.IsolationUnavailable):
        return isolation_hint(exc.data)
    if isinstance(exc, errors.CircuitOpen):
        return "fix the start error above; spawning resumes after circuit_reset seconds"
    if isinstance(exc, errors.PoolExhausted):
        setting, limit = exc.data.get("setting"), exc.data.get("limit")
        if isinstance(setting, str) and limit is not None:
            return f"raise {setting} (now {limit}) or acquire_timeout in the config, or retry later"
        return "raise max_workers / acquire_timeout in the config, or retry later"
    if isinstance(exc, errors.ConfigError):
        return "check the value in your config file, SANDBOX_* variables or flags"
    if isinstance(exc, errors.RequestTimeout):
        return "raise the limit with --timeout (or request_timeout in the config)"
    if isinstance(exc, errors.WorkerCrashed | errors.WorkerStartError):
        return "rerun with -v to see the worker's stderr"
    if isinstance(exc, errors.GatewayError) and (
        exc.data.get("reason") == "no_api_key" or "api key" in exc.message.lower()
    ):
        return "set ANTHROPIC_API_KEY (or model.api_key in the config file), or use --provider offline"
    if isinstance(exc, errors.RemoteError) and "sandbox_core.inside.agent" in exc.message:
        return "this build has no agent runtime yet (sandbox_core.inside.agent.runtime)"
    return None


def isolation_hint(data: dict[str, Any]) -> str | None:
    """What to fix when the strict profile cannot be applied: the setting at fault, if known.

    Never a weaker profile: a typo in a bind path is fixed by fixing the path.
    """
    field, value = data.get("field"), data.get("value")
    if data.get("reason") == "no_bwrap":
        now = f" (now {value!r})" if value is not None else ""
        return f"install bubblewrap (apt-get install bubblewrap), or set strict.bwrap to a working one{now}"
    if isinstance(field, str):
        what = f"{value!r} in {field}" if value is not None else field
        return f"fix {what} (config file, SANDBOX_* variables or flags)"
    return None


def report(exc: BaseException, *, verbose: bool = False, err: Console | None = None) -> int:
    """Print a SandboxError as one red line and a hint (plus details with -v); return its exit code.

    Everything printed goes through :func:`~cli.output.visible`: the message, the traceback
    and the worker's stderr can all carry text from the sandbox, the service or upstream.
    """
    if verbose:
        err = err if err is not None else output.console(stderr=True)
        print_details(exc, err)
    output.error(str(exc), hint=hint_for(exc), err=err)
    return exit_code_for(exc)


def print_details(exc: BaseException, err: Console) -> None:
    """The traceback of ``exc`` and the worker's stderr lines it carries (for ``-v``), escaped."""
    import traceback

    from sandbox_core.errors import SandboxError

    err.print(output.visible("".join(traceback.format_exception(exc))), markup=False, highlight=False)
    stderr = exc.data.get("stderr") if isinstance(exc, SandboxError) else None
    if isinstance(stderr, list) and stderr:
        err.print("worker stderr:\n" + output.visible("\n".join(map(str, stderr))), markup=False, style="dim")


# ---------------------------------------------------------------- local or service


def service_target(state: AppState) -> Target | None:
    """The service this command uses, or None for an in-process pool.

    ``--local`` wins; then ``--connect`` / ``SANDBOX_URL`` (explicit: if it cannot be reached
    the command fails with exit code 125); then the default socket of ``sandbox serve``
    if a server answers on it. A socket that cannot be trusted (see
    :mod:`sandbox_core.service.trust`) fails the command with exit code 125, explicit or
    not: whoever listens there gets nothing. With ``-v`` the choice is said on stderr.
    """
    from sandbox_core.errors import ConfigError, UntrustedService

    if state.local:
        return None
    try:
        settings = state.client_settings()
    except ConfigError:
        settings = None  # the command reports it when it loads the config
    server_uids = settings.server_uids if settings is not None else ()
    if state.connect:
        from sandbox_core.service.paths import normalize_address

        try:
            target = Target(normalize_address(state.connect), explicit=True, server_uids=server_uids)
        except ConfigError as exc:
            output.fail(str(exc), hint="e.g. --connect unix:/run/user/1000/sandbox/sandbox.sock or "
                                       "--connect http://127.0.0.1:8765", code=output.EXIT_USAGE)
    else:
        if settings is None:
            return None
        from pathlib import Path

        from cli.remote import socket_answers
        from sandbox_core.service.paths import socket_file

        path = Path(socket_file(settings.socket_path))
        try:
            answers = socket_answers(path, server_uids)
        except UntrustedService as exc:
            output.leave(report(exc, verbose=state.verbose))
        if not answers:
            if state.verbose and path.exists():
                output.console(stderr=True).print(f"no service answers at unix:{path}; running in-process",
                                                  style="dim", highlight=False)
            return None
        target = Target(f"unix:{path}", explicit=False, server_uids=server_uids)
    if state.verbose:
        how = "" if target.explicit else " (its default socket exists; --local runs in-process)"
        output.console(stderr=True).print(f"using the service at {target.address}{how}", style="dim", highlight=False)
    return target


async def connect(target: Target, requested_user: str | None = None, *, thin: bool = False) -> RemotePool:
    """Connect to the service at ``target`` (token from ``SANDBOX_TOKEN`` / ``SANDBOX_TOKEN_FILE``)."""
    from cli.remote import exposed, read_token

    token, token_file = read_token(os.environ)
    if token_file is not None and exposed(token_file):
        output.warn(f"{token_file} is readable by group or others (chmod 600 it)")
    return await RemotePool.connect(target, token=token, requested_user=requested_user, warn=output.warn, thin=thin)


def warn_ignored(target: Target | None, **flags: object) -> None:
    """In client mode, warn about command flags the service decides instead (``profile=...``)."""
    if target is None:
        return
    for name, value in flags.items():
        if value is not None:
            output.warn(f"--{name.replace('_', '-')} is ignored in client mode (the service's config decides)")


async def pool_stats(pool: Pool) -> dict[str, Any]:
    """The pool's stats, from the service or the in-process orchestrator."""
    if isinstance(pool, RemotePool):
        return await pool.stats()
    return pool.get_pool_stats()


async def pool_workers(pool: Pool) -> list[dict[str, Any]]:
    """The pool's workers, from the service or the in-process orchestrator."""
    if isinstance(pool, RemotePool):
        return await pool.workers()
    return pool.list_workers()


@contextlib.contextmanager
def sigint_calls(callback: Callable[[], None]) -> Iterator[None]:
    """While inside, SIGINT calls ``callback`` in the event loop (and the old handler is restored)."""
    import asyncio

    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGINT)
    try:
        loop.add_signal_handler(signal.SIGINT, callback)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def library_log(verbose: bool) -> None:
    """Where the in-process library's log goes: its warnings (a model call that failed, an egress
    refusal; each already told to the user by the command's own error) only with ``-v``."""
    import logging

    logger = logging.getLogger("sandbox_core")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("sandbox: %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.ERROR)
    logger.propagate = False


def open_record_or_warn(config: ProcessSandboxConfig) -> Record | None:
    """The durable record for an in-process pool; a warning (and no record) when it cannot open."""
    import sqlite3

    from sandbox_core.record import open_record

    try:
        return open_record(config)
    except (OSError, sqlite3.Error) as exc:
        output.warn(f"the record cannot be opened ({exc}): this run is not recorded; "
                    "set state_dir to a writable directory")
        return None


TERMINATING = (signal.SIGTERM, signal.SIGHUP)
"""Signals that end a command the way Ctrl-C does: the job is cancelled and the pool shut
down (workers stopped, their cgroups removed) before the process exits with 128 + signal."""


@contextlib.contextmanager
def _terminating_cancels(stopped_by: list[int]) -> Iterator[None]:
    import asyncio

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    installed: list[signal.Signals] = []

    def stop(sig: signal.Signals) -> None:
        if not stopped_by and task is not None:
            stopped_by.append(int(sig))
            task.cancel()

    for sig in TERMINATING:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop, sig)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


@overload
def run_job(
    config: ProcessSandboxConfig,
    job: Callable[[SandboxOrchestrator], Awaitable[T]],
    *,
    verbose: bool = False,
    target: None = None,
    user: str | None = None,
    thin: bool = False,
    head_start: HeadStart | None = None,
) -> T: ...


@overload
def run_job(
    config: ProcessSandboxConfig,
    job: Callable[[Pool], Awaitable[T]],
    *,
    verbose: bool = False,
    target: Target | None,
    user: str | None = None,
    thin: bool = False,
    head_start: HeadStart | None = None,
) -> T: ...


def run_job(
    config: ProcessSandboxConfig,
    job: Callable[[Any], Awaitable[T]],
    *,
    verbose: bool = False,
    target: Target | None = None,
    user: str | None = None,
    thin: bool = False,
    head_start: HeadStart | None = None,
) -> T:
    """Run ``job`` on the service at ``target``, else on a fresh orchestrator; errors become exits.

    ``user`` is an explicit ``--user``: in client mode the service decides the user, and a
    different one is warned about. ``thin``: the job is one run (see :meth:`RemotePool.connect`).
    ``head_start``: the in-process pool's first worker, already spawned; discarded on return if
    the pool did not adopt it.
    """
    import asyncio

    from sandbox_core.errors import SandboxError

    if target is None:
        library_log(verbose)
    stopped_by: list[int] = []

    async def main() -> T:
        with _terminating_cancels(stopped_by):
            if target is not None:
                async with await connect(target, user, thin=thin) as pool:
                    return await job(pool)
            from sandbox_core.orchestrator import SandboxOrchestrator

            record = open_record_or_warn(config)
            try:
                async with SandboxOrchestrator(config, record=record, origin="cli",
                                               head_start=head_start) as orchestrator:
                    return await job(orchestrator)
            finally:
                if record is not None:
                    await asyncio.to_thread(record.close)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if not stopped_by:
            raise
        output.console(stderr=True).print(f"stopped by {signal.Signals(stopped_by[0]).name}", style="dim")
        output.leave(128 + stopped_by[0])
    except SandboxError as exc:
        output.leave(report(exc, verbose=verbose))
    except KeyboardInterrupt:
        output.console(stderr=True).print("interrupted", style="dim")
        output.leave(output.EXIT_INTERRUPTED)
    finally:
        if head_start is not None:  # the pool did not get as far as taking it (a no-op if it did)
            head_start.discard()
