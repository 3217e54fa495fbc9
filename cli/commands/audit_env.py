"""``sandbox audit-env``: plant canaries on the host, probe from inside a worker, print what held.

Exit code 0 when every check passes, 1 when any fails, 125 when no worker could be
started (for example the strict profile without bubblewrap: fail closed), 2 on a config
error. ``--json`` prints the whole report for machines. The REPL's ``/audit`` calls
:func:`run_audit` (or :func:`run_audit_async` from inside a running event loop).
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli import output
from cli.commands.common import ProfileName, effective_config, state_of

if TYPE_CHECKING:
    from rich.console import Console

    from sandbox_core.audit import AuditReport
    from sandbox_core.config import ProcessSandboxConfig


def audit_env_command(
    ctx: typer.Context,
    profile: Annotated[ProfileName | None, typer.Option("--profile", help="Profile to audit.")] = None,
    user: Annotated[
        str | None,
        typer.Option("--user", help="User id the report stands for (the worker runs as a fresh throwaway user)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Prove the isolation of a real worker: plant canaries on the host, probe from inside.

    Plants a canary secret in a host environment variable, in an owner-only file, in a
    world-readable file outside the allowed paths and in another user's workspace; opens
    TCP and Unix listeners; then a worker of the chosen profile tries to reach each of
    them, runs a fork bomb and a memory hog, and the host checks it stayed responsive.
    Prints one row per check (PASS/FAIL) and the host variables withheld and passed.
    Exit code 1 if any check fails.
    """
    state = state_of(ctx)
    config = effective_config(state, profile, min_idle=0)
    code = run_audit(config, state.user_id(user), as_json, verbose=state.verbose)
    raise typer.Exit(code)


def run_audit(
    config: ProcessSandboxConfig,
    user_id: str,
    as_json: bool = False,
    *,
    verbose: bool = False,
    console: Console | None = None,
) -> int:
    """Run the audit, print the table (or JSON), return the exit code (never exits itself).

    ``console`` (the REPL's) receives the table and any error; by default stdout/stderr.
    Synchronous: from inside a running event loop use :func:`run_audit_async` (or call
    this one in a thread, as the REPL does).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("run_audit() cannot run inside an event loop; await run_audit_async() instead")
    try:
        return asyncio.run(run_audit_async(config, user_id, as_json, verbose=verbose, console=console))
    except KeyboardInterrupt:
        output.warn_to(console or output.console(stderr=True), "audit interrupted; canaries removed")
        return output.EXIT_INTERRUPTED


async def run_audit_async(
    config: ProcessSandboxConfig,
    user_id: str,
    as_json: bool = False,
    *,
    verbose: bool = False,
    console: Console | None = None,
) -> int:
    """:func:`run_audit` for callers that already run an event loop (the REPL)."""
    from cli.runtime import exit_code_for, hint_for, print_details
    from sandbox_core import audit
    from sandbox_core.errors import SandboxError

    err = console or output.console(stderr=True)
    live = err.is_terminal and err.is_interactive and console is None and not as_json
    status = err.status("auditing isolation", spinner="dots") if live else None
    try:
        if status is not None:
            status.start()
        report = await audit.run_audit(
            config, user_id, progress=(lambda msg: status.update(f"audit: {msg}")) if status else None
        )
    except SandboxError as exc:
        if verbose:
            print_details(exc, err)
        output.error(f"the audit could not run: {exc}", hint=hint_for(exc), err=err)
        return exit_code_for(exc)
    finally:
        if status is not None:
            status.stop()
    if as_json:
        if console is None:
            output.print_json(report.to_dict())
        else:
            console.print_json(json.dumps(report.to_dict(), default=str))
    else:
        render_report(report, console)
    return output.EXIT_OK if report.passed else output.EXIT_FAILURE


def render_report(report: AuditReport, console: Console | None = None) -> None:
    """The rich table of checks, the variable lists, the layers and a one-line verdict."""
    from rich.table import Table
    from rich.text import Text

    console = console or output.console()
    title = f"isolation audit: profile {report.profile}, user {report.user_id}, worker {report.worker_id or '-'}"
    table = Table(title=title, show_header=True, show_lines=False, expand=False)
    table.add_column("check", no_wrap=True)
    table.add_column("expectation", ratio=2)
    table.add_column("observed", ratio=3)
    table.add_column("result", no_wrap=True)
    for check in report.checks:
        verdict = Text("PASS", style="bold green") if check.passed else Text("FAIL", style="bold red")
        table.add_row(Text(check.name), Text(check.expectation), Text(output.visible(check.observed)), verdict)
    console.print(table)

    for label, names in (
        ("withheld host variables", report.withheld_variables),
        ("passed host variables", report.passed_variables),
        ("set by the sandbox instead of the host value", report.replaced_variables),
        ("added by the sandbox", report.added_variables),
    ):
        if names or label.startswith(("withheld", "passed")):
            line = Text(f"{label} ({len(names)}): ", style="bold")
            line.append(output.visible(", ".join(names)) if names else "none", style="")
            console.print(line)
    layers = _layers_line(report.layers)
    if layers:
        console.print(Text("layers: ", style="bold") + Text(output.visible(layers)))
    failed = report.failed
    if failed:
        line = Text(f"{len(failed)} of {len(report.checks)} checks FAILED: ", style="bold red")
        line.append(", ".join(c.name for c in failed))
        console.print(line)
    else:
        console.print(Text(f"all {len(report.checks)} checks passed ({report.duration_s:.1f}s)", style="bold green"))


def _layers_line(layers: dict[str, Any]) -> str:
    if not layers:
        return ""
    parts = [f"uid {layers.get('uid')}"]
    if layers.get("engine"):
        parts.append(str(layers["engine"]))
    namespaces = layers.get("namespaces")
    if isinstance(namespaces, list) and namespaces:
        parts.append("namespaces " + ",".join(map(str, namespaces)))
    parts.append(f"seccomp {'on' if layers.get('seccomp') else 'off'}")
    landlock = layers.get("landlock")
    if isinstance(landlock, dict):
        parts.append(f"landlock ABI {landlock.get('abi')}")
    elif landlock is not None:
        parts.append("landlock off")
    if layers.get("limits"):
        parts.append(f"limits {layers['limits']}")
    return "; ".join(parts)


def register(app: typer.Typer) -> None:
    app.command("audit-env", epilog=output.EXIT_CODES_HELP)(audit_env_command)
