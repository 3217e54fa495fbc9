"""The ``sandbox`` command: global options and the command modules under ``cli/commands``.

Heavy imports (sandbox_core's orchestrator, anthropic) happen inside commands, so
``sandbox --help`` stays instant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cli import output
from cli.commands import (
    audit_env,
    bench,
    completions,
    config_cmd,
    cp,
    exec_cmd,
    records,
    repl,
    run,
    serve,
    shell,
    stats,
    workers,
)
from cli.commands.common import ProfileName
from cli.state import AppState

app = typer.Typer(
    name="sandbox",
    help="Run Claude agents and commands in process-isolated sandboxes.\n\n" + output.EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from sandbox_core import __version__

        typer.echo(f"sandbox {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML config file.", envvar="SANDBOX_CONFIG")
    ] = None,
    profile: Annotated[
        ProfileName | None, typer.Option("--profile", help="Isolation profile: strict (default) or process.")
    ] = None,
    user: Annotated[str | None, typer.Option("--user", help="User id (default: config, else login name).")] = None,
    allow_root_process: Annotated[
        bool, typer.Option("--allow-root-process", help="Let the process profile run as root (its commands run as "
                           "root: allow_root_process).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output where the output is data.")
                       ] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Tracebacks and worker stderr.")] = False,
    connect: Annotated[
        str | None,
        typer.Option("--connect", envvar="SANDBOX_URL", metavar="URL|SOCKET",
                     help="Use the `sandbox serve` at unix:PATH, a socket path or http://HOST:PORT "
                          "(run, exec, shell, stats, workers, repl). Default: its socket in the runtime "
                          "directory if a server answers there, else an in-process pool."),
    ] = None,
    local: Annotated[
        bool, typer.Option("--local", help="Use an in-process pool even when a service is running.")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    source = ctx.get_parameter_source("connect")
    if local and connect and source is not None and source.name == "COMMANDLINE":
        output.fail("--local and --connect contradict each other", code=output.EXIT_USAGE)
    ctx.obj = AppState(
        config_path=config,
        profile=profile.value if profile is not None else None,
        user=user,
        verbose=verbose,
        json=as_json,
        connect=connect or None,
        local=local,
    )
    if allow_root_process:
        ctx.obj.overrides["allow_root_process"] = True


for command in (
    run, exec_cmd, shell, cp, repl, audit_env, workers, stats, records, config_cmd, bench, serve, completions,
):
    command.register(app)


def main() -> None:
    if os.environ.get(completions.COMPLETE_VAR):
        completions.activate()
    app()
