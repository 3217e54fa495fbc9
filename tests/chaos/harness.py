"""The chaos workload and its invariants, shared by ``tests/chaos`` (small counts, invariants
asserted) and ``benchmarks/chaos.py`` (full counts, figures printed).

Every request's output is derived from its id (``yes ID | head -c SIZE``, or ``cat`` of
stdin made the same way), so an answer that reached the wrong request, lost bytes, or got
someone else's bytes is caught byte for byte. The :class:`Ledger` records one outcome per
request and counts what must stay zero: lost (no outcome), duplicated (a second outcome,
a second ``started`` or ``done``), misrouted (output not its own, or a worker that served
two users), untyped (a failure that is not a :class:`SandboxError`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import SandboxError, WorkerCrashed
from sandbox_core.isolation import cgroups
from sandbox_core.isolation.spec import LaunchSpec, process_launch
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.process_tree import descendants
from sandbox_core.requests import ExecRequest, RawRequest
from sandbox_core.service.client import ServiceClient

FAKES = Path(__file__).resolve().parents[1] / "fakes"
HOSTILE_MODES = ("garbage", "deep", "badtype", "unknown", "binary", "flood", "nonewline", "hostcalls", "forge")
SIZES = (0, 1, 100, 4096, 65_543, 1 << 20)
"""Output sizes a request asks for (bytes), picked at random."""


def strict_available() -> bool:
    return shutil.which("bwrap") is not None


def expected_output(rid: str, size: int) -> bytes:
    """What ``yes RID | head -c SIZE`` prints: the request's own id, over and over."""
    line = (rid + "\n").encode()
    return (line * (size // len(line) + 1))[:size]


def request_for(rid: str, size: int, *, stdin: bool = False, pause: float = 0.0,
                timeout: float | None = None) -> tuple[ExecRequest, bytes]:
    """An exec whose stdout is derived from ``rid`` (through stdin when ``stdin``), and that
    output; ``pause`` keeps the command running that long after its output (a target for the killer)."""
    want = expected_output(rid, size)
    tail = f"; sleep {pause:g}" if pause else ""
    if stdin:
        return ExecRequest(shell=f"cat{tail}", stdin=want, timeout=timeout), want
    return ExecRequest(shell=f"yes {rid} | head -c {size}{tail}", timeout=timeout), want


@dataclass
class Outcome:
    rid: str
    user: str
    kind: str
    """``ok``, the error class name, or ``cancelled`` (the caller cancelled it)."""
    error: BaseException | None
    worker_id: str | None
    latency: float


@dataclass
class Ledger:
    """One outcome per request, and the counts that must stay zero."""

    submitted: set[str] = field(default_factory=set)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    duplicated: list[str] = field(default_factory=list)
    misrouted: list[str] = field(default_factory=list)
    untyped: list[str] = field(default_factory=list)
    worker_owner: dict[str, str] = field(default_factory=dict)
    in_flight: dict[str, str] = field(default_factory=dict)
    """Request id -> worker id, from its ``started`` event until its outcome."""
    worker_pids: set[int] = field(default_factory=set)
    """Host pids of every worker that served a request (to check none is left)."""
    started_count: int = 0
    started_event: asyncio.Event = field(default_factory=asyncio.Event)

    def note_worker(self, rid: str, user: str, worker_id: str) -> None:
        owner = self.worker_owner.setdefault(worker_id, user)
        if owner != user:
            self.misrouted.append(f"{rid}: worker {worker_id} of {owner} served {user}")

    def record(self, outcome: Outcome) -> None:
        if outcome.rid in self.outcomes:
            self.duplicated.append(f"{outcome.rid}: a second outcome {outcome.kind}")
            return
        self.outcomes[outcome.rid] = outcome
        self.in_flight.pop(outcome.rid, None)

    @property
    def lost(self) -> list[str]:
        return sorted(self.submitted - self.outcomes.keys())

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for o in self.outcomes.values():
            counts[o.kind] = counts.get(o.kind, 0) + 1
        return counts

    def latencies(self, kind: str = "ok") -> list[float]:
        return [o.latency for o in self.outcomes.values() if o.kind == kind]

    def assert_clean(self) -> None:
        """0 lost, 0 duplicated, 0 misrouted, every failure typed."""
        assert not self.lost, f"lost requests: {self.lost[:10]}"
        assert not self.duplicated, f"duplicated: {self.duplicated[:10]}"
        assert not self.misrouted, f"misrouted: {self.misrouted[:10]}"
        assert not self.untyped, f"untyped failures: {self.untyped[:10]}"


async def run_one(
    pool: SandboxOrchestrator, ledger: Ledger, user: str, rid: str, request: ExecRequest | RawRequest,
    want: bytes | None,
) -> Outcome:
    """Run one request, check its answer against ``want`` (its own bytes), record the outcome."""
    ledger.submitted.add(rid)
    began = time.perf_counter()
    out = bytearray()
    started: dict[str, Any] | None = None
    done: dict[str, Any] | None = None
    kind: str = "ok"
    error: BaseException | None = None
    try:
        async for event in pool.execute_stream(user, request):
            if event.type == "started":
                if started is not None:
                    ledger.duplicated.append(f"{rid}: a second started event")
                started = dict(event.data)
                wid = str(started.get("worker_id"))
                if started.get("user_id") != user:
                    ledger.misrouted.append(f"{rid}: started on a worker of {started.get('user_id')!r}")
                ledger.note_worker(rid, user, wid)
                ledger.in_flight[rid] = wid
                if isinstance(started.get("pid"), int):
                    ledger.worker_pids.add(started["pid"])
                ledger.started_count += 1
                ledger.started_event.set()
            elif event.type == "stdout":
                out += event.chunk()
            elif event.type == "done":
                if done is not None:
                    ledger.duplicated.append(f"{rid}: a second done event")
                done = dict(event.data)
    except asyncio.CancelledError:
        kind = "cancelled"
        raise
    except SandboxError as exc:
        kind, error = type(exc).__name__, exc
    except Exception as exc:
        kind, error = type(exc).__name__, exc
        ledger.untyped.append(f"{rid}: {type(exc).__name__}: {exc!r:.200}")
    finally:
        worker_id = started.get("worker_id") if started else None
        outcome = Outcome(rid, user, kind, error, str(worker_id) if worker_id else None, time.perf_counter() - began)
        if want is not None:
            if kind == "ok" and (bytes(out) != want or done is None or done.get("exit_code") != 0):
                code = done.get("exit_code") if done else None
                ledger.misrouted.append(f"{rid}: {len(out)} bytes, not its own {len(want)} (exit {code})")
            elif kind != "ok" and not want.startswith(bytes(out)):
                ledger.misrouted.append(f"{rid}: failed with {len(out)} bytes that are not its own")
        ledger.record(outcome)
    return outcome


async def run_load(
    jobs: Iterable[Callable[[], Awaitable[object]]], in_flight: int
) -> float:
    """Run ``jobs`` with at most ``in_flight`` at once; returns the seconds it took."""
    gate = asyncio.Semaphore(in_flight)

    async def one(job: Callable[[], Awaitable[object]]) -> None:
        async with gate:
            with contextlib.suppress(Exception):
                await job()

    began = time.perf_counter()
    await asyncio.gather(*(one(j) for j in jobs))
    return time.perf_counter() - began


def mixed_jobs(
    pool: SandboxOrchestrator, ledger: Ledger, rng: random.Random, count: int, users: list[str],
    *, pause: float = 0.0, prefix: str = "r",
) -> list[Callable[[], Awaitable[object]]]:
    """``count`` requests from ``users`` at random, of random sizes, a third of them through stdin
    (each made when it runs: the load itself holds only what is in flight)."""
    jobs: list[Callable[[], Awaitable[object]]] = []
    for n in range(count):
        user = rng.choice(users)
        rid = f"{prefix}{n}-{user}"
        size, stdin = rng.choice(SIZES), rng.random() < 0.33
        jobs.append(functools.partial(_mixed_one, pool, ledger, user, rid, size, stdin, pause))
    return jobs


async def _mixed_one(
    pool: SandboxOrchestrator, ledger: Ledger, user: str, rid: str, size: int, stdin: bool, pause: float
) -> Outcome:
    request, want = request_for(rid, size, stdin=stdin, pause=pause)
    return await run_one(pool, ledger, user, rid, request, want)


@dataclass
class Killer:
    """SIGKILLs the worker of a random request in flight, every ``every`` requests started."""

    pool: SandboxOrchestrator
    ledger: Ledger
    rng: random.Random
    every: int
    killed: dict[str, str] = field(default_factory=dict)
    """Worker id -> the request id that was on it."""

    async def run(self) -> None:
        next_at = self.every
        while True:
            self.ledger.started_event.clear()
            if self.ledger.started_count < next_at:
                await self.ledger.started_event.wait()
                continue
            next_at += self.every
            candidates = [(rid, wid) for rid, wid in self.ledger.in_flight.items() if wid not in self.killed]
            if not candidates:
                continue
            rid, wid = self.rng.choice(candidates)
            row = next((w for w in self.pool.list_workers() if w["worker_id"] == wid and w["state"] == "busy"), None)
            if row is None or row["pid"] is None:
                continue
            self.killed[wid] = rid
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(row["pid"]), signal.SIGKILL)

    def check(self, ledger: Ledger) -> int:
        """Requests on a killed worker ended with WorkerCrashed (or had finished); the rest are
        untouched (ok). Returns how many were crashed."""
        crashed = 0
        for outcome in ledger.outcomes.values():
            if outcome.worker_id in self.killed:
                assert outcome.kind in ("ok", "WorkerCrashed"), f"{outcome.rid} on a killed worker: {outcome.kind}"
                crashed += outcome.kind == "WorkerCrashed"
            else:
                assert outcome.kind == "ok", f"{outcome.rid} on a live worker: {outcome.kind}: {outcome.error}"
        assert all(isinstance(o.error, WorkerCrashed) for o in ledger.outcomes.values() if o.kind == "WorkerCrashed")
        return crashed


def hostile_launcher(default: Callable[..., LaunchSpec] = process_launch) -> Callable[..., LaunchSpec]:
    """Users named ``rogue-MODE-...`` get the hostile worker in that mode; the rest a real one."""

    def launcher(cfg: ProcessSandboxConfig, wid: str, ws: Path | None) -> LaunchSpec:
        spec = default(cfg, ws)
        name = ws.name if ws is not None else ""
        if name.startswith("rogue-"):
            mode = name.split("-")[1]
            argv = [sys.executable, str(FAKES / "hostile_worker.py"), mode, *(["20"] if mode == "garbage" else [])]
            return LaunchSpec(argv, spec.env, spec.cwd, spec.plan)
        return spec

    return launcher


# ----------------------------------------------------------------- host checks


def live_descendants() -> list[int]:
    """Our descendant processes, zombies included (a zombie is a child nobody reaped)."""
    return [p for p in descendants(os.getpid()) if Path(f"/proc/{p}").exists()]


def leftover_cgroups(worker_ids: Iterable[str]) -> list[Path]:
    """Cgroup directories of these workers that still exist."""
    ids = set(worker_ids)
    left = []
    for controller in cgroups.CONTROLLERS:
        own = cgroups.own_cgroup(controller)
        base = own / "sandbox" if own is not None else None
        if base is None or not base.is_dir():
            continue
        left += [p for p in base.iterdir() if p.name.split(".")[0] in ids]
    return left


def status_mb(name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextlib.asynccontextmanager
async def pool_of(config: ProcessSandboxConfig, **kw: Any) -> AsyncIterator[SandboxOrchestrator]:
    pool = SandboxOrchestrator(config, **kw)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.shutdown()


# ----------------------------------------------------------------- the service as a process

SANDBOX = str(Path(sys.executable).with_name("sandbox"))


@dataclass
class Served:
    """A ``sandbox serve --listen 127.0.0.1:0`` subprocess and its users' tokens."""

    proc: subprocess.Popen[str]
    url: str
    tokens: dict[str, str]
    workspaces: Path
    log_lines: list[str] = field(default_factory=list)
    """Its stderr, read as it comes by :attr:`reader` (a service whose log nobody reads drops lines)."""
    reader: threading.Thread | None = None

    def client(self, user: str, timeout: float = 120.0) -> ServiceClient:
        return ServiceClient(self.url, self.tokens[user], timeout)

    def read_log(self) -> None:
        """Read its stderr until the end, in a thread of its own."""
        assert self.proc.stderr is not None
        stderr = self.proc.stderr

        def read() -> None:
            for line in stderr:
                self.log_lines.append(line)

        self.reader = threading.Thread(target=read, name="served-log", daemon=True)
        self.reader.start()

    def stop(self) -> str:
        """Kill it if still running; its log (stderr)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.reader is not None:
            self.reader.join(30)
        elif self.proc.stderr is not None:
            self.log_lines.append(self.proc.stderr.read())
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return "".join(self.log_lines)


def _popen(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)


async def start_served(tmp: Path, users: list[str], profile: str = "process", **settings: str) -> Served:
    """Start the service on a loopback port with a token per user; ``settings`` are SANDBOX_* variables."""
    tokens = {u: secrets.token_hex(16) for u in users}
    tokens_file = tmp / "tokens.toml"
    entries = (f'[[token]]\ntoken = "{t}"\nuser = "{u}"\nrole = "user"\n' for u, t in tokens.items())
    tokens_file.write_text("\n".join(entries))
    tokens_file.chmod(0o600)
    ws = tmp / "ws"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")}
    env.update(SANDBOX_WORKSPACE_ROOT=str(ws), SANDBOX_MIN_IDLE="0", SANDBOX_SERVICE__TOKENS_FILE=str(tokens_file),
               SANDBOX_STATE_DIR=str(tmp / "state"), SANDBOX_ALLOW_ROOT_PROCESS="1",
               XDG_CONFIG_HOME=str(tmp / "cfg"), NO_COLOR="1", COLUMNS="200")
    env.update({f"SANDBOX_{k.upper()}": v for k, v in settings.items()})
    proc = _popen([SANDBOX, "--profile", profile, "serve", "--listen", "127.0.0.1:0"], env)
    assert proc.stderr is not None
    seen = ""
    for _ in range(20):  # warnings first, then the line that says where it serves
        line = await asyncio.wait_for(asyncio.to_thread(proc.stderr.readline), 60)
        seen += line
        if match := re.search(r"(http://127\.0\.0\.1:\d+)", line):
            served = Served(proc, match.group(1), tokens, ws, [seen])
            served.read_log()
            return served
        if not line:
            break
    proc.kill()
    proc.wait()
    raise AssertionError(f"sandbox serve did not start: {seen}{proc.stderr.read()}")


def _note_started(ledger: Ledger, rid: str, user: str, data: dict[str, Any]) -> str:
    worker_id = str(data.get("worker_id"))
    if isinstance(data.get("pid"), int):
        ledger.worker_pids.add(data["pid"])
    if data.get("user_id") != user:
        ledger.misrouted.append(f"{rid}: started on a worker of {data.get('user_id')!r}")
    ledger.note_worker(rid, user, worker_id)
    ledger.in_flight[rid] = worker_id
    return worker_id


async def stream_one(
    served: Served, ledger: Ledger, user: str, rid: str, body: dict[str, Any], want: bytes | None,
    *, per_event: float = 0.0, first_event: list[float] | None = None, deadline: float = 600.0,
) -> Outcome:
    """One SSE run through the service, checked like :func:`run_one`; ``per_event`` makes a
    slow reader (it takes that long over each event)."""
    ledger.submitted.add(rid)
    began = time.perf_counter()
    out = bytearray()
    kind: str = "ok"
    error: BaseException | None = None
    worker_id: str | None = None
    done: dict[str, Any] | None = None
    async with served.client(user) as client:
        try:
            async with asyncio.timeout(deadline):
                async for event in client.stream("exec", body):
                    if event.type == "started":
                        if first_event is not None:
                            first_event.append(time.perf_counter() - began)
                        worker_id = _note_started(ledger, rid, user, event.data)
                    elif event.type == "stdout":
                        out += event.chunk()
                    elif event.type == "done":
                        if done is not None:
                            ledger.duplicated.append(f"{rid}: a second done event")
                        done = dict(event.data)
                    if per_event:
                        await asyncio.sleep(per_event)  # the workload: a reader that is slow on purpose
        except TimeoutError:  # no end within the deadline: recorded as lost, not waited for
            return Outcome(rid, user, "lost", None, worker_id, time.perf_counter() - began)
        except SandboxError as exc:
            kind, error = type(exc).__name__, exc
        except Exception as exc:
            kind, error = type(exc).__name__, exc
            ledger.untyped.append(f"{rid}: {type(exc).__name__}: {exc!r:.200}")
    if want is not None and kind == "ok" and (bytes(out) != want or done is None or done.get("exit_code") != 0):
        ledger.misrouted.append(f"{rid}: {len(out)} bytes, not its own {len(want)}")
    outcome = Outcome(rid, user, kind, error, worker_id, time.perf_counter() - began)
    ledger.record(outcome)
    return outcome


def exec_body(rid: str, size: int, *, stdin: bool = False) -> tuple[dict[str, Any], bytes]:
    """The JSON body of an exec run whose output is derived from ``rid``, and that output."""
    want = expected_output(rid, size)
    if stdin:
        return {"argv": ["cat"], "stdin_b64": base64.b64encode(want).decode()}, want
    return {"shell": f"yes {rid} | head -c {size}"}, want
