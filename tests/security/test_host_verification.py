"""The host verifies every layer of a started worker from /proc and fails closed.

Each attack here is a launcher that silently weakens the sandbox: a bwrap stand-in (a small
script around the real bwrap) that drops one option, or a launcher that edits the plan. Each
must end in IsolationUnavailable at start naming the layer, with no worker process left and
no request served. Real workers, real bubblewrap.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox_core.config import ProcessSandboxConfig, StrictIsolation
from sandbox_core.errors import IsolationUnavailable
from sandbox_core.isolation import cgroups, procfs, runtime
from sandbox_core.isolation.launch import LaunchSpec, launch_spec, prepare_workspace
from sandbox_core.isolation.spec import process_launch
from sandbox_core.kernel import landlock_abi
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.requests import ExecRequest
from sandbox_core.worker import SandboxWorker, WorkerState
from tests.helpers import pid_alive, process_config, wait_for

BWRAP = shutil.which("bwrap")
AS_ROOT = os.geteuid() == 0
needs_bwrap = pytest.mark.skipif(
    not sys.platform.startswith("linux") or BWRAP is None, reason="the strict profile needs Linux and bubblewrap"
)
needs_root = pytest.mark.skipif(not AS_ROOT, reason="the uid switch happens only when the host is root")
Launcher = Callable[[ProcessSandboxConfig, str, "Path | None"], LaunchSpec]


def _strict(tmp_path: Path, **strict: Any) -> ProcessSandboxConfig:
    return ProcessSandboxConfig(
        profile="strict", workspace_root=tmp_path / "ws", min_idle=0, startup_timeout=30.0,
        strict=StrictIsolation(**strict),
    )  # fmt: skip


def stand_in(tmp_path: Path, *drop: tuple[str, int]) -> str:
    """A bwrap that silently drops each (option, number of its arguments) before running the real one.

    Written in Python started with -I, so the stand-in adds nothing to the environment (a shell
    would export SHLVL, and the host's environment check would catch that instead).
    """
    name = "bwrap-without" + "".join(option for option, _ in drop)
    script = tmp_path / name
    script.write_text(
        f"#!{sys.executable} -I\n"
        "import os, sys\n"
        f"drop = {dict(drop)!r}\n"
        "rest = sys.argv[1:]\n"
        "if rest[:1] == ['--args']:  # the options come NUL-separated on a descriptor: unfold them\n"
        "    fd = int(rest[1])\n"
        "    os.lseek(fd, 0, 0)\n"
        "    data = b''.join(iter(lambda: os.read(fd, 65536), b''))\n"
        "    rest = [a.decode() for a in data.split(b'\\0')[:-1]] + rest[2:]\n"
        "args = []\n"
        "while rest:\n"
        "    if rest[0] == '--':\n"
        "        args += rest\n"
        "        break\n"
        "    if rest[0] in drop:\n"
        "        rest = rest[1 + drop[rest[0]]:]\n"
        "        continue\n"
        "    args.append(rest.pop(0))\n"
        f"os.execv({BWRAP!r}, [{BWRAP!r}, *args])\n"
    )
    script.chmod(0o755)
    return str(script)


def no_bwrap(tmp_path: Path) -> str:
    """A "bwrap" that answers --version and --help like the real one, then runs the command bare (from the
    host's copy of the staged runtime, which the real sandbox mounts at /opt/sandbox)."""
    script = tmp_path / "bwrap-bare"
    script.write_text(
        f"#!{sys.executable} -I\n"
        "import os, sys\n"
        f"if sys.argv[1:] in (['--version'], ['--help']):\n    os.execv({BWRAP!r}, [{BWRAP!r}, *sys.argv[1:]])\n"
        "cmd = sys.argv[sys.argv.index('--') + 1:]\n"
        f"cmd = [a.replace({runtime.SANDBOX_ROOT!r}, {str(runtime.runtime().host_dir)!r}) for a in cmd]\n"
        "os.execv(cmd[0], cmd)\n"
    )
    script.chmod(0o755)
    return str(script)


def editing(edit: Callable[[LaunchSpec], LaunchSpec]) -> Launcher:
    """A launcher that builds the real spec, then edits it."""

    def launcher(config: ProcessSandboxConfig, worker_id: str, workspace: Path | None) -> LaunchSpec:
        return edit(launch_spec(config, worker_id, workspace))

    return launcher


def without_plan_key(*keys: str) -> Launcher:
    def edit(spec: LaunchSpec) -> LaunchSpec:
        plan = {k: v for k, v in spec.plan.items() if k not in keys}
        return dataclasses.replace(spec, plan=plan)

    return editing(edit)


async def refused(config: ProcessSandboxConfig, launcher: Launcher = launch_spec) -> IsolationUnavailable:
    """Start a worker that must be refused; check that nothing of it is left, then return the error."""
    worker = SandboxWorker(config, "weak", user_id="alice", workspace=prepare_workspace(config, "alice"),
                           launcher=launcher)  # fmt: skip
    with pytest.raises(IsolationUnavailable) as info:
        await worker.start()
    assert worker.state is WorkerState.CRASHED and worker.requests_served == 0
    spawned, inner = worker.pid, info.value.data.get("worker_pid")
    assert isinstance(spawned, int) and isinstance(inner, int)
    await wait_for(lambda: not pid_alive(spawned) and not pid_alive(inner), 10, "the refused worker to be gone")
    return info.value


# ----------------------------------------------------------------- the real thing passes


@needs_bwrap
async def test_a_real_strict_worker_is_verified_layer_by_layer(tmp_path: Path) -> None:
    config = _strict(tmp_path)
    worker = SandboxWorker(config, "real", user_id="alice", workspace=prepare_workspace(config, "alice"))
    await worker.start()
    try:
        result = await worker.execute("exec", ExecRequest(shell="pwd").params())
        assert result.stdout_text == "/workspace\n"
        verified = worker.report["verified_by_host"]
    finally:
        await worker.stop()
    must = {"seccomp", "no_new_privs", "capabilities", "rlimits", "umask", "session", "environment"}
    must |= {f"namespace {k}" for k in ("mnt", "pid", "net", "ipc", "uts")}
    must |= {"identity"} if AS_ROOT else {"namespace user"}
    must |= {"cgroups"} if cgroups.available() is None else set()
    assert must <= set(verified), must - set(verified)
    assert worker.report.get("verified_from_report") == (["landlock"] if landlock_abi() else [])


async def test_a_real_process_worker_is_verified_on_what_it_promises(tmp_path: Path) -> None:
    async with SandboxOrchestrator(process_config(tmp_path)) as pool:
        result = await pool.execute("alice", ExecRequest(shell="true"))
        report = pool.worker_report(result.worker_id) or {}
    assert report["verified_by_host"] == ["rlimits", "umask", "session", "environment"]


# ----------------------------------------------------------------- a stand-in that drops a bwrap option


DROPS = [
    pytest.param([("--seccomp", 1)], "seccomp", "Seccomp 0", id="seccomp"),
    pytest.param([("--unshare-net", 0)], "namespace net", "shares the host's net namespace", id="net"),
    pytest.param([("--unshare-pid", 0)], "namespace pid", "shares the host's pid namespace", id="pid"),
    pytest.param([("--unshare-ipc", 0)], "namespace ipc", "shares the host's ipc namespace", id="ipc"),
    pytest.param([("--unshare-uts", 0), ("--hostname", 1)], "namespace uts", "shares the host's uts", id="uts"),
]


@needs_bwrap
@pytest.mark.parametrize(("drop", "layer", "seen"), DROPS)
async def test_a_launcher_that_drops_a_bwrap_option_is_refused(
    tmp_path: Path, drop: list[tuple[str, int]], layer: str, seen: str
) -> None:
    error = await refused(_strict(tmp_path, bwrap=stand_in(tmp_path, *drop)))
    assert list(error.data["failed_layers"]) == [layer], error.message
    assert f"{layer}: " in error.message and seen in error.message


@needs_bwrap
async def test_a_launcher_that_skips_bwrap_entirely_is_refused(tmp_path: Path) -> None:
    """Without bwrap nothing the sandbox provides exists (its mounts, its HOME, /opt/sandbox): the
    worker refuses itself at its own checks before the host's verification even runs. Either
    way it is refused, serves nothing and leaves nothing."""
    config = _strict(tmp_path, bwrap=no_bwrap(tmp_path))
    worker = SandboxWorker(config, "bare", user_id="alice", workspace=prepare_workspace(config, "alice"))
    with pytest.raises(IsolationUnavailable):
        await worker.start()
    assert worker.state is WorkerState.CRASHED and worker.requests_served == 0
    spawned = worker.pid
    assert isinstance(spawned, int)
    await wait_for(lambda: not pid_alive(spawned), 10, "the refused worker to be gone")


@needs_bwrap
@needs_root
async def test_dropping_cap_drop_is_covered_by_the_workers_own_uid_switch(tmp_path: Path) -> None:
    """Without ``--cap-drop ALL`` bwrap keeps root's capabilities, but the worker's switch to the
    sandbox user empties every set before the host looks: the host checks, and it holds."""
    config = _strict(tmp_path, bwrap=stand_in(tmp_path, ("--cap-drop", 1)))
    worker = SandboxWorker(config, "caps", user_id="alice", workspace=prepare_workspace(config, "alice"))
    await worker.start()
    try:
        assert {"capabilities", "identity"} <= set(worker.report["verified_by_host"])
    finally:
        await worker.stop()


# ----------------------------------------------------------------- a launcher that edits the plan


@needs_bwrap
@needs_root
async def test_a_plan_without_the_uid_switch_is_refused(tmp_path: Path) -> None:
    error = await refused(_strict(tmp_path), without_plan_key("switch_user"))
    failed = error.data["failed_layers"]
    assert set(failed) == {"identity", "capabilities"}, error.message
    assert "runs as uid 0 0 0 0" in failed["identity"] and "per-user uid in 200000-299999" in failed["identity"]
    assert "CapEff 00000000000001c0" in failed["capabilities"]  # SETUID, SETGID, SETPCAP kept for the switch


@needs_bwrap
@pytest.mark.skipif(landlock_abi() == 0, reason="kernel has no landlock")
async def test_a_plan_without_landlock_is_refused_at_bind(tmp_path: Path) -> None:
    error = await refused(_strict(tmp_path), without_plan_key("landlock"))
    assert list(error.data["failed_layers"]) == ["landlock"], error.message
    assert "reports landlock None" in error.message


@needs_bwrap
@pytest.mark.skipif(cgroups.available() is not None, reason=f"cgroups: {cgroups.available()}")
async def test_a_worker_left_outside_its_cgroups_is_refused(tmp_path: Path) -> None:
    def edit(spec: LaunchSpec) -> LaunchSpec:  # forgets to move the worker into its cgroups (fds close at cleanup)
        return dataclasses.replace(spec, after_spawn=None)

    error = await refused(_strict(tmp_path), editing(edit))
    assert list(error.data["failed_layers"]) == ["cgroups"], error.message


async def test_a_process_launcher_that_leaks_the_host_environment_is_refused(tmp_path: Path) -> None:
    secret = "sbx-host-secret-value-4711"

    def leaky(config: ProcessSandboxConfig, worker_id: str, workspace: Path | None) -> LaunchSpec:
        spec = process_launch(config, workspace)
        return dataclasses.replace(spec, env={**spec.env, "DATABASE_URL": secret})

    error = await refused(process_config(tmp_path), leaky)
    assert list(error.data["failed_layers"]) == ["environment"]
    assert "DATABASE_URL" in error.message and secret not in str(error.to_wire())  # names, never values


async def test_a_process_plan_without_rlimits_is_refused(tmp_path: Path) -> None:
    def lax(config: ProcessSandboxConfig, worker_id: str, workspace: Path | None) -> LaunchSpec:
        spec = process_launch(config, workspace)
        return dataclasses.replace(spec, plan={**spec.plan, "rlimits": {}})

    error = await refused(process_config(tmp_path), lax)
    assert list(error.data["failed_layers"]) == ["rlimits"]
    assert "nofile" in error.message and "(plan 256/256)" in error.message


@needs_bwrap
async def test_the_pool_never_serves_a_request_on_a_refused_worker(tmp_path: Path) -> None:
    config = _strict(tmp_path, bwrap=stand_in(tmp_path, ("--unshare-net", 0)))
    marker = tmp_path / "ws" / "alice" / "ran"
    async with SandboxOrchestrator(config) as pool:
        with pytest.raises(IsolationUnavailable, match="namespace net"):
            await pool.execute("alice", ExecRequest(shell="touch ran"))
        assert pool.get_pool_stats()["requests"]["ok"] == 0
    assert not marker.exists()


# ----------------------------------------------------------------- locating the worker, against pid reuse


def test_locate_pins_the_process_so_a_successor_is_never_read() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        worker = procfs.locate(proc.pid, proc.pid)
        assert worker.snapshot().pid == proc.pid
        proc.kill()
        proc.wait()  # reaped: the pid number is free for anyone now
        with pytest.raises(IsolationUnavailable, match=r"cannot read /proc/\d+ of the worker"):
            worker.snapshot()
        worker.kill()  # a no-op on a dead pidfd, never a signal to a successor
        worker.close()
    finally:
        proc.kill()
        proc.wait()


def test_locate_refuses_what_is_not_the_hosts_child_or_does_not_match() -> None:
    with pytest.raises(IsolationUnavailable, match="no longer this host's child"):
        procfs.locate(os.getppid(), os.getppid())
    proc = subprocess.Popen(["sleep", "60"])
    try:
        with pytest.raises(IsolationUnavailable, match="cannot tell which process is the worker"):
            procfs.locate(proc.pid, proc.pid + 1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
