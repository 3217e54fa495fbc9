"""``sandbox run``: one prompt to the Claude agent in the user's sandbox, streamed as it happens."""

from __future__ import annotations

import secrets
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from cli import output
from cli.commands.common import (
    ProfileName,
    ProviderName,
    apply_model_flags,
    effective_config,
    require_model_key,
    state_of,
)
from cli.runtime import run_job, service_target

if TYPE_CHECKING:
    from cli.runtime import Pool


def read_prompt(prompt: str) -> str:
    """The prompt argument, or all of stdin for ``-``."""
    if prompt != "-":
        return prompt
    if sys.stdin is None or sys.stdin.isatty():
        output.fail("PROMPT is '-' but stdin is a terminal", hint="pipe the prompt in: echo 'run: ls' | sandbox run -",
                    code=output.EXIT_USAGE)
    return sys.stdin.read()


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
    if conversation is not None and resume_last:
        output.fail("--conversation and --continue contradict each other", code=output.EXIT_USAGE)
    state = state_of(ctx)
    target = service_target(state)
    apply_model_flags(state, target, provider, model, profile)
    text = read_prompt(prompt)
    if not text.strip():
        output.fail("the prompt is empty", code=output.EXIT_USAGE)
    config = effective_config(state, profile, min_idle=0, warn=target is None)
    if target is None:
        require_model_key(config)
    user_id = state.user_id(user)
    json_mode = state.json_output(as_json)
    local = target is None

    async def job(pool: Pool) -> int:
        from cli.render import JsonRenderer, RichRenderer, drive
        from cli.runtime import exit_code_for
        from sandbox_core.errors import SandboxError
        from sandbox_core.requests import LAST_CONVERSATION, AgentRequest

        request = AgentRequest(
            prompt=text,
            system=system,
            # in client mode only what was asked for explicitly: the service's config fills the rest
            model=config.model.model if local else model,
            max_turns=max_turns if max_turns is not None else config.model.max_turns if local else None,
            max_tokens=config.model.max_tokens if local else None,
            conversation_id=(LAST_CONVERSATION if resume_last else conversation or f"run-{secrets.token_hex(4)}"),
            resume=resume_last or conversation is not None,
            timeout=timeout,
        )
        renderer = JsonRenderer() if json_mode else RichRenderer(output.console())
        try:
            outcome = await drive(pool, user_id, request, renderer)
        except SandboxError as exc:
            if json_mode:
                JsonRenderer.error(str(exc), exit_code_for(exc))
            raise
        if outcome.exit_code != output.EXIT_OK and outcome.error and json_mode:
            output.error(outcome.error)  # the rich renderer has shown it already
        said = outcome.done.get("conversation_id") if outcome.done else None
        if isinstance(said, str) and not json_mode:
            output.console(stderr=True).print(
                f"conversation {output.visible(said)}: continue it with `sandbox run --conversation {said} ...` "
                "or `--continue`", style="dim", markup=False, highlight=False)  # fmt: skip
        return outcome.exit_code

    raise typer.Exit(run_job(config, job, verbose=state.verbose, target=target, user=user or state.user))


def register(app: typer.Typer) -> None:
    app.command("run", epilog=output.EXIT_CODES_HELP)(run_command)
