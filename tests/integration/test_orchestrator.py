"""SandboxOrchestrator against real worker processes (process profile)."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sys
from pathlib import Path

import pytest

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import (
    CircuitOpen,
    ConfigError,
    PoolClosed,
    PoolExhausted,
    RequestTimeout,
    SandboxError,
    WorkerCrashed,
)
from sandbox_core.isolation.spec import LaunchSpec, process_launch
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.requests import ExecRequest, RawRequest
from tests.helpers import live_session_members, pid_alive, process_config, wait_for


def sh(script: str, timeout: float | None = None) -> ExecRequest:
    return ExecRequest(shell=script, timeout=timeout)


async def test_affinity_under_concurrency(workspace_root: Path) -> None:
    config = process_config(workspace_root, max_workers=4, max_workers_per_user=1)
    async with SandboxOrchestrator(config) as pool:
        users = ["alice", "bob", "carol"]
        await asyncio.gather(*(pool.execute(u, sh(f"echo {u} > mine")) for u in users))

        async def read(user: str) -> tuple[str, str, str]:
            result = await pool.execute(user, sh("cat mine; ls"))
            return user, result.stdout_text, result.worker_id

        results = await asyncio.gather(*(read(u) for u in users for _ in range(4)))
        for user, out, _ in results:
            assert out == f"{user}\nmine\n"
        by_user: dict[str, set[str]] = {}
        for user, _, wid in results:
            by_user.setdefault(user, set()).add(wid)
        assert all(len(ids) == 1 for ids in by_user.values())  # per-user cap 1: same worker
        assert len(set().union(*by_user.values())) == 3  # never shared between users


async def test_a_users_concurrent_requests_queue_then_spread(workspace_root: Path) -> None:
    config = process_config(workspace_root, max_workers=4, max_workers_per_user=2)
    async with SandboxOrchestrator(config) as pool:
        gate = workspace_root / "dave" / "go"

        async def hold() -> str:
            return (await pool.execute("dave", sh("while [ ! -e go ]; do sleep 0.01; done"))).worker_id

        tasks = [asyncio.create_task(hold()) for _ in range(3)]
        def settled() -> bool:  # a worker counts as busy while its request still binds it
            stats = pool.get_pool_stats()
            return bool(stats["workers"]["busy"] == 2 and stats["queue_depth"] == 1)
        await wait_for(settled, 10, "two busy workers and the third request queued for dave's cap")
        assert pool.get_pool_stats()["workers"]["total"] == 2
        gate.touch()
        ids = await asyncio.gather(*tasks)
        assert len(set(ids)) == 2


async def test_a_burst_from_one_user_does_not_starve_another_users_first_request(workspace_root: Path) -> None:
    """The fair queue: alice's burst fills the pool and queues; bob's one request, queued last,
    is served within a round of the ring, not after the whole burst (asserted on order)."""
    config = process_config(workspace_root, max_workers=2, max_workers_per_user=2, acquire_timeout=120.0)
    burst = 8
    alice, bob = workspace_root / "alice", workspace_root / "bob"
    async with SandboxOrchestrator(config) as pool:
        def gated(i: int) -> ExecRequest:  # starts, says so, then waits for its own gate
            return sh(f"touch started-{i}; while [ ! -e go-{i} ]; do sleep 0.01; done")

        tasks = [asyncio.create_task(pool.execute("alice", gated(i))) for i in range(burst)]
        await wait_for(lambda: pool.get_pool_stats()["queue_depth"] == burst - 2, 30, "alice's burst to queue")
        bob_task = asyncio.create_task(pool.execute("bob", sh("touch started")))
        await wait_for(lambda: pool.get_pool_stats()["queue_depth"] == burst - 1, 30, "bob to queue")

        def started() -> list[int]:
            return sorted(i for i in range(burst) if (alice / f"started-{i}").exists())

        def moved(before: int) -> bool:
            return len(started()) > before or (bob / "started").exists()

        await wait_for(lambda: len(started()) == 2, 30, "the first two of the burst to run")
        released: list[int] = []
        while not (bob / "started").exists():
            assert len(released) < burst, "bob was served only after the whole burst"
            await wait_for(lambda: bool(set(started()) - set(released)) or (bob / "started").exists(),
                           30, "a request to run")
            running = [i for i in started() if i not in released]
            if (bob / "started").exists():
                break
            (alice / f"go-{running[0]}").touch()  # one of alice's requests ends: one slot frees
            released.append(running[0])
            await wait_for(functools.partial(moved, len(started())), 30, "the next turn")
        ahead = started()
        assert len(ahead) <= 3, f"{len(ahead)} of alice's requests ran before bob's"
        assert pool.get_pool_stats()["queue_depth"] >= burst - 4  # the burst is still waiting
        await bob_task
        for i in range(burst):
            (alice / f"go-{i}").touch()
        results = await asyncio.gather(*tasks)
        assert all(r.exit_code == 0 for r in results)
        assert {w["user_id"] for w in pool.list_workers()} <= {"alice", "bob"}


async def test_a_request_cancelled_while_its_worker_binds_leaves_no_busy_worker(workspace_root: Path) -> None:
    """A caller that goes away while its new worker binds: the worker is retired at once, not
    left busy with no request until its own cancel kills it and the reaper counts a crash."""
    fakes = Path(__file__).resolve().parents[1] / "fakes"

    def launcher(cfg: ProcessSandboxConfig, wid: str, ws: Path | None) -> LaunchSpec:
        spec = process_launch(cfg, ws)
        return LaunchSpec([sys.executable, str(fakes / "hostile_worker.py"), "nobind"], spec.env, spec.cwd, spec.plan)

    async with SandboxOrchestrator(process_config(workspace_root), launcher=launcher) as pool:
        task = asyncio.create_task(pool.execute("erin", RawRequest("ping")))
        await wait_for(lambda: [w["state"] for w in pool.list_workers()] == ["busy"], 20, "the worker to bind")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await wait_for(lambda: not pool.list_workers(), 10, "the unbound worker to be retired")
        assert pool.get_pool_stats()["crashes"] == 0  # retired at once, not found dead by the reaper later


async def test_cap_then_pool_exhausted(workspace_root: Path) -> None:
    config = process_config(workspace_root, max_workers=1, acquire_timeout=0.5)
    async with SandboxOrchestrator(config) as pool:
        hold = asyncio.create_task(pool.execute("alice", sh("while [ ! -e go ]; do sleep 0.01; done")))
        await wait_for(lambda: pool.get_pool_stats()["workers"]["busy"] == 1, 10, "alice busy")
        with pytest.raises(PoolExhausted) as info:
            await pool.execute("bob", sh("true"))
        assert info.value.data["max_workers"] == 1
        assert info.value.data["setting"] == "max_workers" and "max_workers = 1" in info.value.message
        (workspace_root / "alice" / "go").touch()
        await hold
        # once alice's worker is idle, bob evicts it instead of waiting
        result = await pool.execute("bob", sh("echo ok"))
        assert result.stdout_text == "ok\n"
        stats = pool.get_pool_stats()
        assert stats["evicted"] == 1 and stats["workers"]["total"] <= 1


async def test_a_users_own_cap_is_named_when_their_request_times_out(workspace_root: Path) -> None:
    """The pool has room; alice's own cap (max_workers_per_user) is what is full."""
    config = process_config(workspace_root, max_workers=4, max_workers_per_user=1, acquire_timeout=0.5)
    async with SandboxOrchestrator(config) as pool:
        hold = asyncio.create_task(pool.execute("alice", sh("while [ ! -e go ]; do sleep 0.01; done")))
        await wait_for(lambda: pool.get_pool_stats()["workers"]["busy"] == 1, 10, "alice busy")
        with pytest.raises(PoolExhausted) as info:
            await pool.execute("alice", sh("true"))
        assert info.value.data["setting"] == "max_workers_per_user" and info.value.data["limit"] == 1
        assert info.value.message.endswith("(all 1 of the user's workers busy; max_workers_per_user = 1)")
        (workspace_root / "alice" / "go").touch()
        await hold


async def test_prewarm_claim_and_background_refill(workspace_root: Path) -> None:
    config = process_config(workspace_root, min_idle=1)
    async with SandboxOrchestrator(config) as pool:
        await wait_for(lambda: pool.get_pool_stats()["workers"]["prewarmed"] == 1, 15, "pre-warm")
        warm_id = pool.list_workers()[0]["worker_id"]
        result = await pool.execute("erin", sh("pwd"))
        assert result.worker_id == warm_id
        assert result.stdout_text.strip() == str(workspace_root / "erin")
        assert pool.get_pool_stats()["claimed"] == 1
        await wait_for(lambda: pool.get_pool_stats()["workers"]["prewarmed"] == 1, 15, "refill")
        assert pool.get_pool_stats()["workers"]["total"] == 2


async def test_idle_workers_are_reaped(workspace_root: Path) -> None:
    config = process_config(workspace_root, worker_timeout=0.3, cleanup_interval=0.05)
    async with SandboxOrchestrator(config) as pool:
        await pool.execute("frank", sh("true"))
        pid = pool.list_workers()[0]["pid"]
        await wait_for(lambda: pool.get_pool_stats()["reaped"] == 1, 10, "reaping")
        await wait_for(lambda: not pid_alive(pid), 10, "reaped worker exit")
        assert pool.get_pool_stats()["workers"]["total"] == 0


async def test_workers_are_recycled_after_max_requests(workspace_root: Path) -> None:
    config = process_config(workspace_root, max_requests_per_worker=2)
    async with SandboxOrchestrator(config) as pool:
        ids = [(await pool.execute("gina", sh("true"))).worker_id for _ in range(3)]
        assert ids[0] == ids[1] != ids[2]
        assert pool.get_pool_stats()["recycled"] == 1


async def test_pings_do_not_wear_a_worker_out(workspace_root: Path) -> None:
    """A health check's pings run nothing in the worker: they never bring on its recycle."""
    config = process_config(workspace_root, max_requests_per_worker=2)
    async with SandboxOrchestrator(config) as pool:
        first = (await pool.execute("gina", sh("true"))).worker_id
        pongs = [(await pool.execute("gina", RawRequest("ping"))).worker_id for _ in range(5)]
        assert set(pongs) == {first} and pool.get_pool_stats()["recycled"] == 0
        assert (await pool.execute("gina", sh("true"))).worker_id == first  # the second request of its two
        assert pool.get_pool_stats()["recycled"] == 1


async def test_crash_of_busy_worker_then_recovery(workspace_root: Path) -> None:
    config = process_config(workspace_root)
    async with SandboxOrchestrator(config) as pool:
        await pool.execute("hank", sh("echo keep > data"))
        pid = pool.list_workers()[0]["pid"]
        running = workspace_root / "hank" / "running"

        async def kill_it() -> None:
            await wait_for(running.exists, 10, "command start")
            os.kill(pid, signal.SIGKILL)

        killer = asyncio.create_task(kill_it())
        with pytest.raises(WorkerCrashed) as info:
            await pool.execute("hank", sh("touch running; sleep 300"))
        await killer
        assert info.value.data["signal"] == signal.SIGKILL
        result = await pool.execute("hank", sh("cat data"))
        assert result.stdout_text == "keep\n"
        assert result.worker_id != ""
        stats = pool.get_pool_stats()
        assert stats["crashes"] == 1 and stats["restarts"] == 1 and stats["requests"]["failed"] == 1
        await wait_for(lambda: not live_session_members(pid), 5, "crashed session gone")


async def test_request_timeout_and_hung_worker(workspace_root: Path) -> None:
    config = process_config(workspace_root, cancel_grace=0.5)
    async with SandboxOrchestrator(config) as pool:
        with pytest.raises(RequestTimeout):
            await pool.execute("ivan", sh("sleep 300", timeout=0.5))
        assert (await pool.execute("ivan", sh("echo alive"))).stdout_text == "alive\n"
        # a worker that stops answering altogether is killed after the cancel grace
        pid = pool.list_workers()[0]["pid"]
        task = asyncio.create_task(pool.execute("ivan", sh("touch started; sleep 300", timeout=1.0)))
        await wait_for((workspace_root / "ivan" / "started").exists, 10, "start")
        os.kill(pid, signal.SIGSTOP)
        with pytest.raises(RequestTimeout):
            await task
        await wait_for(lambda: not pid_alive(pid), 10, "hung worker killed")
        assert (await pool.execute("ivan", sh("echo fresh"))).stdout_text == "fresh\n"
        assert pool.get_pool_stats()["requests"]["timed_out"] == 2


async def test_garbage_worker_is_recycled(workspace_root: Path) -> None:
    fakes = Path(__file__).resolve().parents[1] / "fakes"

    def launcher(cfg: ProcessSandboxConfig, wid: str, ws: Path | None) -> LaunchSpec:
        spec = process_launch(cfg, ws)
        argv = [sys.executable, str(fakes / "hostile_worker.py"), "garbage", "20"]
        return LaunchSpec(argv, spec.env, spec.cwd, spec.plan)

    config = process_config(workspace_root)
    async with SandboxOrchestrator(config, launcher=launcher) as pool:
        first = await pool.execute("jill", RawRequest("ping"))
        second = await pool.execute("jill", RawRequest("ping"))
        assert first.result["pong"] is True and second.result["pong"] is True
        assert first.worker_id != second.worker_id
        assert pool.get_pool_stats()["recycled"] >= 1


async def test_circuit_breaker_stops_respawn_loop(workspace_root: Path) -> None:
    def launcher(cfg: ProcessSandboxConfig, wid: str, ws: Path | None) -> LaunchSpec:
        spec = process_launch(cfg, ws)
        return LaunchSpec(["false"], spec.env, spec.cwd, spec.plan)

    config = process_config(workspace_root, start_failure_threshold=2, circuit_reset=60)
    async with SandboxOrchestrator(config, launcher=launcher) as pool:
        for _ in range(2):
            with pytest.raises(SandboxError):
                await pool.execute("kim", sh("true"))
        with pytest.raises(CircuitOpen, match="2 times in a row"):
            await pool.execute("kim", sh("true"))
        stats = pool.get_pool_stats()
        assert stats["start_failures"] == 2 and stats["circuit"] == "open"


async def test_shutdown_with_requests_in_flight_leaves_no_process(workspace_root: Path) -> None:
    config = process_config(workspace_root, min_idle=1, max_workers=4)
    pool = SandboxOrchestrator(config)
    await pool.start()
    script = "sleep 300 & echo $! > bg; touch started; sleep 300"
    tasks = [asyncio.create_task(pool.execute(u, sh(script))) for u in ("lea", "max")]
    await wait_for(lambda: all((workspace_root / u / "started").exists() for u in ("lea", "max")), 15, "start")
    pids = [w["pid"] for w in pool.list_workers()]
    await pool.shutdown(grace=0.2)
    for task in tasks:
        with pytest.raises(PoolClosed):  # the cause is the shutdown, not "killed by signal 15"
            await task
    for pid in pids:
        assert not live_session_members(pid)
    for user in ("lea", "max"):
        assert not pid_alive(int((workspace_root / user / "bg").read_text()))
    with pytest.raises(PoolClosed):
        await pool.execute("lea", sh("true"))


async def test_shutdown_while_a_worker_starts_leaves_no_process(workspace_root: Path) -> None:
    """A stop wins over a start: the spawning request gets PoolClosed and nothing outlives shutdown()."""

    def slow(cfg: ProcessSandboxConfig, wid: str, ws: Path | None) -> LaunchSpec:
        spec = process_launch(cfg, ws)
        return LaunchSpec(["sh", "-c", 'sleep 5; exec "$0" "$@"', *spec.argv], spec.env, spec.cwd, spec.plan)

    pool = SandboxOrchestrator(process_config(workspace_root, startup_timeout=30), launcher=slow)
    await pool.start()
    task = asyncio.create_task(pool.execute("quinn", sh("true")))
    await wait_for(lambda: any(w["pid"] for w in pool.list_workers()), 10, "the spawn")
    pid = next(w["pid"] for w in pool.list_workers() if w["pid"])
    await pool.shutdown(grace=0.2)
    assert not pid_alive(pid) and not live_session_members(pid)
    with pytest.raises(PoolClosed):
        await task
    stats = pool.get_pool_stats()
    assert stats["requests"]["failed"] == 1  # counted, though it never got a worker


async def test_shutdown_lets_short_requests_finish(workspace_root: Path) -> None:
    config = process_config(workspace_root)
    pool = SandboxOrchestrator(config)
    await pool.start()
    script = "touch started; while [ ! -e go ]; do sleep 0.01; done; echo done"
    task = asyncio.create_task(pool.execute("ned", sh(script)))
    await wait_for((workspace_root / "ned" / "started").exists, 10, "start")
    shutdown = asyncio.create_task(pool.shutdown(grace=10))
    await wait_for(lambda: pool.closed, 5, "closed")
    (workspace_root / "ned" / "go").touch()
    assert (await task).stdout_text == "done\n"
    await shutdown


async def test_bad_user_ids_are_rejected(workspace_root: Path) -> None:
    async with SandboxOrchestrator(process_config(workspace_root)) as pool:
        for bad in ("../x", "/etc", "..", ""):
            with pytest.raises(ConfigError):
                await pool.execute(bad, sh("true"))
        assert pool.get_pool_stats()["workers"]["total"] == 0
        assert sorted(p.name for p in workspace_root.iterdir()) == []


async def test_workspaces_are_private(workspace_root: Path) -> None:
    async with SandboxOrchestrator(process_config(workspace_root)) as pool:
        result = await pool.execute("olga", sh("touch f; stat -c %a . f"))
        assert result.stdout_text == "700\n600\n"


async def test_operator_controls(workspace_root: Path) -> None:
    async with SandboxOrchestrator(process_config(workspace_root, max_workers=5)) as pool:
        ids = await pool.launch(2)
        assert len(ids) == 2 and pool.get_pool_stats()["workers"]["prewarmed"] == 2
        await pool.execute("pat", sh("true"))
        rows = pool.list_workers()
        assert {r["user_id"] for r in rows} == {None, "pat"}
        assert await pool.stop_workers(user_id="pat") == 1
        assert await pool.stop_workers(everything=True) == 1
        assert pool.list_workers() == []


async def test_two_refills_in_one_loop_turn_stay_within_max_workers(workspace_root: Path) -> None:
    """A refill counts the pre-warms it already scheduled: before, each counted only workers whose
    start task had run, so a second refill in the same turn (a release and the cleanup loop, say)
    scheduled them again (a fresh-clone CI run saw 6 workers under max_workers = 5)."""
    config = process_config(workspace_root, min_idle=2, max_workers=2)
    async with SandboxOrchestrator(config) as pool:
        pool._refill()  # the same turn as the start's own refill: nothing of it has run yet
        pool._refill()
        assert pool.get_pool_stats()["workers"]["total"] == 2
        await wait_for(lambda: pool.get_pool_stats()["workers"]["prewarmed"] == 2, 15, "two pre-warmed workers")
        assert pool.get_pool_stats()["workers"]["total"] == 2
        assert pool.get_pool_stats()["spawned"] == 2


@pytest.mark.parametrize("seen", ["its exit", "its pipe closed"])
async def test_a_worker_that_dies_once_granted_to_a_waiting_request_is_replaced(
    workspace_root: Path, monkeypatch: pytest.MonkeyPatch, seen: str
) -> None:
    """The user's idle worker dies after it was reserved for their next request and before that
    request resumed (seen in the chaos run: a kill that landed as the previous request ended;
    the host may see its control pipe closed before its exit): nothing was sent to it, so the
    request gets another worker instead of WorkerCrashed."""
    config = process_config(workspace_root, max_workers_per_user=1)
    async with SandboxOrchestrator(config) as pool:
        first = await pool.execute("ivy", sh("echo one"))
        dead = pool._workers[first.worker_id]
        take = SandboxOrchestrator._take

        async def take_then_die(self: SandboxOrchestrator, grant: object, user_id: str) -> object:
            worker = await take(self, grant, user_id)  # type: ignore[arg-type]
            if worker is dead and dead.pid is not None:
                if seen == "its exit":
                    os.kill(dead.pid, signal.SIGKILL)
                    await wait_for(lambda: not dead.alive, 10, "its exit seen by the host")
                else:
                    assert dead._process is not None and dead._process.stdin is not None
                    dead._process.stdin.close()
            return worker

        monkeypatch.setattr(SandboxOrchestrator, "_take", take_then_die)
        result = await pool.execute("ivy", sh("echo two"))
        assert result.stdout_text == "two\n" and result.worker_id != first.worker_id
        stats = pool.get_pool_stats()
        assert stats["requests"]["failed"] == 0 and stats["requests"]["ok"] == 2
        assert first.worker_id not in {w["worker_id"] for w in pool.list_workers()}
