"""cgroups are required (rlimits only by name), swept after a dead orchestrator, removed on SIGTERM/SIGHUP."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox_core.config import ProcessSandboxConfig, StrictIsolation
from sandbox_core.errors import IsolationUnavailable
from sandbox_core.isolation import cgroups, slots
from sandbox_core.isolation.launch import prepare_workspace
from sandbox_core.isolation.strict import strict_launch
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.requests import ExecRequest
from tests.helpers import process_config

needs_cgroups = pytest.mark.skipif(
    shutil.which("bwrap") is None or cgroups.available() is not None,
    reason=f"strict profile with v1 cgroups unavailable: {cgroups.available()}",
)
SANDBOX = str(Path(sys.executable).with_name("sandbox"))


def _strict(tmp_path: Path, **strict: object) -> ProcessSandboxConfig:
    config = process_config(tmp_path / "ws", state_dir=tmp_path / "state").replace(profile="strict")
    return config.replace(strict=StrictIsolation(**strict)) if strict else config  # type: ignore[arg-type]


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")
def test_without_cgroups_the_worker_does_not_start_unless_rlimits_only_is_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cgroups, "own_cgroup", lambda *a, **k: None)
    monkeypatch.setattr(cgroups, "v2_mount", lambda *a, **k: None)
    config = _strict(tmp_path)
    with pytest.raises(IsolationUnavailable, match="no cgroups for the worker's limits") as refused:
        strict_launch(config, "w", prepare_workspace(config, "alice"))
    assert "strict.cgroups = false" in refused.value.message
    asked = _strict(tmp_path, cgroups=False)
    spec = strict_launch(asked, "w", prepare_workspace(asked, "alice"))
    try:
        layer = spec.plan["host_layers"]["limits_detail"]
        assert layer["mode"] == "rlimits" and layer["warning"] is True and "rlimits only" in layer["note"]
        assert "nproc" in spec.plan["rlimits"]
    finally:
        assert spec.cleanup is not None
        spec.cleanup()


def _owner_dirs(pid: int) -> list[Path]:
    found = []
    for controller in cgroups.CONTROLLERS + cgroups.CPU_CONTROLLERS:
        base = cgroups.own_cgroup(controller)
        if base is not None:
            found += [p for p in (base / cgroups.SUBTREE).glob(f"o{pid}.*") if p.is_dir()]
    return found


def _cli(tmp_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")}
    env.update(SANDBOX_WORKSPACE_ROOT=str(tmp_path / "ws"), SANDBOX_STATE_DIR=str(tmp_path / "state"),
               XDG_RUNTIME_DIR=str(tmp_path / "run"), XDG_CONFIG_HOME=str(tmp_path / "cfg"), SANDBOX_MIN_IDLE="0")
    return subprocess.Popen([SANDBOX, "--profile", "strict", "exec", "--", "sh", "-c", "echo up; exec sleep 60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _wait_up(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n"  # the command runs: its worker is in its cgroups


@needs_cgroups
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_of_the_cli_removes_its_cgroups(tmp_path: Path, sig: signal.Signals) -> None:
    proc = _cli(tmp_path)
    try:
        _wait_up(proc)
        owned = _owner_dirs(proc.pid)
        assert owned and all(any(d.iterdir()) for d in owned)
        proc.send_signal(sig)
        assert proc.wait(30) == 128 + sig
        assert _owner_dirs(proc.pid) == []
    finally:
        proc.kill()
        proc.communicate()


@needs_cgroups
async def test_a_killed_orchestrators_cgroups_are_swept_by_the_next(tmp_path: Path) -> None:
    proc = _cli(tmp_path)
    try:
        _wait_up(proc)
        left = _owner_dirs(proc.pid)
        proc.kill()
        proc.wait(30)
    finally:
        proc.kill()
        proc.communicate()
    deadline = time.monotonic() + 10
    while any(cgroups.WorkerCgroup({"x": g}, 0, 0).pids() for d in left for g in d.iterdir()):
        assert time.monotonic() < deadline, "the sandbox outlived its CLI"  # bwrap --die-with-parent
        time.sleep(0.05)
    assert left and all(d.exists() for d in left)  # SIGKILL: nobody cleaned up
    async with SandboxOrchestrator(_strict(tmp_path)) as pool:
        cgroup_dirs = [name for name in pool.swept if not name.startswith("slot ")]
        assert sorted(cgroup_dirs) == sorted(str(d) for d in left)
        # The host's copy of the worker's workspace tree is released in the background once the
        # worker has started; a kill that came first leaves that slot to the sweep as well.
        left_slots = [name.removeprefix("slot ") for name in pool.swept if name.startswith("slot ")]
        assert all(name.startswith(f"{proc.pid}-") for name in left_slots), left_slots
        assert not any((tmp_path / "state" / slots.SLOTS_DIR / name).exists() for name in left_slots)
        assert not [m for m in slots.mounted_slots() if m.startswith(str(tmp_path))]
        assert (await pool.execute("u", ExecRequest(shell="echo ok"))).stdout == b"ok\n"
    assert not any(d.exists() for d in left)
