"""A one-shot pool's worker spawned before the pool (sandbox_core/head_start.py).

The head start is adopted by its user's first spawn and checked like any worker; one that
is not adopted, or whose process died or could not be placed, leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import IsolationUnavailable, WorkerStartError
from sandbox_core.head_start import HeadStart, begin
from sandbox_core.inside.boot import _frame_waiting
from sandbox_core.isolation import cgroups
from sandbox_core.isolation.launch import LaunchSpec
from sandbox_core.isolation.slots import mounted_slots
from sandbox_core.isolation.spec import process_launch
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.requests import ExecRequest
from tests.helpers import pid_alive, process_config, wait_for

needs_strict = pytest.mark.skipif(
    shutil.which("bwrap") is None or cgroups.available() is not None,
    reason=f"strict profile with cgroups unavailable: bwrap={shutil.which('bwrap')}, {cgroups.available()}",
)


def _strict(tmp_path: Path) -> ProcessSandboxConfig:
    return process_config(tmp_path / "ws", state_dir=tmp_path / "state").replace(profile="strict")


@contextlib.contextmanager
def _begun(config: ProcessSandboxConfig, user: str, **kwargs: Any) -> Iterator[tuple[HeadStart, int]]:
    """A head start and its pid; discarded at the end whatever the test did (a failed assertion
    must not leave the process to the garbage collector and the next test)."""
    head = begin(config, user, **kwargs)
    pid = head.pid
    assert pid is not None
    try:
        yield head, pid
    finally:
        head.discard()


def _worker_cgroups(worker_id: str) -> list[Path]:
    """This process's cgroup directories of ``worker_id`` (v1 controllers)."""
    found: list[Path] = []
    for controller in cgroups.CONTROLLERS + cgroups.CPU_CONTROLLERS:
        base = cgroups.own_cgroup(controller)
        if base is not None:
            found += [p for p in (base / cgroups.SUBTREE).glob(f"o{os.getpid()}.*/*{worker_id}*") if p.is_dir()]
    return found


@needs_strict
async def test_the_pool_adopts_the_head_start_as_its_users_worker_and_verifies_it(tmp_path: Path) -> None:
    config = _strict(tmp_path)
    with _begun(config, "alice") as (head, pid):
        assert pid_alive(pid)
        # placed from a thread while the host goes on: its cgroups appear meanwhile
        await wait_for(lambda: bool(_worker_cgroups(head.worker_id)), 10, "the head start's cgroups")
        async with SandboxOrchestrator(config, head_start=head) as pool:
            result = await pool.execute("alice", ExecRequest(shell="echo ok; id -u"))
            assert result.stdout.split(b"\n")[0] == b"ok"
            workers = pool.list_workers()
            assert [(w["worker_id"], w["pid"], w["user_id"]) for w in workers] == [(head.worker_id, pid, "alice")]
            assert pool.get_pool_stats()["spawned"] == 1  # adopted, not spawned again
            report = pool.worker_report(head.worker_id)
            assert report is not None and report["verified_by_host"]
            assert not head.pending
    assert not pid_alive(pid)
    assert _worker_cgroups(head.worker_id) == []
    assert mounted_slots() == []


@needs_strict
async def test_a_head_start_for_another_user_is_not_adopted_and_is_discarded_at_shutdown(tmp_path: Path) -> None:
    config = _strict(tmp_path)
    with _begun(config, "bob") as (head, pid):
        async with SandboxOrchestrator(config, head_start=head) as pool:
            await pool.execute("alice", ExecRequest(argv=("true",)))
            assert [w["user_id"] for w in pool.list_workers()] == ["alice"]
            assert head.pending and pid_alive(pid)
        assert head.pid is None  # discarded
    assert not pid_alive(pid)
    assert _worker_cgroups(head.worker_id) == []
    assert mounted_slots() == []


@needs_strict
def test_a_discarded_head_start_leaves_no_process_and_no_cgroup(tmp_path: Path) -> None:
    head = begin(_strict(tmp_path), "carol")
    pid = head.pid
    assert pid is not None
    head.discard()
    head.discard()  # once is enough; more do nothing
    assert not pid_alive(pid)
    assert _worker_cgroups(head.worker_id) == []


async def test_a_head_start_that_died_before_adoption_fails_the_start_and_leaves_nothing(tmp_path: Path) -> None:
    config = process_config(tmp_path / "ws")
    cleaned: list[bool] = []

    def launcher(cfg: ProcessSandboxConfig, wid: str, ws: Path | None) -> LaunchSpec:
        spec = process_launch(cfg, ws)
        return LaunchSpec([sys.executable, "-c", "import sys; sys.exit(3)"], spec.env, spec.cwd, spec.plan,
                          cleanup=lambda: cleaned.append(True))  # fmt: skip

    with _begun(config, "dave", launcher=launcher) as (head, pid):
        await wait_for(lambda: _zombie(pid), 10, "the head start's process to exit")
        async with SandboxOrchestrator(config, launcher=launcher, head_start=head) as pool:
            with pytest.raises(WorkerStartError, match=r"failed to start|exited"):
                await pool.execute("dave", ExecRequest(argv=("true",)))
            assert pool.list_workers() == []
    assert not pid_alive(pid) and not _zombie(pid)  # reaped
    assert cleaned == [True]


async def test_a_head_start_that_cannot_be_placed_fails_the_start_with_that_error(tmp_path: Path) -> None:
    config = process_config(tmp_path / "ws")
    cleaned: list[bool] = []

    def refuse(pid: int) -> None:
        raise IsolationUnavailable("no cgroup for this worker (test)")

    def launcher(cfg: ProcessSandboxConfig, wid: str, ws: Path | None) -> LaunchSpec:
        spec = process_launch(cfg, ws)
        return LaunchSpec(spec.argv, spec.env, spec.cwd, spec.plan, after_spawn=refuse,
                          cleanup=lambda: cleaned.append(True))  # fmt: skip

    with _begun(config, "erin", launcher=launcher) as (head, pid):
        async with SandboxOrchestrator(config, launcher=launcher, head_start=head) as pool:
            with pytest.raises(IsolationUnavailable, match="no cgroup for this worker"):
                await pool.execute("erin", ExecRequest(argv=("true",)))
            assert pool.list_workers() == []
    assert not pid_alive(pid) and not _zombie(pid)
    assert cleaned == [True]


def test_the_worker_sees_whether_the_host_has_written_yet() -> None:
    """What decides whether a new worker imports its serving loop before its handshake."""
    read, write = os.pipe()
    try:
        assert not _frame_waiting(read)  # nothing yet: the host is still loading
        os.write(write, b'{"jsonrpc": "2.0"')
        assert _frame_waiting(read)
    finally:
        os.close(read)
        os.close(write)
    read, write = os.pipe()
    os.close(write)
    try:
        assert _frame_waiting(read)  # the host went away: the handshake sees the end at once
    finally:
        os.close(read)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return False
