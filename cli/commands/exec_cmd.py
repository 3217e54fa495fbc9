"""``sandbox exec``: run one command in the sandbox, streaming its output, passing its exit code."""

from __future__ import annotations

from typing import Annotated

import typer

from cli import output
from cli.commands.common import ALLOW_HELP, NETWORK_HELP, NetworkName, ProfileName, network_flags, state_of
from cli.commands.exec_impl import exec_main, read_stdin, run_terminal_job

__all__ = ["exec_command", "exec_main", "read_stdin", "register", "run_terminal_job"]


def exec_command(
    ctx: typer.Context,
    command: Annotated[list[str], typer.Argument(help="The command and its arguments (after --).")],
    user: Annotated[str | None, typer.Option("--user", help="User id whose workspace to use.")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds before the command is killed.")] = None,
    profile: Annotated[ProfileName | None, typer.Option("--profile", help="Isolation profile.")] = None,
    shell: Annotated[bool, typer.Option("--shell", help="Run COMMAND as one /bin/sh -c string.")] = False,
    raw: Annotated[bool, typer.Option(
        "--raw", help="Pass output to a terminal unfiltered (title, clipboard and query sequences too).")] = False,
    tty: Annotated[bool | None, typer.Option(
        "-t", "--tty/--no-tty", help="Run COMMAND on a pseudo-terminal in the sandbox (default: for a shell, "
                                     "when stdin and stdout are terminals).")] = None,
    interactive: Annotated[bool, typer.Option(
        "-i", "--interactive", help="With -t: send this terminal's keys (stdin) to COMMAND.")] = False,
    network: Annotated[NetworkName | None, typer.Option("--network", help=NETWORK_HELP)] = None,
    allow: Annotated[list[str] | None, typer.Option("--allow", metavar="HOST[:PORT]", help=ALLOW_HELP)] = None,
) -> None:
    """Run COMMAND in the user's sandboxed workspace.

    Output streams as it is produced, byte for byte to a pipe or file; to a terminal,
    escape strings and queries (OSC, DCS, ESC[6n, ...) are removed unless --raw, colours
    and cursor movement kept. Stdin, when it is not a terminal,
    streams to the command as it arrives (any size, binary too); the exit code is the
    command's own (124 on timeout), and a command killed by a limit says which. With -t,
    COMMAND runs on a pseudo-terminal inside the sandbox, shown here unfiltered with this
    terminal in raw mode (restored however it ends), and -i sends it your keys. With a
    service (--connect, SANDBOX_URL or its default socket) the command runs there, as
    the user of your credentials.
    """
    raise typer.Exit(exec_main(state_of(ctx), command, user=user, timeout=timeout, profile=profile, shell=shell,
                               raw=raw, tty=tty, interactive=interactive, network=network_flags(network, allow)))


def register(app: typer.Typer) -> None:
    app.command(
        "exec",
        context_settings={"allow_interspersed_args": False},
        epilog=output.EXIT_CODES_HELP,
    )(exec_command)
