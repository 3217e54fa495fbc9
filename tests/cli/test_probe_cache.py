"""bwrap's ``--version`` / ``--help`` answers are kept across CLI runs, and only when trustworthy.

A one-shot ``sandbox exec`` under the strict profile used to run both probes every time. A
``strict.bwrap`` wrapper script logs each probe (and execs the real bwrap), so the tests see
how often the real console script probed: once for the same binary, again after the binary
changed, and again when a cache file could have been written by someone else.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from tests.cli.conftest import Run

BWRAP = shutil.which("bwrap")
pytestmark = pytest.mark.skipif(BWRAP is None, reason="bubblewrap (bwrap) is not installed")


@pytest.fixture
def wrapper(tmp_path: Path) -> tuple[Path, Path]:
    """A bwrap that notes each ``--version`` / ``--help`` call in a log, then runs the real one."""
    log = tmp_path / "probes.log"
    script = tmp_path / "bin" / "bwrap"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\ncase "$1" in --version|--help) echo "$1" >> {log};; esac\nexec {BWRAP} "$@"\n')
    script.chmod(0o755)
    return script, log


def _exec_true(run_cli: Run, script: Path) -> None:
    env = {"SANDBOX_PROFILE": "strict", "SANDBOX_STRICT__BWRAP": str(script)}
    result = run_cli("--local", "exec", "--", "true", env=env)
    assert result.returncode == 0, result.stderr


def _probes(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_probes_run_once_per_binary_and_again_when_it_changes(
    run_cli: Run, wrapper: tuple[Path, Path], cli_env: dict[str, str]
) -> None:
    script, log = wrapper
    _exec_true(run_cli, script)
    assert sorted(_probes(log)) == ["--help", "--version"]
    _exec_true(run_cli, script)
    assert sorted(_probes(log)) == ["--help", "--version"]  # the second process asked nobody
    cache = Path(cli_env["SANDBOX_STATE_DIR"]) / "probes"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in cache.iterdir())
    later = time.time() + 5
    os.utime(script, (later, later))  # an upgraded binary: a new identity
    _exec_true(run_cli, script)
    assert sorted(_probes(log)) == ["--help", "--help", "--version", "--version"]


@pytest.mark.parametrize("spoil", ["mode", "owner", "forged"])
def test_a_cache_file_anyone_else_could_write_is_not_believed(
    run_cli: Run, wrapper: tuple[Path, Path], cli_env: dict[str, str], spoil: str
) -> None:
    script, log = wrapper
    _exec_true(run_cli, script)
    cache = Path(cli_env["SANDBOX_STATE_DIR"]) / "probes"
    files = sorted(f for f in cache.iterdir() if not f.name.startswith("seccomp-"))  # bwrap's two answers
    assert len(files) == 2
    for f in files:
        if spoil == "mode":
            f.chmod(0o644)
        elif spoil == "owner":
            if os.geteuid() != 0:
                pytest.skip("changing a file's owner needs root")
            os.chown(f, 65534, 65534)
        else:  # same owner and mode, but the answer is for another binary
            f.write_text(f.read_text().replace(str(script.resolve()), "/usr/bin/other-bwrap"))
    _exec_true(run_cli, script)
    assert sorted(_probes(log)) == ["--help", "--help", "--version", "--version"]
    assert all(f.stat().st_uid == os.geteuid() and stat.S_IMODE(f.stat().st_mode) == 0o600 for f in cache.iterdir())
