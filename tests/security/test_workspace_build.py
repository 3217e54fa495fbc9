"""A strict worker spawned for its user gets its workspace tree built by the host, in a private slot.

The host mounts the workspace's protections on a detached clone before bwrap runs, bwrap binds
the finished tree in one recursive bind, and the host takes its own copy away once the worker
has answered its handshake: the protections stay in force inside, nothing stays mounted on the
host, and a build that fails fails the start closed without leaving a slot or a process.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import IsolationUnavailable
from sandbox_core.isolation import slots, strict, tenants
from sandbox_core.isolation.launch import prepare_workspace
from sandbox_core.requests import ExecRequest
from sandbox_core.worker import SandboxWorker
from tests.helpers import pid_alive, wait_for, watched_log

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="only a root host builds a workspace tree (mount(2) on the host)"),
]

PROBE = (
    "for f in .bashrc .git/config; do echo x >> /workspace/$f 2>/dev/null && echo wrote-$f; done; "
    "echo ok > /workspace/notes.txt && cat /workspace/notes.txt"
)


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    tenants.close_maps()


def _config(tmp_path: Path) -> ProcessSandboxConfig:
    return ProcessSandboxConfig(profile="strict", workspace_root=tmp_path / "ws", state_dir=tmp_path / "state",
                                min_idle=0, startup_timeout=30.0)  # fmt: skip


def _slot_dirs(tmp_path: Path) -> list[str]:
    root = tmp_path / "state" / slots.SLOTS_DIR
    return sorted(os.listdir(root)) if root.exists() else []


def _slot_mounts(tmp_path: Path) -> list[str]:
    return [m for m in slots.mounted_slots() if m.startswith(str(tmp_path))]


async def test_the_host_built_tree_is_gone_from_the_host_and_holds_inside(tmp_path: Path) -> None:
    config = _config(tmp_path)
    workspace = prepare_workspace(config, "alice")
    assert strict.builds_workspace(config, tmp_path, unbound=False)  # the way this test is about
    worker = SandboxWorker(config, "w1", user_id="alice", workspace=workspace)
    await worker.start()
    try:
        # released in the background once the worker has started, while its sandbox keeps its copy
        await wait_for(lambda: _slot_mounts(tmp_path) == [] and _slot_dirs(tmp_path) == [], 10, "the slot released")
        result = await worker.execute("exec", ExecRequest(shell=PROBE).params())
        assert result.exit_code == 0, result.stderr
        assert result.stdout_text.strip() == "ok"  # neither protected file took the write; the rest of the tree did
        assert (workspace / "notes.txt").read_text() == "ok\n"
        assert (workspace / ".bashrc").read_text() == ""  # the host's placeholder, unchanged
    finally:
        await worker.stop()
    assert _slot_mounts(tmp_path) == [] and _slot_dirs(tmp_path) == []


async def test_a_build_that_fails_fails_the_start_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(tmp_path)
    original = slots.move_mount

    def refuse_the_tree(from_dfd: int, from_path: str, to_dfd: int, to_path: str, flags: int) -> None:
        if to_dfd == slots.AT_FDCWD:  # the finished tree onto the slot
            raise OSError(22, "injected failure of the final move_mount")
        original(from_dfd, from_path, to_dfd, to_path, flags)

    monkeypatch.setattr(slots, "move_mount", refuse_the_tree)
    worker = SandboxWorker(config, "w2", user_id="alice", workspace=prepare_workspace(config, "alice"))
    try:
        with pytest.raises(IsolationUnavailable, match=r"cannot mount the workspace.s protections.*injected"):
            await worker.start()
    finally:
        await worker.stop()
    assert worker.pid is None or not pid_alive(worker.pid)
    assert _slot_mounts(tmp_path) == [] and _slot_dirs(tmp_path) == []


async def test_a_release_that_fails_is_logged_and_done_at_the_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host's copy is housekeeping, not a layer: a failed unmount leaves the worker serving,
    says so, and the clean-up after the exit removes the slot."""
    config = _config(tmp_path)
    original = slots.release_path
    calls: list[Path] = []

    def fail_once(path: Path) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise OSError(16, "injected failure of the release")
        original(path)

    monkeypatch.setattr(slots, "release_path", fail_once)
    worker = SandboxWorker(config, "w3", user_id="alice", workspace=prepare_workspace(config, "alice"))
    with watched_log("sandbox_core.worker", monkeypatch) as kept:
        try:
            await worker.start()
            await wait_for(lambda: "injected failure of the release" in kept.text(), 10, "the failed release logged")
            assert "cannot unmount the workspace tree" in kept.text()
            result = await worker.execute("exec", ExecRequest(shell=PROBE).params())
            assert result.exit_code == 0 and result.stdout_text.strip() == "ok"  # serving, protections held
            assert _slot_dirs(tmp_path)  # still there: the exit's clean-up takes it
        finally:
            await worker.stop()
    assert len(calls) == 2
    assert _slot_mounts(tmp_path) == [] and _slot_dirs(tmp_path) == []
