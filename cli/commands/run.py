"""``sandbox run``: one prompt to the Claude agent in the user's sandbox, streamed as it happens."""

from __future__ import annotations

from typing import Annotated

import typer

from cli import output
from cli.commands.common import (
    ALLOW_HELP,
    NETWORK_HELP,
    NetworkName,
    ProfileName,
    ProviderName,
    network_flags,
    state_of,
)
from cli.commands.run_impl import read_prompt, run_main

__all__ = ["read_prompt", "register", "run_command", "run_main"]


def run_command(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="The prompt; '-' reads it from stdin.", show_default=False)],
    user: Annotated[str | None, typer.Option("--user", help="User id whose workspace and worker to use.")] = None,
    provider: Annotated[
        ProviderName | None, typer.Option("--provider", help="Model provider (default: config; auto = anthropic "
                                          "with an API key, else offline).")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model name (default: config).")] = None,
    max_turns: Annotated[int | None, typer.Option("--max-turns", min=1, help="Model turns before stopping.")] = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0.001, help="Seconds before the run is killed.")
                       ] = None,
    profile: Annotated[ProfileName | None, typer.Option("--profile", help="Isolation profile.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one event per line (NDJSON).")] = False,
    conversation: Annotated[str | None, typer.Option(
        "--conversation", metavar="ID", help="Continue conversation ID (its id is printed after each run).")] = None,
    resume_last: Annotated[bool, typer.Option(
        "--continue", help="Continue your most recent conversation.")] = False,
    network: Annotated[NetworkName | None, typer.Option("--network", help=NETWORK_HELP)] = None,
    allow: Annotated[list[str] | None, typer.Option("--allow", metavar="HOST[:PORT]", help=ALLOW_HELP)] = None,
) -> None:
    """Run the Claude agent on PROMPT inside the sandbox and stream what it does.

    Assistant text streams as it arrives; each tool call is a panel (command or file, truncated
    output, status), and a bash command's output shows while it runs; a closing line gives turns,
    tokens, duration, worker and profile. With --json every event is one JSON object per line.
    Exit code 0 on success.

    With a service (--connect, SANDBOX_URL or its default socket) the run happens there:
    the service's config decides provider and profile, your credentials decide the user.

    Each run is a conversation of its own, kept in the durable record; --conversation ID
    (or --continue for your latest) sends the next prompt in it, with everything before.
    """
    raise typer.Exit(run_main(
        state_of(ctx), prompt, user=user, provider=provider, model=model, max_turns=max_turns, system=system,
        timeout=timeout, profile=profile, as_json=as_json, conversation=conversation, resume_last=resume_last,
        network=network_flags(network, allow)))


def register(app: typer.Typer) -> None:
    app.command("run", epilog=output.EXIT_CODES_HELP)(run_command)
