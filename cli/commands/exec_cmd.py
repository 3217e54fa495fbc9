"""``sandbox exec``: run one command in the sandbox, streaming its output, passing its exit code."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from cli import output
from cli.commands.common import ProfileName, effective_config, state_of
from cli.runtime import run_job, service_target, warn_ignored

if TYPE_CHECKING:
    from cli.runtime import Pool


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
    the exit code is the command's own (124 on timeout). With a service (--connect,
    SANDBOX_URL or its default socket) the command runs there, as the user of your
    credentials; stdin must then be UTF-8 text.
    """
    state = state_of(ctx)
    target = service_target(state)
    warn_ignored(target, profile=profile)
    config = effective_config(state, profile, min_idle=0, warn=target is None)
    user_id = state.user_id(user)
    stdin: bytes | str | None = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    if target is not None and isinstance(stdin, bytes):
        try:
            stdin = stdin.decode()
        except UnicodeDecodeError:
            output.fail("stdin is not UTF-8 text, and the service takes text",
                        hint="pass --local to run in-process with binary stdin", code=output.EXIT_USAGE)

    async def job(pool: Pool) -> int:
        from sandbox_core.requests import ExecRequest

        request = (
            ExecRequest(shell=" ".join(command), stdin=stdin, timeout=timeout)
            if shell
            else ExecRequest(argv=tuple(command), stdin=stdin, timeout=timeout)
        )
        code = output.EXIT_FAILURE
        async for event in pool.execute_stream(user_id, request):
            if event.type == "stdout":
                sys.stdout.write(event.data.get("data", ""))
                sys.stdout.flush()
            elif event.type == "stderr":
                sys.stderr.write(event.data.get("data", ""))
                sys.stderr.flush()
            elif event.type == "done":
                code = int(event.data.get("exit_code", output.EXIT_FAILURE))
        return code

    raise typer.Exit(run_job(config, job, verbose=state.verbose, target=target, user=user or state.user))


def register(app: typer.Typer) -> None:
    app.command(
        "exec",
        context_settings={"allow_interspersed_args": False},
        epilog=output.EXIT_CODES_HELP,
    )(exec_command)
