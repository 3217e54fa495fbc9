"""``sandbox repl``: an interactive session with the agent over a live pool."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

import typer

from cli import output
from cli.commands.common import (
    ProfileName,
    ProviderName,
    agent_preload,
    apply_model_flags,
    effective_config,
    require_model_key,
    state_of,
)
from cli.runtime import report, service_target

REPL_HELP = (
    "Talk to the agent interactively, over a live pool.\n\n"
    "Every line is a prompt to the agent of the current user, rendered like `sandbox run`; the "
    "conversation continues across prompts (same worker, same conversation).\n\n"
    "Slash commands: /help, /exec CMD, /stats, /workers (list | launch N | stop ID... | stop --user U | "
    "stop --all), /user NAME, /provider NAME, /model NAME, /reset, /audit, /quit.\n\n"
    "Keys: Enter sends; Esc Enter (Alt+Enter) inserts a new line; Ctrl-X Ctrl-E edits the line in "
    "$EDITOR; Tab completes slash commands and their arguments; Up/Down and Ctrl-R search the history "
    "($XDG_STATE_HOME/sandbox/history); Ctrl-C cancels the running request (at the prompt it clears the "
    "line); Ctrl-D exits after shutting the pool down.\n\n"
    "With a service (--connect, SANDBOX_URL or its default socket) prompts, /exec, /stats and /workers go "
    "to it: the service decides the user (from your credentials), provider and profile; Ctrl-C cancels the "
    "run on the service; Ctrl-D only disconnects (the service keeps running).\n\n"
    "With stdin not a terminal, lines are read from it one by one (no prompt) until end of input."
)


def repl_command(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option("--user", help="User id to start as.")] = None,
    provider: Annotated[ProviderName | None, typer.Option("--provider", help="Model provider.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model name.")] = None,
    profile: Annotated[ProfileName | None, typer.Option("--profile", help="Isolation profile.")] = None,
) -> None:
    state = state_of(ctx)
    target = service_target(state)
    apply_model_flags(state, target, provider, model, profile)
    config = agent_preload(effective_config(state, profile, warn=target is None))
    if target is None:
        require_model_key(config)
    user_id = state.user_id(user)

    from cli.repl.session import Repl
    from sandbox_core.errors import ConfigError, SandboxError
    from sandbox_core.names import validate_user_id

    try:
        validate_user_id(user_id)
    except ConfigError as exc:
        output.fail(str(exc), code=output.EXIT_USAGE)
    interactive = output.is_tty(sys.stdin) and output.is_tty(sys.stdout)
    repl = Repl(state, output.console(), user_id, target, requested_user=user or state.user)
    try:
        code = asyncio.run(repl.run(interactive))
    except SandboxError as exc:
        raise typer.Exit(report(exc, verbose=state.verbose)) from None
    except KeyboardInterrupt:
        raise typer.Exit(output.EXIT_INTERRUPTED) from None
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("repl", help=REPL_HELP, epilog=output.EXIT_CODES_HELP)(repl_command)
