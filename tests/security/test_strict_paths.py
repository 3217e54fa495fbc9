"""Path settings of the strict profile fail closed: a rule either does what it says or is a ConfigError.

Static mistakes (empty, relative) are refused when the config is built; what depends on the
sandbox's mount view (does a deny path show inside at all?) is refused when a worker is
planned. Real bubblewrap workers.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from sandbox_core.config import ProcessSandboxConfig, StrictIsolation
from sandbox_core.errors import ConfigError
from sandbox_core.isolation.launch import prepare_workspace
from sandbox_core.isolation.runtime import SANDBOX_ROOT
from sandbox_core.isolation.strict import strict_launch
from sandbox_core.requests import ExecRequest
from sandbox_core.worker import SandboxWorker

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("bwrap") is None,
    reason="the strict profile needs Linux and bubblewrap",
)


def _config(tmp_path: Path, **strict: Any) -> ProcessSandboxConfig:
    return ProcessSandboxConfig(profile="strict", workspace_root=tmp_path / "ws", min_idle=0,
                                strict=StrictIsolation(**strict))  # fmt: skip


def _plan(tmp_path: Path, **strict: Any) -> dict[str, Any]:
    config = _config(tmp_path, **strict)
    spec = strict_launch(config, "plan", prepare_workspace(config, "alice"))
    if spec.cleanup is not None:
        spec.cleanup()
    return spec.plan


async def _sh(config: ProcessSandboxConfig, script: str) -> str:
    worker = SandboxWorker(config, "paths", user_id="alice", workspace=prepare_workspace(config, "alice"))
    await worker.start()
    try:
        return (await worker.execute("exec", ExecRequest(shell=script).params())).stdout_text
    finally:
        await worker.stop()


def test_an_empty_bind_never_binds_the_current_directory(tmp_path: Path) -> None:
    os.chdir(tmp_path)  # realpath("") would be this directory
    for setting in ("ro_binds", "rw_binds"):
        with pytest.raises(ConfigError) as info:
            strict_launch(_config(tmp_path, **{setting: ("",)}), "w", None)
        assert info.value.field == f"strict.{setting}" and "''" in info.value.message


async def test_a_generated_file_can_be_denied(tmp_path: Path) -> None:
    """/etc/passwd is written by the sandbox (not bound): denying it used to be skipped silently."""
    config = _config(tmp_path, deny_paths=("/etc/passwd",))
    assert "/etc/passwd" in _plan(tmp_path, deny_paths=("/etc/passwd",))["host_layers"]["filesystem"]["denied"]
    out = await _sh(config, "stat -c '%a %s' /etc/passwd; cat /etc/passwd 2>&1 || true")
    assert out.splitlines()[0] == "0 0" and "root:x:0:0" not in out


async def test_a_directory_the_sandbox_makes_can_be_denied(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "tool.txt").write_text("tool-content-4711")
    data.chmod(0o755)
    config = _config(tmp_path, ro_binds=(f"{data}:/mnt/data",), deny_paths=("/mnt",))  # /opt holds the runtime
    out = await _sh(config, "cat /mnt/data/tool.txt 2>&1 || echo hidden")
    assert "tool-content-4711" not in out and "hidden" in out


@pytest.mark.skipif(not os.path.exists("/etc/shadow"), reason="this host has no /etc/shadow")
def test_a_host_path_the_sandbox_does_not_show_is_an_error(tmp_path: Path) -> None:
    """It exists on the host but not in the view: the rule hides nothing, so the operator may
    have meant another path (a host path bound elsewhere, say): tell them instead of skipping."""
    with pytest.raises(ConfigError) as info:
        _plan(tmp_path, deny_paths=("/etc/shadow",))
    assert info.value.field == "strict.deny_paths" and "'/etc/shadow'" in info.value.message
    assert "neither bound nor generated" in info.value.message


def test_a_path_that_exists_nowhere_is_skipped_and_not_reported_denied(tmp_path: Path) -> None:
    plan = _plan(tmp_path, deny_paths=("/nonexistent-sbx-h14", "/usr/share/nonexistent-sbx-h14"))
    assert plan["host_layers"]["filesystem"]["denied"] == []


@pytest.mark.parametrize("entry", ["/proc/sys", "/dev/full", "/tmp/x"])
def test_a_path_inside_the_sandboxes_own_filesystems_is_an_error(tmp_path: Path, entry: str) -> None:
    with pytest.raises(ConfigError) as info:
        _plan(tmp_path, deny_paths=(entry,))
    assert info.value.field == "strict.deny_paths" and "the sandbox's own" in info.value.message


def test_denying_what_the_worker_needs_is_an_error(tmp_path: Path) -> None:
    needed = (SANDBOX_ROOT, os.path.dirname(SANDBOX_ROOT), f"{SANDBOX_ROOT}/app")  # the staged runtime
    for entry in ("/", "/proc", "/tmp", "/workspace", *needed):
        with pytest.raises(ConfigError, match="would hide what the worker needs") as info:
            _plan(tmp_path, deny_paths=(entry,))
        assert repr(entry) in info.value.message
