"""``sandbox stats``: pool statistics of an orchestrator (after a short self-check)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli import output
from cli.commands.common import effective_config, state_of
from cli.runtime import run_job

if TYPE_CHECKING:
    from rich.console import Console

    from sandbox_core.orchestrator import SandboxOrchestrator


def stats_command(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stats as JSON.")] = False,
) -> None:
    """Start a pool, run a self-check (ping and `true`), and print the pool's stats.

    Workers by state, per user, request outcomes, crashes, restarts, spawn latency and queue
    depth. (There is no long-running pool service yet: the stats are those of the pool this
    command starts; the REPL's /stats shows its own live pool.)
    """
    state = state_of(ctx)
    config = effective_config(state)
    user_id = state.user_id()

    async def job(orchestrator: SandboxOrchestrator) -> dict[str, Any]:
        from sandbox_core.requests import ExecRequest, RawRequest

        await orchestrator.execute(user_id, RawRequest("ping"))
        await orchestrator.execute(user_id, ExecRequest(argv=("true",)))
        return orchestrator.get_pool_stats()

    stats = run_job(config, job, verbose=state.verbose)
    if state.json_output(as_json):
        output.print_json(stats)
        return
    render_stats(stats, output.console())


def _ms(value: Any) -> str:
    return "–" if value is None else f"{value:g} ms"


def render_stats(stats: dict[str, Any], console: Console) -> None:
    """The pool's stats as tables: pool, per user, and the model gateway when it was used."""
    from rich.table import Table

    workers = stats["workers"]
    requests = stats["requests"]
    latency = stats["spawn_latency_ms"]
    table = Table(title=f"pool · {stats['profile']} profile · up {stats['uptime_s']:.1f} s",
                  show_header=False, title_justify="left")
    table.add_column("group", style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("metric")
    table.add_column("value", justify="right")

    def rows(group: str, pairs: list[tuple[str, Any]]) -> None:
        for i in range(0, len(pairs), 2):
            left = pairs[i]
            right = pairs[i + 1] if i + 1 < len(pairs) else ("", "")
            table.add_row(group if i == 0 else "", left[0], str(left[1]), right[0], str(right[1]))
        table.add_section()

    rows("workers", [
        ("total", f"{workers['total']} / {workers['max']}"), ("idle", workers["idle"]),
        ("busy", workers["busy"]), ("starting", workers["starting"]),
        ("stopping", workers["stopping"]), ("pre-warmed", workers["prewarmed"]),
    ])
    rows("requests", [
        ("ok", requests["ok"]), ("failed", requests["failed"]),
        ("timed out", requests["timed_out"]), ("cancelled", requests["cancelled"]),
        ("in flight", requests["in_flight"]), ("queue depth", stats["queue_depth"]),
    ])
    rows("lifecycle", [
        ("spawned", stats["spawned"]), ("claimed", stats.get("claimed", 0)),
        ("crashes", stats["crashes"]), ("restarts", stats["restarts"]),
        ("recycled", stats["recycled"]), ("reaped", stats["reaped"]),
        ("evicted", stats["evicted"]), ("start failures", stats["start_failures"]),
        ("circuit", stats["circuit"]),
    ])
    rows("spawn latency", [
        ("p50", _ms(latency["p50"])), ("p95", _ms(latency["p95"])), ("samples", latency["count"]),
    ])
    console.print(table)

    if stats["users"]:
        users = Table(title="per user", title_justify="left")
        users.add_column("user")
        for col in ("workers", "busy", "requests"):
            users.add_column(col, justify="right")
        for user, row in sorted(stats["users"].items()):
            users.add_row(user, str(row["workers"]), str(row["busy"]), str(row["requests"]))
        console.print(users)

    gateway = stats.get("gateway")
    if isinstance(gateway, dict) and gateway:
        per_user = {user: row for user, row in gateway.items() if isinstance(row, dict)}
        columns = sorted({key for row in per_user.values() for key in row})
        gw = Table(title="model gateway, per user", title_justify="left")
        gw.add_column("user")
        for col in columns:
            gw.add_column(col.replace("_", " "), justify="right")
        for user, row in sorted(per_user.items()):
            gw.add_row(user, *(f"{row.get(col, 0):,}" if isinstance(row.get(col, 0), int) else str(row.get(col))
                               for col in columns))
        console.print(gw)


def register(app: typer.Typer) -> None:
    app.command("stats")(stats_command)
