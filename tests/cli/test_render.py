"""The event renderer on synthetic event streams (in memory, no workers)."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from cli.output import visible
from cli.render import (
    LIVE_LINES,
    PANEL_TAIL_LINES,
    JsonRenderer,
    RichRenderer,
    render_events,
    tool_panel,
)
from sandbox_core.events import Event, EventType


def ev(kind: EventType, seq: int = 0, **data: object) -> Event:
    return Event(kind, dict(data), seq)


def rich(events: list[Event]) -> tuple[str, str, int]:
    out, err = io.StringIO(), io.StringIO()
    renderer = RichRenderer(Console(file=out, width=120), err=Console(file=err, width=120))
    outcome = render_events(events, renderer)
    return out.getvalue(), err.getvalue(), outcome.exit_code


AGENT_RUN = [
    ev("started", 0, worker_id="w1-ab", user_id="alice", method="agent.run", profile="process"),
    ev("text", 1, text="Let me "),
    ev("text", 2, text="look."),
    ev("tool_use", 3, id="t1", name="bash", input={"command": "seq 1 40"}),
    ev("usage", 4, input_tokens=100, output_tokens=10),
    ev("tool_result", 5, id="t1", output="\n".join(str(i) for i in range(1, 41)), is_error=False,
       truncated=False, exit_code=0),
    ev("text", 6, text="Forty lines.\n"),
    ev("usage", 7, input_tokens=150, output_tokens=5),
    ev("done", 8, stop_reason="end_turn", turns=2, duration_s=1.5, worker_id="w1-ab", profile="process"),
]


def test_agent_run_streams_text_panel_and_summary() -> None:
    out, err, code = rich(AGENT_RUN)
    assert code == 0 and err == ""
    assert out.startswith("Let me look.\n")  # deltas joined on one line, ended before the panel
    assert "$ seq 1 40" in out and "exit 0" in out
    assert "… 28 more lines …" in out and "│ 40" in out and "│ 9 " not in out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("✓ end_turn · 2 turns · 265 tokens (250 in, 15 out) · 1.50 s")
    assert summary.endswith("worker w1-ab · profile process")


def test_usage_in_done_wins_over_summed_events() -> None:
    events = [*AGENT_RUN[:-1], ev("done", 8, stop_reason="end_turn", turns=2,
                                  usage={"input_tokens": 7, "output_tokens": 3})]
    out, _, _ = rich(events)
    assert "10 tokens (7 in, 3 out)" in out


def test_error_event_fails_the_run_with_one_line_on_stderr() -> None:
    events = [AGENT_RUN[0], ev("text", 1, text="partial"), ev("error", 2, code=-32008, message="gateway refused"),
              ev("done", 3, stop_reason="error", turns=1)]
    out, err, code = rich(events)
    assert code == 1
    assert err.strip() == "error: gateway refused"
    assert out.startswith("partial\n") and "✗" in out


def test_tool_error_and_missing_result() -> None:
    events = [AGENT_RUN[0], ev("tool_use", 1, id="a", name="read", input={"file_path": "notes.txt"}),
              ev("tool_result", 2, id="a", output="no such file", is_error=True),
              ev("tool_use", 3, id="b", name="grep", input={"pattern": "TODO", "path": "src"})]
    out, _, _ = rich(events)  # no done: the stream was cancelled
    assert "notes.txt" in out and "no such file" in out and "error" in out
    assert "TODO in src" in out and "no result (cancelled)" in out


def test_exec_events_pass_the_exit_code() -> None:
    events = [ev("started", 0, worker_id="w2", method="exec", profile="strict"),
              ev("stdout", 1, data="out\n"), ev("stderr", 2, data="err\n"),
              ev("done", 3, exit_code=3, duration_s=0.01, worker_id="w2", profile="strict")]
    out, _, code = rich(events)
    assert code == 3
    assert out.splitlines()[:2] == ["out", "err"]
    assert "✗ exit 3 · 0.01 s · worker w2 · profile strict" in out


def test_output_from_the_sandbox_cannot_drive_the_terminal() -> None:
    hostile = "a\x1b]52;c;c2VjcmV0\x07b\x1b[2J\rc"
    events = [ev("started", 0, method="agent.run"), ev("text", 1, text=hostile),
              ev("tool_use", 2, id="t", name="bash", input={"command": "printf '\\x1b[31m'"}),
              ev("tool_result", 3, id="t", output=hostile, is_error=False), ev("done", 4, turns=1)]
    out, _, _ = rich(events)
    assert "\x1b" not in out and "\x07" not in out
    assert "a^[]52;c;c2VjcmV0^Gb^[[2J" in out
    assert visible("x\r\ny\rz\x7f\x9b") == "x\ny\nz^?\\x9b"


def test_done_warnings_go_to_stderr() -> None:
    events = [ev("started", 0, method="agent.run"), ev("done", 1, turns=1, warnings=["model is deprecated"])]
    _, err, code = rich(events)
    assert code == 0 and "warning: model is deprecated" in err


def test_json_renderer_prints_one_event_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    outcome = render_events(AGENT_RUN, JsonRenderer())
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["type"] for line in lines] == [e.type for e in AGENT_RUN]
    assert json.loads(lines[-1])["data"]["turns"] == 2 and outcome.exit_code == 0


def test_panel_for_unknown_tool_shows_its_input() -> None:
    console = Console(file=io.StringIO(), width=60)
    console.print(tool_panel("fetch", {"url": "http://x"}, {"output": "", "is_error": False}))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "fetch" in text and '{"url": "http://x"}' in text and "ok" in text


LIVE_RUN = [
    ev("started", 0, worker_id="w1-ab", user_id="alice", method="agent.run", profile="process"),
    ev("tool_use", 1, id="t1", name="bash", input={"command": "echo first; wait-for-go; echo second"}),
    ev("stdout", 2, tool_use_id="t1", data="first\n"),
    ev("stdout", 3, tool_use_id="t1", data="sec"),
    ev("stdout", 4, tool_use_id="t1", b64="b25kCgHz"),  # "ond\n", ^A, then a byte that is not UTF-8
    ev("tool_result", 5, id="t1", output="first\nsecond\n\x01\ufffd", is_error=False, truncated=False),
    ev("done", 6, stop_reason="end_turn", turns=2),
]


def test_tool_output_is_shown_as_it_arrives_and_not_again_at_the_end() -> None:
    out = io.StringIO()
    renderer = RichRenderer(Console(file=out, width=120), err=Console(file=io.StringIO()))
    for event in LIVE_RUN[:3]:
        renderer.handle(event)
    assert out.getvalue().splitlines() == ["╭─ bash · $ echo first; wait-for-go; echo second", "│ first"]
    renderer.handle(LIVE_RUN[3])
    assert "│ sec" not in out.getvalue()  # a line is shown once it is complete
    for event in LIVE_RUN[4:]:
        renderer.handle(event)
    renderer.close()
    lines = out.getvalue().splitlines()
    header = "╭─ bash · $ echo first; wait-for-go; echo second"
    assert lines[:5] == [header, "│ first", "│ second", "│ ^A\\xf3", "╰─ ok"]
    assert out.getvalue().count("first") == 2 and "╭─ bash ─" not in out.getvalue()  # header + the line: no panel


def test_long_live_output_is_cut_and_errors_and_cancels_close_the_call() -> None:
    lines = "".join(f"line {i}\n" for i in range(1, 201))
    events = [
        ev("started", 0, method="agent.run"),
        ev("tool_use", 1, id="a", name="bash", input={"command": "seq"}),
        ev("stdout", 2, tool_use_id="a", data=lines),
        ev("tool_result", 3, id="a", output=lines[:4096] + "\n[exit code 2]", is_error=True, truncated=True,
           exit_code=2),
        ev("tool_use", 4, id="b", name="bash", input={"command": "sleep"}),
        ev("stdout", 5, tool_use_id="b", data="waiting\x1b[2J"),
        ev("tool_result", 6, id="b", output="bash: command timed out after 1s; the shell was restarted",
           is_error=True, truncated=False),
        ev("tool_use", 7, id="c", name="bash", input={"command": "hang"}),
        ev("stdout", 8, tool_use_id="c", data="still here\n"),
    ]
    out, _, _ = rich(events)  # no done: cancelled while "hang" ran
    assert "\x1b" not in out
    assert f"│ line {LIVE_LINES}\n│ … {200 - LIVE_LINES - PANEL_TAIL_LINES} more lines …\n│ line 197\n" in out
    assert f"│ line {LIVE_LINES + 1}\n" not in out and "│ line 200\n╰─ exit 2\n" in out  # the flag is not news
    assert "│ waiting^[[2J\n│ bash: command timed out after 1s; the shell was restarted\n╰─ error\n" in out
    assert out.endswith("│ still here\n╰─ no result (cancelled)\n")
