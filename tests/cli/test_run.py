"""``sandbox run``: the offline provider end to end, rendering, NDJSON, stdin, errors."""

from __future__ import annotations

import json
import selectors
import subprocess
import time
from pathlib import Path
from typing import Any

import pexpect

from tests.cli.conftest import SANDBOX, Invoke, Run, assert_plain, find_process, needs_agent, poll
from tests.helpers import pid_alive


@needs_agent
def test_run_streams_text_tool_panel_and_summary(run_cli: Run, profile: str) -> None:
    result = run_cli("run", "run: echo hi-from-the-sandbox")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "╭─ bash" in out and "$ echo hi-from-the-sandbox" in out and "│ hi-from-the-sandbox" in out
    assert "╰─ ok" in out  # the output streamed under the call, then its status (no second copy in a panel)
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("✓ end_turn · 2 turns · ")
    assert "tokens" in summary and f"profile {profile}" in summary and "worker w" in summary
    assert_plain(out + result.stderr)


@needs_agent
def test_run_json_is_one_event_per_line_and_reads_stdin(run_cli: Run) -> None:
    result = run_cli("run", "--json", "-", input="run: echo json-run\n")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "done"
    assert {"text", "tool_use", "tool_result", "usage"} <= set(kinds)
    tool = next(e for e in events if e["type"] == "tool_use")
    assert tool["data"]["input"]["command"] == "echo json-run"
    assert "json-run" in next(e for e in events if e["type"] == "tool_result")["data"]["output"]


LIVE = "echo first; while [ ! -e go ]; do sleep 0.05; done; echo second"


class Lines:
    """The NDJSON lines of a running process's stdout, each read with a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.stdout = proc.stdout
        self.selector = selectors.DefaultSelector()
        self.selector.register(proc.stdout, selectors.EVENT_READ)
        self.buffer = b""

    def next(self, timeout: float = 30) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line within {timeout}s; got so far {self.buffer[-300:]!r}")
            if self.selector.select(left):
                chunk = self.stdout.read1(65536)  # type: ignore[attr-defined]
                if not chunk:
                    return None
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        event: dict[str, Any] = json.loads(line)
        return event


@needs_agent
def test_run_json_streams_tool_output_before_the_result(cli_env: dict[str, str]) -> None:
    events: list[dict[str, Any]] = []
    with subprocess.Popen([SANDBOX, "run", "--json", "--user", "alice", f"run: {LIVE}"], env=cli_env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL) as proc:
        lines = Lines(proc)
        try:
            while not any(e["type"] == "stdout" for e in events):
                event = lines.next()
                assert event is not None, f"the run ended without live output: {events}"
                events.append(event)
            use = next(e["data"] for e in events if e["type"] == "tool_use")
            assert events[-1]["data"] == {"tool_use_id": use["id"], "data": "first\n"}
            assert "tool_result" not in [e["type"] for e in events]
            (Path(cli_env["SANDBOX_WORKSPACE_ROOT"]) / "alice" / "go").touch()
            while (event := lines.next()) is not None:
                events.append(event)
            assert proc.wait(30) == 0
        finally:
            lines.selector.close()
            if proc.poll() is None:
                proc.kill()
    kinds = [e["type"] for e in events]
    outputs = [e["data"] for e in events if e["type"] == "stdout"]
    assert outputs == [{"tool_use_id": use["id"], "data": "first\n"}, {"tool_use_id": use["id"], "data": "second\n"}]
    last_output = max(i for i, kind in enumerate(kinds) if kind == "stdout")
    assert last_output < kinds.index("tool_result") and kinds[-1] == "done"


@needs_agent
def test_run_in_process(invoke: Invoke) -> None:
    result = invoke("run", "--max-turns", "4", "--model", "claude-test-model", "run: echo in-process")
    assert result.exit_code == 0, result.output
    assert "$ echo in-process" in result.stdout and "end_turn" in result.stdout


def test_run_anthropic_without_key_fails_with_the_fix(run_cli: Run) -> None:
    result = run_cli("run", "--provider", "anthropic", "hello")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "error: provider 'anthropic' needs an API key on the host" in lines
    assert any(line.startswith("hint: set ANTHROPIC_API_KEY") for line in lines)
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_run_usage_errors(run_cli: Run) -> None:
    empty = run_cli("run", "   ")
    assert empty.returncode == 2 and "the prompt is empty" in empty.stderr
    turns = run_cli("run", "--max-turns", "0", "x")
    assert turns.returncode == 2 and "--max-turns" in turns.stderr
    provider = run_cli("run", "--provider", "nope", "x")
    assert provider.returncode == 2 and "nope" in provider.stderr


def test_run_timeout_exits_124(run_cli: Run) -> None:
    result = run_cli("run", "--timeout", "0.001", "--json", "run: sleep 5")
    assert result.returncode == 124, result.stderr
    assert "timed out" in result.stderr and "Traceback" not in result.stderr
    last = json.loads(result.stdout.splitlines()[-1])
    assert last["type"] == "error" and last["data"]["exit_code"] == 124


@needs_agent
def test_ctrl_c_cancels_a_run_and_its_tool(cli_env: dict[str, str]) -> None:
    child = pexpect.spawn(SANDBOX, ["run", "run: sleep 3021"], env={**cli_env, "TERM": "xterm"},
                          encoding="utf-8", dimensions=(40, 100), timeout=20)
    try:
        child.expect(r"sleep 3021")
        sleeper = poll(lambda: find_process(["sleep", "3021"], child.pid), 15, "the tool's command to start")
        child.sendintr()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 130
        assert "no result (cancelled)" in child.before and "interrupted" in child.before
        poll(lambda: not pid_alive(sleeper), 10, "the cancelled command to die")
    finally:
        if child.isalive():
            child.terminate(force=True)


def test_an_unreachable_model_api_is_said_once_with_its_url(run_cli: Run) -> None:
    dead = "http://127.0.0.1:9"  # loopback, nothing listens: nothing leaves the machine
    result = run_cli("run", "--provider", "anthropic", "hello",
                     env={"ANTHROPIC_API_KEY": "sk-ant-test-0000000000000000", "ANTHROPIC_BASE_URL": dead})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unreachable" in errors[0], result.stderr
    assert f"model.base_url = {dead}" in result.stderr
    assert "ConnectError" not in result.stderr  # the cause is for -v, not every run
    assert "sk-ant-test" not in result.stderr + result.stdout
