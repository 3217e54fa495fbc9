"""Rendering a request's event stream: rich for people (``run``, the REPL), NDJSON for scripts.

The rich renderer streams assistant text as it arrives, shows each tool call as a compact
panel (command or file, truncated output, status) and ends with one summary line (turns,
tokens, duration, worker, profile). A ``bash`` call whose output streams (``stdout`` events
with its ``tool_use_id``) is drawn as it runs instead: a header line, its output lines
under a ``│`` rule (the first ``LIVE_LINES``; the rest are counted, the last few shown at
the end), then a closing line with the status. Its output is not printed again at the end:
the operator has seen it, and the tool result only repeats it. Everything that came from
inside the sandbox is shown with its control characters made visible, so a command or a
prompt-injected agent cannot drive the operator's terminal with escape sequences.
"""

from __future__ import annotations

import codecs
import contextlib
import json
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Console, Group
from rich.panel import Panel
from rich.text import Text

from cli import output
from cli.output import visible

if TYPE_CHECKING:
    from rich.status import Status

    from cli.runtime import Pool
    from sandbox_core.events import Event
    from sandbox_core.requests import Request

PANEL_HEAD_LINES = 8
"""Output lines shown from the start of a tool's output."""
PANEL_TAIL_LINES = 4
"""Output lines shown from its end (errors usually are there)."""
PANEL_LINE_CHARS = 400
HEADER_LINES = 3
"""Lines of a multi-line command shown in a panel's header."""
LIVE_LINES = 50
"""Output lines of one tool call shown as they arrive; of the later ones only the last
``PANEL_TAIL_LINES`` are shown, when the call ends."""
SUBJECT_CHARS = 100
"""Characters of a command shown on a live tool's header line."""

@dataclass
class Outcome:
    """What a rendered request came to: its exit code, an error, the ``done`` data."""

    method: str = ""
    exit_code: int = output.EXIT_OK
    error: str | None = None
    done: dict[str, Any] | None = None
    input_tokens: int = 0
    output_tokens: int = 0

    def track(self, event: Event) -> None:
        data = event.data
        if event.type == "started":
            self.method = str(data.get("method", ""))
        elif event.type == "usage":
            self.input_tokens += _int(data.get("input_tokens"))
            self.output_tokens += _int(data.get("output_tokens"))
        elif event.type == "error":
            self.error = str(data.get("message", "error"))
            self.exit_code = output.EXIT_FAILURE
        elif event.type == "done":
            self.done = dict(data)
            usage = data.get("usage")
            if isinstance(usage, dict) and ("input_tokens" in usage or "output_tokens" in usage):
                self.input_tokens = _int(usage.get("input_tokens"))
                self.output_tokens = _int(usage.get("output_tokens"))
            if "exit_code" in data:
                self.exit_code = _int(data.get("exit_code"), output.EXIT_FAILURE)
            elif data.get("stop_reason") == "error" or data.get("error"):
                self.exit_code = output.EXIT_FAILURE
                self.error = self.error or str(data.get("error") or "the agent stopped on an error")


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


class Renderer(Protocol):
    outcome: Outcome

    def handle(self, event: Event) -> None: ...

    def close(self) -> None: ...


class JsonRenderer:
    """One event per line (NDJSON) on stdout, exactly as the library yields it."""

    def __init__(self) -> None:
        self.outcome = Outcome()

    def handle(self, event: Event) -> None:
        self.outcome.track(event)
        output.json_line(event.to_dict())

    def close(self) -> None:
        pass

    @staticmethod
    def error(message: str, code: int) -> None:
        """The line a script sees when the request failed before ``done``."""
        output.json_line({"type": "error", "seq": -1, "data": {"message": message, "exit_code": code}})


@dataclass
class _Tool:
    name: str
    input: dict[str, Any] = field(default_factory=dict)
    live: bool = False
    """Its output has been streaming (header printed)."""
    shown: int = 0
    partial: str = ""
    """The last line of its output so far, not ended yet."""
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=PANEL_TAIL_LINES))
    skipped: int = 0


def _text_decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")


class RichRenderer:
    """Streams events to a rich console as they happen (spinner only on an interactive terminal)."""

    def __init__(self, console: Console, *, err: Console | None = None, summary: bool = True) -> None:
        self.console = console
        self.err = err if err is not None else output.console(stderr=True)
        self.outcome = Outcome()
        self._summary = summary
        self._status: Status | None = None
        self._at_line_start = True
        self._tools: dict[str, _Tool] = {}
        self._decoders = {kind: _text_decoder() for kind in ("stdout", "stderr")}
        """Output is bytes: text shows as text (never a character cut in two), the rest as \\xNN."""
        self._worker = ""
        self._profile = ""

    # ------------------------------------------------------------------ events

    def handle(self, event: Event) -> None:
        self.outcome.track(event)
        data = event.data
        kind = event.type
        if kind == "started":
            self._worker = str(data.get("worker_id", ""))
            self._profile = str(data.get("profile", ""))
            self._spin("running" if self.outcome.method == "exec" else "thinking")
        elif kind == "text":
            self._write(str(data.get("text", "")))
        elif kind in ("stdout", "stderr"):
            if "tool_use_id" in data:
                self._tool_output(data["tool_use_id"], event.chunk().decode("utf-8", errors="backslashreplace"))
            else:
                text = self._decoders[kind].decode(event.chunk())
                self._write(text, style="red" if kind == "stderr" else None)
        elif kind == "tool_use":
            self._end_line()
            raw_input = data.get("input")
            tool_input = raw_input if isinstance(raw_input, dict) else {"input": raw_input} if raw_input else {}
            tool = _Tool(str(data.get("name", "tool")), tool_input)
            self._tools[str(data.get("id", ""))] = tool
            self._spin(f"{tool.name}: {_one_line(_subject(tool), 60)}")
        elif kind == "tool_result":
            self._end_line()
            tool = self._tools.pop(str(data.get("id", "")), _Tool("tool"))
            if tool.live:
                self._end_live(tool, data)
            else:
                self.console.print(tool_panel(tool.name, tool.input, data))
            self._spin("thinking")
        elif kind == "error":
            self._end_line()
            output.error(visible(str(data.get("message", "error"))), err=self.err)
        elif kind == "done":
            self._end_line()
            warnings = data.get("warnings")
            for warning in warnings if isinstance(warnings, list) else [warnings] if warnings else []:
                output.warn_to(self.err, visible(str(warning)))
            if self._summary:
                self.console.print(self.summary_line())

    def close(self) -> None:
        """Stop the spinner and finish the line; show tool calls that never got a result."""
        self._unspin()
        self._end_line()
        for tool in self._tools.values():
            if tool.live:
                self._end_live(tool, None)
            else:
                self.console.print(tool_panel(tool.name, tool.input, None))
        self._tools.clear()

    # ------------------------------------------------------------------ pieces

    def summary_line(self) -> Text:
        o = self.outcome
        done = o.done or {}
        ok = o.exit_code == output.EXIT_OK
        parts: list[str] = []
        if o.method == "exec" or "exit_code" in done:
            parts.append(f"exit {done.get('exit_code', '?')}")
            if "signal" in done:
                parts.append(f"signal {done['signal']}")
            if isinstance(done.get("kill_reason"), str):
                parts.append(f"killed: {done['kill_reason']}")
        else:
            reason = done.get("stop_reason")
            if reason:
                parts.append(str(reason))
            turns = done.get("turns")
            if isinstance(turns, int):
                parts.append(f"{turns} turn" + ("" if turns == 1 else "s"))
            total = o.input_tokens + o.output_tokens
            parts.append(f"{total:,} tokens ({o.input_tokens:,} in, {o.output_tokens:,} out)")
        duration = done.get("duration_s")
        if isinstance(duration, int | float):
            parts.append(f"{duration:.2f} s")
        worker = done.get("worker_id") or self._worker
        if worker:
            parts.append(f"worker {worker}")
        profile = done.get("profile") or self._profile
        if profile:
            parts.append(f"profile {profile}")
        mark = ("✓ ", "green") if ok else ("✗ ", "red")
        return Text.assemble(mark, (visible(" · ".join(parts)), "dim"))

    def _tool_output(self, tool_use_id: object, text: str) -> None:
        """Output of a running tool call: whole lines under its header, the open line in the spinner."""
        key = str(tool_use_id) if str(tool_use_id) in self._tools else next(reversed(self._tools), None)
        if key is None:  # no call to put it under (a replay that starts midway)
            self._write(text)
            return
        tool = self._tools[key]
        if not text:
            return
        if not self._at_line_start:
            self._end_line()
        if not tool.live:
            tool.live = True
            header = Text("╭─ ", style="dim")
            header.append(visible(tool.name), style="bold")
            subject = _subject(tool)
            if subject:
                header.append((" · $ " if tool.name == "bash" and "command" in tool.input else " · ")
                              + _one_line(visible(subject), SUBJECT_CHARS), style="bold")
            self.console.print(header)
        lines = (tool.partial + visible(text)).split("\n")
        tool.partial = lines.pop()
        for line in lines:
            self._live_line(tool, line)
        latest = tool.partial or (tool.tail[-1] if tool.tail else "")
        if latest:
            self._spin(f"{tool.name}: {_one_line(_subject(tool), 40)} · {_one_line(latest, 60)}")
        else:
            self._spin(f"{tool.name}: {_one_line(_subject(tool), 60)}")

    def _live_line(self, tool: _Tool, line: str) -> None:
        if tool.shown < LIVE_LINES:
            tool.shown += 1
            self.console.print(Text.assemble(("│ ", "dim"), (_clip_lines([line])[0], "dim")))
            return
        if len(tool.tail) == tool.tail.maxlen:
            tool.skipped += 1
        tool.tail.append(line)

    def _end_live(self, tool: _Tool, result: dict[str, Any] | None) -> None:
        """Close a live tool call: the rest of its output, a tool error's message, the status."""
        if tool.partial:
            line, tool.partial = tool.partial, ""
            self._live_line(tool, line)
        if tool.skipped:
            self.console.print(Text.assemble(("│ ", "dim"), (f"… {tool.skipped} more lines …", "italic")))
        for line in _clip_lines(list(tool.tail)):
            self.console.print(Text.assemble(("│ ", "dim"), (line, "dim")))
        tool.tail.clear()
        status, colour = _status(result, live=True)
        if result is not None and result.get("is_error") and not isinstance(result.get("exit_code"), int):
            # not the command's own output (a timeout, a tool failure): the operator has not seen it
            shown, hidden = _truncated(_output_text(result))
            for line in shown if not hidden else shown[:PANEL_HEAD_LINES]:
                self.console.print(Text.assemble(("│ ", "dim"), (line, colour)))
        self.console.print(Text.assemble(("╰─ ", "dim"), (status, colour)))

    def _write(self, text: str, style: str | None = None) -> None:
        if not text:
            return
        self._unspin()
        self.console.print(Text(visible(text), style=style or ""), end="", soft_wrap=True)
        self._at_line_start = text.endswith(("\n", "\r"))

    def _end_line(self) -> None:
        self._unspin()
        if not self._at_line_start:
            self.console.print()
            self._at_line_start = True

    def _spin(self, message: str) -> None:
        if not self.console.is_interactive or not self._at_line_start:
            return
        label = Text(visible(message) + "…", style="dim")
        if self._status is None:
            self._status = self.console.status(label, spinner="dots")
            self._status.start()
        else:
            self._status.update(label)

    def _unspin(self) -> None:
        if self._status is not None:
            status, self._status = self._status, None
            with contextlib.suppress(Exception):
                status.stop()


def _subject(tool: _Tool) -> str:
    """What a tool call is about: the command, the pattern, the file."""
    inp = tool.input
    if isinstance(inp.get("command"), str):
        return str(inp["command"])
    if isinstance(inp.get("pattern"), str):
        where = inp.get("path")
        return str(inp["pattern"]) + (f" in {where}" if isinstance(where, str) else "")
    for key in ("file_path", "path"):
        if isinstance(inp.get(key), str):
            return str(inp[key])
    if inp.get("restart"):
        return "restart"
    return json.dumps(inp, sort_keys=True, default=str) if inp else ""


def _one_line(text: str, width: int) -> str:
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    if len(lines) > 1 or len(first) > width:
        return first[: width - 1] + "…"
    return first


def _clip_lines(lines: list[str]) -> list[str]:
    return [line if len(line) <= PANEL_LINE_CHARS else line[: PANEL_LINE_CHARS - 1] + "…" for line in lines]


def _truncated(text: str) -> tuple[list[str], int]:
    """Head and tail lines of ``text`` and how many were left out between them."""
    lines = visible(text).rstrip("\n").splitlines()
    if len(lines) <= PANEL_HEAD_LINES + PANEL_TAIL_LINES:
        return _clip_lines(lines), 0
    hidden = len(lines) - PANEL_HEAD_LINES - PANEL_TAIL_LINES
    return _clip_lines(lines[:PANEL_HEAD_LINES] + lines[-PANEL_TAIL_LINES:]), hidden


def tool_panel(name: str, tool_input: dict[str, Any], result: dict[str, Any] | None) -> Panel:
    """A compact panel for one tool call: what it ran or touched, its output, its status."""
    tool = _Tool(name, tool_input)
    subject = visible(_subject(tool))
    header_lines = subject.splitlines() or [""]
    header = Text("$ " if name == "bash" and "command" in tool_input else "", style="bold")
    header.append("\n".join(header_lines[:HEADER_LINES]), style="bold")
    if len(header_lines) > HEADER_LINES:
        header.append(f"\n… {len(header_lines) - HEADER_LINES} more lines", style="dim")
    parts: list[Text] = [header]
    status, colour = _status(result)
    if result is not None:
        shown, hidden = _truncated(_output_text(result))
        if shown:
            body = Text(style="dim")
            head = shown[:PANEL_HEAD_LINES] if hidden else shown
            body.append("\n".join(head))
            if hidden:
                body.append(f"\n… {hidden} more lines …\n", style="italic")
                body.append("\n".join(shown[PANEL_HEAD_LINES:]))
            parts.append(body)
    return Panel(
        Group(*parts),
        title=Text(visible(name), style="bold"),
        title_align="left",
        subtitle=Text(status, style=colour),
        subtitle_align="right",
        border_style=colour,
        padding=(0, 1),
    )


def _output_text(result: dict[str, Any]) -> str:
    text = result.get("output")
    return text if isinstance(text, str) else "" if text is None else json.dumps(text, default=str)


def _status(result: dict[str, Any] | None, *, live: bool = False) -> tuple[str, str]:
    """A tool call's status and its colour. A live call's output was seen whole, so its
    result's truncation is not news."""
    if result is None:
        return "no result (cancelled)", "yellow"
    failed = bool(result.get("is_error"))
    code = result.get("exit_code")
    if isinstance(code, int) and not isinstance(code, bool):
        status = f"exit {code}"
        failed = failed or code != 0
    else:
        status = "error" if failed else "ok"
    if result.get("truncated") and not live:
        status += " · output truncated"
    return status, "red" if failed else "green"


def finish_run(outcome: Outcome, *, json_mode: bool) -> int:
    """What ``sandbox run`` says after its events, and its exit code: in JSON mode the error the
    rich renderer would have shown, else how to continue the conversation (on stderr)."""
    if outcome.exit_code != output.EXIT_OK and outcome.error and json_mode:
        output.error(outcome.error)
    said = outcome.done.get("conversation_id") if outcome.done else None
    if isinstance(said, str) and not json_mode:
        output.console(stderr=True).print(
            f"conversation {output.visible(said)}: continue it with `sandbox run --conversation {said} ...` "
            "or `--continue`", style="dim", markup=False, highlight=False)  # fmt: skip
    return outcome.exit_code


async def drive(pool: Pool, user_id: str, request: Request, renderer: Renderer) -> Outcome:
    """Stream ``request`` for ``user_id`` into ``renderer``; errors propagate after it closes.

    ``pool`` is an in-process orchestrator or the service (where ``user_id`` is the service's call).
    """
    stream = pool.execute_stream(user_id, request)
    try:
        async with contextlib.aclosing(stream):
            async for event in stream:
                renderer.handle(event)
    finally:
        renderer.close()
    return renderer.outcome


def render_events(events: Iterable[Event], renderer: Renderer) -> Outcome:
    """Feed already collected events to ``renderer`` (tests, replays)."""
    try:
        for event in events:
            renderer.handle(event)
    finally:
        renderer.close()
    return renderer.outcome
