"""The benchmark suite: each figure is measured against a baseline taken in the same run.

Used by ``benchmarks/bench.py`` and ``sandbox bench``. Figures are wall-clock
milliseconds on this machine; the ratios are what to compare across machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import pwd
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import ConfigError
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.requests import ExecRequest, RawRequest
from sandbox_core.worker import SandboxWorker


@dataclass
class Figure:
    """One measured figure, its target and (when it has one) its same-run baseline."""

    name: str
    value: float
    unit: str
    target: str = ""
    ok: bool | None = None
    baseline: float | None = None
    ratio: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None and v not in ({}, "")}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def _timed(fn: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        began = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - began)
    return out


async def cold_start(config: ProcessSandboxConfig, n: int) -> Figure:
    """Spawn to ready (handshake done) of a fresh worker."""
    samples = []
    for i in range(n):
        worker = SandboxWorker(config, f"bench-cold-{i}", user_id="bench", workspace=config.workspace_for("bench"))
        began = time.perf_counter()
        await worker.start()
        samples.append(time.perf_counter() - began)
        await worker.stop()
    p50, p95 = _pct(samples, 0.5), _pct(samples, 0.95)
    return Figure(f"cold start ({config.profile})", _ms(p50), "ms p50", "< 300 ms", p50 < 0.3,
                  detail={"p95_ms": _ms(p95), "n": n})


async def warm_claim(config: ProcessSandboxConfig, n: int) -> Figure:
    """Time for a request to get a ready worker bound to its user from the pre-warmed pool.

    In profiles that bind at spawn (strict), "warm" is the user's own idle worker. Where workers
    are pre-warmed unbound, each sample is a user never seen before (the uid map in the state
    directory outlives the run: a fixed name is a returning user from the second run on, who
    attaches their own workspace instead of taking the spare).
    """
    from sandbox_core.isolation.launch import can_prewarm

    samples = []
    spares = 0
    async with SandboxOrchestrator(config.replace(min_idle=1, worker_timeout=3600)) as pool:
        for i in range(n):
            user = f"claim-{os.getpid()}-{i}" if can_prewarm(config) else "claim"
            if can_prewarm(config):
                deadline = time.monotonic() + 30
                while (workers := pool.get_pool_stats()["workers"])["prewarmed"] < 1 or workers["starting"]:
                    if time.monotonic() > deadline:  # the refill done and quiet: it is not on the clock
                        raise TimeoutError("pre-warm did not happen")
                    await asyncio.sleep(0.005)
            elif i == 0:
                await pool.execute(user, RawRequest("ping"))
            began = time.perf_counter()
            worker = await pool._acquire(user)
            samples.append(time.perf_counter() - began)
            spares += worker.claimed_spare
            await pool._release(worker)
            if can_prewarm(config):
                await pool.stop_workers(user_id=user)
    p50, p99 = _pct(samples, 0.5), _pct(samples, 0.99)
    return Figure(f"warm claim ({config.profile})", _ms(p50), "ms p50", "< 5 ms", p50 < 0.005,
                  detail={"p99_ms": _ms(p99), "n": n, "spares_taken": spares})


def new_users(kind: str, n: int) -> list[str]:
    """``n`` user ids no earlier call gave, in this process or another: a step that measures a
    new user's first request must not meet the users (and spares) of its previous run."""
    tag = os.urandom(4).hex()
    return [f"{kind}-{tag}-{i}" for i in range(n)]


async def claim_new_user(config: ProcessSandboxConfig, n: int) -> Figure:
    """A new user's ``exec true`` on a claimed pre-warmed worker, against the same request
    starting a worker for that user (the spawn-per-user path), measured in the same run.

    Each sample is a user never seen before; the claim rows wait for the refill between
    samples (off the clock: a refilled worker has its spare workspace staged, and switched to
    its uid where it is for new users, before it counts as pre-warmed), the spawn row runs
    with ``min_idle = 0``. The figure is the pool kept for new users (``new_user_spares = 1``:
    the worker switched to its spare's uid before the claim) where this host can stage spares;
    the pool whose pre-warmed worker any user can claim is measured alongside
    (``any_user_p50_ms``). The detail splits the figure's claims: ``attach`` (a new user takes
    the worker's spare: the uid map's rename and the directory's; otherwise the user's
    workspace is prepared and attached), ``bind`` (the round trip of the worker's uid switch
    and Landlock; Landlock only, for a worker that switched ahead), ``handover`` (what the
    spare's hand-over still needed after the bind), ``verify`` (the host's re-check; nothing
    for a worker verified when it switched); ``spares_taken`` counts the samples that took a spare.
    """
    from sandbox_core.isolation.launch import can_prewarm, can_switch_ahead

    if not can_prewarm(config):
        return Figure(f"claim new user -> exec true ({config.profile})", 0.0, "ms p50", "", None,
                      detail={"skipped": "workers of this profile cannot be pre-warmed here (see README)"})
    true = ExecRequest(argv=("true",))
    roomy = config.replace(worker_timeout=3600, max_workers=max(config.max_workers, 4))

    steps: dict[str, list[float]] = {}
    spares_taken: list[str] = []
    fallbacks = 0

    async def one(pool: SandboxOrchestrator, user: str) -> float:
        began = time.perf_counter()
        result = await pool.execute(user, true)
        took = time.perf_counter() - began
        worker = pool._workers.get(result.worker_id)
        for step, seconds in (worker.claim_seconds if worker is not None else {}).items():
            steps.setdefault(step, []).append(seconds)
        if worker is not None and worker.claimed_spare:
            spares_taken.append(user)
        await pool.stop_workers(user_id=user)
        return took

    async def claims(pool_config: ProcessSandboxConfig, users: list[str]) -> list[float]:
        nonlocal fallbacks
        steps.clear()
        spares_taken.clear()
        took = []
        async with SandboxOrchestrator(pool_config) as pool:
            for user in users:
                deadline = time.monotonic() + 30
                while (workers := pool.get_pool_stats()["workers"])["prewarmed"] < 1 or workers["starting"]:
                    if time.monotonic() > deadline:  # the refill done and quiet: it is not on the clock
                        raise TimeoutError("pre-warm did not happen")
                    await asyncio.sleep(0.005)
                took.append(await one(pool, user))
            fallbacks += pool.get_pool_stats()["claim_fallbacks"]
        return took

    any_user = await claims(roomy.replace(min_idle=1), new_users("claim-any", n))
    switched = can_switch_ahead(roomy)
    claimed = any_user
    if switched:  # last: the detail's steps and spares are this run's
        claimed = await claims(roomy.replace(min_idle=1, new_user_spares=1), new_users("claim-new", n))
    spawned: list[float] = []
    async with SandboxOrchestrator(roomy.replace(min_idle=0)) as pool:
        for user in new_users("spawn-new", n):
            spawned.append(await one(pool, user))
    p50, p99 = _pct(claimed, 0.5), _pct(claimed, 0.99)
    base = _pct(spawned, 0.5)
    return Figure(f"claim new user -> exec true ({config.profile})", _ms(p50), "ms p50", "p50 <= 5 ms, p99 <= 20 ms",
                  p50 <= 0.005 and p99 <= 0.02, baseline=_ms(base), ratio=round(p50 / base, 3),
                  detail={"p99_ms": _ms(p99), "spawn_p99_ms": _ms(_pct(spawned, 0.99)), "n": n,
                          "new_user_spares": 1 if switched else 0, "any_user_p50_ms": _ms(_pct(any_user, 0.5)),
                          "any_user_p99_ms": _ms(_pct(any_user, 0.99)),
                          "claim_fallbacks": fallbacks, "spares_taken": len(spares_taken),
                          **{f"{step}_ms": _ms(statistics.median(v)) for step, v in steps.items()}})  # fmt: skip


_ECHO = "import sys\nfor line in sys.stdin.buffer:\n    sys.stdout.buffer.write(line)\n    sys.stdout.buffer.flush()\n"


class _PipeEcho:
    """A process echoing lines over pipes (``argv``), timed one protocol-sized line at a time."""

    LINE = b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{}}\n'

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> _PipeEcho:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.close()
        await self.proc.wait()

    async def round_trip(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(self.LINE)
        await self.proc.stdin.drain()
        await self.proc.stdout.readline()


async def ping_vs_pipe(config: ProcessSandboxConfig, n: int, blocks: int = 10) -> Figure:
    """``ping`` through the orchestrator (warm worker) against a raw pipe echo.

    The baseline is a Python process echoing lines over the same kind of pipes (the
    floor for any Python worker); ``cat`` as echo is reported alongside. The three are timed
    in turns, ``blocks`` blocks of ``n / blocks`` round trips each, so that a change of pace
    on the machine during the step (this VM's small figures move by 2x between phases) hits
    the baseline and the figure alike; each is the median of all its round trips.

    Where the scheduler puts the two ends decides most of the spread: a round trip between
    two CPUs pays two cross-CPU wake-ups (on a VM whose idle vCPUs halt, tens of microseconds
    each), one on a single CPU pays only the code on both ends. So the step also times ping and
    the Python echo again with the host's thread and the other end pinned to one CPU (the
    ``same_cpu`` detail): that ratio is the code's cost, not the wake-ups'.
    """
    per_block = max(1, n // blocks)
    samples: dict[str, list[float]] = {"python": [], "cat": [], "ping": []}
    pinned: dict[str, list[float]] = {"python": [], "ping": []}
    async with (_PipeEcho([sys.executable, "-c", _ECHO]) as python, _PipeEcho(["cat"]) as cat,
                SandboxOrchestrator(config.replace(min_idle=0)) as pool):  # fmt: skip
        result = await pool.execute("bench", RawRequest("ping"))

        def ping() -> Awaitable[object]:
            return pool.execute("bench", RawRequest("ping"))

        for _ in range(blocks):
            samples["python"] += await _timed(python.round_trip, per_block)
            samples["cat"] += await _timed(cat.round_trip, per_block)
            samples["ping"] += await _timed(ping, per_block)
        worker = pool._workers.get(result.worker_id)
        ends = {"python": python.proc.pid if python.proc is not None else 0,
                "ping": _worker_python_pid(worker.pid or 0) if worker is not None else 0}  # fmt: skip
        for _ in range(blocks // 2):
            for name, fn in (("python", python.round_trip), ("ping", ping)):
                with _one_cpu(ends[name]) as held:
                    timed = await _timed(fn, per_block)
                if held:
                    pinned[name] += timed
    base, cat_echo, ours = (statistics.median(samples[k]) for k in ("python", "cat", "ping"))
    ratio = ours / base
    same_cpu = {}
    if pinned["python"] and pinned["ping"]:
        p_base, p_ours = statistics.median(pinned["python"]), statistics.median(pinned["ping"])
        same_cpu = {"same_cpu_ping_ms": _ms(p_ours), "same_cpu_echo_ms": _ms(p_base),
                    "same_cpu_ratio": round(p_ours / p_base, 2)}  # fmt: skip
    return Figure("ping round trip", _ms(ours), "ms p50", "< 3x raw pipe echo", ratio < 3,
                  baseline=_ms(base), ratio=round(ratio, 2),
                  detail={"n": per_block * blocks, "blocks": blocks, "cat_echo_ms": _ms(cat_echo),
                          "ratio_vs_cat": round(ours / cat_echo, 2), **same_cpu})


@contextlib.contextmanager
def _one_cpu(pid: int) -> Iterator[bool]:
    """Pin this thread and every thread of process ``pid`` to one CPU (the first this thread
    may use), restoring both after; yields whether the pins held (none is left when one failed)."""
    mine = os.sched_getaffinity(0)
    cpu = {min(mine)}
    pinned: dict[int, set[int]] = {}
    held = pid > 0
    try:
        for tid in map(int, os.listdir(f"/proc/{pid}/task") if held else []):
            before = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpu)
            pinned[tid] = before
        os.sched_setaffinity(0, cpu)
    except OSError:
        held = False
    try:
        yield held
    finally:
        os.sched_setaffinity(0, mine)
        for tid, cpus in pinned.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)


IDLE_GAP = 0.02
"""Seconds of idleness before each ``exec true`` of the step's after-idle figure."""


async def exec_true(config: ProcessSandboxConfig, n: int) -> Figure:
    """``exec true`` end to end on a warm worker against spawning ``true`` directly.

    Back to back, and (in the detail) each after :data:`IDLE_GAP` of idleness: on a VM whose
    idle vCPUs halt, the second is what a command arriving now and then pays, and what the
    claim step's command (after the pool's refill has gone quiet) pays too.
    """
    async def direct() -> None:
        proc = await asyncio.create_subprocess_exec("true")
        await proc.wait()

    async def after_idle() -> float:
        await asyncio.sleep(IDLE_GAP)
        began = time.perf_counter()
        await pool.execute("bench", ExecRequest(argv=("true",)))
        return time.perf_counter() - began

    base = statistics.median(await _timed(direct, n))
    async with SandboxOrchestrator(config.replace(min_idle=0)) as pool:
        await pool.execute("bench", ExecRequest(argv=("true",)))
        samples = await _timed(lambda: pool.execute("bench", ExecRequest(argv=("true",))), n)
        idle = [await after_idle() for _ in range(n)]
    ours, rested = statistics.median(samples), statistics.median(idle)
    return Figure("exec true end to end", _ms(ours), "ms p50", "", None, baseline=_ms(base),
                  ratio=round(ours / base, 2),
                  detail={"n": n, "after_idle_ms": _ms(rested), "idle_gap_ms": _ms(IDLE_GAP),
                          "after_idle_ratio": round(rested / ours, 2)})  # fmt: skip


async def record_cost(config: ProcessSandboxConfig, n: int) -> Figure:
    """``exec true`` on a warm worker with the durable record on, against the same without it.

    The two pools alternate in rounds so that drift on the machine hits both alike; the
    record's file is flushed at the end, so what was measured is what was kept.
    """
    from sandbox_core.record import Record

    state = config.workspace_root.parent / "bench-state"
    record = Record(state / "record.sqlite3")
    plain_samples: list[float] = []
    recorded_samples: list[float] = []
    request = ExecRequest(argv=("true",))
    try:
        async with SandboxOrchestrator(config.replace(min_idle=0)) as plain, \
                SandboxOrchestrator(config.replace(min_idle=0), record=record) as recorded:  # fmt: skip
            await plain.execute("bench", request)
            await recorded.execute("bench", request)
            for _ in range(max(1, n // 10)):
                plain_samples += await _timed(lambda: plain.execute("bench", request), 10)
                recorded_samples += await _timed(lambda: recorded.execute("bench", request), 10)
        kept = await asyncio.to_thread(record.flush)
    finally:
        await asyncio.to_thread(record.close)
    base, ours = statistics.median(plain_samples), statistics.median(recorded_samples)
    ratio = ours / base
    return Figure("exec true with the record", _ms(ours), "ms p50", "<= 1.1x without it", ratio <= 1.1,
                  baseline=_ms(base), ratio=round(ratio, 3),
                  detail={"n": len(recorded_samples), "rows_dropped": record.dropped, "flushed": kept})


def _memory(pid: int) -> tuple[int, int]:
    rss = uss = 0
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            kb = int(rest.split()[0]) if rest.split() else 0
            if key == "Rss":
                rss = kb
            elif key in ("Private_Clean", "Private_Dirty"):
                uss += kb
    return rss, uss


def _worker_python_pid(pid: int) -> int:
    """The Python worker inside a launcher chain (bwrap forks it as a descendant)."""
    from sandbox_core.process_tree import descendants
    from sandbox_core.shared import WORKER_ENTRY

    best = pid
    for member in descendants(pid):
        try:
            with open(f"/proc/{member}/cmdline", "rb") as fh:
                if WORKER_ENTRY.encode() in fh.read():
                    best = member
        except OSError:
            continue
    return best


async def idle_memory(config: ProcessSandboxConfig) -> Figure:
    """RSS and USS of an idle, bound worker."""
    worker = SandboxWorker(config, "bench-mem", user_id="bench", workspace=config.workspace_for("bench"))
    await worker.start()
    try:
        rss, uss = _memory(_worker_python_pid(worker.pid or 0))
    finally:
        await worker.stop()
    return Figure("idle worker memory", round(uss / 1024, 1), "MB USS", "< 30 MB USS", uss < 30 * 1024,
                  detail={"rss_mb": round(rss / 1024, 1)})


async def _run_argv(argv: list[str]) -> float:
    began = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL)
    if await proc.wait() != 0:
        raise RuntimeError(f"baseline command failed: {argv}")
    return time.perf_counter() - began


async def strict_vs_bare_bwrap(config: ProcessSandboxConfig, n: int) -> Figure:
    """Strict worker spawn-to-ready against bare ``bwrap python -c pass`` in the same run.

    A second baseline runs bare bwrap with Python importing the worker's own modules, to
    separate the cost of the isolation layers from the cost of the worker's imports.
    """
    from sandbox_core.isolation.launch import PACKAGE_ROOT
    from sandbox_core.isolation.strict import find_bwrap

    bwrap = find_bwrap(config)
    bare = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-pid",
            "--unshare-net", "--die-with-parent", "--", sys.executable, "-I", "-c", "pass"]
    inside = ", ".join(f"sandbox_core.inside.{m}" for m in ("worker_main", "confine", "identity", "landlock"))
    imports = f"import sys; sys.path.insert(0, {PACKAGE_ROOT!r}); import {inside}"
    bare_imports = [*bare[:-4], sys.executable, "-I", "-S", "-c", imports]
    samples: dict[str, list[float]] = {"bare": [], "imports": [], "ready": [], "first": []}
    for i in range(n):  # in turns, so that a change of load on the machine hits all alike
        samples["bare"].append(await _run_argv(bare))
        samples["imports"].append(await _run_argv(bare_imports))
        ready, first = await _spawn_to_first_exec(config, i)
        samples["ready"].append(ready)
        samples["first"].append(first)
    b, bi, ours, first = (statistics.median(samples[k]) for k in ("bare", "imports", "ready", "first"))
    return Figure("strict cold start vs bwrap", _ms(ours), "ms p50", "<= 1.5x bare bwrap python",
                  ours / b <= 1.5, baseline=_ms(b), ratio=round(ours / b, 2),
                  detail={"bare_bwrap_with_worker_imports_ms": _ms(bi), "ratio_vs_same_imports": round(ours / bi, 2),
                          "spawn_to_first_exec_true_ms": _ms(first), "first_exec_ratio": round(first / b, 2)})


async def _spawn_to_first_exec(config: ProcessSandboxConfig, i: int) -> tuple[float, float]:
    """Seconds from a new worker's spawn to ready, and to its first ``exec true`` done (the worker
    imports its serving loop after the handshake: a new user's first command waits for that)."""
    worker = SandboxWorker(config, f"bench-first-{i}", user_id="bench", workspace=config.workspace_for("bench"))
    try:
        began = time.perf_counter()
        await worker.start()
        ready = time.perf_counter() - began
        await worker.execute("exec", ExecRequest(argv=("true",)).params())
        return ready, time.perf_counter() - began
    finally:
        await worker.stop()


def _cli_argv() -> list[str] | None:
    """The ``sandbox`` console script of this installation (next to its Python), if there is one."""
    script = Path(sys.executable).with_name("sandbox")
    return [str(script)] if os.access(script, os.X_OK) else None


def _cli_env(config: ProcessSandboxConfig, state: Path) -> dict[str, str]:
    """The environment a CLI run of the benchmark gets: this suite's settings, its own state and runtime dirs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SANDBOX_", "_SANDBOX_", "_TYPER_"))}
    env.update(
        SANDBOX_PROFILE=config.profile, SANDBOX_WORKSPACE_ROOT=str(config.workspace_root), SANDBOX_MIN_IDLE="0",
        SANDBOX_ALLOW_ROOT_PROCESS="1", SANDBOX_STATE_DIR=str(state), XDG_RUNTIME_DIR=str(state / "run"),
        SANDBOX_DEFAULT_USER="bench",
    )
    if config.strict.bwrap != "bwrap":
        env["SANDBOX_STRICT__BWRAP"] = config.strict.bwrap
    return env


async def _whole_process(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> float:
    began = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env=env, cwd=cwd,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[1:]} failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - began


async def _alternating(runs: dict[str, Callable[[], Awaitable[float]]], n: int) -> dict[str, float]:
    """The median of ``n`` runs of each, taken in turns so that drift on the machine hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(n):
        for name, run in runs.items():
            samples[name].append(await run())
    return {name: statistics.median(values) for name, values in samples.items()}


async def _serve(argv: list[str], env: dict[str, str], sock: Path) -> asyncio.subprocess.Process:
    """``sandbox serve --socket SOCK`` in the background, once its socket accepts connections."""
    import socket

    proc = await asyncio.create_subprocess_exec(
        *argv, "serve", "--socket", str(sock), env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.returncode is None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(sock))
            return proc
        except OSError:
            await asyncio.sleep(0.05)
        finally:
            probe.close()
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()
    raise RuntimeError("sandbox serve did not come up within 30 s")


SRT_HOME = Path("~/.cache/srt/node_modules/.bin/srt")
"""Where ``npm install @anthropic-ai/sandbox-runtime`` run in ``~/.cache/srt`` puts ``srt``."""


def _srt_argv() -> list[str] | None:
    """Anthropic's sandbox-runtime CLI, from PATH or :data:`SRT_HOME`; None when neither has it."""
    found = shutil.which("srt")
    if found is None:
        home = SRT_HOME.expanduser()
        found = str(home) if os.access(home, os.X_OK) else None
    return [found] if found else None


async def cli_exec_true(config: ProcessSandboxConfig, n: int) -> list[Figure]:
    """Whole-process ``sandbox exec -- true``, one shot in-process and against a running service.

    The one shot runs with its head start (the default) and without it (``head_start = false``),
    in the same rounds. The baseline is ``python3 -c pass`` run by the CLI's own interpreter (the same venv and
    ``site``; not a pyenv shim, which is a shell script), in the same rounds; and, when
    ``srt`` is installed (:func:`_srt_argv`), ``srt -c true`` (its default settings, in a
    directory of its own) in the same rounds too.
    """
    cli = _cli_argv()
    if cli is None:
        return []
    state = config.workspace_root.parent / "bench-cli"
    (state / "run").mkdir(parents=True, exist_ok=True, mode=0o700)
    env = _cli_env(config, state)
    python3 = sys.executable
    sock = state / "run" / "bench.sock"
    server = await _serve(cli, {**env, "SANDBOX_MODEL__PROVIDER": "offline"}, sock)  # no model call leaves the host
    try:
        local = [*cli, "--local", "exec", "--", "true"]
        remote = [*cli, "--connect", f"unix:{sock}", "exec", "--", "true"]
        agent = [*cli, "--connect", f"unix:{sock}", "run", "hello"]
        # a --user the service agrees with (our login name): the same run, through the full command
        agent_full = [*cli, "--connect", f"unix:{sock}", "--user", pwd.getpwuid(os.getuid()).pw_name, "run", "hello"]
        await _whole_process(remote, env)  # the service's worker for the user is warm from here on
        await _whole_process(agent, env)  # and has run the agent once
        no_head = {**env, "SANDBOX_HEAD_START": "false"}
        runs: dict[str, Callable[[], Awaitable[float]]] = {
            "python3": lambda: _whole_process([python3, "-c", "pass"]),
            "local": lambda: _whole_process(local, env),
            "local_no_head": lambda: _whole_process(local, no_head),
            "service": lambda: _whole_process(remote, env),
            "agent": lambda: _whole_process(agent, env),
            "agent_full": lambda: _whole_process(agent_full, env),
        }
        srt = _srt_argv()
        srt_skipped: str | None = None
        if srt is not None:
            srt_dir = state / "srt"
            srt_dir.mkdir(exist_ok=True)
            try:  # installed is not working: its own dependencies (ripgrep, socat) may be missing
                await _whole_process([*srt, "-c", "true"], cwd=srt_dir)
            except RuntimeError as exc:
                srt_skipped = str(exc)[-200:]
            else:
                runs["srt"] = lambda: _whole_process([*srt, "-c", "true"], cwd=srt_dir)
        medians = await _alternating(runs, n)
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.terminate()
        try:
            await asyncio.wait_for(server.wait(), 30)
        except TimeoutError:
            server.kill()
            await server.wait()
    base = medians["python3"]
    detail: dict[str, Any] = {"n": n}
    if srt_skipped is not None:
        detail["srt_skipped"] = srt_skipped
    local_ratio, remote_ratio = medians["local"] / base, medians["service"] / base
    figures = [
        Figure("sandbox exec -- true, one shot in-process", _ms(medians["local"]), "ms p50",
               "<= 6x python3 -c pass", local_ratio <= 6, baseline=_ms(base), ratio=round(local_ratio, 2),
               detail=dict(detail)),
        Figure("sandbox exec -- true, one shot: head start vs none", _ms(medians["local"]), "ms p50",
               baseline=_ms(medians["local_no_head"]), ratio=round(medians["local"] / medians["local_no_head"], 2),
               detail=dict(detail)),
        Figure("sandbox exec -- true, against a running service", _ms(medians["service"]), "ms p50",
               "<= 2.5x python3 -c pass", remote_ratio <= 2.5, baseline=_ms(base), ratio=round(remote_ratio, 2),
               detail=dict(detail)),
        Figure("sandbox run hello (offline model), against a running service", _ms(medians["agent"]), "ms p50",
               baseline=_ms(base), ratio=round(medians["agent"] / base, 2),
               detail={**detail, "full_client_ms": _ms(medians["agent_full"]),
                       "ratio_vs_full_client": round(medians["agent"] / medians["agent_full"], 2)}),
    ]
    if "srt" in medians:
        srt_ratio = medians["local"] / medians["srt"]
        figures.append(Figure("sandbox exec -- true, one shot vs srt -c true", _ms(medians["local"]), "ms p50",
                              "<= 0.5x srt -c true", srt_ratio <= 0.5, baseline=_ms(medians["srt"]),
                              ratio=round(srt_ratio, 2), detail=dict(detail)))  # fmt: skip
    return figures


async def agent_first_text(config: ProcessSandboxConfig, n: int) -> Figure:
    """``agent.run`` request to first ``text`` event, offline model: cold vs warm worker."""
    offline = config.replace(model=dataclasses.replace(config.model, provider="offline"), min_idle=0)
    cold: list[float] = []
    warm: list[float] = []
    for i in range(max(2, n // 4)):
        async with SandboxOrchestrator(offline) as pool:
            cold.append(await _first_text(pool, f"agent{i}"))
            if i == 0:
                warm = [await _first_text(pool, "agent0") for _ in range(n)]
    c, w = statistics.median(cold), statistics.median(warm)
    return Figure("agent first text (offline)", _ms(w), "ms p50 warm", "", None, baseline=_ms(c),
                  ratio=round(w / c, 3), detail={"cold_ms": _ms(c), "n_cold": len(cold), "n_warm": len(warm)})


async def _first_text(pool: SandboxOrchestrator, user: str) -> float:
    from sandbox_core.requests import AgentRequest

    began = time.perf_counter()
    stream = pool.execute_stream(user, AgentRequest(prompt="hello"))
    try:
        async for event in stream:
            if event.type == "text":
                return time.perf_counter() - began
    finally:
        await stream.aclose()
    raise RuntimeError("no text event")


async def _poll_until(predicate: Callable[[], bool], what: str, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench: no {what} within {limit:g} s")
        await asyncio.sleep(0.005)


def _quiet(pool: SandboxOrchestrator) -> bool:
    """An agent-ready pre-warmed worker is waiting, and no worker is starting or preloading."""
    idle = pool._idle_unbound()
    starting = pool.get_pool_stats()["workers"]["starting"]
    return bool(idle) and not starting and all(w.agent_ready for w in idle)


async def agent_ready_first_text(config: ProcessSandboxConfig, n: int) -> Figure:
    """A new user's first ``text`` (offline model) from a pool whose idle workers preloaded the
    agent, against a cold worker (``preload = "none"``, spawned for the user) in the same run.

    Pre-warmed: where workers can be pre-warmed unbound (the process profile; strict on a root
    host) the new user (a name never used before: the uid map in the state directory outlives the
    run, and a user with a uid attaches their own workspace instead of taking the spare, ~7-12 ms
    more) claims an unbound worker that preloaded while it waited; elsewhere a worker
    is launched for the new user (``pool.launch``) and has preloaded before the request. Each pool
    answers one agent run first (the host's gateway).
    """
    from sandbox_core.isolation.launch import can_prewarm

    offline = config.replace(model=dataclasses.replace(config.model, provider="offline"), worker_timeout=3600)
    unbound = can_prewarm(config)
    warm: list[float] = []
    spares = 0
    async with SandboxOrchestrator(offline.replace(preload="agent", min_idle=1 if unbound else 0)) as pool:
        await _first_text(pool, "warmup")
        for i in range(n):
            user = f"ready-{os.getpid()}-{i}"  # never seen before: a fixed name has a uid after the first run
            if unbound:  # off the clock: the refill started and preloaded, the pool is quiet again
                await _poll_until(lambda: _quiet(pool), "agent-ready worker")
            else:
                (worker_id,) = await pool.launch(1, user_id=user)
                ready = pool._workers[worker_id]
                await _poll_until(lambda w=ready: w.agent_ready, "agent-ready worker")  # type: ignore[misc]
            warm.append(await _first_text(pool, user))
            spares += sum(1 for w in pool._workers.values() if w.user_id == user and w.claimed_spare)
            await pool.stop_workers(user_id=user)
    cold: list[float] = []
    async with SandboxOrchestrator(offline.replace(preload="none", min_idle=0)) as pool:
        await _first_text(pool, "warmup")
        for i in range(max(2, n // 4)):
            cold.append(await _first_text(pool, f"cold{i}"))
            await pool.stop_workers(user_id=f"cold{i}")
    w, c = _pct(warm, 0.5), _pct(cold, 0.5)
    return Figure(f"new user first agent text, pre-warmed pool ({config.profile})", _ms(w), "ms p50", "<= 30 ms",
                  w <= 0.030, baseline=_ms(c), ratio=round(w / c, 4),
                  detail={"p95_ms": _ms(_pct(warm, 0.95)), "cold_ms": _ms(c), "n": len(warm), "n_cold": len(cold),
                          "spares_taken": spares})  # fmt: skip


def _tree_uss_kb(pid: int) -> int:
    """USS of a worker's whole process tree (the launcher chain and the Python worker)."""
    from sandbox_core.process_tree import descendants

    total = 0
    for member in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            total += _memory(member)[1]
    return total


async def agent_worker_memory(config: ProcessSandboxConfig) -> Figure:
    """USS of an idle worker that preloaded the agent, against one that did not (same run)."""
    sizes: dict[str, tuple[int, int]] = {}
    for mode in ("none", "agent"):
        worker = SandboxWorker(config, f"bench-agent-mem-{mode}", user_id="bench",
                               workspace=config.workspace_for("bench"), preload=mode)
        await worker.start()
        try:
            if config.profile != "strict":
                await worker.bind("bench", config.workspace_for("bench"))
            if mode == "agent":
                await _poll_until(lambda w=worker: w.agent_ready, "agent-ready worker")  # type: ignore[misc]
            sizes[mode] = _memory(_worker_python_pid(worker.pid or 0))
        finally:
            await worker.stop()
    (_, base), (rss, uss) = sizes["none"], sizes["agent"]
    return Figure(f"idle agent-ready worker memory ({config.profile})", round(uss / 1024, 1), "MB USS",
                  "<= 60 MB USS", uss <= 60 * 1024, baseline=round(base / 1024, 1), ratio=round(uss / base, 2),
                  detail={"rss_mb": round(rss / 1024, 1)})


async def exec_workers_memory(config: ProcessSandboxConfig, count: int = 32) -> Figure:
    """USS of ``count`` idle exec workers (no preload), whole process trees, summed."""
    workers = [SandboxWorker(config, f"bench-many-{i}", user_id="bench", workspace=config.workspace_for("bench"))
               for i in range(count)]
    try:
        for batch in range(0, count, 4):  # a few at a time: a 2-core machine
            await asyncio.gather(*(w.start() for w in workers[batch:batch + 4]))
        total = sum(_tree_uss_kb(w.pid or 0) for w in workers)
    finally:
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
    return Figure(f"{count} pre-warmed exec workers ({config.profile})", round(total / 1024, 1), "MB USS",
                  "<= 1024 MB USS", total <= 1024 * 1024, detail={"per_worker_mb": round(total / 1024 / count, 1)})


def _sse_reply(deltas: int) -> bytes:
    def event(kind: str, data: dict[str, Any]) -> str:
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    usage = {"input_tokens": 10, "output_tokens": deltas}
    parts = [event("message_start", {"type": "message_start", "message": {
        "id": "msg_bench", "type": "message", "role": "assistant", "model": "bench", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        event("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}})]
    parts += [event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": f"w{i} "}})
              for i in range(deltas)]
    parts += [event("content_block_stop", {"type": "content_block_stop", "index": 0}),
              event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                        "stop_sequence": None}, "usage": usage}),
              event("message_stop", {"type": "message_stop"})]
    return "".join(parts).encode()


async def gateway_overhead(config: ProcessSandboxConfig, deltas: int = 1000) -> Figure:
    """Per text event: the SDK streaming through worker, pipe and gateway vs the SDK in-process.

    Both sides read the same server-sent events (``deltas`` text deltas) from an in-memory
    HTTP transport standing in for the API, so only the path differs.
    """
    import anthropic
    import httpx2

    from sandbox_core.config import Secret
    from sandbox_core.gateway import ModelGateway
    from sandbox_core.requests import AgentRequest

    body = _sse_reply(deltas)

    def api(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    client = anthropic.AsyncAnthropic(api_key="bench", base_url="http://api.bench",
                                      http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(api)))
    began = time.perf_counter()
    seen = 0
    async with client.messages.stream(model="bench", max_tokens=10, messages=[
            {"role": "user", "content": "x"}]) as stream:
        async for _text in stream.text_stream:
            seen += 1
    direct = time.perf_counter() - began
    await client.close()

    model = dataclasses.replace(config.model, provider="anthropic", api_key=Secret("bench"),
                                base_url="http://api.bench")
    gateway = ModelGateway(model, transport=httpx2.MockTransport(api))
    async with SandboxOrchestrator(config.replace(model=model, min_idle=0), gateway=gateway) as pool:
        await pool.execute("gw", RawRequest("ping"))
        stream2 = pool.execute_stream("gw", AgentRequest(prompt="x", tools=()))
        first = last = 0.0
        count = 0
        async for event in stream2:
            if event.type == "text":
                last = time.perf_counter()
                first = first or last
                count += 1
        # time per event from the first to the last delta, against the same span in-process
    through = last - first
    per_event_us = (through / max(1, count - 1) - direct / max(1, seen)) * 1e6
    return Figure("gateway stream per event", round(through / max(1, count - 1) * 1e6, 2), "us/event", "",
                  None, baseline=round(direct / max(1, seen) * 1e6, 2),
                  ratio=round((through / max(1, count - 1)) / (direct / max(1, seen)), 2),
                  detail={"events": count, "direct_events": seen, "overhead_us_per_event": round(per_event_us, 2)})


_ENDPOINT_CLIENT = r"""
import http.client, json, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
n, stream = int(sys.argv[1]), sys.argv[2] == "1"
body = json.dumps({"model": sys.argv[3], "max_tokens": 256, "stream": stream,
                   "messages": [{"role": "user", "content": "hello there"}]}).encode()
def calls(host, port):
    conn, times, data = http.client.HTTPConnection(host, port, timeout=30), [], b""
    for _ in range(n):
        began = time.perf_counter()
        conn.request("POST", "/v1/messages", body, {"content-type": "application/json"})
        data = conn.getresponse().read()
        times.append(time.perf_counter() - began)
    return sorted(times)[n // 2], data
base = os.environ["ANTHROPIC_BASE_URL"].rsplit(":", 1)
ours, reply = calls(base[0].split("//")[1], int(base[1]))
class Same(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(reply)
        self.connection.sendall(head + reply)
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", 0), Same)
threading.Thread(target=server.serve_forever, daemon=True).start()
plain, _ = calls("127.0.0.1", server.server_address[1])
print(json.dumps({"endpoint": ours, "plain": plain, "bytes": len(reply)}))
"""


async def model_endpoint_call(config: ProcessSandboxConfig, n: int) -> list[Figure]:
    """A Messages API call through the in-sandbox model endpoint (offline model, keep-alive), against
    the same client and bytes from a plain HTTP server on the same loopback (strict only)."""
    from sandbox_core.isolation import runtime

    config = config.replace(min_idle=0, model=dataclasses.replace(config.model, provider="offline"))
    figures = []
    async with SandboxOrchestrator(config) as pool:
        for stream in ("0", "1"):
            argv = (runtime.inside_executable(), "-I", "-c", _ENDPOINT_CLIENT, str(n), stream, config.model.model)
            result = await pool.execute("bench", ExecRequest(argv=argv, timeout=300))
            lines = result.stdout_text.strip().splitlines()
            if not lines:
                raise RuntimeError(f"the endpoint client failed: {result.stderr_text[-500:]}")
            got = json.loads(lines[-1])
            figures.append(Figure(f"model endpoint call ({'SSE' if stream == '1' else 'JSON'}, offline)",
                                  _ms(got["endpoint"]), "ms p50", "", None, baseline=_ms(got["plain"]),
                                  ratio=round(got["endpoint"] / got["plain"], 1),
                                  detail={"n": n, "reply_bytes": got["bytes"]}))  # fmt: skip
    return figures


def _peak_reset() -> None:
    """Make VmHWM (peak RSS) start from the current RSS, where the kernel allows it."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _plain_pipe_seconds(size: int, consumer: str) -> float:
    """``head -c SIZE /dev/zero | CONSUMER`` through a plain pipe: the baseline."""
    began = time.perf_counter()
    proc = await asyncio.create_subprocess_shell(f"head -c {size} /dev/zero | {consumer}")
    await proc.wait()
    return time.perf_counter() - began


class LoopLag:
    """Measures how late the event loop runs a 5 ms timer while something else works."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _tick(self) -> None:
        while True:
            began = time.perf_counter()
            await asyncio.sleep(0.005)
            self.samples.append(time.perf_counter() - began - 0.005)

    def p99_ms(self) -> float:
        return _ms(_pct(self.samples, 0.99)) if self.samples else 0.0


async def exec_throughput(config: ProcessSandboxConfig, size: int) -> list[Figure]:
    """Bytes per second through ``exec``, out (``head -c`` to the caller) and in (stdin to
    ``cat > /dev/null``), against the same bytes through a plain pipe, and the host's peak RSS.

    The plain pipe runs before, between and after the two (its median is the baseline): on a
    shared VM it moved 1.8-3.6 GB/s from one run to the next, and a single run beside ours
    made the ratio say more about the machine's minute than about the crossing."""
    block = bytes(1024 * 1024)
    figures = []
    plain_runs = [await _plain_pipe_seconds(size, "cat > /dev/null")]
    async with SandboxOrchestrator(config.replace(min_idle=0, request_timeout=600)) as pool:
        await pool.execute("bench", ExecRequest(argv=("true",)))  # the worker is up
        _peak_reset()
        rss = _status_mb("VmRSS")
        began = time.perf_counter()
        got = 0
        async with LoopLag() as out_lag:
            async for event in pool.execute_stream("bench", ExecRequest(argv=("head", "-c", str(size), "/dev/zero"))):
                got += len(event.chunk())
        ours = time.perf_counter() - began
        out_peak = _status_mb("VmHWM") - rss
        assert got == size, f"exec delivered {got} of {size} bytes"
        plain_runs.append(await _plain_pipe_seconds(size, "cat > /dev/null"))

        async def produce() -> Any:
            for _ in range(size // len(block)):
                yield block

        _peak_reset()
        rss = _status_mb("VmRSS")
        began = time.perf_counter()
        async with LoopLag() as in_lag:
            await pool.execute("bench", ExecRequest(shell="cat > /dev/null", stdin=produce()))
        ours_in = time.perf_counter() - began
        in_peak = _status_mb("VmHWM") - rss
    plain_runs.append(await _plain_pipe_seconds(size, "cat > /dev/null"))
    plain = statistics.median(plain_runs)
    mb = size / 1e6
    runs = (("exec output", ours, out_peak, out_lag), ("exec stdin", ours_in, in_peak, in_lag))
    for name, seconds, peak, lag in runs:
        figures.append(Figure(
            f"{name} throughput", round(mb / seconds, 1), "MB/s", ">= 0.5x plain pipe", plain / seconds >= 0.5,
            baseline=round(mb / plain, 1), ratio=round(plain / seconds, 3),
            detail={"bytes": size, "host_peak_rss_growth_mb": round(peak, 1), "rss_target_mb": 100,
                    "loop_lag_p99_ms": lag.p99_ms(), "plain_runs_mb_s": [round(mb / t, 1) for t in plain_runs]},
        ))
    return figures


def _echo_shell() -> list[str]:
    """An interactive shell with no start-up files that echoes what is typed (bash, else sh)."""
    bash = shutil.which("bash")
    return [bash, "--norc", "--noprofile", "-i"] if bash else ["/bin/sh", "-i"]


_PROMPT = b"BENCH> "


async def _until(read: Callable[[], Awaitable[bytes]], pattern: bytes, limit: float = 30.0) -> None:
    """Read until ``pattern`` has arrived (a split pattern included), or TimeoutError."""
    seen = b""
    deadline = time.monotonic() + limit
    while pattern not in seen:
        chunk = await asyncio.wait_for(read(), max(0.001, deadline - time.monotonic()))
        if not chunk:
            raise EOFError(f"the terminal ended before {pattern!r}")
        seen = seen[-len(pattern):] + chunk


async def _keystrokes(write: Callable[[bytes], Awaitable[None]], read: Callable[[], Awaitable[bytes]],
                      n: int) -> list[float]:
    """Round trips of one key through a shell's line editor: sent, echoed back."""
    await _until(read, _PROMPT)
    samples = []
    for i in range(n):
        key = b"abcdefghijklmnopqrstuvwxyz"[i % 26 : i % 26 + 1]
        began = time.perf_counter()
        await write(key)
        await _until(read, key)
        samples.append(time.perf_counter() - began)
    await write(b"\x15exit\r")  # Ctrl-U: drop the typed line, then leave
    return samples


def _take_terminal() -> None:
    """In the shell's child, after setsid: the pty slave (stdin) becomes its controlling terminal."""
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


async def _local_pty_keystrokes(argv: list[str], n: int) -> list[float]:
    """The same keystroke round trip on a local pty running the same shell (the baseline)."""
    master, slave = os.openpty()
    home = tempfile.mkdtemp(prefix="sandbox-bench-pty-")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "xterm", "HOME": home, "PS1": _PROMPT.decode()}
    proc = await asyncio.create_subprocess_exec(*argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=home,
                                                start_new_session=True, preexec_fn=_take_terminal)
    os.close(slave)
    os.set_blocking(master, False)
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes] = asyncio.Queue()

    def readable() -> None:
        try:
            chunks.put_nowait(os.read(master, 65536))
        except BlockingIOError:
            pass
        except OSError:  # the shell has gone (EIO)
            loop.remove_reader(master)
            chunks.put_nowait(b"")

    loop.add_reader(master, readable)

    async def write(data: bytes) -> None:
        os.write(master, data)

    try:
        return await _keystrokes(write, chunks.get, n)
    finally:
        loop.remove_reader(master)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        os.close(master)
        shutil.rmtree(home, ignore_errors=True)


async def keystroke_echo(config: ProcessSandboxConfig, n: int) -> Figure:
    """A key typed into a warm shell on a sandbox pty until its echo is back (pool.terminal),
    against the same shell on a local pty in the same run."""
    argv = _echo_shell()
    base = statistics.median(await _local_pty_keystrokes(argv, n))
    inside = " ".join([os.path.basename(argv[0]), *argv[1:]])
    shell = ("/bin/sh", "-c", f"PS1='{_PROMPT.decode()}' exec {inside}")
    async with SandboxOrchestrator(config.replace(worker_timeout=3600)) as pool:
        await pool.execute("bench", ExecRequest(argv=("true",)))  # the user's worker is warm
        async with pool.terminal("bench", shell) as term:
            ours_samples = await _keystrokes(term.write, term.read, n)
            await term.wait()
    ours = statistics.median(ours_samples)
    ratio = ours / base
    return Figure("keystroke echo (terminal)", _ms(ours), "ms p50", "", None, baseline=_ms(base),
                  ratio=round(ratio, 2), detail={"p95_ms": _ms(_pct(ours_samples, 0.95)), "n": n,
                                                  "baseline": "the same shell on a local pty"})


_BYTES_SERVER = r"""
import socket, sys, threading
block = bytes(1 << 20)
def serve(conn):
    with conn:
        head = b""
        while b"\r\n\r\n" not in head:
            part = conn.recv(65536)
            if not part:
                return
            head += part
        size = int(head.split(b" ")[1].rsplit(b"/", 1)[1])
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % size)
        while size > 0:
            n = conn.send(memoryview(block)[: min(size, len(block))])
            size -= n
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
while True:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def _curl_times(out: str) -> list[float]:
    return [float(line) for line in out.split() if line.strip()]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def egress_throughput(config: ProcessSandboxConfig, size: int, n: int, rounds: int = 5) -> list[Figure]:
    """A download through the sandbox's proxy (plain HTTP and CONNECT) against the same download
    by the same client (curl) straight from the host; and the added latency of one connection
    (a small request through the proxy against one straight from the host).

    The server is a separate process on 127.0.0.1, reached inside by a ``network.hosts`` name.
    Through the proxy the bytes take one more loopback TCP hop and one relay: the worker hands
    curl's socket to the host, which splices the upstream socket into it (a thread per
    direction, :mod:`sandbox_core.egress.tunnel`); so the relay's CPU is nearly all the host's
    (``host_cpu_s``: this process, its tunnel threads included) and the worker's is the
    request head and the handover (``worker_cpu_s``). The three downloads run in turn,
    ``rounds`` times; each ratio is the median of the rounds' ratios, so a machine whose load
    changes during the run skews both sides alike."""
    from sandbox_core.config import NetworkPolicy

    if shutil.which("curl") is None:
        return [Figure("egress download throughput", 0.0, "MB/s", "skipped: no curl on this host")]
    server = await asyncio.create_subprocess_exec(sys.executable, "-c", _BYTES_SERVER, stdout=asyncio.subprocess.PIPE)
    times: dict[str, list[float]] = {"direct": [], "plain HTTP": [], "CONNECT": []}
    cpu: dict[str, list[float]] = {"plain HTTP": [], "CONNECT": []}
    host_cpu: dict[str, list[float]] = {"plain HTTP": [], "CONNECT": []}
    try:
        assert server.stdout is not None
        port = int((await server.stdout.readline()).decode())
        net = NetworkPolicy(mode="allowlist", allow=("registry.bench",), hosts={"registry.bench": "127.0.0.1"},
                            allow_private=("127.0.0.1/32",), max_connections=64)  # fmt: skip
        fmt = "%{time_total}\\n"

        async def host_curl(url: str, times: int) -> list[float]:
            script = f"for i in $(seq {times}); do curl -s -o /dev/null -w '{fmt}' {url}; done"
            proc = await asyncio.create_subprocess_shell(script, stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
            return _curl_times(out.decode())

        async with SandboxOrchestrator(config.replace(min_idle=0, request_timeout=600, network=net)) as pool:
            async def inside(flags: str, path: str, times: int) -> list[float]:
                script = (f"for i in $(seq {times}); do curl -s -o /dev/null {flags} -w '{fmt}' "
                          f"http://registry.bench:{port}{path}; done")  # fmt: skip
                result = await pool.execute("bench", ExecRequest(shell=script))
                return _curl_times(result.stdout_text)

            await inside("", "/bytes/100", 1)  # the worker is up
            worker = _worker_python_pid(pool.list_workers()[0]["pid"])
            for _ in range(rounds):
                times["direct"] += await host_curl(f"http://127.0.0.1:{port}/bytes/{size}", 1)
                for how, flags in (("plain HTTP", ""), ("CONNECT", "-p")):
                    host_before, worker_before = time.process_time(), _cpu_seconds(worker)
                    times[how] += await inside(flags, f"/bytes/{size}", 1)
                    host_cpu[how].append(time.process_time() - host_before)
                    cpu[how].append(host_cpu[how][-1] + _cpu_seconds(worker) - worker_before)
            direct_small = await host_curl(f"http://127.0.0.1:{port}/bytes/100", n)
            small = await inside("-p", "/bytes/100", n)
    finally:
        server.kill()
        await server.wait()
    mb = size / 1e6
    direct = statistics.median(times["direct"])
    figures = []
    for how in ("plain HTTP", "CONNECT"):
        ratio = statistics.median(d / t for d, t in zip(times["direct"], times[how], strict=True))
        seconds = statistics.median(times[how])
        figures.append(Figure(
            f"egress download ({how})", round(mb / seconds, 1), "MB/s", ">= 0.5x direct", ratio >= 0.5,
            baseline=round(mb / direct, 1), ratio=round(ratio, 3),
            detail={"bytes": size, "rounds": rounds, "client": "curl",
                    "baseline": "the same curl download from the host",
                    "relay_cpu_s": round(statistics.median(cpu[how]), 3),
                    "host_cpu_s": round(statistics.median(host_cpu[how]), 3),
                    "worker_cpu_s": round(statistics.median(cpu[how]) - statistics.median(host_cpu[how]), 3)},
        ))  # fmt: skip
    added = statistics.median(small) - statistics.median(direct_small)
    figures.append(Figure(
        "egress added latency per connection (CONNECT + small GET)", _ms(added), "ms", "", None,
        baseline=_ms(statistics.median(direct_small)), detail={"through_proxy_p50_ms": _ms(statistics.median(small)),
                                                               "samples": n},
    ))  # fmt: skip
    return figures


async def files_throughput(config: ProcessSandboxConfig, size: int, rounds: int = 3) -> list[Figure]:
    """Bytes per second of one file through ``pool.files`` (a tar stream, unpacked and packed by
    descriptor inside the sandbox), against the same bytes through ``exec`` (``cat > f``, ``cat f``).

    Each write starts from the same state: the ``exec`` pair's file is removed before the put.
    The worker's memory cgroup holds the page cache its writes dirty, and with 256 MiB of it
    still there the kernel holds the next write back (consecutive puts in one worker: 468, 159,
    48, 61 MB/s as its dirty cache grew to 768 MiB; with the cache dropped between them,
    377-418 MB/s each): a put written beside the ``exec`` file measured that, not the transfer.

    ``rounds`` rounds each time the ``exec`` pair, then ours; the ratio is the median of the
    rounds' ratios (one round each moved 0.22-1.8x between runs of the step: the machine's
    minute, not the code), the MB/s figures the medians of their runs."""
    block = os.urandom(1024 * 1024)

    async def produce() -> Any:
        for _ in range(size // len(block)):
            yield block

    def one_file(out: Any) -> None:
        import tarfile

        with tarfile.open(fileobj=out, mode="w|", bufsize=1024 * 1024) as archive:
            archive.copybufsize = 1024 * 1024  # type: ignore[attr-defined]  # (typeshed lacks it)
            info = tarfile.TarInfo("put.bin")
            info.size = size
            archive.addfile(info, _Repeat(block, size))

    from sandbox_core.files import produced

    runs: dict[str, list[float]] = {"exec_in": [], "exec_out": [], "put": [], "get": []}
    async with SandboxOrchestrator(config.replace(min_idle=0, request_timeout=600)) as pool:
        await pool.execute("bench", ExecRequest(argv=("true",)))
        for _ in range(rounds):
            began = time.perf_counter()
            await pool.execute("bench", ExecRequest(shell="cat > plain.bin", stdin=produce()))
            runs["exec_in"].append(time.perf_counter() - began)
            began = time.perf_counter()
            cat = ExecRequest(argv=("cat", "plain.bin"))
            got = sum([len(e.chunk()) async for e in pool.execute_stream("bench", cat)])
            runs["exec_out"].append(time.perf_counter() - began)
            assert got == size
            await pool.execute("bench", ExecRequest(argv=("rm", "-f", "plain.bin")))  # its dirty cache goes with it
            began = time.perf_counter()
            await pool.files.upload_tar("bench", ".", produced(one_file))
            runs["put"].append(time.perf_counter() - began)
            began = time.perf_counter()
            pulled = 0
            async for chunk in pool.files.download_tar("bench", "put.bin"):
                pulled += len(chunk)
            runs["get"].append(time.perf_counter() - began)
            assert pulled >= size
            await pool.files.remove("bench", "put.bin")
    mb = size / 1e6
    return [
        Figure(f"files {name} throughput", round(mb / statistics.median(runs[name]), 1), "MB/s", ">= 0.5x exec",
               ratio >= 0.5, baseline=round(mb / statistics.median(runs[base]), 1), ratio=round(ratio, 3),
               detail={"bytes": size, "rounds": rounds,
                       "ratios": [round(b / o, 3) for b, o in zip(runs[base], runs[name], strict=True)]})
        for name, base in (("put", "exec_in"), ("get", "exec_out"))
        for ratio in [statistics.median(b / o for b, o in zip(runs[base], runs[name], strict=True))]
    ]


class _Repeat:
    """``size`` bytes of ``block`` over and over, as a file object."""

    def __init__(self, block: bytes, size: int) -> None:
        self._block, self._left = block, size

    def read(self, n: int = -1) -> bytes:
        want = min(self._left, len(self._block) if n < 0 else n, len(self._block))
        self._left -= want
        return self._block[:want]


Step = tuple[str, Callable[[], Awaitable[Figure | list[Figure]]]]


def suite(config: ProcessSandboxConfig, quick: bool = False, only: tuple[str, ...] = ()) -> list[Step]:
    """The benchmark steps for ``config`` (a private workspace root is used); ``only`` keeps the
    named ones (a name that is no step: ConfigError, naming the steps there are)."""
    steps = _all_steps(config, quick)
    names = [name for name, _ in steps]
    unknown = [name for name in only if name not in names]
    if unknown:
        raise ConfigError("only", f"no benchmark step {', '.join(map(repr, unknown))}; "
                          f"the steps ({config.profile}): {', '.join(names)}")  # fmt: skip
    return [step for step in steps if step[0] in only] if only else steps


def _all_steps(config: ProcessSandboxConfig, quick: bool) -> list[Step]:
    n = 5 if quick else 20
    steps: list[Step] = [
        ("cold start", lambda: cold_start(config, n)),
        ("warm claim", lambda: warm_claim(config, n)),
        ("claim new user", lambda: claim_new_user(config, n)),
        ("ping vs pipe", lambda: ping_vs_pipe(config, n * 10)),
        ("exec true", lambda: exec_true(config, n * 2)),
        ("cli exec true", lambda: cli_exec_true(config, max(3, n // 2))),
        ("keystroke echo", lambda: keystroke_echo(config, n * 5)),
        ("record cost", lambda: record_cost(config, n * 2)),
        ("idle memory", lambda: idle_memory(config)),
        ("agent first text", lambda: agent_first_text(config, n)),
        ("agent-ready first text", lambda: agent_ready_first_text(config, n)),
        ("agent worker memory", lambda: agent_worker_memory(config)),
        ("exec workers memory", lambda: exec_workers_memory(config, 8 if quick else 32)),
        ("gateway overhead", lambda: gateway_overhead(config)),
        ("exec throughput", lambda: exec_throughput(config, (100 if quick else 1000) * 1024 * 1024)),
        ("files throughput", lambda: files_throughput(config, (64 if quick else 256) * 1024 * 1024)),
    ]
    if config.profile == "strict":
        steps.insert(1, ("strict vs bare bwrap", lambda: strict_vs_bare_bwrap(config, n)))
        steps.insert(-1, ("model endpoint", lambda: model_endpoint_call(config, n * 5)))


        steps.append(("egress throughput", lambda: egress_throughput(config, (50 if quick else 200) * 1000 * 1000, n)))
    return steps


def cpu_ticks(stat: str | None = None) -> tuple[int, int] | None:
    """(steal, all) CPU time so far, in ticks, from ``/proc/stat``'s ``cpu`` line (or ``stat``);
    None where it cannot be read."""
    try:
        if stat is None:
            with open("/proc/stat") as fh:
                stat = fh.readline()
        fields = stat.split()
        if not fields or fields[0] != "cpu":
            return None
        ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return (ticks[7] if len(ticks) == 8 else 0), sum(ticks)


def machine_figure(before: tuple[int, int] | None, after: tuple[int, int] | None,
                   load: tuple[float, float]) -> Figure:  # fmt: skip
    """What the hypervisor took while the suite ran (steal time, as a share of all CPU time) and
    the load average at its start and end: the context every other figure of the run needs."""
    share, unknown = None, "unknown (no /proc/stat)"
    if before is not None and after is not None:
        unknown = "unknown (no CPU time passed)"
        if after[1] > before[1]:
            share = round(100 * (after[0] - before[0]) / (after[1] - before[1]), 2)
    return Figure("machine during the run", share if share is not None else -1.0, "% steal",
                  detail={"load_start": round(load[0], 2), "load_end": round(load[1], 2), "cpus": os.cpu_count(),
                          **({} if share is not None else {"steal": unknown})})


async def run_suite(
    config: ProcessSandboxConfig, quick: bool = False, progress: Callable[[str], None] | None = None,
    only: tuple[str, ...] = (),
) -> list[Figure]:
    """Run every step on a private temporary workspace root; returns the figures, the machine's
    steal time and load during the run last (:func:`machine_figure`)."""
    root = Path(tempfile.mkdtemp(prefix="sandbox-bench-"))
    os.chmod(root, 0o711)
    try:
        from sandbox_core.isolation.launch import prepare_workspace

        # only the suite's own fixed commands run here (no agent, no untrusted input), so the
        # process profile may be measured as root too
        config = config.replace(workspace_root=root / "ws", allow_root_process=True)
        prepare_workspace(config, "bench")
        figures = []
        ticks, load = cpu_ticks(), os.getloadavg()[0]
        for name, step in suite(config, quick, only):
            if progress is not None:
                progress(name)
            result = await step()
            figures.extend(result if isinstance(result, list) else [result])
        figures.append(machine_figure(ticks, cpu_ticks(), (load, os.getloadavg()[0])))
        return figures
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:  # pragma: no cover - exercised by benchmarks/bench.py
    import json

    profile = sys.argv[1] if len(sys.argv) > 1 else "process"
    config = ProcessSandboxConfig(profile=profile)  # type: ignore[arg-type]
    figures = asyncio.run(run_suite(config))
    sys.stdout.write(json.dumps([f.to_dict() for f in figures], indent=2) + "\n")
