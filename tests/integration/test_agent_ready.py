"""Agent-ready workers (issue 16 item 2): idle workers preload the SDK, the client and a canned turn.

Real workers (``process`` profile, and ``strict`` where bubblewrap is installed), the offline
model; what is checked is what the worker and the pool report, never a timing.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest

from sandbox_core.config import ProcessSandboxConfig, ResourceLimits
from sandbox_core.isolation import cgroups
from sandbox_core.isolation.launch import LaunchSpec, launch_spec, prepare_workspace
from sandbox_core.kernel import landlock_abi
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.requests import AgentRequest, ExecRequest
from sandbox_core.worker import SandboxWorker
from tests.helpers import pid_alive, process_config, wait_for

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")
PRELOAD_WAIT = 90.0
"""Seconds a preload may take here (about 2 s of CPU on a machine shared with other jobs)."""


def _offline(config: ProcessSandboxConfig) -> ProcessSandboxConfig:
    return config.replace(model=dataclasses.replace(config.model, provider="offline"), request_timeout=90.0)


def _agent_ready_unbound(pool: SandboxOrchestrator) -> list[SandboxWorker]:
    return [w for w in pool._idle_unbound() if w.agent_ready]


async def test_a_prewarmed_worker_is_agent_ready_and_its_first_run_uses_the_preload(workspace_root: Path) -> None:
    config = _offline(process_config(workspace_root, min_idle=1, preload="agent"))
    async with SandboxOrchestrator(config) as pool:
        await wait_for(lambda: bool(_agent_ready_unbound(pool)), PRELOAD_WAIT, "an agent-ready pre-warmed worker")
        (ready,) = _agent_ready_unbound(pool)
        stats = pool.get_pool_stats()
        assert stats["workers"]["agent_ready"] >= 1
        assert stats["preload"] == {"setting": "agent", "mode": "agent", "failed": 0}
        assert ready.preload_report["state"] == "ready" and ready.preload_report["cpu_seconds"] > 0
        result = await pool.execute("alice", AgentRequest(prompt="hello"))
        assert result.worker_id == ready.worker_id
        assert result.result["stop_reason"] == "end_turn"
        assert result.result["preloaded"] is True  # the run took the client (and modules) the preload made
        assert any(e.type == "text" for e in result.events)
        again = await pool.execute("alice", AgentRequest(prompt="and again"))
        assert again.worker_id == ready.worker_id and again.result["preloaded"] is True
        assert again.result["tools_built"] == 0  # the first run's file tools, cached for the workspace


async def test_auto_turns_to_agent_at_the_first_agent_request(workspace_root: Path) -> None:
    config = _offline(process_config(workspace_root, min_idle=1, preload="auto"))
    async with SandboxOrchestrator(config) as pool:
        await wait_for(lambda: bool(pool._idle_unbound()), PRELOAD_WAIT, "a pre-warmed worker")
        exec_result = await pool.execute("alice", ExecRequest(shell="true"))
        await wait_for(lambda: bool(pool._idle_unbound()), PRELOAD_WAIT, "the refill")
        assert pool.get_pool_stats()["preload"]["mode"] == "none"
        assert all(w.preload_state == "none" for w in pool._workers.values())  # exec alone loads nothing
        result = await pool.execute("bob", AgentRequest(prompt="hello"))
        assert result.result["stop_reason"] == "end_turn" and result.result["preloaded"] is True
        assert pool.get_pool_stats()["preload"]["mode"] == "agent"
        await wait_for(lambda: bool(_agent_ready_unbound(pool)), PRELOAD_WAIT, "an agent-ready refill")
        alice = [w for w in pool._workers.values() if w.worker_id == exec_result.worker_id]
        await wait_for(lambda: alice[0].agent_ready, PRELOAD_WAIT, "alice's idle worker to preload")


def _failing_sdk(tmp: Path) -> Any:
    """A launcher whose workers find an ``anthropic`` that cannot be imported."""
    fake = tmp / "fake-site"
    for package in ("anthropic", "httpx2"):
        (fake / package).mkdir(parents=True)
        (fake / package / "__init__.py").write_text("raise ImportError('planted: this SDK cannot load')\n")
    fake.chmod(0o755)

    def launcher(config: ProcessSandboxConfig, worker_id: str, workspace: Path | None) -> LaunchSpec:
        spec = launch_spec(config, worker_id, workspace)
        return dataclasses.replace(spec, plan={**spec.plan, "site_packages": str(fake)})

    return launcher


async def test_a_worker_whose_preload_fails_is_retired_and_preloading_stops(
    workspace_root: Path, tmp_path: Path
) -> None:
    config = _offline(process_config(workspace_root, min_idle=1, preload="agent", start_failure_threshold=2))
    pool = SandboxOrchestrator(config, launcher=_failing_sdk(tmp_path))
    failed: list[SandboxWorker] = []
    record = pool._preloaded

    def noted(worker: SandboxWorker) -> None:
        failed.append(worker)
        record(worker)

    # before the start: its first pre-warm is registered (and given this callback) as it is scheduled
    pool._preloaded = noted  # type: ignore[method-assign]
    async with pool:
        await wait_for(lambda: "stopped" in pool.get_pool_stats()["preload"], PRELOAD_WAIT, "preloading to stop")
        stats = pool.get_pool_stats()
        assert stats["preload"]["failed"] >= 2 and stats["preload"]["mode"] == "none"
        assert "planted" in stats["preload"]["stopped"]
        assert stats["workers"]["agent_ready"] == 0
        assert len(failed) >= 2 and all(w.preload_state == "failed" and not w.healthy for w in failed)
        await wait_for(lambda: all(w.worker_id not in pool._workers for w in failed), 10, "failed workers retired")
        await wait_for(lambda: not any(w.pid and pid_alive(w.pid) for w in failed), 20, "failed workers stopped")
        result = await pool.execute("alice", ExecRequest(shell="echo served"))  # the pool still serves
        assert result.stdout == b"served\n" and result.worker_id not in {w.worker_id for w in failed}


class _Recording(SandboxWorker):
    """Keeps every preload state the worker's answers report, in order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answers: list[str] = []

    def _note_preload(self, report: object) -> None:
        if isinstance(report, dict):
            self.answers.append(str(report.get("state")))
        super()._note_preload(report)


@needs_bwrap
async def test_strict_preload_starts_only_after_confinement_is_complete(workspace_root: Path) -> None:
    config = _offline(process_config(workspace_root, profile="strict", preload="agent"))
    workspace = prepare_workspace(config, "alice")
    worker = _Recording(config, "w-ready", user_id="alice", workspace=workspace, preload="agent")
    await worker.start()
    try:
        # initialize and bind are answered by the blocking handshake, before the serving loop (and
        # any thread) starts; the preload thread starts after both, so with Landlock in force
        assert worker.answers[:2] == ["pending", "pending"]
        await wait_for(lambda: worker.agent_ready, PRELOAD_WAIT, "the strict worker to preload")
        if landlock_abi() > 0:
            assert isinstance(worker.report["landlock"], dict)
            assert worker.preload_report["confined"] == {"landlock": worker.report["landlock"]}
    finally:
        await worker.stop()


@needs_bwrap
async def test_strict_pool_serves_the_first_agent_text_from_the_preload(workspace_root: Path) -> None:
    config = _offline(process_config(workspace_root, profile="strict", preload="agent"))
    async with SandboxOrchestrator(config) as pool:
        (worker_id,) = await pool.launch(1, user_id="alice")
        await wait_for(lambda: pool.get_pool_stats()["workers"]["agent_ready"] == 1, PRELOAD_WAIT, "agent-ready")
        result = await pool.execute("alice", AgentRequest(prompt="hello"))
        assert result.worker_id == worker_id and result.result["preloaded"] is True


_LIMITS = ResourceLimits(cpus=2, cpu_budget_seconds=0.2)


@pytest.mark.skipif(shutil.which("bwrap") is None or cgroups.available(_LIMITS) is not None,
                    reason=f"strict profile with v1 cpu cgroups unavailable: {cgroups.available(_LIMITS)}")
async def test_preload_cpu_is_not_charged_to_the_request_that_waits_for_it(workspace_root: Path) -> None:
    """A worker spawned for an agent request preloads while the request waits: 0.4-2 s of CPU that
    the 0.2 s budget must not count (it counts from ``worker.preloaded``)."""
    config = _offline(process_config(workspace_root, profile="strict", preload="agent", limits=_LIMITS))
    async with SandboxOrchestrator(config) as pool:
        result = await pool.execute("alice", AgentRequest(prompt="hello"))
        worker = pool._workers[result.worker_id]
        assert result.result["stop_reason"] == "end_turn" and result.result["preloaded"] is True
        assert "limits_hit" not in result.result and "kill_reason" not in result.result
        assert worker.preload_report["cpu_seconds"] > _LIMITS.cpu_budget_seconds  # it would have struck
        assert worker.healthy
