"""Expected failures print one red line and a hint (a traceback only with -v); colour rules."""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
import typer

from cli.runtime import exit_code_for, hint_for, run_job
from sandbox_core import errors
from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.orchestrator import SandboxOrchestrator
from tests.cli.conftest import SANDBOX, Run, assert_plain

COLOUR = re.compile(r"\x1b\[[0-9;]*(3[0-7]|9[0-7]|38;[25];[0-9;]+)m")


@pytest.mark.parametrize(
    ("error", "code", "hint"),
    [
        (errors.RequestTimeout("exec timed out after 1s and was killed"), 124, "--timeout"),
        (errors.IsolationUnavailable("bwrap not found", data={"reason": "no_bwrap", "value": "bwrap"}), 125,
         "install bubblewrap"),
        (errors.IsolationUnavailable("strict.rw_binds: /srv/dta does not exist",
                                     data={"field": "strict.rw_binds", "value": "/srv/dta"}), 125,
         "fix '/srv/dta' in strict.rw_binds"),
        (errors.CircuitOpen("workers failed to start 3 times in a row"), 125, "circuit_reset"),
        (errors.WorkerCrashed("worker w1 exited (killed by signal 9)"), 125, "-v"),
        (errors.PoolExhausted("no worker free for 'a' within 10s"), 1, "max_workers"),
        (errors.PoolExhausted("no worker free for 'a' within 10s",
                              data={"setting": "max_workers_per_user", "limit": 2}), 1,
         "raise max_workers_per_user (now 2)"),
        (errors.ConfigError("max_workers", "must be > 0"), 2, "config"),
        (errors.GatewayError("the anthropic provider needs an API key", data={"reason": "no_api_key"}), 1,
         "ANTHROPIC_API_KEY"),
    ],
)
def test_each_error_becomes_one_line_a_hint_and_its_code(
    error: errors.SandboxError, code: int, hint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_code_for(error) == code
    assert hint in (hint_for(error) or "")

    async def job(pool: SandboxOrchestrator) -> None:
        raise error

    config = ProcessSandboxConfig(profile="process", workspace_root=tmp_path, min_idle=0, allow_root_process=True)
    with pytest.raises(typer.Exit) as exit_info:
        run_job(config, job)
    assert exit_info.value.exit_code == code
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"error: {error}" and err[1].startswith("hint: ") and len(err) == 2

    with pytest.raises(typer.Exit):
        run_job(config, job, verbose=True)
    assert "Traceback" in capsys.readouterr().err


def test_a_missing_bind_path_is_named_and_no_weaker_profile_suggested(run_cli: Run) -> None:
    env = {"SANDBOX_STRICT__RO_BINDS": "/srv/nonexistent-h14"}
    result = run_cli("--profile", "strict", "exec", "--", "true", env=env)
    assert result.returncode == 125, result.stderr
    error, hint = result.stderr.strip().splitlines()
    assert error == "error: strict.ro_binds: /srv/nonexistent-h14 does not exist"
    assert hint == "hint: fix '/srv/nonexistent-h14' in strict.ro_binds (config file, SANDBOX_* variables or flags)"


def test_isolation_unavailable_fails_closed_with_a_hint(run_cli: Run) -> None:
    env = {"SANDBOX_STRICT__BWRAP": "/nonexistent/bwrap"}
    result = run_cli("--profile", "strict", "exec", "--", "true", env=env)
    assert result.returncode == 125, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: ") and len(lines) == 2
    assert "Traceback" not in result.stderr
    verbose = run_cli("-v", "--profile", "strict", "exec", "--", "true", env=env)
    assert verbose.returncode == 125 and "Traceback" in verbose.stderr


def _tty_output(args: list[str], env: dict[str, str]) -> str:
    child = pexpect.spawn(SANDBOX, args, env=env, encoding="utf-8", dimensions=(40, 140), timeout=30)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    return str(child.before)


def test_colour_only_on_a_terminal_without_no_color(cli_env: dict[str, str], run_cli: Run) -> None:
    env = {**cli_env, "TERM": "xterm-256color", "SANDBOX_MAX_WORKERS": "3"}
    args = ["config", "show"]
    assert COLOUR.search(_tty_output(args, env))
    no_color = _tty_output(args, {**env, "NO_COLOR": "1"})
    assert not COLOUR.search(no_color) and "max_workers" in no_color
    piped = run_cli(*args, env={"SANDBOX_MAX_WORKERS": "3"})
    assert_plain(piped.stdout + piped.stderr)


# ---------------------------------------------------------------- what reaches a terminal

HOSTILE = r"\033]0;pwned\007\033[6n\033P$qm\033\\\033[31m hi\033[0m\n"
"""printf(1) format: a title, a cursor-position query, DECRQSS, then " hi" in red."""
HOSTILE_BYTES = b"\x1b]0;pwned\x07\x1b[6n\x1bP$qm\x1b\\\x1b[31m hi\x1b[0m\n"


def _tty_bytes(args: list[str], env: dict[str, str]) -> bytes:
    """Everything the CLI wrote to its terminal (a real pty), once it has exited 0."""
    child = pexpect.spawn(SANDBOX, args, env=env, dimensions=(40, 140), timeout=30)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    return bytes(child.before)


def test_exec_to_a_terminal_drops_strings_and_queries_unless_raw(cli_env: dict[str, str], run_cli: Run) -> None:
    env = {**cli_env, "TERM": "xterm-256color"}
    shown = _tty_bytes(["exec", "--", "printf", HOSTILE], env)
    assert b"\x1b[31m hi\x1b[0m\r\n" in shown  # colours stay (the pty turns \n into \r\n)
    assert b"pwned" not in shown and b"\x1b]" not in shown and b"\x1b[6n" not in shown and b"\x1bP" not in shown

    raw = _tty_bytes(["exec", "--raw", "--", "printf", HOSTILE], env)
    assert b"\x1b]0;pwned\x07\x1b[6n\x1bP$qm\x1b\\\x1b[31m hi" in raw

    piped = subprocess.run([SANDBOX, "exec", "--", "printf", HOSTILE], capture_output=True, env=cli_env,
                           timeout=60, check=False)
    assert (piped.returncode, piped.stdout) == (0, HOSTILE_BYTES)  # a pipe gets the bytes unchanged


class _HostileService(http.server.BaseHTTPRequestHandler):
    """A service on loopback whose runs fail with escape sequences in the message and worker stderr."""

    def do_GET(self) -> None:
        self._send("application/json", json.dumps({"status": "ok", "profile": "strict"}).encode())

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        error = {"code": -32603, "message": "boom \x1b]0;pwned\x07\x1b[2J",
                 "data": {"stderr": ["worker says \x1b[6n\x1bP$q"]}}
        self._send("text/event-stream", f"event: error\ndata: {json.dumps(error)}\n\n".encode())

    def _send(self, kind: str, body: bytes) -> None:
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hostile_service() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HostileService)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_error_lines_from_upstream_reach_stderr_escaped(run_cli: Run, hostile_service: str) -> None:
    result = run_cli("--connect", hostile_service, "exec", "--", "true", env={"SANDBOX_TOKEN": "t" * 16})
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == "error: boom ^[]0;pwned^G^[[2J"
    verbose = run_cli("-v", "--connect", hostile_service, "exec", "--", "true", env={"SANDBOX_TOKEN": "t" * 16})
    assert "worker says ^[[6n^[P$q" in verbose.stderr and "Traceback" in verbose.stderr
    assert "\x1b" not in result.stderr + verbose.stderr
