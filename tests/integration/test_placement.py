"""A worker's placement (its spec's ``after_spawn``: into its cgroups) runs beside its handshake.

The worker answers ``initialize`` while the host places it, and is judged, verified and
offered only once the placement is done; a placement that fails fails the start, and what the
spec holds is released only after the placement has ended.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox_core import worker as worker_module
from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import IsolationUnavailable, WorkerStartError
from sandbox_core.isolation.launch import LaunchSpec, prepare_workspace
from sandbox_core.isolation.spec import process_launch
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.requests import ExecRequest
from sandbox_core.worker import SandboxWorker
from tests.helpers import pid_alive, process_config, wait_for, watched_log


def _soft_nofile(pid: int) -> int | None:
    """The process's soft RLIMIT_NOFILE, as ``/proc`` shows it (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/limits") as fh:
            for line in fh:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _confined_within(pid: int, nofile: int, seconds: float) -> bool:
    """Whether the worker applies its plan's rlimits (its ``initialize``) within ``seconds``,
    polled from the placement's own thread."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _soft_nofile(pid) == nofile:
            return True
        time.sleep(0.005)
    return False


def _placing(config: ProcessSandboxConfig, place: Callable[[int, int], None],
             events: list[str]) -> Callable[[ProcessSandboxConfig, str, Path | None], LaunchSpec]:  # fmt: skip
    """A process launcher whose ``after_spawn`` is ``place(pid, planned soft nofile)`` and whose
    clean-up is logged in ``events``."""

    def launcher(cfg: ProcessSandboxConfig, wid: str, ws: Path | None) -> LaunchSpec:
        spec = process_launch(cfg, ws)
        nofile = int(spec.plan["rlimits"]["nofile"])
        return LaunchSpec(spec.argv, spec.env, spec.cwd, spec.plan, workspace_in_sandbox=spec.workspace_in_sandbox,
                          after_spawn=lambda pid: place(pid, nofile),
                          cleanup=lambda: events.append("cleaned"))  # fmt: skip

    return launcher


async def test_the_worker_answers_initialize_while_it_is_placed(tmp_path: Path) -> None:
    config = process_config(tmp_path / "ws")
    events: list[str] = []
    seen: list[bool] = []

    def place(pid: int, nofile: int) -> None:  # ends only once the worker has confined itself
        seen.append(_confined_within(pid, nofile, 10))
        events.append("placed")

    async with SandboxOrchestrator(config, launcher=_placing(config, place, events)) as pool:
        result = await pool.execute("ann", ExecRequest(argv=("true",)))
        assert result.exit_code == 0
        assert seen == [True]  # the handshake did not wait for the placement
    assert events == ["placed", "cleaned"]


async def test_a_placement_that_fails_after_the_handshake_fails_the_start(tmp_path: Path) -> None:
    config = process_config(tmp_path / "ws")
    events: list[str] = []

    def place(pid: int, nofile: int) -> None:
        assert _confined_within(pid, nofile, 10)  # the worker has answered by now, or nearly
        events.append("refused")
        raise IsolationUnavailable("no cgroup for this worker (test)")

    ran = tmp_path / "ran"
    async with SandboxOrchestrator(config, launcher=_placing(config, place, events)) as pool:
        with pytest.raises(IsolationUnavailable, match="no cgroup for this worker"):
            await pool.execute("bea", ExecRequest(argv=("touch", str(ran))))
        assert pool.list_workers() == []
    assert not ran.exists()  # no request reached the worker
    assert events == ["refused", "cleaned"]


async def test_a_start_cut_short_releases_the_spec_only_after_its_placement(tmp_path: Path) -> None:
    config = process_config(tmp_path / "ws", startup_timeout=1.0)
    events: list[str] = []
    release = threading.Event()

    def place(pid: int, nofile: int) -> None:  # outlives the start's time limit
        release.wait(30)
        events.append("placed")

    worker = SandboxWorker(config, "w-cut", user_id="cid", workspace=prepare_workspace(config, "cid"),
                           launcher=_placing(config, place, events))  # fmt: skip
    starting = asyncio.ensure_future(worker.start())
    await wait_for(lambda: worker.pid is not None, 10, "the worker to be spawned")
    pid = worker.pid
    assert pid is not None
    await wait_for(lambda: not pid_alive(pid), 10, "the worker to be killed at its time limit")
    assert events == []  # killed, and its spec still held: the placement has not ended
    release.set()
    with pytest.raises(WorkerStartError, match="did not finish its handshake"):
        await starting
    assert events == ["placed", "cleaned"]


async def test_a_placement_that_never_ends_delays_the_clean_up_only_so_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_module, "PLACEMENT_WAIT", 0.5)
    config = process_config(tmp_path / "ws", startup_timeout=1.0)
    events: list[str] = []
    release = threading.Event()

    def place(pid: int, nofile: int) -> None:  # a kernel that never answers, as far as the start can tell
        release.wait(30)
        events.append("placed")

    worker = SandboxWorker(config, "w-hung", user_id="hal", workspace=prepare_workspace(config, "hal"),
                           launcher=_placing(config, place, events))  # fmt: skip
    try:
        with watched_log("sandbox_core.worker", monkeypatch) as kept, \
                pytest.raises(WorkerStartError, match="did not finish its handshake"):  # fmt: skip
            await worker.start()
        assert events == ["cleaned"]  # the clean-up went ahead, bounded, and said why
        assert "placement did not end" in kept.text()
    finally:
        release.set()
    await wait_for(lambda: events == ["cleaned", "placed"], 10, "the hung placement to end once let go")
