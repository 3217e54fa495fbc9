"""``sandbox runs`` and ``sandbox log``: what the durable record kept (runs, then the journal).

With a service (``--connect``, ``SANDBOX_URL`` or its default socket) they ask it (a user sees
their own rows, an operator everyone's); in-process they read the record file in the state
directory (``state_dir``) directly. A table on a terminal, one JSON object per line
on a pipe or with ``--json``. Every string comes from a record of sandboxed work and is shown
escaped.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli import output
from cli.commands.common import effective_config, state_of
from cli.remote import RemotePool
from cli.runtime import run_job, service_target, sigint_calls

if TYPE_CHECKING:
    from cli.runtime import Pool
    from sandbox_core.config import ProcessSandboxConfig
    from sandbox_core.record import Record

FOLLOW_INTERVAL = 0.5
KINDS = "exec|agent|tool|model|egress|crash|limit|auth|terminal|files"

UserOpt = Annotated[str | None, typer.Option("--user", "-u", metavar="USER",
                                             help="Only this user's rows (operators; a user sees their own).")]
SinceOpt = Annotated[str | None, typer.Option("--since", metavar="AGE",
                                               help="Only rows newer than AGE (90s, 15m, 1h, 2d).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line (the default on a pipe).")]


def runs_command(
    ctx: typer.Context,
    user: UserOpt = None,
    since: SinceOpt = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="At most this many runs.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List recorded runs, newest first: who, what, when, how it ended, tokens."""
    state = state_of(ctx)
    cutoff = _cutoff(since)
    target = service_target(state)
    if target is not None:
        async def remote(pool: Pool) -> list[dict[str, Any]]:
            assert isinstance(pool, RemotePool)
            return await pool.client.runs(user_id=user, since=since, limit=limit)

        rows = run_job(effective_config(state, warn=False), remote, verbose=state.verbose, target=target)
    else:
        record = _local(effective_config(state, warn=False))
        try:
            rows = record.runs(user_id=user, since=cutoff, limit=limit)
        finally:
            record.close()
    if state.json_output(as_json) or not output.is_tty(output.console().file):
        for row in rows:
            output.json_line(row)
        return
    _runs_table(rows)


def log_command(
    ctx: typer.Context,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new entries until Ctrl-C.")] = False,
    user: UserOpt = None,
    kind: Annotated[str | None, typer.Option("--kind", metavar="KIND", help=f"Only entries of KIND ({KINDS}).")
                    ] = None,
    since: SinceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the journal: exec argv, agent tool calls, model calls, egress, crashes, limits, auth."""
    from sandbox_core.record import JOURNAL_KINDS

    state = state_of(ctx)
    if kind is not None and kind not in JOURNAL_KINDS:
        output.fail(f"--kind must be one of {KINDS}, got {kind!r}", code=output.EXIT_USAGE)
    cutoff = _cutoff(since)
    as_lines = state.json_output(as_json) or not output.is_tty(output.console().file)
    target = service_target(state)
    config = effective_config(state, warn=False)

    def show(entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            if as_lines:
                output.json_line(entry)
            else:
                _entry_line(entry)

    async def tail(fetch: Any) -> int:
        after = 0
        stop = asyncio.Event()
        with sigint_calls(stop.set):
            while True:
                entries = await fetch(after)
                show(entries)
                if entries:
                    after = int(entries[-1]["id"])
                    continue
                if not follow:
                    return output.EXIT_OK
                try:
                    await asyncio.wait_for(stop.wait(), FOLLOW_INTERVAL)
                except TimeoutError:
                    continue
                return output.EXIT_OK

    if target is not None:
        async def remote(pool: Pool) -> int:
            assert isinstance(pool, RemotePool)
            return await tail(lambda after: pool.client.journal(user_id=user, kind=kind, since=since, after=after))

        raise typer.Exit(run_job(config, remote, verbose=state.verbose, target=target))
    record = _local(config)

    async def local() -> int:
        return await tail(lambda after: asyncio.to_thread(record.entries, user_id=user, kind=kind, since=cutoff,
                                                           after=after))  # fmt: skip

    try:
        code = asyncio.run(local())
    finally:
        record.close()
    raise typer.Exit(code)


def _cutoff(since: str | None) -> float | None:
    from sandbox_core.record import parse_duration

    if since is None:
        return None
    try:
        return time.time() - parse_duration(since)
    except ValueError as exc:
        output.fail(str(exc), code=output.EXIT_USAGE)


def _local(config: ProcessSandboxConfig) -> Record:
    from sandbox_core.record import Record, record_path

    path = record_path(config)
    if not path.is_file():
        output.fail(f"no record at {path} yet", hint="runs are recorded by `sandbox serve` and in-process "
                    "commands (record.enabled); set state_dir if the record lives elsewhere")  # fmt: skip
    try:
        return Record(path, retention_days=config.record.retention_days, max_mb=config.record.max_mb)
    except OSError as exc:
        output.fail(f"cannot open the record {path}: {exc}",
                    hint="the record is the service's (0600): ask it instead (sandbox serve, --connect)")


def _when(ts: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts))) if ts else "–"


def _what(summary: Any) -> str:
    if not isinstance(summary, dict):
        return str(summary)
    if "argv" in summary:
        return " ".join(map(str, summary["argv"]))
    return str(summary.get("shell") or summary.get("prompt") or summary.get("method") or "")


def _runs_table(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{len(rows)} runs", title_justify="left")
    for column in ("run", "user", "kind", "started", "s", "outcome", "exit", "kill", "tokens", "what"):
        table.add_column(column, overflow="fold", no_wrap=column in ("run", "started"))
    for row in rows:
        took = f"{row['ended'] - row['started']:.1f}" if row.get("ended") else "…"
        tokens = row.get("input_tokens", 0) + row.get("output_tokens", 0)
        cells = (row.get("run_id"), row.get("user_id"), row.get("kind"), _when(row.get("started")), took,
                 row.get("outcome") or row.get("state"), row.get("exit_code"), row.get("kill_reason"),
                 tokens or "", _what(row.get("summary")))  # fmt: skip
        table.add_row(*(Text(output.visible("" if c is None else str(c))) for c in cells))
    output.console().print(table)


def _entry_line(entry: dict[str, Any]) -> None:
    from rich.text import Text

    detail = json.dumps(entry.get("detail"), ensure_ascii=False, separators=(",", ":"))
    who = entry.get("user_id") or "-"
    line = Text.assemble((_when(entry.get("at")), "dim"), " ", (f"{entry.get('kind'):<7}", "bold"), " ",
                         (who, "cyan"), " ", output.visible(detail))  # fmt: skip
    output.console().print(line, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("runs")(runs_command)
    app.command("log")(log_command)
