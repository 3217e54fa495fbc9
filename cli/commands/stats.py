"""``sandbox stats``: pool statistics of an orchestrator (after a short self-check)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli import output
from cli.commands.common import effective_config, state_of
from cli.runtime import run_job

if TYPE_CHECKING:
    from sandbox_core.orchestrator import SandboxOrchestrator


def stats_command(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stats as JSON.")] = False,
) -> None:
    """Start a pool, run a self-check (ping and `true`), and print the pool's stats."""
    state = state_of(ctx)
    config = effective_config(state)
    user_id = state.user_id()

    async def job(orchestrator: SandboxOrchestrator) -> dict[str, Any]:
        from sandbox_core.requests import ExecRequest, RawRequest

        await orchestrator.execute(user_id, RawRequest("ping"))
        await orchestrator.execute(user_id, ExecRequest(argv=("true",)))
        return orchestrator.get_pool_stats()

    stats = run_job(config, job, verbose=state.verbose)
    if as_json:
        typer.echo(json.dumps(stats, indent=2, sort_keys=True))
        return
    render_stats(stats)


def render_stats(stats: dict[str, Any]) -> None:
    from rich.table import Table

    console = output.console()
    workers = stats["workers"]
    table = Table(title=f"pool ({stats['profile']} profile)", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("total", "starting", "idle", "busy", "stopping", "prewarmed", "max"):
        table.add_row(f"workers {key}", str(workers[key]))
    for key, value in stats["requests"].items():
        table.add_row(f"requests {key}", str(value))
    for key in ("crashes", "restarts", "recycled", "reaped", "evicted", "spawned",
                "start_failures", "queue_depth", "circuit"):
        table.add_row(key.replace("_", " "), str(stats[key]))
    latency = stats["spawn_latency_ms"]
    table.add_row("spawn latency p50/p95 ms", f"{latency['p50']} / {latency['p95']}")
    table.add_row("uptime s", str(stats["uptime_s"]))
    console.print(table)
    if stats["users"]:
        users = Table(title="per user")
        for col in ("user", "workers", "busy", "requests"):
            users.add_column(col)
        for user, row in sorted(stats["users"].items()):
            users.add_row(user, str(row["workers"]), str(row["busy"]), str(row["requests"]))
        console.print(users)


def register(app: typer.Typer) -> None:
    app.command("stats")(stats_command)
