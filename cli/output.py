"""One way to print and one way to fail: consoles that respect NO_COLOR and pipes, exit codes.

Colour needs a terminal and no ``NO_COLOR``; live redraws (spinners, progress bars) need
a terminal that is not ``TERM=dumb``. Piped output gets neither: plain text only. Error,
warning and hint lines go through :func:`visible`: their text often quotes the sandbox,
the service or an upstream API, and must not be able to drive the operator's terminal.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: the fast paths print with this module
if TYPE_CHECKING:
    from typing import Any, NoReturn, TextIO

    from rich.console import Console

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_SANDBOX = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "Exit codes: 0 success, 1 failure, 2 usage error, 124 timeout, 125 sandbox failure "
    "(could not start or isolate), 126 command not executable, 127 command not found, "
    "130 interrupted (Ctrl-C); `exec` and `shell` pass through the command's own code."
)


def _caret(code: int) -> str:
    if code == 0x7F:
        return "^?"
    if code < 0x20:
        return "^" + chr(code + 64)
    return f"\\x{code:02x}"


_CARETS = {code: _caret(code) for code in (*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0))}
"""Control characters (all but tab and newline) and what a terminal is shown instead."""


def visible(text: str) -> str:
    """``text`` safe for a terminal: CR/LF normalised, other control characters as ``^X``."""
    return text.replace("\r\n", "\n").replace("\r", "\n").translate(_CARETS)


def is_tty(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def color_allowed(stream: object) -> bool:
    return is_tty(stream) and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def console(stderr: bool = False, stream: TextIO | None = None) -> Console:
    """A rich console for stdout (or stderr): colour and live redraws only where allowed."""
    from rich.console import Console

    out = stream if stream is not None else (sys.stderr if stderr else sys.stdout)
    tty = is_tty(out)
    color = color_allowed(out)
    return Console(
        file=out,
        force_terminal=tty,
        force_interactive=tty and os.environ.get("TERM") != "dumb",
        no_color=not color,
        color_system="auto" if color else None,
        highlight=False,
        soft_wrap=not tty,
        emoji=False,
    )


def print_json(obj: Any) -> None:
    """Pretty JSON on stdout (paths and other objects as strings)."""
    import json

    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def json_line(obj: Any) -> None:
    """One compact JSON object per line on stdout (NDJSON), flushed at once."""
    import json

    sys.stdout.write(json.dumps(obj, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    if not _plain_stderr():
        warn_to(console(stderr=True), message)
        return
    sys.stderr.write(f"warning: {visible(message)}\n")
    sys.stderr.flush()


def note(message: str) -> None:
    """One dim line on stderr (plain text off a terminal, without loading rich)."""
    if _plain_stderr():
        sys.stderr.write(f"{visible(message)}\n")
        sys.stderr.flush()
        return
    console(stderr=True).print(visible(message), style="dim", markup=False, highlight=False)


def _plain_stderr() -> bool:
    """Whether stderr gets plain lines (a pipe or a file): then rich is not needed to print them.

    What rich would print there is the same text: no colour and no wrapping off a terminal.
    """
    return not is_tty(sys.stderr)


def warn_to(err: Console, message: str) -> None:
    from rich.text import Text

    err.print(Text.assemble(("warning: ", "bold yellow"), visible(message)))


def error(message: str, *, hint: str | None = None, err: Console | None = None) -> None:
    """Print one red line (and a dim hint) without exiting (the REPL keeps going).

    Both are shown through :func:`visible`: either may quote text from the sandbox or upstream.
    """
    if err is None and _plain_stderr():
        sys.stderr.write(f"error: {visible(message)}\n" + (f"hint: {visible(hint)}\n" if hint else ""))
        sys.stderr.flush()
        return
    from rich.text import Text

    out = err if err is not None else console(stderr=True)
    out.print(Text.assemble(("error: ", "bold red"), (visible(message), "red")))
    if hint:
        out.print(Text.assemble(("hint: ", "dim"), visible(hint)))


def fail(message: str, *, hint: str | None = None, code: int = EXIT_FAILURE) -> NoReturn:
    """Print one red line (and a hint) to stderr and exit with ``code``."""
    error(message, hint=hint)
    leave(code)


def leave(code: int) -> NoReturn:
    """Exit with ``code``: ``typer.Exit`` under typer, ``SystemExit`` on the fast path (:mod:`cli.main`).

    The fast path never imports typer, and a command's code is the same either way.
    """
    if "typer" in sys.modules:
        import typer

        raise typer.Exit(code)
    raise SystemExit(code)
