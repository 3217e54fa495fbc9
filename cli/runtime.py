"""Running an async orchestrator job from a command, and mapping errors to exit codes and hints."""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import typer

from cli import output

if TYPE_CHECKING:
    from rich.console import Console

    from sandbox_core.config import ProcessSandboxConfig
    from sandbox_core.orchestrator import SandboxOrchestrator

T = TypeVar("T")


def exit_code_for(exc: BaseException) -> int:
    from sandbox_core import errors

    if isinstance(exc, errors.RequestTimeout):
        return output.EXIT_TIMEOUT
    if isinstance(exc, errors.ConfigError):
        return output.EXIT_USAGE
    if isinstance(exc, errors.IsolationUnavailable | errors.WorkerStartError | errors.WorkerCrashed):
        return output.EXIT_SANDBOX
    return output.EXIT_FAILURE


def hint_for(exc: BaseException) -> str | None:
    from sandbox_core import errors

    if isinstance(exc, errors.IsolationUnavailable):
        return "install bubblewrap (apt-get install bubblewrap), or pass --profile process (weaker)"
    if isinstance(exc, errors.CircuitOpen):
        return "fix the start error above; spawning resumes after circuit_reset seconds"
    if isinstance(exc, errors.PoolExhausted):
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
    if isinstance(exc, errors.RemoteError) and "sandbox_core.agent" in exc.message:
        return "this build has no agent runtime yet (sandbox_core.agent.runtime)"
    return None


def report(exc: BaseException, *, verbose: bool = False, err: Console | None = None) -> int:
    """Print a SandboxError as one red line and a hint (plus details with -v); return its exit code."""
    from sandbox_core.errors import SandboxError

    err = err if err is not None else output.console(stderr=True)
    if verbose:
        err.print("".join(traceback.format_exception(exc)), markup=False, highlight=False)
        stderr = exc.data.get("stderr") if isinstance(exc, SandboxError) else None
        if isinstance(stderr, list) and stderr:
            err.print("worker stderr:\n" + "\n".join(map(str, stderr)), markup=False, style="dim")
    output.error(str(exc), hint=hint_for(exc), err=err)
    return exit_code_for(exc)


def run_job(
    config: ProcessSandboxConfig,
    job: Callable[[SandboxOrchestrator], Awaitable[T]],
    *,
    verbose: bool = False,
) -> T:
    """Run ``job`` against a fresh orchestrator, shut it down, and turn errors into exits."""
    from sandbox_core.errors import SandboxError
    from sandbox_core.orchestrator import SandboxOrchestrator

    async def main() -> T:
        async with SandboxOrchestrator(config) as orchestrator:
            return await job(orchestrator)

    try:
        return asyncio.run(main())
    except SandboxError as exc:
        raise typer.Exit(report(exc, verbose=verbose)) from None
    except KeyboardInterrupt:
        output.console(stderr=True).print("interrupted", style="dim")
        raise typer.Exit(output.EXIT_INTERRUPTED) from None
