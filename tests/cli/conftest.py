"""Fixtures for CLI tests: a private environment, the real console script, typer's runner, a pty.

The isolation profile under test comes from ``SANDBOX_CLI_TEST_PROFILE`` (default
``process``); every fixture passes it on through ``SANDBOX_PROFILE``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from cli.app import app

SANDBOX = str(Path(sys.executable).with_name("sandbox"))
Run = Callable[..., subprocess.CompletedProcess[str]]
Invoke = Callable[..., Result]
ANSI = re.compile(r"\x1b[\[\]()]")
AGENT_AVAILABLE = importlib.util.find_spec("sandbox_core.inside.agent.runtime") is not None
needs_agent = pytest.mark.skipif(
    not AGENT_AVAILABLE, reason="sandbox_core.inside.agent.runtime is not in this build yet"
)


def assert_plain(text: str) -> None:
    """Piped output carries no ANSI escape sequences."""
    assert not ANSI.search(text), f"ANSI escape in piped output: {text[:300]!r}"


@pytest.fixture
def profile() -> str:
    return os.environ.get("SANDBOX_CLI_TEST_PROFILE", "process")


@pytest.fixture
def cli_env(tmp_path: Path, profile: str) -> dict[str, str]:
    """An environment for the CLI: private config/state/runtime dirs and workspace root, no colour vars.

    A private ``XDG_RUNTIME_DIR`` keeps a ``sandbox serve`` running on this machine from
    being used automatically (client mode) by tests of the in-process CLI.
    """
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("SANDBOX_", "ANTHROPIC_", "_SANDBOX_", "_TYPER_", "COMP_"))
        and k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES")
    }
    env.update(
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_STATE_HOME=str(tmp_path / "state"),
        XDG_RUNTIME_DIR=str(tmp_path / "run"),
        SANDBOX_WORKSPACE_ROOT=str(tmp_path / "ws"),
        SANDBOX_STATE_DIR=str(tmp_path / "statedir"),
        SANDBOX_PROFILE=profile,
        SANDBOX_ALLOW_ROOT_PROCESS="1",
        SANDBOX_MIN_IDLE="0",
        SANDBOX_SHUTDOWN_GRACE="2",
        SANDBOX_CANCEL_GRACE="1",
        COLUMNS="120",
    )
    return env


@pytest.fixture
def run_cli(cli_env: dict[str, str]) -> Run:
    """Run the real ``sandbox`` console script in a subprocess (stdout and stderr are pipes)."""

    def run(*args: str, input: str | None = None, timeout: float = 60, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SANDBOX, *args], input=input, capture_output=True, text=True, timeout=timeout,
            env={**cli_env, **(env or {})}, check=False,
        )

    return run


@pytest.fixture
def invoke(cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Invoke:
    """Run the app in this process through typer's CliRunner, in the private environment."""
    for key in list(os.environ):
        if key not in cli_env:
            monkeypatch.delenv(key)
    for key, value in cli_env.items():
        monkeypatch.setenv(key, value)

    def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
        return CliRunner().invoke(app, list(args), input=input, env=env, catch_exceptions=False)

    return run


# ---------------------------------------------------------------- processes


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [part.decode(errors="replace") for part in fh.read().split(b"\0") if part]
    except OSError:
        return []


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def worker_sessions(parent: int) -> list[int]:
    """Children of ``parent`` that lead a session of their own: the worker processes."""
    found = []
    for pid in all_pids():
        fields = _stat(pid)
        if fields and int(fields[1]) == parent and int(fields[3]) == pid and fields[0] != "Z":
            found.append(pid)
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (a strict worker's sandbox has sessions of its own)."""
    from sandbox_core.process_tree import descendants

    return [pid, *descendants(pid)]


def find_process(argv: list[str], root: int) -> int | None:
    """A live process running ``argv`` somewhere below ``root``."""
    for pid in process_tree(root)[1:]:
        fields = _stat(pid)
        if fields and fields[0] != "Z" and cmdline(pid) == argv:
            return pid
    return None


def poll(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (and return it), or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def reap_sessions() -> Iterator[list[int]]:
    """Session ids a test registers; anything left in them is killed at teardown."""
    from sandbox_core.process_tree import kill_session

    sessions: list[int] = []
    yield sessions
    for sid in sessions:
        kill_session(sid)
