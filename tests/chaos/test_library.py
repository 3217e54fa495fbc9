"""Chaos against the library: mixed load, a killer, rogue workers, storms, shutdown under load.

Small counts (``benchmarks/chaos.py`` runs the full ones). Each test asserts the invariants:
0 lost, 0 misrouted, 0 duplicated, every failure a typed SandboxError, no process or cgroup
left, host RSS growth and event-loop lag bounded. The ``strict`` profile where the point is
isolation (answers reach only their own user), ``process`` where it is the orchestrator.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from sandbox_core import worker as worker_module
from sandbox_core.bench import LoopLag
from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import PoolClosed, SandboxError
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.requests import ExecRequest, RawRequest
from tests.chaos import harness
from tests.chaos.harness import Killer, Ledger, pool_of, run_load, run_one
from tests.helpers import pid_alive, process_config, wait_for

LAG_P99_BOUND = 0.5
"""Seconds: generous, for a loaded 2-core machine (the benchmark prints the real figure)."""
RSS_GROWTH_MB = 150


def _config(root: Path, **changes: object) -> ProcessSandboxConfig:
    base = {"max_workers": 6, "max_workers_per_user": 2, "acquire_timeout": 120.0, "request_timeout": 60.0}
    return process_config(root, **{**base, **changes})


async def _no_leftovers(worker_ids: set[str]) -> None:
    """No descendant process (live or zombie) and no cgroup of ours is left."""
    await wait_for(lambda: not harness.live_descendants(), 15, "every worker process to be gone")
    await wait_for(lambda: not harness.leftover_cgroups(worker_ids), 15, "the workers' cgroups to be removed")


async def test_mixed_users_and_sizes_reach_only_their_own_caller(workspace_root: Path) -> None:
    """Strict: 8 users, sizes 0 B to 1 MiB, a third through stdin; every answer byte-exact."""
    if not harness.strict_available():
        pytest.skip("bubblewrap (bwrap) is not installed")
    ledger, rng = Ledger(), random.Random(17)
    users = [f"mix{i}" for i in range(8)]
    rss = harness.status_mb("VmRSS")
    async with LoopLag() as lag, pool_of(_config(workspace_root).replace(profile="strict")) as pool:
        await run_load(harness.mixed_jobs(pool, ledger, rng, 40, users), in_flight=6)
    ledger.assert_clean()
    assert ledger.kinds() == {"ok": 40}
    assert harness.status_mb("VmRSS") - rss < RSS_GROWTH_MB
    assert harness.percentile(lag.samples, 0.99) < LAG_P99_BOUND
    await _no_leftovers(set(ledger.worker_owner))


async def test_killed_workers_fail_their_request_only(workspace_root: Path) -> None:
    """A killer SIGKILLs the worker of a random running request every few starts: that request
    ends with WorkerCrashed, every other one is untouched, and the user gets a fresh worker."""
    ledger, rng = Ledger(), random.Random(23)
    users = [f"k{i}" for i in range(6)]
    async with pool_of(_config(workspace_root)) as pool:
        killer = Killer(pool, ledger, rng, every=5)
        hunting = asyncio.create_task(killer.run())
        try:
            await run_load(harness.mixed_jobs(pool, ledger, rng, 48, users, pause=0.2), in_flight=8)
        finally:
            hunting.cancel()
            await asyncio.gather(hunting, return_exceptions=True)
        ledger.assert_clean()
        crashed = killer.check(ledger)
        assert crashed >= 1 and len(killer.killed) >= 3, (crashed, killer.killed)
        assert pool.get_pool_stats()["crashes"] >= crashed
        for user in users:  # everyone is served again
            request, want = harness.request_for(f"after-{user}", 100)
            assert (await run_one(pool, ledger, user, f"after-{user}", request, want)).kind == "ok"
    ledger.assert_clean()
    await _no_leftovers(set(ledger.worker_owner))


async def test_rogue_workers_and_a_stopped_one_cost_only_their_own_requests(
    workspace_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every hostile mode (garbage, deep, wrong types, unknown ids, binary, floods, half frames,
    host-call floods, forged codes) and a SIGSTOPped worker, beside honest users under load:
    the rogues' requests fail typed (or succeed), the honest ones are all byte-exact."""
    monkeypatch.setattr(worker_module, "WRITE_TIMEOUT", 2.0)
    ledger, rng = Ledger(), random.Random(29)
    honest = [f"h{i}" for i in range(4)]
    config = _config(workspace_root, max_workers=8, request_timeout=20.0)
    rss = harness.status_mb("VmRSS")
    async with LoopLag() as lag, pool_of(config, launcher=harness.hostile_launcher()) as pool:
        rogue_jobs: list[Callable[[], Awaitable[object]]] = [
            functools.partial(run_one, pool, ledger, f"rogue-{mode}-{k}", f"rogue-{mode}-{k}", RawRequest("ping"), None)
            for mode in harness.HOSTILE_MODES for k in range(2)
        ]

        async def stopped(rid: str, request: ExecRequest | RawRequest) -> None:
            """A worker that stops reading (a command can SIGSTOP its own worker)."""
            await run_one(pool, ledger, rid, f"{rid}-warm", ExecRequest(argv=("true",)), b"")
            pid = next(w["pid"] for w in pool.list_workers() if w["user_id"] == rid)
            os.kill(pid, signal.SIGSTOP)
            await run_one(pool, ledger, rid, rid, request, None)

        stopped_jobs: list[Callable[[], Awaitable[object]]] = [
            functools.partial(stopped, "stopped-ping", RawRequest("ping", {"pad": "x" * 2_000_000})),
            functools.partial(stopped, "stopped-stdin", ExecRequest(argv=("cat",), stdin=bytes(1 << 20), timeout=3.0)),
        ]
        jobs = harness.mixed_jobs(pool, ledger, rng, 32, honest) + rogue_jobs + stopped_jobs
        rng.shuffle(jobs)
        await run_load(jobs, in_flight=8)
    ledger.assert_clean()
    for outcome in ledger.outcomes.values():
        if outcome.user in honest:
            assert outcome.kind == "ok", (outcome.rid, outcome.kind, outcome.error)
        else:
            assert outcome.kind == "ok" or isinstance(outcome.error, SandboxError), outcome
    kinds = {o.rid: o.kind for o in ledger.outcomes.values()}
    assert kinds["stopped-ping"] == "WorkerCrashed" and kinds["stopped-stdin"] in ("RequestTimeout", "WorkerCrashed")
    assert kinds["rogue-forge-0"] == "RemoteError" and kinds["rogue-deep-0"] == "ProtocolError"
    assert harness.status_mb("VmRSS") - rss < RSS_GROWTH_MB
    assert harness.percentile(lag.samples, 0.99) < LAG_P99_BOUND
    await _no_leftovers(set(ledger.worker_owner))


async def test_cancel_and_timeout_storms_leave_the_pool_whole(workspace_root: Path) -> None:
    """A third of the requests time out, a third are cancelled by their caller while running:
    each ends as such, the rest are byte-exact, the stats add up and nothing they started is left."""
    ledger, rng = Ledger(), random.Random(31)
    users = [f"s{i}" for i in range(6)]
    plan = [rng.choice(("ok", "timeout", "cancel")) for _ in range(45)]
    async with pool_of(_config(workspace_root)) as pool:
        async def job(n: int, what: str) -> None:
            user, rid = users[n % len(users)], f"storm{n}"
            if what == "ok":
                request, want = harness.request_for(rid, rng.choice(harness.SIZES))
                await run_one(pool, ledger, user, rid, request, want)
            elif what == "timeout":
                await run_one(pool, ledger, user, rid, ExecRequest(shell="sleep 60", timeout=0.5), None)
            else:
                task = asyncio.create_task(run_one(pool, ledger, user, rid, ExecRequest(shell="sleep 60"), None))
                await wait_for(lambda: rid in ledger.in_flight or task.done(), 120, f"{rid} to start")
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        await run_load([functools.partial(job, n, w) for n, w in enumerate(plan)], in_flight=8)
        ledger.assert_clean()
        kinds = {o.rid: o.kind for o in ledger.outcomes.values()}
        for n, what in enumerate(plan):
            assert kinds[f"storm{n}"] == {"ok": "ok", "timeout": "RequestTimeout", "cancel": "cancelled"}[what]
        stats = pool.get_pool_stats()["requests"]
        assert stats["in_flight"] == 0
        assert (stats["ok"], stats["timed_out"], stats["cancelled"]) == (
            plan.count("ok"), plan.count("timeout"), plan.count("cancel"))

        def sleepers() -> list[int]:
            return [p for p in harness.live_descendants() if pid_alive(p) and _comm(p) == "sleep"]

        await wait_for(lambda: not sleepers(), 15, "every command of the storm to be gone")
        for user in users:
            request, want = harness.request_for(f"after-{user}", 4096)
            assert (await run_one(pool, ledger, user, f"after-{user}", request, want)).kind == "ok"
    ledger.assert_clean()
    await _no_leftovers(set(ledger.worker_owner))


async def test_shutdown_under_load_ends_every_request_and_leaves_nothing(workspace_root: Path) -> None:
    """shutdown() while requests run and queue: each one ends ok (byte-exact) or PoolClosed,
    and when shutdown returns no worker process is alive (spawning ones included)."""
    ledger, rng = Ledger(), random.Random(37)
    users = [f"d{i}" for i in range(8)]
    pool = SandboxOrchestrator(_config(workspace_root, shutdown_grace=0.5))
    await pool.start()
    jobs = harness.mixed_jobs(pool, ledger, rng, 40, users, pause=0.3)
    load = asyncio.create_task(run_load(jobs, in_flight=40))
    await wait_for(lambda: ledger.started_count >= 6, 60, "the load to run")
    await pool.shutdown()
    alive = [p for p in harness.live_descendants() if pid_alive(p)]
    assert not alive, f"processes alive after shutdown returned: {alive}"
    await asyncio.wait_for(load, 60)
    ledger.assert_clean()
    kinds = ledger.kinds()
    assert set(kinds) <= {"ok", "PoolClosed"} and kinds.get("PoolClosed", 0) >= 1, kinds
    assert all(isinstance(o.error, PoolClosed) for o in ledger.outcomes.values() if o.kind == "PoolClosed")
    await _no_leftovers(set(ledger.worker_owner))


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""

