"""Chaos against ``sandbox serve`` as a real process, over real HTTP (loopback TCP, tokens).

Concurrent SSE runs of several users, byte-exact; clients that disconnect mid-run (the run is
cancelled and its command killed); slow readers behind a small run buffer (the run waits for
them, nothing is lost); then SIGTERM with long runs in flight: each stream ends with the typed
ServerShuttingDown, the log has one line per stopped run and no traceback, no worker is left.
"""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

from sandbox_core import codes
from sandbox_core.errors import ServerShuttingDown
from tests.chaos import harness
from tests.chaos.harness import Ledger, stream_one
from tests.helpers import live_session_members, pid_alive, wait_for, wait_for_async


async def test_the_service_under_sse_load_disconnects_slow_readers_and_sigterm(tmp_path: Path) -> None:
    users = [f"svc{i}" for i in range(6)]
    served = await harness.start_served(
        tmp_path, users, max_workers="8", max_workers_per_user="2", acquire_timeout="120",
        service__drain_grace="1", service__run_buffer_mb="1", service__keepalive_seconds="0.5",
    )
    ledger, rng = Ledger(), random.Random(41)
    worker_pids: set[int] = set()
    try:
        async def normal(n: int) -> None:
            user, rid = users[n % len(users)], f"n{n}"
            body, want = harness.exec_body(rid, rng.choice(harness.SIZES), stdin=rng.random() < 0.3)
            await stream_one(served, ledger, user, rid, body, want)

        async def slow(n: int) -> None:  # 3 MiB through a 1 MiB run buffer, read slowly
            user, rid = users[n % len(users)], f"slow{n}"
            body, want = harness.exec_body(rid, 3 << 20)
            await stream_one(served, ledger, user, rid, body, want, per_event=0.02)

        async def disconnect(n: int) -> None:  # leaves after the first output: the run is cancelled
            user, rid = users[n % len(users)], f"gone{n}"
            pidfile = served.workspaces / user / f"{rid}.pid"
            async with served.client(user) as client:
                stream = client.stream("exec", {"shell": f"echo $$ > {rid}.pid; echo up; exec sleep 300"})
                started = await anext(stream)
                worker_pids.add(int(started.data["pid"]))
                run_id = started.data["run_id"]
                assert (await anext(stream)).data["data"] == "up\n"
                await stream.aclose()
                command = int(pidfile.read_text())
                await wait_for(lambda: not pid_alive(command), 30, f"{rid}'s command to be killed")

                async def cancelled() -> bool:
                    return any(r["run_id"] == run_id and r["state"] == "cancelled" for r in await client.runs())

                await wait_for_async(cancelled, 30, f"{rid}'s run to say cancelled")

        jobs = [normal(n) for n in range(24)] + [slow(n) for n in range(3)] + [disconnect(n) for n in range(4)]
        rng.shuffle(jobs)
        await asyncio.gather(*jobs)
        ledger.assert_clean()
        assert ledger.kinds() == {"ok": 27}, ledger.kinds()

        # SIGTERM with runs in flight past the drain
        long_runs: list[asyncio.Task[harness.Outcome]] = []
        for n, user in enumerate(users[:4]):
            long_runs.append(asyncio.create_task(
                stream_one(served, ledger, user, f"long{n}", {"shell": "echo up; sleep 300"}, None)))
        await wait_for(lambda: sum(r.startswith("long") for r in ledger.in_flight) == 4, 60, "the long runs to start")
        served.proc.send_signal(signal.SIGTERM)
        outcomes = await asyncio.wait_for(asyncio.gather(*long_runs), 60)
        for outcome in outcomes:
            assert isinstance(outcome.error, ServerShuttingDown), (outcome.rid, outcome.kind, outcome.error)
            assert outcome.error.code == codes.SERVER_SHUTTING_DOWN
        code = await asyncio.to_thread(served.proc.wait, 60)
    finally:
        log = served.stop()
    assert code == 0, log
    assert "Traceback" not in log and "Exception in ASGI" not in log, log
    assert sum("stopped run" in line for line in log.splitlines()) == 4, log
    ledger.assert_clean()
    assert len(ledger.worker_pids) >= 6
    for pid in worker_pids | ledger.worker_pids:
        assert not live_session_members(pid), f"worker {pid} or its session outlived the service"
