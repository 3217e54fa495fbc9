"""``sandbox shell``: the user's login shell on a terminal inside their sandbox."""

from __future__ import annotations

from typing import Annotated

import typer

from cli import output
from cli.commands.common import (
    ALLOW_HELP,
    NETWORK_HELP,
    NetworkName,
    ProfileName,
    effective_config,
    network_flags,
    state_of,
)
from cli.commands.exec_cmd import run_terminal_job
from cli.runtime import service_target, warn_ignored


def shell_command(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option("--user", help="User id whose sandbox to enter.")] = None,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", help="Seconds before the session ends (default: terminal_timeout, else request_timeout).")] = None,
    profile: Annotated[ProfileName | None, typer.Option("--profile", help="Isolation profile.")] = None,
    network: Annotated[NetworkName | None, typer.Option("--network", help=NETWORK_HELP)] = None,
    allow: Annotated[list[str] | None, typer.Option("--allow", metavar="HOST[:PORT]", help=ALLOW_HELP)] = None,
) -> None:
    """Open a login shell (bash if the sandbox has it, else sh) in the user's /workspace.

    The shell runs on a pseudo-terminal inside the sandbox; this terminal is in raw mode
    until it exits (its mode is restored however the session ends), and the exit code is
    the shell's. With a service (--connect, SANDBOX_URL or its default socket) the shell
    runs there, as the user of your credentials.
    """
    from sandbox_core.terminal import LOGIN_SHELL

    state = state_of(ctx)
    narrowing = network_flags(network, allow)
    target = service_target(state)
    warn_ignored(target, profile=profile)
    config = effective_config(state, profile, min_idle=0, warn=target is None)
    code = run_terminal_job(state, config, target, state.user_id(user), list(LOGIN_SHELL), timeout=timeout,
                            interactive=True, user=user, network=narrowing)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("shell", epilog=output.EXIT_CODES_HELP)(shell_command)
