"""``sandbox workers launch|list|stop``: operator control of a pool.

With a service (``--connect``, ``SANDBOX_URL`` or its default socket) these act on its live
pool (operators only). Without one they act on the pool of this one command (shut down
when the command ends); inside ``sandbox repl`` the same operations (``/workers ...``) act
on the REPL's pool.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli import output
from cli.commands.common import effective_config, state_of
from cli.remote import RemotePool, Target
from cli.runtime import pool_stats, pool_workers, run_job, service_target

if TYPE_CHECKING:
    from rich.console import Console

    from cli.runtime import Pool
    from sandbox_core.config import ProcessSandboxConfig

NO_SERVICE_NOTE = (
    "this acts on an in-process pool that lives only as long as this command "
    "(`sandbox serve` keeps a live pool, which this command then uses)"
)

workers_app = typer.Typer(
    name="workers",
    help="Launch, list and stop the workers of a pool.\n\nWith a service (--connect, SANDBOX_URL or its "
         "default socket) these act on its live pool (operators only); without one, on a pool that lives only "
         "as long as the command.",
    no_args_is_help=True,
)


# ---------------------------------------------------------------- operations (shared with the REPL)


async def settle(pool: Pool, timeout: float) -> None:
    """Wait (up to ``timeout``) until no worker of ``pool`` is still starting."""
    deadline = time.monotonic() + timeout
    await asyncio.sleep(0)  # let a pre-warm scheduled by start() register its worker
    while (await pool_stats(pool))["workers"]["starting"] and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def launch(pool: Pool, count: int, user_id: str | None = None) -> list[dict[str, Any]]:
    """Pre-warm ``count`` workers (for ``user_id`` if given); the rows of the launched ones."""
    ids = set(await pool.launch(count, user_id))
    return [row for row in await pool_workers(pool) if row["worker_id"] in ids]


async def stop(pool: Pool, ids: list[str], user: str | None, everything: bool) -> tuple[int, list[str]]:
    """Stop workers by id, by user, or all; returns how many stopped and the unknown ids."""
    known = {row["worker_id"] for row in await pool_workers(pool)}
    unknown = [i for i in ids if i not in known]
    stopped = await pool.stop_workers(worker_ids=ids or None, user_id=user, everything=everything)
    return stopped, unknown


def render_workers(rows: list[dict[str, Any]], console: Console, title: str = "workers") -> None:
    from rich.table import Table

    if not rows:
        console.print("no workers", style="dim")
        return
    table = Table(title=title, title_justify="left")
    for col, justify in (("id", "left"), ("state", "left"), ("user", "left"), ("pid", "right"),
                         ("requests", "right"), ("idle s", "right"), ("age s", "right"), ("profile", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(
            row["worker_id"], row["state"], row["user_id"] or "–", str(row["pid"] or "–"),
            str(row["requests"]), f"{row['idle_s']:.1f}", f"{row['age_s']:.1f}", row["profile"],
        )
    console.print(table)


# ---------------------------------------------------------------- commands


def _pool_for_command(ctx: typer.Context, *, prewarm: bool = True) -> tuple[Target | None, ProcessSandboxConfig]:
    """Where this command acts (the service, else in-process with a note) and the config."""
    state = state_of(ctx)
    target = service_target(state)
    config = effective_config(state, warn=target is None)
    if not prewarm:
        config = config.replace(min_idle=0)
    if target is None:
        output.console(stderr=True).print(f"note: {NO_SERVICE_NOTE}", style="dim")
    return target, config


async def _started(pool: Pool, timeout: float) -> None:
    """An in-process pool: started, its pre-warmed workers up (a service's pool is live already)."""
    if not isinstance(pool, RemotePool):
        await pool.start()
        await settle(pool, timeout)


def _show(rows: list[dict[str, Any]], as_json: bool, title: str) -> None:
    if as_json:
        output.print_json(rows)
    else:
        render_workers(rows, output.console(), title)


@workers_app.command("launch")
def launch_command(
    ctx: typer.Context,
    count: Annotated[int, typer.Argument(min=1, help="How many workers to pre-warm.")],
    user: Annotated[str | None, typer.Option(
        "--user", help="Pre-warm for this user (default: unbound workers any user can claim, where the "
                       "profile allows them; else the current user).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the workers as JSON.")] = False,
) -> None:
    """Pre-warm COUNT workers and show them.

    Unbound workers, claimed by the next new user, where the profile allows them (process;
    strict on a root host, which attaches the workspace at the claim); elsewhere (strict on a
    non-root host mounts the workspace at spawn) workers warm for --user (default: the
    current user).
    """
    state = state_of(ctx)
    target, config = _pool_for_command(ctx, prewarm=False)
    from sandbox_core.isolation.launch import can_prewarm

    for_user = user if user is not None else (None if can_prewarm(config) else state.user_id())

    async def job(pool: Pool) -> list[dict[str, Any]]:
        return await launch(pool, count, for_user)

    rows = run_job(config, job, verbose=state.verbose, target=target)
    _show(rows, state.json_output(as_json), f"launched {len(rows)} worker(s)")


@workers_app.command("list")
def list_command(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the workers as JSON.")] = False,
) -> None:
    """List the pool's workers (state, user, pid, requests, idle time, age, profile)."""
    state = state_of(ctx)
    target, config = _pool_for_command(ctx)

    async def job(pool: Pool) -> list[dict[str, Any]]:
        await _started(pool, config.startup_timeout)
        return await pool_workers(pool)

    rows = run_job(config, job, verbose=state.verbose, target=target)
    _show(rows, state.json_output(as_json), "workers")


@workers_app.command("stop")
def stop_command(
    ctx: typer.Context,
    worker_ids: Annotated[list[str] | None, typer.Argument(help="Worker ids to stop.", show_default=False)] = None,
    user: Annotated[str | None, typer.Option("--user", help="Stop every worker of this user.")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Stop every worker.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Stop workers by ID, by --user, or --all (a busy worker's request is killed)."""
    ids = list(worker_ids or [])
    if sum((bool(ids), user is not None, everything)) != 1:
        output.fail("give worker ids, --user U or --all (exactly one of them)", code=output.EXIT_USAGE)
    state = state_of(ctx)
    target, config = _pool_for_command(ctx)

    async def job(pool: Pool) -> tuple[int, list[str]]:
        await _started(pool, config.startup_timeout)
        return await stop(pool, ids, user, everything)

    stopped, unknown = run_job(config, job, verbose=state.verbose, target=target)
    if state.json_output(as_json):
        output.print_json({"stopped": stopped, "unknown": unknown})
    else:
        output.console().print(f"stopped {stopped} worker(s)")
    if unknown:
        output.fail(f"no such worker: {', '.join(unknown)}", hint="`sandbox workers list` shows the ids")


def register(app: typer.Typer) -> None:
    app.add_typer(workers_app)
