"""Disk quotas per workspace (an ext4 image, loop-mounted): bytes and inodes, enforced by the kernel."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandbox_core.config import ResourceLimits
from sandbox_core.errors import FileTransferError, IsolationUnavailable
from sandbox_core.isolation import quota
from sandbox_core.isolation.launch import prepare_workspace
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.requests import ExecRequest
from tests.helpers import process_config

_PROBE = process_config(Path("/tmp"), state_dir=Path("/tmp")).replace(profile="strict",
                                                                      limits=ResourceLimits(workspace_mb=8))
WHY = quota.unavailable(_PROBE) or (None if shutil.which("bwrap") else "bubblewrap is not installed")
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"disk quotas cannot be enforced here: {WHY}")


@pytest.fixture
async def quota_pool(tmp_path: Path) -> AsyncIterator[SandboxOrchestrator]:
    config = process_config(tmp_path / "ws", state_dir=tmp_path / "state").replace(
        profile="strict", limits=ResourceLimits(workspace_mb=16, workspace_inodes=256))
    try:
        async with SandboxOrchestrator(config) as pool:
            yield pool
    finally:
        for user in ("alice", "bob"):
            quota.release(config, config.workspace_root / user)


async def test_writing_past_workspace_mb_fails_inside_and_spares_the_host(quota_pool: SandboxOrchestrator) -> None:
    config = quota_pool.config
    before = shutil.disk_usage("/").free
    result = await quota_pool.execute("alice", ExecRequest(shell="dd if=/dev/zero of=big bs=1M count=40 2>&1; "
                                                                 "echo exit=$?; df -k . | tail -1"))
    assert "No space left on device" in result.stdout_text and "exit=1" in result.stdout_text
    report = quota_pool.worker_report(result.worker_id) or {}
    assert report["disk_quota"] == {"mechanism": quota.MECHANISM, "workspace_mb": 16, "workspace_inodes": 256}
    image = config.state_dir / "images" / "alice.img"
    assert image.stat().st_size == 16 * 1024 * 1024 and image.stat().st_blocks * 512 <= 17 * 1024 * 1024
    assert before - shutil.disk_usage("/").free < 30 * 1024 * 1024  # 40 MB never reached the host's disk
    workspace = config.workspace_root / "alice"
    assert quota.mounted_image(workspace) is not None
    st = workspace.stat()
    assert oct(st.st_mode & 0o777) == "0o700" and st.st_uid not in (0, 65534)
    assert "big" in os.listdir(workspace) and "lost+found" not in os.listdir(workspace)
    with pytest.raises(FileTransferError, match="disk quota exceeded") as full:
        await quota_pool.files.put("alice", "more.bin", os.urandom(4 * 1024 * 1024))
    assert full.value.data["reason"] == "quota"
    bob = await quota_pool.execute("bob", ExecRequest(shell="head -c 1000000 /dev/zero > f && echo ok"))
    assert bob.stdout_text == "ok\n"  # alice's full disk is hers alone


async def test_the_inode_quota(quota_pool: SandboxOrchestrator) -> None:
    result = await quota_pool.execute("alice", ExecRequest(shell="i=0; while [ $i -lt 400 ]; do true > f$i || break; "
                                                                 "i=$((i+1)); done; echo made=$i"))
    made = int(result.stdout_text.split("made=")[1])
    assert 200 <= made < 256 and "No space left on device" in result.stderr_text


def test_a_quota_that_cannot_be_enforced_fails_closed(tmp_path: Path) -> None:
    config = process_config(tmp_path / "ws", state_dir=tmp_path / "state", limits=ResourceLimits(workspace_mb=8))
    with pytest.raises(IsolationUnavailable, match="cannot be enforced: disk quotas need the strict profile"):
        prepare_workspace(config, "alice")
    strict = config.replace(profile="strict")
    (strict.workspace_root / "carol").mkdir(parents=True)
    (strict.workspace_root / "carol" / "old.txt").write_text("data from before the quota")
    with pytest.raises(IsolationUnavailable, match="holds files outside a quota image"):
        prepare_workspace(strict, "carol")


