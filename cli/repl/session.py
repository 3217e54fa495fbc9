"""The REPL's loop and its live pool.

Each input line is a prompt to the agent of the current user (the conversation continues
across prompts: same worker, same conversation id) or a slash command. The line runs as a
foreground task; Ctrl-C (SIGINT, the terminal being in cooked mode while a request runs)
cancels that task, which makes the library cancel the request in the worker (the worker
kills the running command's process group), and the REPL returns to the prompt. At the
end (Ctrl-D, /quit, end of piped input) the pool is shut down: no worker process is left.

In client mode (a running ``sandbox serve``) the pool is the service's: prompts, /exec,
/stats and /workers go to it, Ctrl-C closes the request's stream and cancels its run there,
and the end just closes the connection (the service keeps running). The service decides
the user from the credentials, and its config decides provider and profile.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import traceback
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from cli import output
from cli.remote import RemotePool, Target
from cli.render import RichRenderer, drive
from cli.runtime import connect, report, sigint_calls
from cli.state import AppState, effective_provider

if TYPE_CHECKING:
    from rich.console import Console

    from cli.runtime import Pool
    from sandbox_core.config import ProcessSandboxConfig

POLL_INTERVAL_S = 1.0
"""How often a client-mode REPL refreshes the service's stats for its toolbar."""


class UsageError(Exception):
    """A slash command was given arguments it cannot use (shown as one line)."""


class Repl:
    """One REPL session: the current user, provider and model, and the pool it talks to."""

    def __init__(
        self,
        state: AppState,
        console: Console,
        user_id: str,
        target: Target | None = None,
        requested_user: str | None = None,
    ) -> None:
        self.state = state
        self.console = console
        self.user_id = user_id
        self.target = target
        """The service this session uses (None: an in-process pool)."""
        self.requested_user = requested_user
        """An explicit --user (in client mode only compared with the service's idea)."""
        # in client mode only an explicit --model is sent: the service's config decides otherwise
        explicit_model = state.overrides.get("model.model")
        self.model: str | None = self.config.model.model if target is None else explicit_model
        self.pool: Pool | None = None
        self.conversations: dict[str, str] = {}
        self.users: set[str] = {user_id}
        self.done = False
        self.interactive = False

    # ------------------------------------------------------------------ config, pool

    @property
    def config(self) -> ProcessSandboxConfig:
        return self.state.loaded().config

    @property
    def provider(self) -> str:
        return effective_provider(self.config)

    @property
    def remote(self) -> RemotePool | None:
        """The service connection, in client mode."""
        return self.pool if isinstance(self.pool, RemotePool) else None

    @property
    def profile(self) -> str:
        remote = self.remote
        return remote.profile if remote is not None else self.config.profile

    def live_pool(self) -> Pool:
        if self.pool is None:
            raise RuntimeError("the pool is not running")
        return self.pool

    def stats_snapshot(self) -> dict[str, Any] | None:
        """The pool's stats without waiting (the service's: the last ones polled, if we may see them)."""
        if self.pool is None:
            return None
        if isinstance(self.pool, RemotePool):
            return self.pool.last_stats
        return self.pool.get_pool_stats()

    def workers_snapshot(self) -> list[dict[str, Any]]:
        """The pool's workers without waiting (for completion)."""
        if self.pool is None:
            return []
        if isinstance(self.pool, RemotePool):
            return list(self.pool.last_workers or [])
        return self.pool.list_workers()

    async def open_pool(self) -> None:
        if self.target is not None:
            remote = await connect(self.target, self.requested_user)
            self.pool = remote
            self.sync_identity()
            if self.interactive:
                remote.start_polling(POLL_INTERVAL_S)
            return
        from cli.runtime import open_record_or_warn
        from sandbox_core.orchestrator import SandboxOrchestrator

        orchestrator = SandboxOrchestrator(self.config, record=open_record_or_warn(self.config), origin="cli")
        self.pool = orchestrator
        await orchestrator.start()

    async def close_pool(self) -> None:
        pool, self.pool = self.pool, None
        if isinstance(pool, RemotePool):
            await pool.aclose()
        elif pool is not None:
            await pool.shutdown()
            if pool.record is not None:
                await asyncio.to_thread(pool.record.close)

    def sync_identity(self) -> None:
        """In client mode, take the user the service says we are (it decides, not --user)."""
        remote = self.remote
        if remote is None or remote.identity is None or remote.identity == self.user_id:
            return
        if self.user_id in self.conversations:
            self.conversations[remote.identity] = self.conversations.pop(self.user_id)
        self.user_id = remote.identity
        self.users = {remote.identity}

    async def restart_pool(self) -> None:
        """A new pool from the current config (conversations start over)."""
        await asyncio.shield(self.close_pool())
        self.conversations.clear()
        await self.open_pool()

    def conversation(self) -> str:
        """The current user's conversation id (one per user for the life of the session)."""
        return self.conversations.setdefault(self.user_id, f"repl-{secrets.token_hex(6)}")

    # ------------------------------------------------------------------ loop

    async def run(self, interactive: bool) -> int:
        """Serve input until Ctrl-D, /quit or end of input; always shut the pool down."""
        self.interactive = interactive
        await self.open_pool()
        try:
            if interactive:
                await self._serve_terminal()
            else:
                await self._serve_lines()
        finally:
            if interactive and self.remote is not None:
                self.console.print("disconnecting (the service keeps running)…", style="dim")
            elif interactive:
                self.console.print(f"stopping {len(self.workers_snapshot())} worker(s)…", style="dim")
            await asyncio.shield(self.close_pool())
        return output.EXIT_OK

    async def _serve_terminal(self) -> None:
        from cli.repl.prompt import build_session, prompt_message

        session = build_session(self)
        self.banner()
        while not self.done:
            try:
                line = await session.prompt_async(prompt_message(self))
            except KeyboardInterrupt:  # Ctrl-C at an empty prompt (a non-empty line is just cleared)
                self.console.print("(Ctrl-D or /quit exits)", style="dim")
                continue
            except EOFError:
                break
            await self.handle(line)

    async def _serve_lines(self) -> None:
        """Piped input: one line at a time, no prompt, no line editing."""
        while not self.done:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                break
            await self.handle(line)

    def banner(self) -> None:
        remote = self.remote
        if remote is not None:
            self.console.print(
                f"sandbox repl · service {remote.target.address} · user {self.user_id} · "
                f"model {self.model or 'the service default'} · profile {remote.profile}", style="bold", markup=False,
            )
        else:
            self.console.print(
                f"sandbox repl · user {self.user_id} · provider {self.provider} · model {self.model} · "
                f"profile {self.config.profile}", style="bold", markup=False,
            )
        self.console.print("Type a prompt for the agent, /help for commands, Esc+Enter (Alt+Enter) for a new "
                           "line, Ctrl-C to cancel, Ctrl-D to exit.", style="dim", markup=False)

    async def handle(self, line: str) -> None:
        """Run one input line in the foreground."""
        from cli.repl import slash

        text = line.strip()
        if not text:
            return
        if text.startswith("//"):
            await self.foreground(self.ask(text[1:]))
        elif text.startswith("/"):
            await self.foreground(slash.dispatch(self, text))
        else:
            await self.foreground(self.ask(text))

    async def foreground(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` until it ends or Ctrl-C cancels it; errors become one line, never a traceback."""
        from sandbox_core.errors import SandboxError

        task = asyncio.create_task(work)
        interrupted = False

        def interrupt() -> None:
            nonlocal interrupted
            if interrupted:  # a second Ctrl-C must not break the cancellation's own cleanup
                return
            interrupted = True
            task.cancel()

        try:
            with sigint_calls(interrupt):
                await task
        except asyncio.CancelledError:
            if not interrupted:
                raise
            self.console.print("^C cancelled", style="yellow")
        except SandboxError as exc:
            report(exc, verbose=self.state.verbose, err=self.console)
        except UsageError as exc:
            output.error(str(exc), err=self.console)
        except Exception as exc:  # noqa: BLE001 - a bug must not end the session
            if self.state.verbose:
                self.console.print("".join(traceback.format_exception(exc)), markup=False)
            output.error(f"unexpected {type(exc).__name__}: {exc}", hint="rerun with -v for the traceback",
                         err=self.console)

    # ------------------------------------------------------------------ requests

    async def ask(self, prompt: str) -> None:
        """Send ``prompt`` to the current user's agent and stream the answer."""
        from sandbox_core.requests import AgentRequest

        config = self.config
        local = self.remote is None
        if local and config.model.provider == "anthropic" and not config.model.api_key:
            output.error("provider 'anthropic' needs an API key on the host",
                         hint="set ANTHROPIC_API_KEY (or model.api_key in the config) and restart, "
                              "or /provider offline", err=self.console)
            return
        request = AgentRequest(
            prompt=prompt,
            model=self.model,
            max_turns=config.model.max_turns if local else None,
            max_tokens=config.model.max_tokens if local else None,
            conversation_id=self.conversation(),
        )
        try:
            await drive(self.live_pool(), self.user_id, request, RichRenderer(self.console, err=self.console))
        finally:
            self.sync_identity()

    async def exec(self, command: str) -> None:
        from sandbox_core.requests import ExecRequest

        request = ExecRequest(shell=command)
        try:
            await drive(self.live_pool(), self.user_id, request, RichRenderer(self.console, err=self.console))
        finally:
            self.sync_identity()

    async def shell(self) -> None:
        """The current user's login shell on this terminal, until it exits; then back to the prompt."""
        from cli.terminal import attach
        from sandbox_core.terminal import LOGIN_SHELL

        if not (self.interactive and output.is_tty(sys.stdin) and output.is_tty(sys.stdout)):
            raise UsageError("/shell needs a terminal (stdin and stdout)")
        pool = self.live_pool()
        self.console.print(f"shell in {self.user_id}'s sandbox; exit (or Ctrl-D) returns here", style="dim")
        try:
            code = await attach(lambda **window: pool.terminal(self.user_id, list(LOGIN_SHELL), **window),
                                interactive=True)
        finally:
            self.sync_identity()
        self.console.print(f"back in the REPL (shell exit {code})", style="dim")
