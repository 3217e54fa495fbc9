"""What ``sandbox run`` does, without its typer signature (:mod:`cli.commands.run`).

Kept apart so the fast entry point (:mod:`cli.main`) runs it without importing typer.
"""

from __future__ import annotations

import secrets
import sys
from typing import TYPE_CHECKING

from cli import output
from cli.commands.common import agent_preload, apply_model_flags, effective_config, require_model_key
from cli.runtime import run_job, service_target

if TYPE_CHECKING:
    from cli.commands.common import ProfileName, ProviderName
    from cli.runtime import Pool
    from cli.state import AppState
    from sandbox_core.config import ProcessSandboxConfig


def read_prompt(prompt: str) -> str:
    """The prompt argument, or all of stdin for ``-``."""
    if prompt != "-":
        return prompt
    if sys.stdin is None or sys.stdin.isatty():
        output.fail("PROMPT is '-' but stdin is a terminal", hint="pipe the prompt in: echo 'run: ls' | sandbox run -",
                    code=output.EXIT_USAGE)
    return sys.stdin.read()


def model_hint(exc: BaseException, config: ProcessSandboxConfig) -> str | None:
    """What to do when a model call failed on the host, naming the URL it tried (in-process only:
    the host's own config; never sent to the sandbox)."""
    from cli.runtime import hint_for
    from sandbox_core.errors import GatewayError

    reason = exc.data.get("reason") if isinstance(exc, GatewayError) else None
    if reason in ("unreachable", "timeout"):
        return (f"the gateway could not reach model.base_url = {config.model.base_url} ({reason}): check the "
                "URL (ANTHROPIC_BASE_URL) and the host's network, or use --provider offline; -v shows the cause")
    return hint_for(exc)


def run_main(
    state: AppState,
    prompt: str,
    *,
    user: str | None = None,
    provider: ProviderName | None = None,
    model: str | None = None,
    max_turns: int | None = None,
    system: str | None = None,
    timeout: float | None = None,
    profile: ProfileName | None = None,
    as_json: bool = False,
    conversation: str | None = None,
    resume_last: bool = False,
    network: tuple[str, ...] | None = None,
) -> int:
    """Run the agent on ``prompt`` as ``sandbox run`` does; the exit code to leave with."""
    if conversation is not None and resume_last:
        output.fail("--conversation and --continue contradict each other", code=output.EXIT_USAGE)
    target = service_target(state)
    apply_model_flags(state, target, provider, model, profile)
    text = read_prompt(prompt)
    if not text.strip():
        output.fail("the prompt is empty", code=output.EXIT_USAGE)
    config = agent_preload(effective_config(state, profile, min_idle=0, warn=target is None))
    if target is None:
        require_model_key(config)
    user_id = state.user_id(user)
    json_mode = state.json_output(as_json)
    local = target is None

    async def job(pool: Pool) -> int:
        from cli.render import JsonRenderer, RichRenderer, drive, finish_run
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
            network=network,
        )
        renderer = JsonRenderer() if json_mode else RichRenderer(output.console())
        try:
            outcome = await drive(pool, user_id, request, renderer)
        except SandboxError as exc:
            if json_mode:
                JsonRenderer.error(str(exc), exit_code_for(exc))
                raise
            if not renderer.outcome.error:
                raise
            # the rich renderer has printed the error already: add only what to do about it
            hint = model_hint(exc, config) if local else None
            if hint is not None:
                output.console(stderr=True).print(f"hint: {hint}", style="dim", markup=False, highlight=False)
            return exit_code_for(exc)
        return finish_run(outcome, json_mode=json_mode)

    return run_job(config, job, verbose=state.verbose, target=target, user=user or state.user, thin=True)
