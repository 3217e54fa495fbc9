"""``sandbox exec``: run one command in the sandbox, streaming its output, passing its exit code."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from cli import output
from cli.commands.common import ProfileName, effective_config, state_of
from cli.runtime import run_job

if TYPE_CHECKING:
    from sandbox_core.orchestrator import SandboxOrchestrator


def exec_command(
    ctx: typer.Context,
    command: Annotated[list[str], typer.Argument(help="The command and its arguments (after --).")],
    user: Annotated[str | None, typer.Option("--user", help="User id whose workspace to use.")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds before the command is killed.")] = None,
    profile: Annotated[ProfileName | None, typer.Option("--profile", help="Isolation profile.")] = None,
    shell: Annotated[bool, typer.Option("--shell", help="Run COMMAND as one /bin/sh -c string.")] = False,
) -> None:
    """Run COMMAND in the user's sandboxed workspace.

    Output streams as it is produced; stdin is forwarded when it is not a terminal;
    the exit code is the command's own (124 on timeout).
    """
    state = state_of(ctx)
    config = effective_config(state, profile, min_idle=0)
    user_id = state.user_id(user)
    stdin = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()

    async def job(orchestrator: SandboxOrchestrator) -> int:
        from sandbox_core.requests import ExecRequest

        request = (
            ExecRequest(shell=" ".join(command), stdin=stdin, timeout=timeout)
            if shell
            else ExecRequest(argv=tuple(command), stdin=stdin, timeout=timeout)
        )
        code = output.EXIT_FAILURE
        async for event in orchestrator.execute_stream(user_id, request):
            if event.type == "stdout":
                sys.stdout.write(event.data.get("data", ""))
                sys.stdout.flush()
            elif event.type == "stderr":
                sys.stderr.write(event.data.get("data", ""))
                sys.stderr.flush()
            elif event.type == "done":
                code = int(event.data.get("exit_code", output.EXIT_FAILURE))
        return code

    raise typer.Exit(run_job(config, job, verbose=state.verbose))


def register(app: typer.Typer) -> None:
    app.command(
        "exec",
        context_settings={"allow_interspersed_args": False},
        epilog=output.EXIT_CODES_HELP,
    )(exec_command)
