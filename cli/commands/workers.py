"""``sandbox workers launch|list|stop``: operator control of a pool.

There is no long-running pool service yet, so from the shell these act on the pool of this
one command (it is shut down when the command ends); inside ``sandbox repl`` the same
operations (``/workers ...``) act on the REPL's live pool.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli import output
from cli.commands.common import effective_config, state_of
from cli.runtime import run_job

if TYPE_CHECKING:
    from rich.console import Console

    from sandbox_core.orchestrator import SandboxOrchestrator

NO_SERVICE_NOTE = (
    "this acts on a pool that lives only as long as this command (in the REPL, /workers acts on its live pool)"
)

workers_app = typer.Typer(
    name="workers",
    help="Launch, list and stop the workers of a pool.\n\n" + NO_SERVICE_NOTE + ".",
    no_args_is_help=True,
)


# ---------------------------------------------------------------- operations (shared with the REPL)


async def settle(pool: SandboxOrchestrator, timeout: float) -> None:
    """Wait (up to ``timeout``) until no worker of ``pool`` is still starting."""
    deadline = time.monotonic() + timeout
    await asyncio.sleep(0)  # let a pre-warm scheduled by start() register its worker
    while pool.get_pool_stats()["workers"]["starting"] and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def launch(pool: SandboxOrchestrator, count: int) -> list[dict[str, Any]]:
    """Pre-warm ``count`` workers; the rows of the launched ones."""
    ids = set(await pool.launch(count))
    return [row for row in pool.list_workers() if row["worker_id"] in ids]


async def stop(
    pool: SandboxOrchestrator, ids: list[str], user: str | None, everything: bool
) -> tuple[int, list[str]]:
    """Stop workers by id, by user, or all; returns how many stopped and the unknown ids."""
    known = {row["worker_id"] for row in pool.list_workers()}
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


def _show(rows: list[dict[str, Any]], as_json: bool, title: str) -> None:
    if as_json:
        output.print_json(rows)
    else:
        render_workers(rows, output.console(), title)


@workers_app.command("launch")
def launch_command(
    ctx: typer.Context,
    count: Annotated[int, typer.Argument(min=1, help="How many workers to pre-warm.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the workers as JSON.")] = False,
) -> None:
    """Pre-warm COUNT unbound workers and show them."""
    state = state_of(ctx)
    config = effective_config(state, min_idle=0)
    output.console(stderr=True).print(f"note: {NO_SERVICE_NOTE}", style="dim")

    async def job(pool: SandboxOrchestrator) -> list[dict[str, Any]]:
        return await launch(pool, count)

    rows = run_job(config, job, verbose=state.verbose)
    _show(rows, state.json_output(as_json), f"launched {len(rows)} worker(s)")


@workers_app.command("list")
def list_command(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the workers as JSON.")] = False,
) -> None:
    """List the pool's workers (state, user, pid, requests, idle time, age, profile)."""
    state = state_of(ctx)
    config = effective_config(state)
    output.console(stderr=True).print(f"note: {NO_SERVICE_NOTE}", style="dim")

    async def job(pool: SandboxOrchestrator) -> list[dict[str, Any]]:
        await pool.start()
        await settle(pool, config.startup_timeout)
        return pool.list_workers()

    rows = run_job(config, job, verbose=state.verbose)
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
    config = effective_config(state)
    output.console(stderr=True).print(f"note: {NO_SERVICE_NOTE}", style="dim")

    async def job(pool: SandboxOrchestrator) -> tuple[int, list[str]]:
        await pool.start()
        await settle(pool, config.startup_timeout)
        return await stop(pool, ids, user, everything)

    stopped, unknown = run_job(config, job, verbose=state.verbose)
    if state.json_output(as_json):
        output.print_json({"stopped": stopped, "unknown": unknown})
    else:
        output.console().print(f"stopped {stopped} worker(s)")
    if unknown:
        output.fail(f"no such worker: {', '.join(unknown)}", hint="`sandbox workers list` shows the ids")


def register(app: typer.Typer) -> None:
    app.add_typer(workers_app)
