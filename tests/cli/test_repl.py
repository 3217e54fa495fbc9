"""``sandbox repl`` in a pseudo-terminal (pexpect), and with piped input through typer's runner."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from rich.console import Console

from sandbox_core.shared import WORKER_ENTRY
from tests.cli.conftest import (
    SANDBOX,
    Invoke,
    assert_plain,
    cmdline,
    find_process,
    needs_agent,
    poll,
    process_tree,
    worker_sessions,
)
from tests.helpers import live_session_members, pid_alive

CPR_REQUEST = re.escape("\x1b[6n")
PROMPT = "› "
EXPECT_TIMEOUT = 20


class Terminal:
    """A REPL on a pty: answers prompt-toolkit's cursor position requests while waiting."""

    def __init__(self, child: pexpect.spawn) -> None:
        self.child = child

    def expect(self, pattern: str, timeout: float = EXPECT_TIMEOUT) -> str:
        while True:
            index = self.child.expect([pattern, CPR_REQUEST], timeout=timeout)
            if index == 0:
                return str(self.child.after)
            self.child.send("\x1b[1;1R")

    def prompt(self) -> None:
        self.expect(re.escape(PROMPT.strip()))

    def line(self, text: str) -> None:
        self.child.send(text + "\r")

    @property
    def pid(self) -> int:
        return int(self.child.pid)


@pytest.fixture
def terminal(cli_env: dict[str, str], tmp_path: Path, reap_sessions: list[int]) -> Iterator[Terminal]:
    env = {**cli_env, "TERM": "xterm", "NO_COLOR": "1", "LINES": "40", "COLUMNS": "110"}
    child = pexpect.spawn(SANDBOX, ["repl", "--user", "alice"], env=env, encoding="utf-8",
                          dimensions=(40, 110), timeout=EXPECT_TIMEOUT)
    log = (tmp_path / "pty.log").open("w")
    child.logfile_read = log
    term = Terminal(child)
    try:
        term.prompt()
        yield term
    finally:
        reap_sessions.extend(worker_sessions(child.pid))
        if child.isalive():
            child.terminate(force=True)
        child.close()
        log.close()


def test_exec_stats_and_toolbar(terminal: Terminal, profile: str) -> None:
    terminal.expect(rf"user alice │ provider offline │ model \S+ │ profile {profile} │ workers 0 busy / 0 idle")
    terminal.line("/exec echo hi-$((6*7))")
    terminal.expect("hi-42")
    terminal.expect(f"✓ exit 0 · .* · worker w1-\\S+ · profile {profile}")
    terminal.prompt()
    terminal.line("/stats")
    terminal.expect("spawn latency")
    terminal.expect(r"│ alice\s+│\s+1 │")
    terminal.prompt()
    terminal.line("/workers")
    terminal.expect(r"w1-\S+\s+│ idle\s+│ alice")
    terminal.prompt()
    terminal.line("/nope")
    terminal.expect(r"error: unknown command /nope \(/help lists them\)")
    terminal.prompt()


@needs_agent
def test_prompt_streams_the_agent_and_the_conversation_continues(terminal: Terminal) -> None:
    terminal.line("run: echo hello-agent")
    terminal.expect(r"\$ echo hello-agent")
    terminal.expect("hello-agent")
    terminal.expect(r"✓ end_turn · \d+ turns")
    terminal.prompt()
    terminal.line("run: echo second")
    terminal.expect(r"✓ end_turn")
    terminal.prompt()
    terminal.line("/workers")
    terminal.expect(r"│ alice\s+│\s+\d+\s+│\s+2 │")  # the same worker served both prompts
    terminal.prompt()


@needs_agent
def test_tool_output_shows_while_the_command_runs(terminal: Terminal, cli_env: dict[str, str]) -> None:
    terminal.line("run: echo first-$((6*7)); while [ ! -e go ]; do sleep 0.05; done; echo second-$((6*8))")
    terminal.expect(r"│ first-42")  # the typed line shows $((6*7)), the output 42
    (Path(cli_env["SANDBOX_WORKSPACE_ROOT"]) / "alice" / "go").touch()
    terminal.expect(r"│ second-48")
    terminal.expect(r"╰─ ok")
    terminal.expect(r"✓ end_turn")
    terminal.prompt()


def test_ctrl_c_cancels_a_running_command_and_the_repl_goes_on(terminal: Terminal) -> None:
    terminal.line("/exec sleep 3011")
    sleeper = poll(lambda: find_process(["sleep", "3011"], terminal.pid), 15, "sleep to start")
    terminal.child.sendintr()
    terminal.expect(r"\^C cancelled")
    terminal.prompt()
    poll(lambda: not pid_alive(sleeper), 10, "the cancelled command to die")
    terminal.line("/exec echo still-here")
    terminal.expect("still-here")
    terminal.expect("exit 0")
    terminal.prompt()
    terminal.line("/stats")
    terminal.expect(r"cancelled\s+│\s+1")


def _completed(typed: str, rest: str) -> str:
    """What the screen shows once ``typed`` is completed with ``rest``: drawn in one go, or (a
    loaded machine, where the typed part is drawn before the Tab is read) the typed part, the
    terminal's control sequences, then the rest."""
    return re.escape(typed) + r"(?:\x1b\[[0-9;?]*[A-Za-z])*" + re.escape(rest)


def test_ctrl_c_at_the_prompt_multiline_completion_and_history(terminal: Terminal, cli_env: dict[str, str]) -> None:
    terminal.child.send("some half-typed line")
    terminal.expect("half-typed line")
    terminal.child.sendcontrol("c")  # clears the line; the REPL stays
    terminal.child.sendcontrol("c")  # on an empty line: a hint
    terminal.expect(r"\(Ctrl-D or /quit exits\)")
    terminal.prompt()
    terminal.child.send("/wor\t")
    terminal.expect(_completed("/wor", "kers"))
    terminal.child.send(" la\t")
    terminal.expect(_completed("la", "unch"))
    terminal.child.sendcontrol("u")  # back to an empty line
    terminal.child.send("/exec echo one\x1b\recho two")  # Esc Enter: a new line in the same input
    terminal.line("")
    terminal.expect(r"one\s+two")
    terminal.expect("exit 0")
    terminal.prompt()
    terminal.line("/quit")
    terminal.child.expect(pexpect.EOF)
    history = Path(cli_env["XDG_STATE_HOME"]) / "sandbox" / "history"
    assert "+/exec echo one\n+echo two\n" in history.read_text()
    assert "half-typed" not in history.read_text()
    assert history.stat().st_mode & 0o777 == 0o600


def test_ctrl_d_shuts_the_pool_down_leaving_no_worker(terminal: Terminal, profile: str) -> None:
    terminal.line("/exec true")
    terminal.expect("exit 0")
    terminal.prompt()
    terminal.line("/user bob")
    terminal.expect("now user bob")
    terminal.prompt()
    terminal.line("/exec echo as-bob")
    terminal.expect("as-bob")
    terminal.prompt()
    if profile == "process":
        terminal.line("/workers launch 1")
        terminal.expect(r"launched 1 worker")
        terminal.prompt()
    sessions = poll(lambda: (s := worker_sessions(terminal.pid)) and len(s) >= 2 and s, 10, "two workers")
    members = [pid for sid in sessions for pid in process_tree(sid)]
    assert any(WORKER_ENTRY in " ".join(cmdline(pid)) for pid in members)
    terminal.child.sendcontrol("d")
    terminal.expect(r"stopping \d worker")
    terminal.child.expect(pexpect.EOF)
    terminal.child.close()
    assert terminal.child.exitstatus == 0
    poll(lambda: not any(pid_alive(pid) for pid in members), 10, "worker processes to be gone")
    assert not [sid for sid in sessions if live_session_members(sid)]


def test_piped_repl_in_process(invoke: Invoke, monkeypatch: pytest.MonkeyPatch, cli_env: dict[str, str]) -> None:
    from cli.commands import audit_env

    async def fake_audit(config: object, user_id: str, as_json: bool = False, *, verbose: bool = False,
                         console: Console | None = None) -> int:
        assert console is not None and not as_json
        console.print(f"fake audit of {user_id}")
        return 1

    monkeypatch.setattr(audit_env, "run_audit_async", fake_audit)
    lines = "\n".join(["/exec echo piped-$((1+1))", "/stats", "/user bob", "/exec echo bob-was-here > note.txt",
                       "/workers", "/workers stop --user alice", "/model claude-other", "/provider", "/bogus", "/exec",
                       "/audit", "/help", ""])
    result = invoke("repl", "--user", "alice", input=lines)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "piped-2" in out and "spawn latency" in out and "now user bob" in out
    assert (Path(cli_env["SANDBOX_WORKSPACE_ROOT"]) / "bob" / "note.txt").read_text() == "bob-was-here\n"
    assert "stopped 1 worker(s)" in out and "model claude-other" in out and "provider auto (→ offline)" in out
    assert "unknown command /bogus" in out and "usage: /exec CMD" in out
    assert "fake audit of bob" in out and "audit finished with exit code 1" in out
    assert "Esc Enter / Alt+Enter" in out
    assert_plain(out)


def test_shell_drops_into_the_sandbox_and_returns_to_the_repl(terminal: Terminal) -> None:
    terminal.line("/shell")
    terminal.expect(r"[$#] ")
    terminal.child.send("PS1='IN''SIDE> '\r")
    terminal.expect("INSIDE> ")
    terminal.line("tty; echo inside-$((6*7))")
    terminal.expect(r"/dev/pts/\d+")
    terminal.expect("inside-42")
    terminal.expect("INSIDE> ")
    terminal.line("exit 4")
    terminal.expect(r"back in the REPL \(shell exit 4\)")
    terminal.prompt()
    terminal.line("/exec echo repl-again")
    terminal.expect("repl-again")
    terminal.prompt()
