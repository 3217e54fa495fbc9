"""One way to print and one way to fail: consoles that respect NO_COLOR and pipes, exit codes."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import typer
from rich.console import Console

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_SANDBOX = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

EXIT_CODES_HELP = (
    "Exit codes: 0 success, 1 failure, 2 usage error, 124 timeout, 125 sandbox failure "
    "(could not start or isolate), 126 command not executable, 127 command not found; "
    "`exec` passes through the command's own code."
)


def _color_allowed(stream: object) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def console(stderr: bool = False) -> Console:
    """A rich console: colour and live redraws only on a terminal without NO_COLOR."""
    stream = sys.stderr if stderr else sys.stdout
    tty = _color_allowed(stream)
    return Console(
        file=stream,
        no_color=not tty,
        color_system="auto" if tty else None,
        force_terminal=tty,
        highlight=False,
        soft_wrap=not tty,
    )


def warn(message: str) -> None:
    console(stderr=True).print(f"[bold yellow]warning:[/] {message}")


def fail(message: str, *, hint: str | None = None, code: int = EXIT_FAILURE) -> NoReturn:
    """Print one red line (and a hint) to stderr and exit with ``code``."""
    err = console(stderr=True)
    err.print(f"[bold red]error:[/] {message}", markup=True)
    if hint:
        err.print(f"[dim]hint:[/] {hint}")
    raise typer.Exit(code)
