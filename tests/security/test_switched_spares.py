"""Pre-warmed strict workers switched ahead to their spare's uid (``new_user_spares``), with real workers.

Such a worker serves a new user only, as that user's uid; a returning user never gets it; a
worker that cannot switch, or whose switch the host does not see in ``/proc``, or that dies
while switching, is never offered, and leaves no process, mount or spare directory behind. Its
uid is never given back, since a process ran as it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from sandbox_core.errors import CircuitOpen, IsolationUnavailable, SandboxError
from sandbox_core.isolation import spares, tenants, verify
from sandbox_core.isolation.launch import can_switch_ahead
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.process_tree import descendants
from sandbox_core.requests import ExecRequest
from sandbox_core.worker import SandboxWorker
from tests.helpers import pid_alive, wait_for
from tests.security.claims import NEEDS_UNBOUND_STRICT, claim_config, fresh_uid_maps, slot_mounts  # noqa: F401

pytestmark = NEEDS_UNBOUND_STRICT


def _config(tmp_path: Path, **changes: Any) -> Any:
    return claim_config(tmp_path, **{"new_user_spares": 1, **changes})


def _spare_dirs(config: Any) -> list[str]:
    return sorted(n for n in os.listdir(config.workspace_root) if n.startswith(tenants.SPARE_PREFIX))


def _uids_in(pid: int) -> set[tuple[int, ...]]:
    """The (real, effective, saved, fs) uids of every process of the sandbox below ``pid``, from /proc."""
    seen = set()
    for each in (pid, *descendants(pid)):
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except FileNotFoundError:
            continue
        (line,) = [x for x in status.splitlines() if x.startswith("Uid:")]
        seen.add(tuple(int(v) for v in line.split()[1:]))
    return seen


def _switched(pool: SandboxOrchestrator) -> list[SandboxWorker]:
    return [w for w in pool._workers.values() if w.user_id is None and w.new_users_only]


async def _switched_ready(pool: SandboxOrchestrator) -> SandboxWorker:
    await wait_for(lambda: pool.get_pool_stats()["workers"]["prewarmed_new_users"] >= 1, 30, "a switched worker")
    (worker,) = _switched(pool)
    return worker


def test_only_strict_pools_with_a_uid_per_user_switch_ahead(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert can_switch_ahead(config)
    assert not can_switch_ahead(config.replace(profile="process"))
    assert not can_switch_ahead(config.replace(strict=dataclasses.replace(config.strict, sandbox_user="nobody")))


async def test_a_new_user_claims_a_worker_already_running_as_its_spares_uid(tmp_path: Path) -> None:
    config = _config(tmp_path)
    async with SandboxOrchestrator(config) as pool:
        worker = await _switched_ready(pool)
        assert pool.get_pool_stats()["workers"]["prewarmed"] == 1  # min_idle counts it: no second worker
        (name,) = _spare_dirs(config)
        spare_uid = tenants.assigned(config)[name]
        assert worker.pid is not None  # before any claim: the worker runs as the spare's uid (bwrap stays root)
        assert (spare_uid,) * 4 in _uids_in(worker.pid) and _uids_in(worker.pid) <= {(0,) * 4, (spare_uid,) * 4}
        assert worker.report["uid"] == spare_uid
        assert {"identity", "capabilities"} <= set(worker.report["verified_by_host"])
        result = await pool.execute("alice", ExecRequest(shell="id -u; pwd; echo mine > a.txt; "
                                                               "grep -E '^CapEff' /proc/self/status"))  # fmt: skip
        assert result.exit_code == 0, result.stderr_text
        assert result.worker_id == worker.worker_id and worker.claimed_spare
        assert result.stdout_text.splitlines()[:2] == [str(spare_uid), "/workspace"]
        assert result.stdout_text.splitlines()[2].endswith("0000000000000000")
        assert tenants.identity_for(config, "alice").uid == spare_uid
        assert (config.workspace_for("alice") / "a.txt").stat().st_uid == spare_uid
        assert pool.get_pool_stats()["claim_fallbacks"] == 0
        assert worker.claim_seconds["verify"] < worker.claim_seconds["bind"]  # nothing left to re-check
    assert slot_mounts(tmp_path) == []


@pytest.mark.parametrize("has", ["a workspace", "a uid"])
async def test_a_returning_user_never_gets_a_worker_switched_to_another_uid(tmp_path: Path, has: str) -> None:
    config = _config(tmp_path)
    if has == "a workspace":
        config.workspace_for("judy").parent.mkdir(parents=True, exist_ok=True)
        config.workspace_for("judy").mkdir(mode=0o700)
    judy = tenants.identity_for(config, "judy").uid
    async with SandboxOrchestrator(config) as pool:
        switched = await _switched_ready(pool)
        result = await pool.execute("judy", ExecRequest(shell="id -u"))
        assert result.exit_code == 0 and result.stdout_text.strip() == str(judy)
        assert result.worker_id != switched.worker_id
        assert switched.user_id is None and switched.alive and _switched(pool) == [switched]  # still waiting
        assert pool.get_pool_stats()["claim_fallbacks"] == 0  # never tried: chosen by kind, not by failure
        again = await pool.execute("newcomer", ExecRequest(shell="id -u"))
        assert again.worker_id == switched.worker_id and again.stdout_text.strip() != str(judy)
    assert slot_mounts(tmp_path) == []


async def test_a_switched_worker_refuses_a_second_switch_and_a_bind_to_another_uid(tmp_path: Path) -> None:
    config = _config(tmp_path)
    async with SandboxOrchestrator(config) as pool:
        worker = await _switched_ready(pool)
        uid = worker.report["uid"]
        with pytest.raises(SandboxError, match="has not switched its uid yet"):
            await worker.call("assume", {"uid": uid + 1, "gid": uid + 1, "expect_mounts": []})
        with pytest.raises(IsolationUnavailable, match="another uid"):
            await worker.call("bind", {"user_id": "mallory", "workspace": "/workspace", "uid": uid + 1, "gid": uid + 1})
        with pytest.raises(SandboxError, match="never retried"):  # one attempt: it only awaits its shutdown now
            await worker.call("bind", {"user_id": "mallory", "workspace": "/workspace", "uid": uid, "gid": uid})
        assert worker.pid is not None and _uids_in(worker.pid) <= {(0,) * 4, (uid,) * 4}
    assert slot_mounts(tmp_path) == []


async def _never_offered(pool: SandboxOrchestrator, config: Any, tmp_path: Path, failures: int = 1) -> None:
    """The pool's switched workers fail their start: none is offered, each leaves nothing but its burned uid."""
    await wait_for(lambda: pool.get_pool_stats()["start_failures"] >= failures, 30, "the failed starts")
    assert pool.get_pool_stats()["workers"]["prewarmed_new_users"] == 0
    assert all(w.user_id is not None or not w.new_users_only or w.state.value in ("new", "starting")
               for w in pool._workers.values())  # fmt: skip


@pytest.mark.parametrize(("fault", "why"), [("the worker refuses", "should be a ro mount point"),
                                           ("the host sees another uid", "uid"), ("the worker dies", "worker")])
async def test_a_worker_that_does_not_switch_as_planned_is_never_offered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, why: str
) -> None:
    config = _config(tmp_path, start_failure_threshold=2, circuit_reset=600.0)
    pledged: list[str] = []
    pids: list[int] = []
    pledge = spares.Spare.pledge

    def pledge_and_note(self: spares.Spare) -> dict[str, Any] | None:
        answer = pledge(self)
        pledged.append(self.name)
        if answer is not None and fault == "the worker refuses":  # a mount the sandbox does not have
            answer = {**answer, "expect_mounts": [*answer["expect_mounts"], ["/workspace/.nowhere", "ro"]]}
        return answer

    monkeypatch.setattr(spares.Spare, "pledge", pledge_and_note)
    if fault == "the host sees another uid":
        expectations = verify.claim_expectations
        monkeypatch.setattr(verify, "claim_expectations",
                            lambda cfg, plan, uid, gid: expectations(cfg, plan, uid + 1, gid + 1))  # fmt: skip
    if fault == "the worker dies":
        call = SandboxWorker.call

        async def die_on_assume(self: SandboxWorker, method: str, params: Any = None, timeout: Any = None) -> Any:
            if method == "assume" and self.pid is not None:
                pids.extend([self.pid, *descendants(self.pid)])
                os.kill(self.pid, signal.SIGKILL)
            return await call(self, method, params, timeout)

        monkeypatch.setattr(SandboxWorker, "call", die_on_assume)
    async with SandboxOrchestrator(config) as pool:
        await _never_offered(pool, config, tmp_path, failures=2)
        assert pool.get_pool_stats()["circuit"] == "open"  # it stops trying, and says why
        with pytest.raises(CircuitOpen, match=why):
            await pool.execute("zed", ExecRequest(shell="id -u"))
        assert len(pledged) >= 2 and not any(w.user_id for w in pool._workers.values())
        await wait_for(lambda: not set(pledged) & set(_spare_dirs(config)), 10, "the spare directories removed")
        assert set(pledged) <= set(tenants.assigned(config))  # a process was told to run as them: never reused
    await wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "the dead worker's processes")
    assert slot_mounts(tmp_path) == []
    assert _spare_dirs(config) == []


async def test_min_idle_bounds_the_switched_workers_and_the_reaper_keeps_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``new_user_spares`` counts within ``min_idle``; the demand's extra workers are for any
    user, and once idle past ``worker_timeout`` they go while the switched ones stay."""
    from sandbox_core import orchestrator

    monkeypatch.setattr(orchestrator, "DEMAND_WINDOW", 600.0)  # every claim of this test counts
    config = _config(tmp_path, min_idle=2, new_user_spares=5, worker_timeout=0.3, cleanup_interval=3600.0)

    def kinds() -> tuple[int, int]:
        stats = pool.get_pool_stats()["workers"]
        return stats["prewarmed_new_users"], stats["prewarmed"] - stats["prewarmed_new_users"]

    def quiet() -> bool:
        return not any(w["state"] in ("new", "starting") for w in pool.list_workers())

    async with SandboxOrchestrator(config) as pool:
        await wait_for(lambda: kinds() == (2, 0) and quiet(), 30, "two switched workers (capped by min_idle)")
        for user in ("u1", "u2", "u3"):  # three claims: the demand keeps three warm, one for any user
            await wait_for(lambda: kinds()[0] == 2 and quiet(), 30, "the refill")
            result = await pool.execute(user, ExecRequest(argv=("true",)))
            assert pool._workers[result.worker_id].claimed_spare
        await wait_for(lambda: kinds() == (2, 1) and quiet(), 30, "the refill of both kinds")
        monkeypatch.setattr(orchestrator, "DEMAND_WINDOW", 0.0)  # the demand is over
        await wait_for(lambda: all(w["idle_s"] > 0.3 for w in pool.list_workers() if w["state"] == "idle"), 10,
                       "every idle worker past worker_timeout")  # fmt: skip
        await pool.cleanup_idle_workers()
        assert kinds() == (2, 0)
        assert not any(w["user_id"] for w in pool.list_workers())  # the users' idle workers were reaped too
    assert slot_mounts(tmp_path) == []


async def test_an_agent_worker_switches_ahead_once_its_preload_ended_and_serves_a_new_user(tmp_path: Path) -> None:
    """preload = "agent": the preload thread runs while the worker waits, and is gone before the
    switch (``assume`` waits for it: capabilities are per thread); the new user's agent run then
    finds the worker agent-ready, already running as the spare's uid."""
    from sandbox_core.requests import AgentRequest

    base = _config(tmp_path, preload="agent", request_timeout=90.0)
    config = base.replace(model=dataclasses.replace(base.model, provider="offline"))
    async with SandboxOrchestrator(config) as pool:
        await wait_for(lambda: pool.get_pool_stats()["workers"]["prewarmed_new_users"] >= 1, 90,
                       "a switched, agent-ready worker")  # fmt: skip
        (worker,) = _switched(pool)
        assert worker.agent_ready and set(worker.preload_report["confined"]) == {"before_bind"}
        assert worker.pid is not None and (worker.report["uid"],) * 4 in _uids_in(worker.pid)
        result = await pool.execute("bea", AgentRequest(prompt="hello"))
        assert result.worker_id == worker.worker_id and worker.claimed_spare
        assert "".join(e.data.get("text", "") for e in result.events if e.type == "text")
        assert result.result["tools_built"] == 0 and pool.get_pool_stats()["preload"]["failed"] == 0
    assert slot_mounts(tmp_path) == []


async def test_a_preload_asked_for_after_the_switch_is_over_before_the_claims_landlock(tmp_path: Path) -> None:
    """A preload asked of a worker that has switched already (``preload = "auto"`` turns to agent
    at the pool's first agent request) runs its thread as the spare's uid; the claim's bind waits
    for it to end before Landlock, which refuses a process with a second thread."""
    from sandbox_core.kernel import landlock_abi

    if landlock_abi() == 0:
        pytest.skip("this kernel has no Landlock")
    base = _config(tmp_path, preload="auto")
    config = base.replace(model=dataclasses.replace(base.model, provider="offline"))
    async with SandboxOrchestrator(config) as pool:
        worker = await _switched_ready(pool)
        assert worker.preload_state == "none"
        await worker.preload_agent()  # what the pool asks of its idle workers once it turns to agent
        assert worker.preload_state in ("pending", "running")  # the SDK's import takes about a second
        result = await pool.execute("newbie", ExecRequest(shell="id -u"))
        assert result.exit_code == 0 and result.stdout_text.strip() == str(worker.report["uid"])
        assert result.worker_id == worker.worker_id and pool.get_pool_stats()["claim_fallbacks"] == 0
        assert worker.report["landlock"]["abi"] == landlock_abi()
    assert slot_mounts(tmp_path) == []


async def test_a_user_the_host_cannot_tell_is_new_gets_another_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the quick look at the workspace and uid map fails (an OSError), the switched worker
    is not offered: the request is served by a worker started for the user, the pool intact."""
    config = _config(tmp_path)
    async with SandboxOrchestrator(config) as pool:
        switched = await _switched_ready(pool)

        def cannot_tell(cfg: Any, user_id: str) -> bool:
            raise PermissionError(13, "injected: the uid map cannot be read")

        monkeypatch.setattr(spares, "is_new_user", cannot_tell)
        result = await pool.execute("quinn", ExecRequest(shell="id -u"))
        monkeypatch.undo()
        assert result.exit_code == 0 and result.worker_id != switched.worker_id
        assert result.stdout_text.strip() == str(tenants.identity_for(config, "quinn").uid)
        assert switched.user_id is None and _switched(pool) == [switched]
    assert slot_mounts(tmp_path) == []
