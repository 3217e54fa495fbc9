"""The orchestrator with the default ``strict`` profile: real bubblewrap workers."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from sandbox_core.config import ProcessSandboxConfig, StrictIsolation
from sandbox_core.errors import ConfigError, PoolClosed, RequestTimeout, WorkerCrashed
from sandbox_core.isolation.launch import can_prewarm, workspace_owner
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.process_tree import descendants
from sandbox_core.requests import ExecRequest
from sandbox_core.shared import WORKER_ENTRY
from tests.helpers import pid_alive, process_config, wait_for

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")


def strict(root: Path, **changes: object) -> ProcessSandboxConfig:
    return process_config(root, **changes).replace(profile="strict")


def sh(script: str, timeout: float | None = None) -> ExecRequest:
    return ExecRequest(shell=script, timeout=timeout)


async def test_strict_exec_sees_only_its_own_workspace(workspace_root: Path, host_canary: str) -> None:
    async with SandboxOrchestrator(strict(workspace_root)) as pool:
        await pool.execute("alice", sh("echo mine > a.txt"))
        result = await pool.execute("bob", sh("pwd; ls -a /workspace; ls /workspace/.. ; env; cat /proc/1/environ"))
        assert result.stdout_text.startswith("/workspace\n.\n..\n")
        assert "a.txt" not in result.stdout_text and "alice" not in result.stdout_text
        assert host_canary not in result.stdout_text + result.stderr_text
        report = pool.worker_report(result.worker_id)
        assert report is not None and report["profile"] == "strict"
        assert report["seccomp"] is True and report["no_new_privs"] is True
        if os.getuid() == 0:
            assert report["capabilities_zero"] is True
            assert report["uid"] == (workspace_root / "bob").stat().st_uid != (workspace_root / "alice").stat().st_uid
        assert (workspace_root / "alice" / "a.txt").read_text() == "mine\n"


async def test_strict_timeout_kills_everything_the_request_started(workspace_root: Path) -> None:
    async with SandboxOrchestrator(strict(workspace_root)) as pool:
        await pool.execute("carol", sh("true"))
        bwrap_pid = pool.list_workers()[0]["pid"]
        before = set(descendants(bwrap_pid))
        with pytest.raises(RequestTimeout):
            await pool.execute("carol", sh("sleep 300 & sleep 300 & touch started; sleep 300", timeout=1.0))
        await wait_for(lambda: {p for p in descendants(bwrap_pid) if pid_alive(p)} <= before, 10,
                       "request's processes gone")
        assert (await pool.execute("carol", sh("echo alive"))).stdout_text == "alive\n"
        assert (await pool.execute("carol", sh("kill -9 $$"))).exit_code == 137
        # every command the worker ran, timed out or not, was reaped: no zombie is left below it
        def zombies() -> list[int]:
            return [p for p in descendants(bwrap_pid) if os.path.exists(f"/proc/{p}") and not pid_alive(p)]

        await wait_for(lambda: not zombies(), 10, "no zombie left in the sandbox")


async def test_strict_crash_then_recovery_and_no_orphans(workspace_root: Path) -> None:
    async with SandboxOrchestrator(strict(workspace_root)) as pool:
        await pool.execute("dave", sh("echo keep > data"))
        bwrap_pid = pool.list_workers()[0]["pid"]
        running = workspace_root / "dave" / "running"

        async def kill_it() -> None:
            await wait_for(running.exists, 10, "command start")
            os.kill(bwrap_pid, signal.SIGKILL)

        killer = asyncio.create_task(kill_it())
        with pytest.raises(WorkerCrashed):
            await pool.execute("dave", sh("touch running; sleep 300 & sleep 300"))
        await killer
        assert (await pool.execute("dave", sh("cat data"))).stdout_text == "keep\n"
        assert pool.get_pool_stats()["restarts"] == 1


async def test_strict_shutdown_leaves_no_process(workspace_root: Path) -> None:
    pool = SandboxOrchestrator(strict(workspace_root))
    await pool.start()
    task = asyncio.create_task(pool.execute("erin", sh("touch started; sleep 300 & sleep 300")))
    await wait_for((workspace_root / "erin" / "started").exists, 15, "start")
    bwrap_pid = pool.list_workers()[0]["pid"]
    tree = descendants(bwrap_pid)
    assert tree
    await pool.shutdown(grace=0.2)
    with pytest.raises(PoolClosed):  # the cause is the shutdown, whichever way the worker went
        await task
    await wait_for(lambda: not any(pid_alive(p) for p in [bwrap_pid, *tree]), 10, "the sandbox to be gone")


async def test_strict_prewarms_per_user(workspace_root: Path) -> None:
    async with SandboxOrchestrator(strict(workspace_root)) as pool:
        if can_prewarm(pool.config):  # a root host: unbound workers any user can claim (test_strict_claim.py)
            unbound = await pool.launch(1)
            assert [r["user_id"] for r in pool.list_workers()] == [None]
            await pool.stop_workers(worker_ids=unbound)
        else:
            with pytest.raises(ConfigError, match="name the user"):
                await pool.launch(1)
        ids = await pool.launch(2, "frank")
        rows = {r["worker_id"]: r for r in pool.list_workers()}
        assert set(ids) == set(rows) and all(r["state"] == "idle" and r["user_id"] == "frank" for r in rows.values())
        result = await pool.execute("frank", sh("pwd"))
        assert result.worker_id in ids and result.stdout_text == "/workspace\n"
        assert pool.get_pool_stats()["spawned"] == 2 + can_prewarm(pool.config)  # served warm, nothing new started


CHAIN = "import os, sys\nif os.fork(): sys.exit(0)\nos.setsid()\nwhile True:\n    if os.fork(): os._exit(0)\n"
"""A fork-and-exit chain: its live process changes pid faster than a snapshot can catch it."""


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _zombies_and_live(root: int) -> tuple[list[int], list[int]]:
    zombies: list[int] = []
    live: list[int] = []
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        (zombies if state == "Z" else live).append(pid)
    return zombies, live


async def test_a_fork_and_exit_chain_dies_with_its_request_and_leaves_no_zombie(workspace_root: Path) -> None:
    config = strict(workspace_root)
    config = config.replace(limits=dataclasses.replace(config.limits, processes=32))
    async with SandboxOrchestrator(config) as pool:
        await pool.execute("gina", sh("true"))
        bwrap_pid = pool.list_workers()[0]["pid"]
        (worker_pid,) = [p for p in descendants(bwrap_pid)
                         if WORKER_ENTRY.encode() in _cmdline(p) and not _cmdline(p).split(b"\0")[0].endswith(b"bwrap")]
        for _ in range(3):
            result = await pool.execute("gina", ExecRequest(argv=("python3", "-c", CHAIN)))
            assert result.exit_code == 0
            assert _zombies_and_live(worker_pid) == ([], []), "a chain member or a zombie is left"
        for _ in range(5):  # the pids limit is not filled by leftovers
            busy = await pool.execute("gina", sh("for i in 1 2 3 4 5 6 7 8 9 10; do true & done; wait; echo ok"))
            assert busy.stdout == b"ok\n"


PLANT = r"""
cd /workspace
echo 'touch /workspace/pwned-profile' >> ~/.profile
git config --global alias.st '!touch /workspace/pwned-alias'
echo 'touch /workspace/pwned-profile' >> .profile
echo 'touch /workspace/pwned-bashrc' >> .bashrc
printf '[core]\n\tfsmonitor = touch /workspace/pwned-fsmonitor\n' >> .git/config
printf '[alias]\n\tst = !touch /workspace/pwned-alias\n' >> .gitconfig
printf '#!/bin/sh\ntouch /workspace/pwned-hook\n' > .git/hooks/post-checkout
mv .git .git-old && mkdir .git && echo moved-git
echo "home=$HOME"
ls -A /workspace
"""
RUN_PLANTED = "cd /workspace && bash -lc 'git status --short; git st; true' && bash -ic true; ls -A /workspace"


async def test_strict_dotfile_plants_neither_land_nor_run_later(workspace_root: Path) -> None:
    """One run tries to plant ~/.profile, core.fsmonitor, a git alias and a hook; a later run runs git and shells."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    workspace = workspace_root / "mallory"
    workspace.mkdir(mode=0o700)
    await asyncio.to_thread(subprocess.run, ["git", "init", "-q", str(workspace)], check=True)
    (workspace / ".bashrc").write_text("# mine\n")
    async with SandboxOrchestrator(strict(workspace_root)) as pool:
        if os.getuid() == 0:
            owner = workspace_owner(pool.config, "mallory")
            assert owner is not None
            for p in [workspace, *workspace.rglob("*")]:
                os.lchown(p, *owner)
        planted = await pool.execute("mallory", sh(PLANT))
    assert "home=/home/sandbox\n" in planted.stdout_text and "moved-git" not in planted.stdout_text
    refused = [line for line in planted.stderr_text.splitlines()
               if line.endswith(("Read-only file system", "Permission denied", "Device or resource busy"))]
    assert len(refused) == 6, planted.stderr_text  # .profile .bashrc .git/config .gitconfig the hook, mv .git
    async with SandboxOrchestrator(strict(workspace_root)) as pool:  # a fresh worker: HOME is new
        later = await pool.execute("mallory", sh(RUN_PLANTED))
    assert "pwned" not in later.stdout_text, later.stdout_text + later.stderr_text
    assert not list(workspace.glob("pwned-*")) and not (workspace / ".git-old").exists()
    assert (workspace / ".bashrc").read_text() == "# mine\n" and (workspace / ".profile").read_text() == ""
    assert "fsmonitor" not in (workspace / ".git" / "config").read_text()
    assert not (workspace / ".git" / "hooks" / "post-checkout").exists()
    # what an operator's git would run on the host: nothing planted
    listing = ["git", "config", "--file", str(workspace / ".git" / "config"), "--list"]
    config = (await asyncio.to_thread(subprocess.run, listing, capture_output=True, text=True, check=True)).stdout
    assert "fsmonitor" not in config and "alias" not in config


async def test_strict_rename_of_a_parent_does_not_expose_a_denied_path(workspace_root: Path) -> None:
    denied = "/workspace/base/denied-dir/secret.txt"
    config = strict(workspace_root).replace(strict=StrictIsolation(deny_paths=(denied,)))
    secret = workspace_root / "trudy" / "base" / "denied-dir" / "secret.txt"
    async with SandboxOrchestrator(config) as pool:
        await pool.execute("trudy", sh("mkdir -p base/denied-dir"))
        secret.write_text("top-secret")
        os.chmod(secret, 0o644)
    for _ in range(2):  # this run and a later one
        async with SandboxOrchestrator(config) as pool:
            moved = await pool.execute("trudy", sh("mv /workspace/base /workspace/moved; echo rc=$?"))
            read = await pool.execute("trudy", sh("cat /workspace/moved/denied-dir/secret.txt "
                                                  "/workspace/base/denied-dir/secret.txt; grep -r top-secret ."))
        assert "rc=0" not in moved.stdout_text and "Device or resource busy" in moved.stderr_text
        assert "top-secret" not in read.stdout_text + read.stderr_text
    assert secret.read_text() == "top-secret" and not (workspace_root / "trudy" / "moved").exists()
