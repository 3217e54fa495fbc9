"""The CLI as a client of a running ``sandbox serve`` (a real server process, Unix socket and TCP).

Two servers live for the whole module (starting one takes about a second): one on the
default socket of a private ``XDG_RUNTIME_DIR`` (so clients find it automatically, or
name it with ``--connect``), one on a loopback port with bearer tokens. Tests read the
servers' counters as deltas, since they share them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pexpect
import pytest

from cli.commands.stats import compute_rates
from cli.remote import socket_answers
from sandbox_core.service.paths import normalize_address
from tests.cli.conftest import (
    AGENT_AVAILABLE,
    SANDBOX,
    assert_plain,
    find_process,
    needs_agent,
    poll,
    worker_sessions,
)
from tests.cli.impostor import Impostor
from tests.cli.test_repl import EXPECT_TIMEOUT, Terminal
from tests.helpers import pid_alive


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    address: str
    workspace: Path
    log: Path
    tokens: dict[str, str]


def base_env(root: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("SANDBOX_", "ANTHROPIC_", "_SANDBOX_", "_TYPER_", "COMP_"))
        and k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES", "XDG_RUNTIME_DIR")
    }
    env.update(
        XDG_CONFIG_HOME=str(root / "config"),
        XDG_STATE_HOME=str(root / "state"),
        SANDBOX_STATE_DIR=str(root / "statedir"),
        SANDBOX_PROFILE="process",
        SANDBOX_ALLOW_ROOT_PROCESS="1",
        SANDBOX_MIN_IDLE="0",
        SANDBOX_SHUTDOWN_GRACE="2",
        SANDBOX_CANCEL_GRACE="1",
        COLUMNS="120",
    )
    return env


def start_server(root: Path, env: dict[str, str], *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = root / "serve.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([SANDBOX, "serve", *args], env=env, stdout=fh, stderr=fh)
    return proc, log


def stop_server(server: Server) -> None:
    from sandbox_core.process_tree import kill_session

    sessions = worker_sessions(server.proc.pid)
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    for sid in sessions:
        kill_session(sid)


@pytest.fixture(scope="module")
def runtime_dir() -> Iterator[Path]:
    """A short private runtime directory (a socket path must fit in 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="sbx-rt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def unix_server(tmp_path_factory: pytest.TempPathFactory, runtime_dir: Path) -> Iterator[Server]:
    """``sandbox serve`` on the default socket of ``runtime_dir``."""
    root = tmp_path_factory.mktemp("unix-service")
    env = {**base_env(root), "XDG_RUNTIME_DIR": str(runtime_dir), "SANDBOX_WORKSPACE_ROOT": str(root / "ws")}
    proc, log = start_server(root, env)
    sock = runtime_dir / "sandbox" / "sandbox.sock"
    server = Server(proc, f"unix:{sock}", root / "ws", log, {})
    try:
        poll(lambda: socket_answers(sock) or proc.poll() is not None, 20, "the service's socket")
        assert proc.poll() is None, log.read_text()
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def tcp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``sandbox serve --listen 127.0.0.1:0`` with a user token (alice) and an operator token (ops)."""
    root = tmp_path_factory.mktemp("tcp-service")
    tokens = {"alice": secrets.token_hex(16), "ops": secrets.token_hex(16)}
    tokens_file = root / "tokens.toml"
    tokens_file.write_text(
        f'[[token]]\ntoken = "{tokens["alice"]}"\nuser = "alice"\n\n'
        f'[[token]]\ntoken = "{tokens["ops"]}"\nuser = "ops"\nrole = "operator"\n'
    )
    tokens_file.chmod(0o600)
    env = {**base_env(root), "SANDBOX_WORKSPACE_ROOT": str(root / "ws"),
           "SANDBOX_SERVICE__TOKENS_FILE": str(tokens_file), "XDG_RUNTIME_DIR": str(root / "run")}
    proc, log = start_server(root, env, "--listen", "127.0.0.1:0")
    server = Server(proc, "", root / "ws", log, tokens)
    try:
        match = poll(lambda: re.search(r"serving \w+ pool on (http://\S+)", log.read_text())
                     or proc.poll() is not None, 20, "the service's port")
        assert proc.poll() is None, log.read_text()
        server.address = match.group(1)
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def client_env(tmp_path: Path, runtime_dir: Path) -> dict[str, str]:
    """A client's environment: the service's runtime dir (its default socket), its own workspace root."""
    return {**base_env(tmp_path), "XDG_RUNTIME_DIR": str(runtime_dir),
            "SANDBOX_WORKSPACE_ROOT": str(tmp_path / "local-ws")}


def sandbox(env: dict[str, str], *args: str, input: str | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SANDBOX, *args], env=env, input=input, capture_output=True, text=True,
                          timeout=timeout, check=False)


def service_stats(server: Server, env: dict[str, str]) -> dict[str, Any]:
    result = sandbox(env, "--connect", server.address, "stats", "--json")
    assert result.returncode == 0, result.stderr
    stats: dict[str, Any] = json.loads(result.stdout)
    return stats


def user_dir(server: Server) -> Path:
    """The service's workspace of this process's user (the login name of our uid)."""
    from cli.remote import unix_identity

    return server.workspace / unix_identity()


# ---------------------------------------------------------------- one-shot commands


def test_exec_over_the_socket_passes_output_stdin_and_exit_code(unix_server: Server, client_env: dict[str, str]
                                                                ) -> None:
    result = sandbox(client_env, "--connect", unix_server.address, "exec", "--", "echo", "hi")
    assert (result.returncode, result.stdout) == (0, "hi\n"), result.stderr
    assert "warning" not in result.stderr  # the local profile is not the one used: no 'process' warning

    result = sandbox(client_env, "--connect", unix_server.address, "--user", "bob", "exec", "--shell",
                     "cat; echo made-here > marker; echo oops >&2; exit 3", input="from stdin\n")
    assert result.returncode == 3
    assert result.stdout == "from stdin\n" and "oops" in result.stderr
    assert "--user bob is ignored in client mode" in result.stderr
    assert (user_dir(unix_server) / "marker").read_text() == "made-here\n"
    assert not (Path(client_env["SANDBOX_WORKSPACE_ROOT"]) / "bob").exists()

    result = sandbox(client_env, "--connect", unix_server.address, "exec", "--timeout", "0.3", "--", "sleep", "30")
    assert result.returncode == 124, result.stderr


@needs_agent
def test_run_streams_the_agent_from_the_service(unix_server: Server, client_env: dict[str, str]) -> None:
    sock = unix_server.address.removeprefix("unix:")
    result = sandbox(client_env, "--connect", sock, "run", "run: echo hi-from-agent")  # a bare socket path
    assert result.returncode == 0, result.stderr
    assert "hi-from-agent" in result.stdout and "✓ end_turn" in result.stdout
    assert_plain(result.stdout)

    result = sandbox(client_env, "--connect", unix_server.address, "--json", "run", "run: echo json-run")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0]["type"] == "started" and events[0]["data"]["run_id"].startswith("run_")
    assert events[-1]["type"] == "done"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert any(e["type"] == "tool_result" and "json-run" in e["data"]["output"] for e in events)


def test_stats_and_workers_against_the_service(unix_server: Server, client_env: dict[str, str]) -> None:
    before = service_stats(unix_server, client_env)
    assert sandbox(client_env, "--connect", unix_server.address, "exec", "--", "true").returncode == 0
    after = service_stats(unix_server, client_env)
    assert after["requests"]["ok"] == before["requests"]["ok"] + 1  # no self-check requests of its own
    assert "runs_in_flight" in after and after["profile"] == "process"

    result = sandbox(client_env, "--connect", unix_server.address, "workers", "list", "--json")
    assert result.returncode == 0, result.stderr
    assert "note:" not in result.stderr  # the note is for in-process pools
    rows = json.loads(result.stdout)
    assert any(row["user_id"] == user_dir(unix_server).name for row in rows)

    result = sandbox(client_env, "--connect", unix_server.address, "workers", "launch", "1", "--json")
    assert result.returncode == 0, result.stderr
    (launched,) = json.loads(result.stdout)
    result = sandbox(client_env, "--connect", unix_server.address, "workers", "stop", launched["worker_id"])
    assert result.returncode == 0 and "stopped 1 worker(s)" in result.stdout, result.stderr

    result = sandbox(client_env, "--connect", unix_server.address, "stats")
    assert result.returncode == 0 and "spawn latency" in result.stdout and "service runs" in result.stdout


def test_tcp_with_tokens(tcp_server: Server, client_env: dict[str, str], tmp_path: Path) -> None:
    ops = {**client_env, "SANDBOX_TOKEN": tcp_server.tokens["ops"], "SANDBOX_URL": tcp_server.address}
    result = sandbox(ops, "exec", "--", "sh", "-c", "echo over-tcp; pwd")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["over-tcp", str(tcp_server.workspace / "ops")]
    stats = json.loads(sandbox(ops, "stats", "--json").stdout)
    assert stats["users"]["ops"]["requests"] >= 1

    token_file = tmp_path / "token"
    token_file.write_text(tcp_server.tokens["alice"] + "\n")
    token_file.chmod(0o600)
    alice = {**client_env, "SANDBOX_TOKEN_FILE": str(token_file)}
    result = sandbox(alice, "--connect", tcp_server.address, "--user", "alice", "exec", "--", "echo", "as-alice")
    assert (result.returncode, result.stdout, result.stderr) == (0, "as-alice\n", "")
    result = sandbox(alice, "--connect", tcp_server.address, "stats")  # operator-only
    assert result.returncode == 1
    assert "operator role (403)" in result.stderr and "hint: pool stats and worker control" in result.stderr

    wrong = {**client_env, "SANDBOX_TOKEN": "not-" + tcp_server.tokens["alice"]}
    result = sandbox(wrong, "--connect", tcp_server.address, "exec", "--", "true")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: the service refused the credentials (401); set SANDBOX_TOKEN"
    assert [line for line in lines if line.startswith("error")] == lines[:1] and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_unreachable_connect_is_exit_125_with_a_hint(client_env: dict[str, str], tmp_path: Path) -> None:
    result = sandbox(client_env, "--connect", f"unix:{tmp_path}/nothing.sock", "exec", "--", "true")
    assert result.returncode == 125
    error, hint = result.stderr.strip().splitlines()
    assert error.startswith(f"error: cannot reach the service at unix:{tmp_path}/nothing.sock")
    assert hint.startswith("hint: is `sandbox serve` running there?") and "--local" in hint
    result = sandbox(client_env, "--connect", "ftp://example", "exec", "--", "true")
    assert result.returncode == 2 and "unsupported address" in result.stderr


def test_the_default_socket_is_used_automatically_and_local_overrides(
    unix_server: Server, client_env: dict[str, str], tmp_path: Path
) -> None:
    local_ws = Path(client_env["SANDBOX_WORKSPACE_ROOT"])
    result = sandbox(client_env, "-v", "exec", "--", "sh", "-c", "echo auto > where")
    assert result.returncode == 0, result.stderr
    assert f"using the service at {unix_server.address}" in result.stderr
    assert (user_dir(unix_server) / "where").read_text() == "auto\n"

    result = sandbox(client_env, "--local", "-v", "exec", "--", "sh", "-c", "echo local > where")
    assert result.returncode == 0, result.stderr
    assert "using the service" not in result.stderr
    assert (local_ws / user_dir(unix_server).name / "where").read_text() == "local\n"
    assert (user_dir(unix_server) / "where").read_text() == "auto\n"

    elsewhere = {**client_env, "XDG_RUNTIME_DIR": str(tmp_path / "empty-run")}
    result = sandbox(elsewhere, "-v", "exec", "--", "true")
    assert result.returncode == 0 and "using the service" not in result.stderr


# ---------------------------------------------------------------- the REPL


@pytest.fixture
def remote_terminal(unix_server: Server, client_env: dict[str, str], tmp_path: Path) -> Iterator[Terminal]:
    env = {**client_env, "TERM": "xterm", "NO_COLOR": "1", "LINES": "40", "COLUMNS": "110"}
    child = pexpect.spawn(SANDBOX, ["--connect", unix_server.address, "repl"], env=env, encoding="utf-8",
                          dimensions=(40, 110), timeout=EXPECT_TIMEOUT)
    log = (tmp_path / "pty.log").open("w")
    child.logfile_read = log
    term = Terminal(child)
    try:
        term.prompt()
        yield term
    finally:
        if child.isalive():
            child.terminate(force=True)
        child.close()
        log.close()


def test_repl_against_the_service(remote_terminal: Terminal, unix_server: Server, client_env: dict[str, str]) -> None:
    term = remote_terminal
    term.expect(r"service …\S*/sandbox\.sock │ profile process │ workers \d+ busy / \d+ idle")
    term.line("/exec echo hi-$((6*7))")
    term.expect("hi-42")
    term.expect(r"✓ exit 0 · .* · worker w\d+-\S+ · profile process")
    term.prompt()
    if AGENT_AVAILABLE:
        term.line("run: echo hello-agent")
        term.expect("hello-agent")
        term.expect(r"✓ end_turn · \d+ turns")
        term.prompt()

    term.line("/exec sleep 3011")
    sleeper = poll(lambda: find_process(["sleep", "3011"], unix_server.proc.pid), 15, "sleep to start on the service")
    term.child.sendintr()
    term.expect(r"\^C cancelled")
    term.prompt()
    poll(lambda: not pid_alive(sleeper), 10, "the cancelled command to die on the service")
    term.line("/exec echo still-here")
    term.expect("still-here")
    term.expect("exit 0")
    term.prompt()
    term.line("/stats")
    term.expect("spawn latency")
    term.prompt()
    term.line("/user bob")
    term.expect("the service decides the user")
    term.prompt()

    term.child.sendcontrol("d")
    term.expect(r"disconnecting \(the service keeps running\)")
    term.child.expect(pexpect.EOF)
    term.child.close()
    assert term.child.exitstatus == 0
    result = sandbox(client_env, "--connect", unix_server.address, "exec", "--", "echo", "alive")
    assert result.stdout == "alive\n"


# ---------------------------------------------------------------- stats --watch


def read_until(proc: subprocess.Popen[str], pattern: str, count: int, timeout: float) -> str:
    """Read ``proc``'s stdout until ``pattern`` has appeared ``count`` times (or fail at the deadline)."""
    assert proc.stdout is not None
    out = ""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while out.count(pattern) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {count}× {pattern!r}: {out[-2000:]!r}"
            if sel.select(left):
                chunk = os.read(proc.stdout.fileno(), 65536).decode()
                assert chunk, f"stdout closed early (exit {proc.wait()}): {out[-2000:]!r}"
                out += chunk
    return out


def test_stats_watch_piped_prints_snapshots_until_sigint(unix_server: Server, client_env: dict[str, str]) -> None:
    proc = subprocess.Popen([SANDBOX, "--connect", unix_server.address, "stats", "--watch", "--interval", "0.2"],
                            env=client_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out = read_until(proc, "sandbox stats · ", 2, 20)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    out += rest
    assert f"sandbox stats · {unix_server.address} · process profile" in out
    assert "per s" in out and "spawn p95" in out
    assert_plain(out)


def test_stats_watch_on_a_terminal_in_process(client_env: dict[str, str], tmp_path: Path) -> None:
    env = {**client_env, "TERM": "xterm", "NO_COLOR": "1", "SANDBOX_MIN_IDLE": "1"}
    child = pexpect.spawn(SANDBOX, ["--local", "stats", "--watch", "--interval", "0.2"], env=env,
                          encoding="utf-8", dimensions=(50, 120), timeout=EXPECT_TIMEOUT)
    child.logfile_read = (tmp_path / "pty.log").open("w")
    try:
        child.expect("sandbox stats · in-process process pool")
        child.expect(r"spawned\s+│\s+\d+ \(\d+\.\d\d/s\)")  # a rate: the second sample, redrawn in place
        child.sendintr()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        if child.isalive():
            child.terminate(force=True)
        child.logfile_read.close()


# ---------------------------------------------------------------- pieces


def test_addresses_and_rates() -> None:
    assert normalize_address("unix:/run/s.sock") == "unix:/run/s.sock"
    assert normalize_address("/run/s.sock") == "unix:/run/s.sock"
    assert normalize_address("127.0.0.1:8765") == "http://127.0.0.1:8765"
    assert normalize_address("https://example.org/") == "https://example.org"
    assert normalize_address("rel.sock") == f"unix:{Path.cwd() / 'rel.sock'}"
    assert normalize_address("[::1]:8765") == "http://[::1]:8765"
    assert normalize_address("sandbox-host.example:99") == "http://sandbox-host.example:99"
    for path in ("host:123456", "[]:80", "bad_host:80", ":80", "host:8o"):
        assert normalize_address(path) == f"unix:{Path.cwd() / path}", path  # not HOST:PORT: a socket path

    def sample(uptime: float, ok: int, user_requests: int, calls: int) -> dict[str, Any]:
        return {"uptime_s": uptime, "requests": {"ok": ok, "failed": 0, "timed_out": 0, "cancelled": 0},
                "spawned": 1, "crashes": 0, "users": {"a": {"requests": user_requests}},
                "gateway": {"a": {"calls": calls, "input_tokens": 10 * calls, "output_tokens": calls}}}

    assert compute_rates(None, sample(1, 0, 0, 0), 1) == {}
    rates = compute_rates(sample(10, 4, 4, 1), sample(12, 10, 8, 3), 99)  # the pool's clock, not ours
    assert rates["requests_per_s"] == rates["ok_per_s"] == 3.0
    assert rates["users"] == {"a": 2.0}
    assert rates["gateway_calls_per_s"] == 1.0 and rates["gateway_tokens_per_s"] == 11.0
    assert compute_rates(sample(12, 10, 8, 3), sample(1, 0, 0, 0), 1) == {}  # the pool restarted


def test_exec_through_the_service_is_binary_safe_and_streams_stdin(unix_server: Server, client_env: dict[str, str]
                                                                   ) -> None:
    """Bytes both ways through SSE; stdin streams in a follow-up POST, any size, with backpressure."""
    blob = bytes(range(256)) * 4096 + os.urandom(3 * 1024 * 1024)  # 4 MiB, over the inline size
    result = subprocess.run([SANDBOX, "--connect", unix_server.address, "exec", "--", "cat"], input=blob,
                            capture_output=True, timeout=120, env=client_env, check=False)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(blob).hexdigest()


def test_cp_through_the_service(unix_server: Server, client_env: dict[str, str], tmp_path: Path) -> None:
    from cli.remote import unix_identity
    from tests.integration.test_files import _digest, _tree

    me = unix_identity()
    project = tmp_path / "project"
    project.mkdir()
    _tree(project)
    sent = sandbox(client_env, "--connect", unix_server.address, "cp", str(project), f"{me}:shared-src")
    assert sent.returncode == 0, sent.stderr
    assert (user_dir(unix_server) / "shared-src" / "sub" / "run.sh").is_file()
    back = sandbox(client_env, "--connect", unix_server.address, "cp", f"{me}:shared-src", str(tmp_path / "back"))
    assert back.returncode == 0, back.stderr
    assert _digest(tmp_path / "back") == _digest(project)
    missing = sandbox(client_env, "--connect", unix_server.address, "cp", f"{me}:nothing", str(tmp_path / "x"))
    assert missing.returncode == 1 and "nothing: no such file or directory" in missing.stderr


# ---------------------------------------------------------------- trusting the socket

IMPOSTOR_UID = 64102
"""The uid of another local user, listening where the service is expected."""
VICTIM_UID = 64101
"""A non-root user without XDG_RUNTIME_DIR (whose default socket once fell back to /tmp)."""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A short directory below /tmp that, like /tmp, every uid may create in (sticky: 1777)."""
    path = Path(tempfile.mkdtemp(prefix="sbx-trust-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def refused(result: subprocess.CompletedProcess[str], why: str, fix: str) -> None:
    """The CLI refused the socket: exit 125, one error line saying why, one hint saying how to fix it."""
    assert result.returncode == 125, (result.stdout, result.stderr)
    error, hint = result.stderr.strip().splitlines()[-2:]
    assert error.startswith("error: refusing the service socket") and why in error, error
    assert error.endswith("nothing was sent") and hint.startswith("hint: ") and fix in hint, hint
    assert "forged" not in result.stdout


def test_an_impostor_owning_the_default_socket_gets_nothing(
    client_env: dict[str, str], shared_dir: Path
) -> None:
    run_dir = shared_dir  # a runtime dir like /tmp, where the impostor made sandbox/ first
    with Impostor(run_dir / "sandbox" / "sandbox.sock", IMPOSTOR_UID) as impostor:
        env = {**client_env, "XDG_RUNTIME_DIR": str(run_dir)}
        result = sandbox(env, "exec", "--", "echo", "secret-argv", input="secret-stdin")
        refused(result, f"{run_dir}/sandbox is owned by uid {IMPOSTOR_UID}", "service.server_uids")
        record = impostor.record()
    assert (record.connections, record.received) == (0, 0), record


def test_an_impostor_whose_socket_looks_right_is_caught_by_its_peer_uid(
    client_env: dict[str, str], shared_dir: Path
) -> None:
    """Socket and directories owned by root, but the process listening is another user's."""
    with Impostor(shared_dir / "imp" / "s.sock", IMPOSTOR_UID) as impostor:
        home = shared_dir / "run" / "sandbox"
        home.mkdir(parents=True, mode=0o700)
        impostor.move_to(home / "sandbox.sock", owner=0)
        env = {**client_env, "XDG_RUNTIME_DIR": str(shared_dir / "run")}
        result = sandbox(env, "exec", "--", "echo", "secret-argv")
        refused(result, f"the process listening on it runs as uid {IMPOSTOR_UID}", "service.server_uids")
        result = sandbox(client_env, "--connect", str(home / "sandbox.sock"), "exec", "--", "echo", "secret-argv")
        refused(result, f"runs as uid {IMPOSTOR_UID}", f"add {IMPOSTOR_UID} to service.server_uids")
        record = impostor.record()
    assert record.received == 0 and record.connections >= 1, record  # connected, checked, sent nothing


def test_an_explicit_connect_to_an_impostor_gets_nothing(client_env: dict[str, str], shared_dir: Path) -> None:
    with Impostor(shared_dir / "imp" / "s.sock", IMPOSTOR_UID) as impostor:
        for address in (f"unix:{impostor.path}", str(impostor.path)):
            result = sandbox(client_env, "--connect", address, "exec", "--", "echo", "secret-argv")
            refused(result, f"is owned by uid {IMPOSTOR_UID}", "service.server_uids")
        record = impostor.record()
    assert (record.connections, record.received) == (0, 0), record


def test_a_configured_server_uid_is_trusted(client_env: dict[str, str], shared_dir: Path) -> None:
    """The one opt-out: service.server_uids names a uid that may run the service."""
    with Impostor(shared_dir / "svc" / "s.sock", IMPOSTOR_UID) as impostor:
        env = {**client_env, "SANDBOX_SERVICE__SERVER_UIDS": str(IMPOSTOR_UID)}
        result = sandbox(env, "--connect", str(impostor.path), "exec", "--", "echo", "secret-argv")
        assert (result.returncode, result.stdout) == (0, "forged\n"), result.stderr
        record = impostor.record()
    assert record.received > 0 and any("secret-argv" in line for line in record.lines), record


def test_symlinked_socket_paths_are_refused(unix_server: Server, client_env: dict[str, str], shared_dir: Path
                                            ) -> None:
    """Even to the real service: a link is a path someone else may point elsewhere."""
    real = Path(unix_server.address.removeprefix("unix:"))
    (shared_dir / "sandbox").mkdir(mode=0o700)
    (shared_dir / "sandbox" / "sandbox.sock").symlink_to(real)
    result = sandbox(client_env, "--connect", str(shared_dir / "sandbox" / "sandbox.sock"), "exec", "--", "true")
    refused(result, "it is a symbolic link", f"real path ({real})")
    result = sandbox({**client_env, "XDG_RUNTIME_DIR": str(shared_dir)}, "exec", "--", "true")
    refused(result, "it is a symbolic link", f"real path ({real})")

    (shared_dir / "run").symlink_to(real.parent.parent)  # a linked directory on the way
    result = sandbox({**client_env, "XDG_RUNTIME_DIR": str(shared_dir / "run")}, "exec", "--", "true")
    refused(result, f"{shared_dir}/run is a symbolic link", f"real path ({real})")
    assert sandbox(client_env, "--connect", str(real), "exec", "--", "true").returncode == 0


def test_no_default_socket_under_tmp_without_a_runtime_dir(client_env: dict[str, str]) -> None:
    """A user without XDG_RUNTIME_DIR looks for the system socket, never /tmp/sandbox-UID.

    The CLI runs as root but believes it is uid VICTIM_UID (only ``os.getuid`` is replaced):
    this machine's interpreter lives under /root, which a real other uid cannot reach.
    """
    tmp_default = Path(f"/tmp/sandbox-{VICTIM_UID}")
    shutil.rmtree(tmp_default, ignore_errors=True)
    env = {k: v for k, v in client_env.items() if k != "XDG_RUNTIME_DIR"}
    as_victim = f"import os; os.getuid = lambda: {VICTIM_UID}; from cli.app import main; main()"
    try:
        with Impostor(tmp_default / "sandbox.sock", IMPOSTOR_UID) as impostor:
            result = subprocess.run([sys.executable, "-c", as_victim, "exec", "--", "echo", "secret-argv"], env=env,
                                    capture_output=True, text=True, timeout=60, check=False)
            assert (result.returncode, result.stdout) == (0, "secret-argv\n"), result.stderr
            record = impostor.record()
    finally:
        shutil.rmtree(tmp_default, ignore_errors=True)
    assert (record.connections, record.received) == (0, 0), record


def test_a_per_user_queue_timeout_names_the_users_cap(tmp_path: Path) -> None:
    """Over the service: the user's own cap is full (the pool has room), and the hint says so."""
    run = Path(tempfile.mkdtemp(prefix="sbx-cap-", dir="/tmp"))
    env = {**base_env(tmp_path), "XDG_RUNTIME_DIR": str(run), "SANDBOX_WORKSPACE_ROOT": str(tmp_path / "ws"),
           "SANDBOX_MAX_WORKERS_PER_USER": "1", "SANDBOX_ACQUIRE_TIMEOUT": "0.5"}
    proc, log = start_server(tmp_path, env)
    server = Server(proc, f"unix:{run}/sandbox/sandbox.sock", tmp_path / "ws", log, {})
    wait = ["sh", "-c", "while [ ! -e go ]; do sleep 0.01; done"]
    holder = None
    try:
        poll(lambda: socket_answers(run / "sandbox" / "sandbox.sock") or proc.poll() is not None, 20, "the service")
        holder = subprocess.Popen([SANDBOX, "exec", "--", *wait], env=env, stdout=subprocess.DEVNULL)
        poll(lambda: find_process(wait, proc.pid), 20, "the first command running")
        result = sandbox(env, "exec", "--", "true")
        assert result.returncode == 1, result.stderr
        error, hint = result.stderr.strip().splitlines()
        assert error.endswith("(all 1 of the user's workers busy; max_workers_per_user = 1)"), error
        assert hint == "hint: raise max_workers_per_user (now 1) or acquire_timeout in the config, or retry later"
        (user_dir(server) / "go").touch()
        assert holder.wait(30) == 0
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
        stop_server(server)
        shutil.rmtree(run, ignore_errors=True)


def test_repl_shell_against_the_service(remote_terminal: Terminal) -> None:
    term = remote_terminal
    term.line("/shell")
    term.expect(r"[$#] ")
    term.child.send("PS1='RE''MOTE> '\r")
    term.expect("REMOTE> ")
    term.line("tty; echo remote-$((6*7))")
    term.expect(r"/dev/pts/\d+")
    term.expect("remote-42")
    term.expect("REMOTE> ")
    term.line("exit 5")
    term.expect(r"back in the REPL \(shell exit 5\)")
    term.prompt()
