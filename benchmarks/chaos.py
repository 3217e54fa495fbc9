"""The chaos benchmark: ``.venv/bin/python benchmarks/chaos.py [--profile P] [--requests N] ...``.

The full counts of the chaos suite (``tests/chaos`` asserts the same invariants with small
ones), printing figures:

* library: a quiet mixed load (the baseline, measured in the same run), then the same load
  under a killer SIGKILLing the worker of a random running request every ``--kill-every``
  starts: requests/s, p50/p99 latency, each as a ratio to the baseline; loop-lag p99; host
  RSS peak; outcomes; 0 lost / misrouted / duplicated / untyped;
* fuzzer: every hostile-worker mode beside honest load (process profile): outcomes, loop lag;
* service: ``--streams`` concurrent SSE runs through a real ``sandbox serve``: time to first
  event p50/p99, requests/s, outcomes (PoolExhausted at the default ``acquire_timeout``
  included), then SIGTERM with runs in flight: how many ended with ServerShuttingDown.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the checkout

from sandbox_core.bench import LoopLag
from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.requests import RawRequest
from tests.chaos import harness
from tests.chaos.harness import Killer, Ledger, percentile, pool_of, run_load, run_one, stream_one


def _config(root: Path, profile: str, args: argparse.Namespace) -> ProcessSandboxConfig:
    return ProcessSandboxConfig(
        profile="strict" if profile == "strict" else "process", workspace_root=root, min_idle=0,
        max_workers=args.max_workers, max_workers_per_user=2, acquire_timeout=600.0, request_timeout=120.0,
        cleanup_interval=1.0, shutdown_grace=2.0, cancel_grace=1.0,
        allow_root_process=True,  # the fuzzer's process profile, as the suite does (these machines run as root)
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _line(name: str, value: str, extra: str = "") -> None:
    print(f"  {name:<34} {value:>14}  {extra}".rstrip())


async def _library(root: Path, args: argparse.Namespace) -> None:
    users = [f"u{i:02d}" for i in range(args.users)]
    rng = random.Random(1)
    config = _config(root, args.profile, args)
    print(f"library ({args.profile}, {args.users} users, {args.in_flight} in flight, max_workers {args.max_workers})")
    quiet = Ledger()
    async with pool_of(config) as pool:
        jobs = harness.mixed_jobs(pool, quiet, rng, args.baseline, users, prefix="q")
        quiet_s = await run_load(jobs, args.in_flight)
    quiet.assert_clean()
    q_rate, q_lat = args.baseline / quiet_s, quiet.latencies()
    _line("baseline: quiet load", f"{q_rate:.1f} req/s",
          f"p50 {_ms(percentile(q_lat, 0.5))}  p99 {_ms(percentile(q_lat, 0.99))}  ({args.baseline} requests)")

    ledger = Ledger()
    harness.reset_peak()
    rss = harness.status_mb("VmRSS")
    async with LoopLag() as lag, pool_of(config) as pool:
        killer = Killer(pool, ledger, rng, every=args.kill_every)
        hunting = asyncio.create_task(killer.run())
        jobs = harness.mixed_jobs(pool, ledger, rng, args.requests, users, pause=0.05)
        took = await run_load(jobs, args.in_flight)
        hunting.cancel()
        await asyncio.gather(hunting, return_exceptions=True)
    ledger.assert_clean()
    crashed = killer.check(ledger)
    lat = ledger.latencies()
    rate = args.requests / took
    _line("under the killer", f"{rate:.1f} req/s", f"{rate / q_rate:.2f}x of the baseline ({args.requests} requests)")
    _line("latency p50 (ok)", _ms(percentile(lat, 0.5)), f"{percentile(lat, 0.5) / percentile(q_lat, 0.5):.2f}x")
    _line("latency p99 (ok)", _ms(percentile(lat, 0.99)), f"{percentile(lat, 0.99) / percentile(q_lat, 0.99):.2f}x")
    _line("workers killed / requests crashed", f"{len(killer.killed)} / {crashed}", f"outcomes {ledger.kinds()}")
    _line("event-loop lag p99", _ms(percentile(lag.samples, 0.99)), f"max {_ms(max(lag.samples, default=0))}")
    _line("host RSS peak", f"{harness.status_mb('VmHWM'):.1f} MB", f"growth {harness.status_mb('VmHWM') - rss:.1f} MB")
    _line("lost / misrouted / duplicated", "0 / 0 / 0", "(asserted)")


async def _fuzzer(root: Path, args: argparse.Namespace) -> None:
    ledger, rng = Ledger(), random.Random(2)
    honest = [f"h{i}" for i in range(8)]
    config = _config(root, "process", args)
    print(f"fuzzer (process, {len(harness.HOSTILE_MODES)} hostile modes x {args.rogues}, honest load beside)")
    async with LoopLag() as lag, pool_of(config, launcher=harness.hostile_launcher()) as pool:
        rogue: list[Callable[[], Awaitable[object]]] = [
            functools.partial(run_one, pool, ledger, f"rogue-{m}-{k}", f"rogue-{m}-{k}", RawRequest("ping"), None)
            for m in harness.HOSTILE_MODES for k in range(args.rogues)
        ]
        jobs = harness.mixed_jobs(pool, ledger, rng, args.requests // 4, honest) + rogue
        rng.shuffle(jobs)
        took = await run_load(jobs, args.in_flight)
    ledger.assert_clean()
    bad = [o for o in ledger.outcomes.values() if o.user in honest and o.kind != "ok"]
    assert not bad, bad[:5]
    rogue_kinds: dict[str, int] = {}
    for o in ledger.outcomes.values():
        if o.user not in honest:
            rogue_kinds[o.kind] = rogue_kinds.get(o.kind, 0) + 1
    _line("requests", f"{len(jobs)} in {took:.1f} s", f"rogue outcomes {rogue_kinds}")
    _line("event-loop lag p99", _ms(percentile(lag.samples, 0.99)), f"max {_ms(max(lag.samples, default=0))}")


async def _service(root: Path, args: argparse.Namespace) -> None:
    users = [f"s{i:02d}" for i in range(args.users)]
    rng = random.Random(3)
    print(f"service ({args.profile}, {args.streams} concurrent SSE streams, {args.users} users, "
          f"max_workers {args.max_workers}, acquire_timeout {args.acquire_timeout:g} s)")
    served = await harness.start_served(
        root, users, args.profile, max_workers=str(args.max_workers), max_workers_per_user="2",
        acquire_timeout=str(args.acquire_timeout), service__drain_grace="1",
    )
    ledger = Ledger()
    first: list[float] = []
    try:
        async def one(n: int) -> None:
            user, rid = users[n % len(users)], f"svc{n}"
            body, want = harness.exec_body(rid, rng.choice(harness.SIZES))
            await stream_one(served, ledger, user, rid, body, want, first_event=first)

        began = time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(args.streams)))
        took = time.perf_counter() - began
        ledger.assert_clean()
        ok = ledger.kinds().get("ok", 0)
        _line("runs served (ok)", f"{ok / took:.1f} req/s", f"{args.streams} ended in {took:.1f} s: {ledger.kinds()}")
        _line("time to first event p50", _ms(percentile(first, 0.5)), f"p10 {_ms(percentile(first, 0.1))}")
        _line("time to first event p99", _ms(percentile(first, 0.99)), f"max {_ms(max(first, default=0))}")
        lat = ledger.latencies()
        _line("latency p50 / p99 (ok)", f"{_ms(percentile(lat, 0.5))}", f"p99 {_ms(percentile(lat, 0.99))}")
        cut = [asyncio.create_task(stream_one(served, ledger, users[n], f"long{n}", {"shell": "echo up; sleep 300"},
                                              None)) for n in range(min(8, args.users))]
        deadline = time.monotonic() + 120
        while sum(r.startswith("long") for r in ledger.in_flight) < len(cut) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        served.proc.send_signal(signal.SIGTERM)
        outcomes = await asyncio.gather(*cut)
        code = await asyncio.to_thread(served.proc.wait, 120)
    finally:
        log = served.stop()
    stopped = sum("stopped run" in line for line in log.splitlines())
    kinds = {o.kind for o in outcomes}
    _line("SIGTERM with runs in flight", f"{len(outcomes)} runs", f"ended {kinds}, log lines {stopped}, exit {code}, "
          f"tracebacks {log.count('Traceback')}")


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="sandbox-chaos-") as tmp:
        root = Path(tmp)
        if "library" in args.parts:
            (root / "lib").mkdir()
            await _library(root / "lib", args)
        if "fuzzer" in args.parts:
            (root / "fuzz").mkdir()
            await _fuzzer(root / "fuzz", args)
        if "service" in args.parts:
            (root / "svc").mkdir()
            await _service(root / "svc", args)
        left = harness.live_descendants()
        print(f"processes left behind: {len(left)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["strict", "process"], default="strict" if harness.strict_available()
                        else "process")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--baseline", type=int, default=250, help="requests of the quiet baseline load")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--max-workers", type=int, default=16)
    parser.add_argument("--kill-every", type=int, default=10, help="kill one running request's worker per N starts")
    parser.add_argument("--rogues", type=int, default=20, help="requests per hostile mode")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--acquire-timeout", type=float, default=10.0)
    parser.add_argument("--parts", nargs="+", default=["library", "fuzzer", "service"],
                        choices=["library", "fuzzer", "service"])
    asyncio.run(main(parser.parse_args()))
