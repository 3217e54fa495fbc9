"""``sandbox serve``: host one orchestrator behind the HTTP API until a signal."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from cli import output
from cli.commands.common import effective_config, state_of


def serve_command(
    ctx: typer.Context,
    listen: Annotated[
        str | None, typer.Option("--listen", help="HOST:PORT for TCP (needs service.tokens_file).")
    ] = None,
    socket_path: Annotated[
        str | None, typer.Option("--socket", help="Unix socket path (default: the runtime directory).")
    ] = None,
) -> None:
    """Serve the pool over HTTP: a 0600 Unix socket by default, or TCP with bearer tokens.

    SIGTERM (or Ctrl-C) drains: no new runs, in-flight runs get service.drain_grace
    seconds; a second Ctrl-C stops at once. No worker is left behind.
    """
    from sandbox_core.errors import SandboxError
    from sandbox_core.service.server import serve

    state = state_of(ctx)
    if socket_path is not None:
        state.overrides["service.socket_path"] = socket_path
    config = effective_config(state)
    err = output.console(stderr=True)

    def ready(where: str) -> None:
        err.print(f"sandbox: serving {config.profile} pool on {where}", highlight=False)

    try:
        asyncio.run(serve(config, listen=listen, on_ready=ready))
    except SandboxError as exc:
        from cli.runtime import exit_code_for, hint_for

        output.fail(str(exc), hint=hint_for(exc), code=exit_code_for(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
