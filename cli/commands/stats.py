"""``sandbox stats``: the pool's statistics, once or as a live dashboard (``--watch``).

With a service (``--connect``, ``SANDBOX_URL`` or its default socket) these are the live
pool's; in-process, the pool this command starts (after a short self-check).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli import output
from cli.commands.common import effective_config, state_of
from cli.remote import RemotePool
from cli.runtime import pool_stats, run_job, service_target, sigint_calls

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.text import Text

    from cli.runtime import Pool

REQUEST_OUTCOMES = ("ok", "failed", "timed_out", "cancelled")


def stats_command(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stats as JSON (NDJSON with --watch).")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="A live dashboard, refreshed until Ctrl-C.")] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, metavar="S", help="Seconds between refreshes (--watch).")
    ] = 2.0,
) -> None:
    """Print the pool's stats: of the service if one is used, else of a pool this command starts.

    Workers by state, per user, request outcomes, crashes, restarts, spawn latency, queue
    depth and model gateway use. In-process, the new pool first runs a self-check (ping and
    `true`); the service's stats are operator-only (root or its uid on the socket, an
    operator token on TCP).

    --watch: a live dashboard, redrawn in place every --interval seconds on a terminal, with
    request, spawn and gateway rates per second (from consecutive samples); one plain
    snapshot per interval when stdout is not a terminal, one JSON object per line with
    --json. Ctrl-C ends it (exit 0). In-process it watches the pool it starts (idle unless
    something else runs in it), so --watch is mostly useful with the service.
    """
    state = state_of(ctx)
    target = service_target(state)
    config = effective_config(state, warn=target is None)
    user_id = state.user_id()
    json_mode = state.json_output(as_json)

    if watch:
        where = target.address if target is not None else f"in-process {config.profile} pool"

        async def watching(pool: Pool) -> int:
            return await watch_stats(pool, interval=interval, as_json=json_mode, where=where,
                                     console=output.console())

        raise typer.Exit(run_job(config, watching, verbose=state.verbose, target=target))

    async def job(pool: Pool) -> dict[str, Any]:
        from sandbox_core.requests import ExecRequest, RawRequest

        if isinstance(pool, RemotePool):
            return await pool.stats()
        await pool.execute(user_id, RawRequest("ping"))
        await pool.execute(user_id, ExecRequest(argv=("true",)))
        return pool.get_pool_stats()

    stats = run_job(config, job, verbose=state.verbose, target=target)
    if json_mode:
        output.print_json(stats)
        return
    render_stats(stats, output.console())


# ---------------------------------------------------------------- --watch


async def watch_stats(pool: Pool, *, interval: float, as_json: bool, where: str, console: Console) -> int:
    """Show the pool's stats every ``interval`` seconds until Ctrl-C (then return 0)."""
    if not isinstance(pool, RemotePool):
        await pool.start()
    task = asyncio.create_task(_watch_loop(pool, interval, as_json, where, console))
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    with sigint_calls(interrupt):
        try:
            await task
        except asyncio.CancelledError:
            if not interrupted:
                raise
    return output.EXIT_OK


async def _watch_loop(pool: Pool, interval: float, as_json: bool, where: str, console: Console) -> None:
    from rich.live import Live

    live = Live(console=console, auto_refresh=False, transient=False) if (
        console.is_terminal and console.is_interactive and not as_json) else None
    previous: dict[str, Any] | None = None
    previous_at = 0.0
    with live if live is not None else contextlib.nullcontext():
        for sample in itertools.count():
            stats = await pool_stats(pool)
            now = time.monotonic()
            rates = compute_rates(previous, stats, now - previous_at)
            previous, previous_at = stats, now
            if as_json:
                output.json_line({"time": round(time.time(), 3), "stats": stats, "rates": rates})
            elif live is not None:
                live.update(dashboard(stats, rates, where=where, interval=interval), refresh=True)
            else:
                if sample:
                    console.print()
                console.print(dashboard(stats, rates, where=where, interval=interval))
            await asyncio.sleep(interval)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _gateway_totals(stats: dict[str, Any]) -> dict[str, int]:
    totals = {"calls": 0, "tokens": 0, "refused": 0, "errors": 0}
    gateway = stats.get("gateway")
    for row in gateway.values() if isinstance(gateway, dict) else ():
        if isinstance(row, dict):
            totals["calls"] += _count(row.get("calls"))
            totals["tokens"] += _count(row.get("input_tokens")) + _count(row.get("output_tokens"))
            totals["refused"] += _count(row.get("refused"))
            totals["errors"] += _count(row.get("errors"))
    return totals


def compute_rates(previous: dict[str, Any] | None, current: dict[str, Any], elapsed: float) -> dict[str, Any]:
    """Per-second rates of the counters between two samples (empty for the first one).

    The pool's own uptime is the clock when both samples have it (no network jitter); a
    pool that restarted between them (uptime went down) gives no rates.
    """
    if previous is None:
        return {}
    up0, up1 = previous.get("uptime_s"), current.get("uptime_s")
    if isinstance(up0, int | float) and isinstance(up1, int | float):
        if up1 < up0:
            return {}
        elapsed = up1 - up0
    if elapsed <= 0:
        return {}

    def rate(now: Any, before: Any) -> float:
        return max(0, _count(now) - _count(before)) / elapsed

    req0, req1 = previous["requests"], current["requests"]
    rates: dict[str, Any] = {f"{key}_per_s": rate(req1.get(key), req0.get(key)) for key in REQUEST_OUTCOMES}
    rates["requests_per_s"] = sum(rates[f"{key}_per_s"] for key in REQUEST_OUTCOMES)
    rates["spawned_per_s"] = rate(current.get("spawned"), previous.get("spawned"))
    rates["crashes_per_s"] = rate(current.get("crashes"), previous.get("crashes"))
    gw0, gw1 = _gateway_totals(previous), _gateway_totals(current)
    rates["gateway_calls_per_s"] = rate(gw1["calls"], gw0["calls"])
    rates["gateway_tokens_per_s"] = rate(gw1["tokens"], gw0["tokens"])
    users0 = previous.get("users", {})
    rates["users"] = {
        user: rate(row.get("requests"), users0.get(user, {}).get("requests"))
        for user, row in current.get("users", {}).items()
    }
    rates["elapsed_s"] = round(elapsed, 3)
    return rates


def _per_s(rates: dict[str, Any], key: str) -> str:
    value = rates.get(key)
    return "–" if not isinstance(value, int | float) else f"{value:.2f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _worker_bar(workers: dict[str, Any], width: int = 40) -> Text:
    """One cell per worker slot: busy, idle, starting, stopping, then free slots."""
    from rich.text import Text

    cap = max(_count(workers.get("max")), _count(workers.get("total")), 1)
    scale = min(1.0, width / cap)
    bar = Text()
    for key, char, style in (("busy", "█", "red"), ("idle", "█", "green"), ("starting", "▒", "yellow"),
                             ("stopping", "░", "dim")):
        bar.append(char * round(_count(workers.get(key)) * scale), style=style)
    bar.append("·" * max(0, round(cap * scale) - len(bar.plain)), style="dim")
    return bar


def dashboard(stats: dict[str, Any], rates: dict[str, Any], *, where: str, interval: float) -> RenderableType:
    """The --watch view of one sample: header, workers, requests and rates, latency, users, gateway."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    workers = stats["workers"]
    requests = stats["requests"]
    latency = stats["spawn_latency_ms"]
    header = Text.assemble(
        ("sandbox stats", "bold"),
        f" · {where} · {stats['profile']} profile · up {_duration(stats['uptime_s'])} · "
        f"{time.strftime('%H:%M:%S')} · every {interval:g} s · Ctrl-C exits",
    )

    pool = Table(title="workers", title_justify="left", box=None, padding=(0, 1))
    for col in ("busy", "idle", "starting", "stopping", "pre-warmed", "total", "queue", "in flight"):
        pool.add_column(col, justify="right")
    pool.add_column("")
    pool.add_row(
        str(workers["busy"]), str(workers["idle"]), str(workers["starting"]), str(workers["stopping"]),
        str(workers["prewarmed"]), f"{workers['total']}/{workers['max']}", str(stats["queue_depth"]),
        str(stats.get("runs_in_flight", requests["in_flight"])), _worker_bar(workers),
    )

    reqs = Table(title="requests", title_justify="left")
    reqs.add_column("outcome")
    reqs.add_column("total", justify="right")
    reqs.add_column("per s", justify="right")
    for key in REQUEST_OUTCOMES:
        reqs.add_row(key.replace("_", " "), str(requests[key]), _per_s(rates, f"{key}_per_s"))
    reqs.add_section()
    reqs.add_row("all", str(sum(_count(requests[k]) for k in REQUEST_OUTCOMES)), _per_s(rates, "requests_per_s"),
                 style="bold")

    life = Table(title="workers' lifecycle", title_justify="left")
    life.add_column("metric")
    life.add_column("value", justify="right")
    life.add_row("spawn p50", _ms(latency["p50"]))
    life.add_row("spawn p95", _ms(latency["p95"]))
    life.add_row("spawned", f"{stats['spawned']} ({_per_s(rates, 'spawned_per_s')}/s)")
    life.add_row("crashes", f"{stats['crashes']} ({_per_s(rates, 'crashes_per_s')}/s)")
    life.add_row("restarts · recycled", f"{stats['restarts']} · {stats['recycled']}")
    life.add_row("reaped · evicted", f"{stats['reaped']} · {stats['evicted']}")
    life.add_row("start failures", f"{stats['start_failures']} (circuit {stats['circuit']})")

    side = Table.grid(padding=(0, 2))
    side.add_row(reqs, life)
    parts: list[RenderableType] = [header, pool, side]

    raw_gateway = stats.get("gateway")
    gateway: dict[str, Any] = raw_gateway if isinstance(raw_gateway, dict) else {}
    if stats["users"] or gateway:
        users = Table(title="per user", title_justify="left")
        for col, justify in (("user", "left"), ("workers", "right"), ("busy", "right"), ("requests", "right"),
                             ("req/s", "right"), ("gw calls", "right"), ("gw tokens", "right")):
            users.add_column(col, justify=justify)  # type: ignore[arg-type]
        user_rates = rates.get("users", {})
        for user in sorted(set(stats["users"]) | set(gateway)):
            row = stats["users"].get(user, {})
            gw = gateway.get(user, {}) if isinstance(gateway.get(user), dict) else {}
            rate = user_rates.get(user)
            users.add_row(
                user, str(row.get("workers", 0)), str(row.get("busy", 0)), str(row.get("requests", 0)),
                "–" if rate is None else f"{rate:.2f}", f"{_count(gw.get('calls')):,}",
                f"{_count(gw.get('input_tokens')) + _count(gw.get('output_tokens')):,}",
            )
        parts.append(users)
    if gateway:
        totals = _gateway_totals(stats)
        parts.append(Text(
            f"model gateway: {totals['calls']:,} calls ({_per_s(rates, 'gateway_calls_per_s')}/s) · "
            f"{totals['tokens']:,} tokens ({_per_s(rates, 'gateway_tokens_per_s')}/s) · "
            f"{totals['refused']} refused · {totals['errors']} errors"
        ))
    return Group(*parts)


# ---------------------------------------------------------------- one snapshot


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
        *([("service runs", stats["runs_in_flight"])] if "runs_in_flight" in stats else []),
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
