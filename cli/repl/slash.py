"""The REPL's slash commands: what each does, its usage, and how its arguments complete."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import shlex
import threading
import typing
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cli import output
from cli.remote import RemotePool
from cli.repl.session import UsageError

if TYPE_CHECKING:
    from cli.repl.session import Repl

Handler = Callable[["Repl", list[str], str], Awaitable[None]]
"""A slash command: the session, its arguments split like a shell, and the raw argument text."""
ArgCompleter = Callable[["Repl", list[str]], Iterable[str]]
"""Candidates for the next argument, given the arguments typed before it."""

PROVIDERS = ("auto", "anthropic", "offline")
KEY_BINDINGS = (
    ("Enter", "send the line"),
    ("Esc Enter / Alt+Enter", "insert a new line (multi-line prompt)"),
    ("Ctrl-X Ctrl-E", "edit the line in $EDITOR"),
    ("Tab", "complete a slash command or its argument"),
    ("Up / Down, Ctrl-R", "history (kept in $XDG_STATE_HOME/sandbox/history)"),
    ("Ctrl-C", "cancel the running request; at the prompt, clear the line"),
    ("Ctrl-D", "exit (the pool is shut down, no worker is left; a service keeps running)"),
)


@dataclass(frozen=True)
class Slash:
    name: str
    usage: str
    summary: str
    run: Handler
    complete: ArgCompleter | None = None


# ---------------------------------------------------------------- handlers


async def _help(repl: Repl, args: list[str], raw: str) -> None:
    from rich.table import Table

    table = Table(title="commands", title_justify="left", show_header=False)
    table.add_column("usage", style="bold")
    table.add_column("what")
    table.add_row("PROMPT", "send PROMPT to the agent (the conversation continues); //TEXT sends /TEXT")
    for cmd in COMMANDS.values():
        table.add_row(cmd.usage, cmd.summary)
    repl.console.print(table)
    keys = Table(title="keys", title_justify="left", show_header=False)
    keys.add_column("key", style="bold")
    keys.add_column("what")
    for key, what in KEY_BINDINGS:
        keys.add_row(key, what)
    repl.console.print(keys)


async def _exec(repl: Repl, args: list[str], raw: str) -> None:
    if not raw.strip():
        raise UsageError("usage: /exec CMD")
    await repl.exec(raw.strip())


async def _shell(repl: Repl, args: list[str], raw: str) -> None:
    if args:
        raise UsageError("usage: /shell")
    await repl.shell()


async def _stats(repl: Repl, args: list[str], raw: str) -> None:
    from cli.commands.stats import render_stats
    from cli.runtime import pool_stats

    render_stats(await pool_stats(repl.live_pool()), repl.console)


async def _workers(repl: Repl, args: list[str], raw: str) -> None:
    from cli.commands import workers
    from cli.runtime import pool_workers

    pool = repl.live_pool()
    verb = args[0] if args else "list"
    if verb == "list" and len(args) <= 1:
        workers.render_workers(await pool_workers(pool), repl.console)
    elif verb == "launch" and len(args) == 2 and args[1].isdigit() and int(args[1]) > 0:
        from sandbox_core.isolation.launch import can_prewarm

        for_user = None if can_prewarm(repl.config) else repl.user_id
        rows = await workers.launch(pool, int(args[1]), for_user)
        workers.render_workers(rows, repl.console, f"launched {len(rows)} worker(s)")
    elif verb == "stop" and len(args) >= 2:
        rest = args[1:]
        if rest == ["--all"]:
            stopped, unknown = await workers.stop(pool, [], None, True)
        elif rest[0] == "--user" and len(rest) == 2:
            stopped, unknown = await workers.stop(pool, [], rest[1], False)
        elif not any(a.startswith("-") for a in rest):
            stopped, unknown = await workers.stop(pool, rest, None, False)
        else:
            raise UsageError("usage: /workers stop ID... | --user U | --all")
        repl.console.print(f"stopped {stopped} worker(s)")
        if unknown:
            output.error(f"no such worker: {', '.join(unknown)}", err=repl.console)
    else:
        raise UsageError("usage: /workers [list | launch N | stop ID... | stop --user U | stop --all]")


async def _user(repl: Repl, args: list[str], raw: str) -> None:
    from sandbox_core.errors import ConfigError
    from sandbox_core.names import validate_user_id

    if not args:
        repl.console.print(f"user {repl.user_id}")
        return
    if repl.remote is not None:
        raise UsageError(f"in client mode the service decides the user from your credentials (you are "
                         f"{repl.user_id}); use --local, or connect with another user's credentials")
    if len(args) != 1:
        raise UsageError("usage: /user NAME")
    try:
        validate_user_id(args[0])
    except ConfigError as exc:
        raise UsageError(exc.message) from None
    repl.user_id = args[0]
    repl.users.add(args[0])
    repl.console.print(f"now user {repl.user_id} (their own worker and workspace, their own conversation)")


async def _provider(repl: Repl, args: list[str], raw: str) -> None:
    if repl.remote is not None:
        if args:
            raise UsageError("in client mode the service's config decides the provider (use --local to choose)")
        repl.console.print("provider: the service's")
        return
    if not args:
        repl.console.print(f"provider {repl.config.model.provider} (→ {repl.provider})")
        return
    if len(args) != 1 or args[0] not in PROVIDERS:
        raise UsageError(f"usage: /provider {'|'.join(PROVIDERS)}")
    previous = repl.config.model.provider
    repl.state.set_override("model.provider", args[0])
    if repl.provider == "anthropic" and not repl.config.model.api_key:
        repl.state.set_override("model.provider", previous)
        output.error("provider 'anthropic' needs an API key on the host",
                     hint="set ANTHROPIC_API_KEY (or model.api_key in the config file) and restart the REPL",
                     err=repl.console)
        return
    pool = repl.live_pool()
    from sandbox_core.orchestrator import SandboxOrchestrator

    if isinstance(pool, SandboxOrchestrator):  # same workers, same conversations
        await pool.set_model_config(repl.config.model)
        repl.console.print(f"provider {args[0]} (→ {repl.provider})", style="dim")
        return
    repl.console.print(f"provider {args[0]} (→ {repl.provider}); restarting the pool, conversations start over…",
                       style="dim")
    await repl.restart_pool()


async def _model(repl: Repl, args: list[str], raw: str) -> None:
    if not args:
        repl.console.print(f"model {repl.model or 'the service default'}")
        return
    if len(args) != 1:
        raise UsageError("usage: /model NAME")
    repl.model = args[0]
    repl.state.set_override("model.model", args[0])
    repl.console.print(f"model {repl.model} (from the next prompt on)")


async def _reset(repl: Repl, args: list[str], raw: str) -> None:
    from sandbox_core.errors import SandboxError
    from sandbox_core.requests import RawRequest

    old = repl.conversations.pop(repl.user_id, None)
    pool = repl.live_pool()
    if isinstance(pool, RemotePool):  # the service forgets the old one when the worker goes
        repl.console.print("new conversation")
        return
    if old is not None and any(row["user_id"] == repl.user_id for row in pool.list_workers()):
        try:
            await pool.execute(repl.user_id, RawRequest("agent.reset", {"conversation_id": old}))
        except SandboxError as exc:
            repl.console.print(f"(the worker could not forget the old conversation: {exc})", style="dim",
                               markup=False)
    repl.console.print("new conversation")


async def _audit(repl: Repl, args: list[str], raw: str) -> None:
    """Run the audit of ``sandbox audit-env`` (``run_audit_async``, else ``run_audit`` in a thread).

    The keyword arguments it declares are filled from the session (config, user_id,
    console, verbose, as_json...); a build without that module says so instead.
    """
    if repl.remote is not None:
        raise UsageError("the audit runs in-process: `sandbox --local audit-env` audits this host's profile "
                         "(run it on the service's host to audit the service)")
    try:
        module = importlib.import_module("cli.commands.audit_env")
    except ModuleNotFoundError as exc:
        if exc.name not in ("cli.commands.audit_env", "cli.commands"):
            raise
        module = None
    run_audit = getattr(module, "run_audit_async", None) or getattr(module, "run_audit", None)
    if run_audit is None:
        repl.console.print("audit is unavailable in this build (no cli.commands.audit_env.run_audit)",
                           style="yellow")
        return
    offered: dict[str, Any] = {
        "config": repl.config, "state": repl.state, "user_id": repl.user_id, "console": repl.console,
        "orchestrator": repl.pool, "pool": repl.pool, "verbose": repl.state.verbose, "as_json": False,
    }
    params = inspect.signature(run_audit).parameters
    kwargs = {name: value for name, value in offered.items() if name in params}
    if inspect.iscoroutinefunction(run_audit):
        result = await run_audit(**kwargs)
    else:
        result = await asyncio.to_thread(run_audit, **kwargs)
    if isinstance(result, int) and not isinstance(result, bool) and result != 0:
        repl.console.print(f"audit finished with exit code {result}", style="yellow")


async def _quit(repl: Repl, args: list[str], raw: str) -> None:
    repl.done = True


# ---------------------------------------------------------------- argument completion


def _complete_workers(repl: Repl, words: list[str]) -> Iterable[str]:
    if not words:
        return ("list", "launch", "stop")
    if words[0] == "stop":
        if words[-1] == "--user":
            return sorted(_known_users(repl))
        ids = [row["worker_id"] for row in repl.workers_snapshot()]
        return [*ids, "--user", "--all"] if len(words) == 1 else ids
    return ()


def _known_users(repl: Repl) -> set[str]:
    users = set(repl.users)
    stats = repl.stats_snapshot()
    if stats is not None:
        users.update(stats["users"])
    return users


def _complete_user(repl: Repl, words: list[str]) -> Iterable[str]:
    return sorted(_known_users(repl)) if not words else ()


def _complete_provider(repl: Repl, words: list[str]) -> Iterable[str]:
    return PROVIDERS if not words else ()


_models: list[str] = []
_models_loading: list[threading.Thread] = []


def _load_models() -> None:
    try:
        from anthropic.types.model import Model
    except ImportError:
        return
    names = [a for arg in typing.get_args(Model) for a in typing.get_args(arg) if isinstance(a, str)]
    _models.extend(names)


def sdk_models() -> list[str]:
    """Model names the installed anthropic SDK knows; the first call starts loading them.

    Importing the SDK takes about a second, so it happens in a thread: the first Tab offers
    the current model, the following ones the whole list.
    """
    if not _models and not _models_loading:
        loader = threading.Thread(target=_load_models, name="sdk-models", daemon=True)
        _models_loading.append(loader)
        loader.start()
    return list(_models)


def _complete_model(repl: Repl, words: list[str]) -> Iterable[str]:
    if words:
        return ()
    current = [repl.model] if repl.model else []
    return [*current, *(m for m in sdk_models() if m != repl.model)]


COMMANDS: dict[str, Slash] = {
    cmd.name: cmd
    for cmd in (
        Slash("/help", "/help", "this help", _help),
        Slash("/exec", "/exec CMD", "run CMD (a shell line) in the current user's sandbox", _exec),
        Slash("/shell", "/shell", "the current user's login shell in their sandbox (exit returns here)", _shell),
        Slash("/stats", "/stats", "pool statistics", _stats),
        Slash("/workers", "/workers [list|launch N|stop ID...|stop --user U|stop --all]",
              "list, pre-warm or stop the pool's workers", _workers, _complete_workers),
        Slash("/user", "/user NAME", "switch user (and so worker, workspace and conversation)", _user,
              _complete_user),
        Slash("/provider", "/provider auto|anthropic|offline",
              "switch model provider (workers and conversations carry on)", _provider, _complete_provider),
        Slash("/model", "/model NAME", "switch model for the next prompts", _model, _complete_model),
        Slash("/reset", "/reset", "start a new conversation", _reset),
        Slash("/audit", "/audit", "audit the isolation of this profile (sandbox audit-env)", _audit),
        Slash("/quit", "/quit", "exit (also /exit, Ctrl-D)", _quit),
    )
}
ALIASES = {"/exit": "/quit", "/q": "/quit", "/?": "/help"}


def lookup(name: str) -> Slash | None:
    return COMMANDS.get(ALIASES.get(name, name))


async def dispatch(repl: Repl, line: str) -> None:
    """Run the slash command on ``line`` (``/name args...``)."""
    name, _, raw = line.strip().partition(" ")
    cmd = lookup(name)
    if cmd is None:
        raise UsageError(f"unknown command {name} (/help lists them)")
    try:
        args = shlex.split(raw)
    except ValueError:  # unbalanced quotes: /exec hands the raw text to the shell anyway
        args = raw.split()
    await cmd.run(repl, args, raw)
