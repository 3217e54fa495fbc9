"""Running an async orchestrator job from a command, and mapping errors to exit codes."""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import typer

from cli import output

if TYPE_CHECKING:
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
    if isinstance(exc, errors.PoolExhausted):
        return "raise max_workers / acquire_timeout in the config, or retry later"
    if isinstance(exc, errors.ConfigError):
        return "check the value in your config file, SANDBOX_* variables or flags"
    if isinstance(exc, errors.RequestTimeout):
        return "raise the limit with --timeout"
    if isinstance(exc, errors.WorkerCrashed | errors.WorkerStartError):
        return "rerun with -v to see the worker's stderr"
    return None


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
        if verbose:
            traceback.print_exc()
            stderr = exc.data.get("stderr")
            if isinstance(stderr, list) and stderr:
                output.console(stderr=True).print("[dim]worker stderr:[/]\n" + "\n".join(map(str, stderr)))
        output.fail(str(exc), hint=hint_for(exc), code=exit_code_for(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
