from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

SANDBOX = str(Path(sys.executable).with_name("sandbox"))
Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """An environment for the CLI: private config dir and workspace root, no colour."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("SANDBOX_", "ANTHROPIC_")) and k not in ("NO_COLOR", "FORCE_COLOR")
    }
    env.update(
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_STATE_HOME=str(tmp_path / "state"),
        SANDBOX_WORKSPACE_ROOT=str(tmp_path / "ws"),
        SANDBOX_MIN_IDLE="0",
        COLUMNS="120",
    )
    return env


@pytest.fixture
def run_cli(cli_env: dict[str, str]) -> Run:
    """Run the real ``sandbox`` console script in a subprocess."""

    def run(*args: str, input: str | None = None, timeout: float = 60, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SANDBOX, *args], input=input, capture_output=True, text=True, timeout=timeout,
            env={**cli_env, **(env or {})}, check=False,
        )

    return run
