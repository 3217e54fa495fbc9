"""SandboxWorker: the host-side handle of one sandboxed worker process.

Life: ``start()`` spawns the process from a :class:`LaunchSpec` and completes the
``initialize`` handshake within ``startup_timeout`` (else the process is killed).
Requests are multiplexed by id; events arrive as notifications and are routed to the
request's stream. When the process dies, every pending call fails at once with
:class:`WorkerCrashed` carrying the exit status or signal and the last stderr lines.

Every crossing is bounded. A frame the host would send over ``max_frame_bytes`` fails its
call at once; stdin of any size streams as raw frames on the input pipe, which the worker
reads only as fast as the command takes it, so a command that does not read slows the
sender (and one that closes its stdin stops it: ``exec.stdin_closed``); output a
caller has not consumed past :data:`BUFFER_HIGH` pauses reading the worker's pipe (the worker
then blocks on its writes); at most :data:`MAX_HOST_CALLS` calls from the worker run at once.
Garbage (malformed frames, answers to nothing, stray events) is counted: a worker that
sends :data:`GARBAGE_LIMIT` pieces of it is retired after its current request, and one that
sends :data:`GARBAGE_KILL`, or whose frames break a pipe callback, is killed at once: its
pending calls fail with :class:`ProtocolError`.

Shutdown (``stop()``): close stdin (the worker exits at end of input), wait the grace
period, SIGTERM the process group, wait again, SIGKILL; then kill whatever remains of the
worker's session. Cleanup is shielded from cancellation.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox_core import datapipe
from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.egress import Relay
from sandbox_core.errors import (
    ConfigError,
    GatewayError,
    IsolationUnavailable,
    LimitExceeded,
    ProtocolError,
    RequestTimeout,
    SandboxError,
    WorkerCrashed,
    WorkerStartError,
    from_worker,
)
from sandbox_core.events import EVENT_METHOD, Event
from sandbox_core.framereader import FrameReader
from sandbox_core.isolation import verify
from sandbox_core.isolation.launch import LaunchSpec, launch_spec
from sandbox_core.process_tree import kill_group_and_children, kill_session, parent
from sandbox_core.protocol import (
    PROTOCOL_VERSION,
    FrameSplitter,
    Malformed,
    Notification,
    Request,
    RequestId,
    Response,
    encode,
)
from sandbox_core.requests import RequestResult
from sandbox_core.shared import EGRESS_OPEN, HOST_CHUNK, PRELOAD_METHOD, PRELOADED
from sandbox_core.worker_process import Placement, Spawned, WorkerProcess, spawn

if TYPE_CHECKING:
    from sandbox_core.head_start import HeadStart

_log = logging.getLogger("sandbox_core.worker")
HostHandler = Callable[["SandboxWorker", str, dict[str, Any]], AsyncIterator[dict[str, Any]]]
"""Serves a call the worker makes to the host (e.g. ``gateway.request``), yielding chunks."""
Launcher = Callable[[ProcessSandboxConfig, str, "Path | None"], LaunchSpec]
"""Turns a config into the launch spec of one worker (the seam for other launchers)."""
StdinSource = AsyncIterable[bytes]
"""Stdin for a command, read as it is produced."""

GARBAGE_LIMIT = 1
"""Malformed frames, answers to nothing and stray events after which a worker is retired
(no new request after the current one): our own worker sends none, so one means it is
broken or compromised..."""
GARBAGE_KILL = 256
"""...and after which it is killed at once (a flood), failing its calls with ProtocolError."""
MAX_HOST_CALLS = 4
"""Calls from one worker to the host that may run at once; more are refused at once."""
BUFFER_HIGH = 4 * 1024 * 1024
"""Output bytes waiting for a slow caller at which reading the worker's pipes pauses (its
writes then wait, and so does its command: a slow caller slows the worker, never grows
the host)..."""
BUFFER_LOW = 1024 * 1024
"""...and below which reading resumes."""
QUEUE_HIGH = 256
"""Events of any kind waiting for callers at which reading pauses too (agent text, say)..."""
QUEUE_LOW = 64
"""...and below which it resumes."""
WRITE_TIMEOUT = 10.0
"""Seconds the control pipe may stay full (the worker not reading it) before the worker is
killed: a stopped worker must not hang its caller, its cancel or the host's shutdown."""
ASSUME_PRELOAD_WAIT = 60.0
"""Seconds a worker switching ahead to its spare's uid may first spend waiting for its agent
preload to end (the worker's own bound, ``PRELOAD_END_LIMIT``), on top of ``startup_timeout``."""
PLACEMENT_WAIT = 10.0
"""Seconds an exited worker's clean-up waits for a placement still under way (a start cut short
while the kernel was slow to move it) before it removes the cgroups anyway, saying so."""
CPU_POLL = 0.1
"""Seconds between reads of a worker's CPU accounting while a request with a CPU budget runs."""
NO_PROCESSES = frozenset({"ping"})
"""Requests the worker answers without starting a process: no limit can strike during one, so
the host reads no cgroup accounting for them (two reads of several files per request)."""
CPU_GRACE_NS = 1_000_000_000
"""CPU past the budget (after its processes were killed) at which the whole worker is killed."""
PRELOAD_CPU_ALLOWANCE_NS = 10_000_000_000
"""CPU time of a worker's agent preload that no request's budget counts (at most this much,
once per worker: a worker that claims to preload forever gets no more)."""
OUTPUT_SLACK = 1024 * 1024
"""Output past ``limits.output_mb`` the host tolerates before it stops trusting the worker."""


_LAUNCHING = threading.Lock()
"""Serializes building launch plans (their threads share the strict runtime's staging)."""


class WorkerState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"


class _Deadline:
    """Put on a request's queue by its timer when the request runs out of time."""


_DEADLINE = _Deadline()


_Item = Event | Response | SandboxError | _Deadline


class _Inbox:
    """What arrives for one request, in order, for its one reader (the stream that sent it).

    A deque and at most one waiting future: lighter than :class:`asyncio.Queue` on the path
    every answer takes (a ``ping`` makes one of these per call).
    """

    __slots__ = ("_items", "_waiter", "loop")

    def __init__(self) -> None:
        self._items: collections.deque[_Item] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        """The loop its reader runs on, once known (asking for the running loop costs a getpid)."""

    def put_nowait(self, item: _Item) -> None:
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> _Item:
        while not self._items:
            waiter = self._waiter = (self.loop or asyncio.get_running_loop()).create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self._items.popleft()

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> _Item:
        return self._items.popleft()


class _Pending:
    def __init__(self, *, output_on_data_pipe: bool = False) -> None:
        self.queue = _Inbox()
        self.output = 0
        """Bytes of command output this request has produced."""
        self.output_pending = output_on_data_pipe
        """Output may still come on the data pipe (until its end frame)."""
        self.held: Response | None = None
        """A successful answer that came before the end of the output, held until it."""
        self.stdin_closed = False
        """The command closed its stdin: stop sending it."""
        self.source_failed = False
        """The caller's stdin source raised: the request fails, and is cancelled in the worker."""


class _Call:
    """One request's life on the host: sent, its answers taken one by one, then cleaned up.

    ``open`` sends it (and returns the ``started`` event when one is wanted), ``next`` returns
    each event in turn until ``over`` (the last is ``done``; a failure raises), and ``close``
    (always, once) cancels what is still running in the worker and forgets the request.
    A generator (``execute_stream``) and a plain loop (``collect``, ``call``) share it.
    """

    __slots__ = (
        "_accounted",
        "_began",
        "_emit_started",
        "_finished",
        "_id",
        "_limit",
        "_method",
        "_params",
        "_pending",
        "_resize",
        "_seq",
        "_stdin",
        "_tasks",
        "_timer",
        "_watchdog",
        "_worker",
        "over",
        "result",
    )

    def __init__(
        self,
        worker: SandboxWorker,
        method: str,
        params: dict[str, Any],
        timeout: float | None,
        *,
        emit_started: bool,
        stdin: StdinSource | None = None,
        resize: AsyncIterable[tuple[int, int]] | None = None,
        network: tuple[str, ...] | None = None,
        bind_network: bool = True,
    ) -> None:
        self._worker, self._method, self._emit_started = worker, method, emit_started
        self._stdin, self._resize = stdin, resize
        if emit_started and worker.egress is not None and bind_network:
            if not worker.serves_network(network):  # the orchestrator never asks; fail closed if anyone does
                raise ConfigError("network", f"worker {worker.worker_id} is bound to the network narrowing "
                                  f"{worker.network!r}, not {network!r}; a request needs a worker of its own policy")
            worker.network_bound, worker.network = True, network
            worker.egress.request_network = network  # for the worker's life: what this request starts keeps it
        self._id = worker._next_id()
        on_data_pipe = worker._data_pipe and method == "exec"
        if on_data_pipe:
            params = {**params, "output": "data_pipe"}
        if stdin is not None:
            params = {**params, "stdin": "stream"}
        self._params = params
        self._pending = _Pending(output_on_data_pipe=on_data_pipe)
        self._limit = worker.config.request_timeout if timeout is None else timeout
        self._timer: asyncio.TimerHandle | None = None
        self._began = time.monotonic()
        self._finished = False
        """The worker has answered (or was abandoned): nothing to cancel there."""
        self._seq = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._watchdog: asyncio.Task[None] | None = None
        self._accounted = emit_started and method not in NO_PROCESSES
        self.over = False
        """No event follows: ``done`` was returned, or a failure raised."""
        self.result: Any = None
        """The worker's result, once ``done``."""

    async def open(self) -> Event | None:
        """Send the request; the ``started`` event, if it was asked for."""
        worker, pending = self._worker, self._pending
        worker._pending[self._id] = pending
        loop = pending.queue.loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._limit, pending.queue.put_nowait, _DEADLINE)
        if self._accounted:
            worker._limits_at_start = worker.limit_counts()
            worker._serving[self._id] = f"{worker.worker_id}/{self._id}"
            worker._budget_struck = False
            self._watchdog = worker._watch_cpu_budget()
        await worker._send(Request(self._id, self._method, self._params))
        if self._stdin is not None:
            self._tasks.append(asyncio.create_task(worker._feed_stdin(self._id, pending, self._stdin)))
        if self._resize is not None:
            self._tasks.append(asyncio.create_task(worker._feed_resize(self._id, self._resize)))
        return Event("started", worker._started_data(self._method), 0) if self._emit_started else None

    async def next(self) -> Event:
        """The request's next event (``done`` last, then :attr:`over`); raises what failed it."""
        worker, pending = self._worker, self._pending
        item = await pending.queue.get()
        if isinstance(item, Event):
            worker._taken(output_size(item))
            self._seq += 1
            return Event(item.type, item.data, self._seq)
        self.over = True
        if isinstance(item, _Deadline):
            await worker._abandon(self._id, pending)
            self._finished = True
            limit = self._limit
            raise RequestTimeout(
                f"{self._method} timed out after {limit:g}s and was killed",
                data={"worker_id": worker.worker_id, "timeout": limit, "kill_reason": f"timeout {limit:g} s"},
            )
        self._finished = True
        if isinstance(item, SandboxError):
            # a failing stdin source fails the request on the host; the command in the
            # worker must not run on (waiting for stdin, then killing what started since)
            self._finished = not pending.source_failed
            raise item
        if item.error is not None:
            raise from_worker(item.error)
        if self._accounted:  # control calls (bind) and a user's ping run nothing: no wear to recycle for
            worker.requests_served += 1
        worker.last_used = time.monotonic()
        self.result = item.result
        done = worker._done_data(item.result, self._began)
        if self._accounted:
            worker._name_kill(done)
        return Event("done", done, self._seq + 1)

    async def close(self) -> None:
        """Stop what runs for the request on the host, cancel it in the worker if it still
        runs there, and give back what its unread output held."""
        worker, pending = self._worker, self._pending
        if self._timer is not None:
            self._timer.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.shield(task)
        if not self._finished and self._timer is not None:
            await asyncio.shield(worker._abandon(self._id, pending))
        worker._pending.pop(self._id, None)
        worker._serving.pop(self._id, None)
        while not pending.queue.empty():  # output nobody will take no longer holds the pipe
            item = pending.queue.get_nowait()
            if isinstance(item, Event):
                worker._taken(output_size(item))


class _SpecClaim:
    """A launch spec built in a thread, and who releases it when its start was cancelled.

    The thread runs on whatever happens to the task awaiting it (and its future may be
    cancelled, or the loop closed, before it finishes): whichever of the thread and the
    cancelled start comes second releases what the spec holds (fds, cgroups, a slot's mounts).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spec: LaunchSpec | None = None
        self._abandoned = False

    def build(self, launch: Callable[[], LaunchSpec]) -> LaunchSpec:
        spec = launch()
        with self._lock:
            self._spec = spec
            abandoned = self._abandoned
        if abandoned:
            _release(spec)
        return spec

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            spec = self._spec
        if spec is not None:
            _release(spec)


def _release(spec: LaunchSpec) -> None:
    """Clean up a launch spec nobody will spawn."""
    if spec.cleanup is not None:
        with contextlib.suppress(Exception):
            spec.cleanup()


class SandboxWorker:
    """One sandboxed process and the JSON-RPC conversation with it."""

    def __init__(
        self,
        config: ProcessSandboxConfig,
        worker_id: str,
        *,
        user_id: str | None = None,
        workspace: Path | None = None,
        host_handler: HostHandler | None = None,
        launcher: Launcher = launch_spec,
        on_egress: Callable[[dict[str, Any]], None] | None = None,
        preload: str = "none",
        on_preloaded: Callable[[SandboxWorker], None] | None = None,
        head_start: HeadStart | None = None,
    ) -> None:
        self.config = config
        self.worker_id = worker_id
        self._on_egress = on_egress
        """Told each egress decision of this worker (the orchestrator's record)."""
        self.preload = preload
        """What the worker is asked to load at ``initialize`` (``agent`` or ``none``)."""
        self.preload_report: dict[str, Any] = {"state": "none"}
        """The worker's last word on its preload: ``state`` none, pending, running, ready or failed."""
        self._on_preloaded = on_preloaded
        self._budget_start = 0
        """The cgroup CPU time the current request's budget counts from."""
        self._preload_cpu_ns = 0
        """CPU time spent while the preload ran that no budget counted (up to the allowance)."""
        self.user_id = user_id
        self.workspace = workspace
        self.state = WorkerState.NEW
        self.report: dict[str, Any] = {}
        self.requests_served = 0
        self.garbage_frames = 0
        self.created = time.monotonic()
        self.last_used = self.created
        self.spawn_seconds: float | None = None
        self.claim_seconds: dict[str, float] = {}
        """Where a claim's time went (``attach``, ``bind`` round trip, ``handover``: what the spare's
        hand-over still needed after the bind, ``verify``), for the benchmark."""
        self.claimed_spare = False
        """Claimed by a new user who took the spare workspace staged for this worker."""
        self.new_users_only = False
        """Set before the start (by the pool): switch this unbound worker to its spare's uid as soon as
        the spare is staged, so that a new user's claim skips the switch (:meth:`_assume`); such a
        worker can serve nobody but a user who has neither a uid nor a workspace yet."""
        self._switched_to: tuple[int, int] | None = None
        """The uid and gid the unbound worker switched to ahead of its claim, verified by the host."""
        self.exit_status: int | None = None
        self.exit_signal: int | None = None
        self.workspace_in_sandbox: str | None = None
        self._host_handler = host_handler
        self._launcher = launcher
        self._spec: LaunchSpec | None = None
        self._verified: verify.Verified | None = None
        """What the host checked of this worker itself (set once the handshake is verified)."""
        self._claim_expected: verify.Prepared | None = None
        """What the claim's verify expects of the staged spare's uid, worked out before the claim."""
        self._process: WorkerProcess | None = None
        self._placement: Placement | None = None
        """Its spec's ``after_spawn`` (into its cgroups), run in a thread from the spawn on."""
        self._head_start = head_start
        self._pid: int | None = None
        self._last_id = 0
        self._limits_at_start: dict[str, int] = {}
        self._budget_struck = False
        """The current request went past ``limits.cpu_budget_seconds`` (its processes were killed)."""
        """Struck-limit counters when the current request began (to name a kill's reason)."""
        self._pending: dict[RequestId, _Pending] = {}
        self._host_calls: dict[RequestId, asyncio.Task[None]] = {}
        self._serving: dict[RequestId, str] = {}
        """The requests (``agent.run``, ``exec``...) running now, by id, with the run name each
        model call they make is bound to (see :attr:`current_run`)."""
        self._stderr: collections.deque[str] = collections.deque(maxlen=config.stderr_lines)
        self._stderr_partial = b""
        self._splitter = FrameSplitter(config.max_frame_bytes)
        self._writable = asyncio.Event()
        self._writable.set()
        self._exited = asyncio.Event()
        self._buffered = 0
        """Output bytes routed to streams and not yet taken by their callers."""
        self._queued = 0
        """Events routed to streams and not yet taken."""
        self._data: FrameReader | None = None
        self._data_pipe = False
        """Whether the worker sends command output on the data pipe (it said so at handshake)."""
        self._stdin: asyncio.StreamWriter | None = None
        """The host's end of the input pipe (streamed stdin)."""
        self._reading_paused = False
        self.broken: str | None = None
        """Why the host stopped trusting this worker's channel (it is then killed)."""
        self._broken_error: SandboxError | None = None
        self._starting: asyncio.Future[None] | None = None
        self._stopped_while_starting = False
        self.egress: Relay | None = None
        """The host's half of this worker's network (strict workers), set at spawn."""
        self.network_bound = False
        """Whether the worker is bound to :attr:`network` (at its first request; for its life)."""
        self.network: tuple[str, ...] | None = None
        """The request narrowing this worker's network is bound to (None = the configured policy)."""
        self._egress_calls: dict[RequestId, asyncio.Task[None]] = {}
        self._swept: asyncio.Future[None] | None = None
        """The clean-up after exit (session sweep, cgroups), run in a thread; stop() awaits it."""
        self._background: set[asyncio.Future[None]] = set()
        """Host work that follows the start in a thread (:meth:`_settle`), held until it is done."""

    # ------------------------------------------------------------------ info

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def alive(self) -> bool:
        return self._pid is not None and not self._exited.is_set()

    @property
    def reachable(self) -> bool:
        """Alive, and its control pipe still open: a request sent now reaches it (a worker that
        died has its pipe seen closed a moment before its exit is)."""
        stdin = self._process.stdin if self._process is not None else None
        return self.alive and stdin is not None and not stdin.is_closing()

    @property
    def healthy(self) -> bool:
        """Alive, trusted, and not a worker whose preload failed (it is retired, never served)."""
        return (self.alive and self.garbage_frames < GARBAGE_LIMIT and self.broken is None
                and self.preload_state != "failed")

    @property
    def preload_state(self) -> str:
        return str(self.preload_report.get("state", "none"))

    @property
    def agent_ready(self) -> bool:
        """The SDK is imported, the client built and a canned turn run: the first text is hot."""
        return self.preload_state == "ready" and self.healthy

    @property
    def sweeps_session(self) -> bool:
        """Whether what the worker leaves behind is found by its session (not a pid namespace)."""
        return self._spec is None or self._spec.sweep_session

    @property
    def profile(self) -> str:
        return str(self.report.get("profile", self.config.profile))

    @property
    def current_run(self) -> str | None:
        """The run a model call from this worker is bound to: the request it is serving.

        Decided by the host, never by the worker: a worker serves one request at a time, so
        this is that request (``WORKER-ID/REQUEST-ID``; with several, the oldest). None when
        it serves none; a call then (a process left over from an earlier command) is refused.
        """
        return next(iter(self._serving.values()), None)

    def stderr_tail(self, lines: int = 20) -> list[str]:
        return list(self._stderr)[-lines:]

    def __repr__(self) -> str:
        return f"<SandboxWorker {self.worker_id} {self.state.value} pid={self.pid} user={self.user_id}>"

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Spawn the process, finish the handshake, verify it from the host, all within ``startup_timeout``.

        Only a worker whose layers the host has checked (:mod:`sandbox_core.isolation.verify`)
        is bound and becomes IDLE; any mismatch kills it and raises IsolationUnavailable.
        """
        if self.state is not WorkerState.NEW:
            raise WorkerStartError(f"worker {self.worker_id} was already started")
        self.state = WorkerState.STARTING
        began = time.monotonic()
        self._starting = asyncio.ensure_future(self._start_or_kill())
        try:
            await self._starting
        except BaseException as exc:
            self.state = WorkerState.CRASHED
            if self._stopped_while_starting:
                raise WorkerStartError(
                    f"worker {self.worker_id} was stopped while it started", data={"stopped": True}
                ) from None
            if isinstance(exc, TimeoutError):
                raise WorkerStartError(
                    f"worker {self.worker_id} did not finish its handshake within "
                    f"{self.config.startup_timeout}s",
                    data={"stderr": self.stderr_tail()},
                ) from None
            if isinstance(exc, IsolationUnavailable | WorkerStartError | ConfigError):  # says what to fix
                raise
            if isinstance(exc, SandboxError):
                raise WorkerStartError(
                    f"worker {self.worker_id} failed to start: {exc.message}",
                    data={"stderr": self.stderr_tail(), **exc.data},
                ) from exc
            if isinstance(exc, OSError):
                raise WorkerStartError(f"cannot spawn worker: {exc}") from exc
            raise
        self.spawn_seconds = time.monotonic() - began
        self.state = WorkerState.IDLE

    async def _start_or_kill(self) -> None:
        """Spawn and handshake within the time limit; on any failure the process is gone on return."""
        try:
            await asyncio.wait_for(self._spawn_and_handshake(), self.config.startup_timeout)
            if self.new_users_only and self._spec is not None:  # its own limit: it may wait for a preload
                await self._assume(self._spec)
        except BaseException:
            await asyncio.shield(self._kill_now())
            raise

    def _launch(self) -> LaunchSpec:
        with _LAUNCHING:  # one at a time: the first one stages the strict runtime (functools.cache)
            return self._launcher(self.config, self.worker_id, self.workspace)

    async def _build_spec(self) -> LaunchSpec:
        """The launch spec, built in a thread (it reads the host's trees: a launch check walks
        the workspace); a start cancelled meanwhile still releases what the spec holds."""
        claim = _SpecClaim()
        built = asyncio.ensure_future(asyncio.to_thread(claim.build, self._launch))
        try:
            return await asyncio.shield(built)
        except asyncio.CancelledError:
            claim.abandon()  # released here, or by the thread when it finishes (even after the loop closed)
            # and a shutdown that awaits this start sees the release done, not still under way
            await asyncio.wait([built])
            raise

    async def _spawn_and_handshake(self) -> None:
        head = self._head_start
        self._head_start = None
        if head is not None:  # spawned before the event loop existed: adopted, not spawned again
            spec, spawned = head.take()
        else:
            spec = await self._build_spec()
        self._spec = spec
        self.workspace_in_sandbox = spec.workspace_in_sandbox
        net = spec.plan.get("network")
        if isinstance(net, dict):
            self.egress = Relay(self.config.network, self.worker_id, lambda: self.user_id, self._on_egress)
        if head is None:
            spawned = spawn(spec)
        self._process = spawned.process
        self._pid = spawned.process.pid
        self._placement = spawned.placement
        attach = asyncio.ensure_future(spawned.process.attach(_Pipes(self)))
        try:
            await asyncio.shield(attach)
        except BaseException:
            await asyncio.wait([attach])  # a cancel lets it finish: the exit is then watched and heard
            spawned.close()
            raise
        await self._connect_channel(spawned)
        params: dict[str, Any] = {"worker_id": self.worker_id, "plan": spec.plan, **spawned.inside}
        if self.preload == "agent":
            params["preload"] = "agent"
        bind_now = spec.bound_at_spawn and self.user_id is not None and spec.workspace_in_sandbox is not None
        if bind_now:  # the worker answers the bind too before it imports its serving loop
            params["bind_follows"] = True
        initializing = asyncio.ensure_future(self.call("initialize", params))
        # A worker bound at spawn has seen its workspace since bwrap mounted it, so its bind (a
        # chdir and Landlock, inside) is written right behind initialize (tasks run in the order
        # they were made, and a call writes its frame before it first waits): the worker finds it
        # waiting once it has answered initialize, and runs it while the host checks /proc. The
        # answer is judged, and the worker started, only once that check has passed; a worker
        # whose initialize failed refuses it (nothing is served before initialize).
        binding = None
        if bind_now:
            assert self.user_id is not None and spec.workspace_in_sandbox is not None
            binding = asyncio.ensure_future(self.call("bind", {"user_id": self.user_id,
                                                               "workspace": spec.workspace_in_sandbox}))
        try:
            placement = self._placement  # into its cgroups while the worker confined itself: done first
            if placement is not None and placement.running:
                await asyncio.to_thread(placement.wait)
            elif placement is not None:
                placement.wait()  # done: raises what it raised
            await self._initialized(spec, await initializing)
            if binding is not None:  # the workspace's layers (landlock) are checked against the plan
                self._check_bound(await binding)
        except BaseException:
            for call in (initializing, binding):
                if call is not None and not call.done():
                    call.cancel()
                    await asyncio.wait([call])
            raise
        self._settle(spec)

    async def _initialized(self, spec: LaunchSpec, reply: object) -> None:
        """Take the ``initialize`` answer and verify the worker from the host (off the loop)."""
        if not isinstance(reply, dict) or reply.get("protocol") != PROTOCOL_VERSION:
            raise WorkerStartError(f"unexpected handshake reply: {reply!r:.200}")
        self.report = dict(reply.get("layers") or {})
        self.report["pid_in_sandbox"] = reply.get("pid")
        self._data_pipe = reply.get("data_pipe") is True
        self._note_preload(reply.get("preload"))
        if reply.get("stdin_pipe") is not True and self._stdin is not None:
            self._stdin.close()
            self._stdin = None
        unbound = spec.attach is not None and self.workspace is None
        self._verified = await asyncio.to_thread(  # reads /proc of the worker: off the loop
            functools.partial(verify.started, unbound=unbound),
            self.config, spec.plan, self._pid, reply.get("pid"), self.report)
        self.report["verified_by_host"] = self._verified.by_host
        if unbound and spec.stage is not None:
            await self._stage_spare(spec.stage)
        if unbound:  # answered once the imports it does while it waits are done: ready means ready
            await self.call("ping", {}, timeout=self.config.startup_timeout)

    async def _assume(self, spec: LaunchSpec) -> None:
        """Switch the unbound worker to its staged spare's uid before any claim, and verify it from
        the host as a claim would (:func:`verify.claimed`). Part of the start: a worker meant for
        new users that cannot switch, or does not show the switch in ``/proc``, is never offered.
        Timed apart from the handshake: the worker first waits for its agent preload to end."""
        spare = spec.spare
        attached = spare.pledge() if spare is not None else None
        if attached is None or self._verified is None:
            raise IsolationUnavailable(f"worker {self.worker_id} has no spare workspace to switch to "
                                       f"({self.report.get('spare', 'none made')})")  # fmt: skip
        reply = await self.call("assume", {"uid": attached["uid"], "gid": attached["gid"],
                                           "expect_mounts": attached["expect_mounts"]},
                                timeout=self.config.startup_timeout + ASSUME_PRELOAD_WAIT)  # fmt: skip
        self._take_identity(attached, reply)
        self._verified = await asyncio.to_thread(verify.claimed, self.config, spec.plan, self._verified, self.report,
                                                 attached["uid"], attached["gid"], self._claim_expected)  # fmt: skip
        self.report["verified_by_host"] = self._verified.by_host
        self._switched_to = (int(attached["uid"]), int(attached["gid"]))

    def _take_identity(self, attached: dict[str, Any], reply: object) -> None:
        """Note the identity a uid switch (``assume``, or a claim's ``bind``) brought in the report."""
        answer: dict[str, Any] = reply if isinstance(reply, dict) else {}
        self.report["identity"] = attached["identity"]
        self.report.setdefault("filesystem", {}).update(attached["filesystem"])
        observed = answer.get("observed")
        if isinstance(observed, dict):
            self.report.update(observed)

    def _settle(self, spec: LaunchSpec) -> None:
        """Run the spec's ``after_start`` in the background once the worker has started: the
        host's copy of what it built for bwrap goes while the first request runs, not before
        the start returns. A failure only leaves that copy to the exit's clean-up."""
        if spec.after_start is None:
            return
        settling = asyncio.ensure_future(asyncio.to_thread(spec.after_start))
        self._background.add(settling)
        settling.add_done_callback(self._settled)

    def _settled(self, settling: asyncio.Future[None]) -> None:
        self._background.discard(settling)
        if not settling.cancelled() and settling.exception() is not None:
            _log.warning("worker %s: %s (tried again when it exits)", self.worker_id, settling.exception())

    async def _connect_channel(self, spawned: Spawned) -> None:
        """The host's ends of the worker's data and input pipes, and its handoff socket, on the loop."""
        loop = asyncio.get_running_loop()
        stdin = os.fdopen(spawned.stdin_write, "wb", buffering=0)
        handoff = spawned.handoff
        try:
            self._data = FrameReader(spawned.data_read, self._on_output, self._bad_output)
            stdin_transport, stdin_protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, stdin)
            self._stdin = asyncio.StreamWriter(stdin_transport, stdin_protocol, None, loop)
            if handoff is not None and self.egress is not None:
                fd, handoff = handoff, None  # the relay owns it from here, whatever attach does
                await self.egress.attach(fd)
        except BaseException:
            if self._data is not None:
                self._data.close()
            else:
                os.close(spawned.data_read)
            stdin.close()  # a transport that took it closes it too (a second close does nothing)
            if handoff is not None:
                os.close(handoff)
            raise

    async def _stage_spare(self, stage: Callable[[], None]) -> None:
        """Make and attach the spare workspace a new user will take (off the request path); a
        failure only costs the claim its head start (the user's workspace is attached then)."""
        try:
            await asyncio.to_thread(stage)
        except (SandboxError, OSError) as exc:
            self.report["spare"] = f"not staged: {exc}"
            return
        self.report["spare"] = "staged"
        spec = self._spec
        ids = spec.spare.ids if spec is not None and spec.spare is not None else None
        if spec is not None and ids is not None:  # the claim's verify then only reads /proc
            with contextlib.suppress(KeyError, TypeError, ValueError):  # worked out again at the claim
                self._claim_expected = verify.claim_expectations(self.config, spec.plan, *ids)

    # ------------------------------------------------------------------ I/O

    async def _send(self, msg: Request | Notification | Response) -> None:
        stdin = self._process.stdin if self._process is not None else None
        if stdin is None or stdin.is_closing() or self._exited.is_set():
            raise self._crash_error("worker is not running")
        frame = encode(msg)
        if len(frame) > self.config.max_frame_bytes:
            raise ProtocolError(
                f"a {getattr(msg, 'method', 'response')} frame of {len(frame)} bytes is over the "
                f"{self.config.max_frame_bytes}-byte frame limit and was not sent",
                data={"frame_bytes": len(frame), "max_frame_bytes": self.config.max_frame_bytes},
            )
        stdin.write(frame)
        if not self._writable.is_set():  # the worker is not reading: wait for the pipe, not forever
            try:
                await asyncio.wait_for(self._writable.wait(), WRITE_TIMEOUT)
            except TimeoutError:
                why = f"stopped reading its control pipe for {WRITE_TIMEOUT:g} s (stopped or hung); killed"
                self._break(why, WorkerCrashed)
                raise WorkerCrashed(f"worker {self.worker_id} {why}", data={"worker_id": self.worker_id}) from None

    def _on_stdout(self, data: bytes) -> None:
        try:
            for frame in self._splitter.frames(data):
                if self.broken is not None:  # killed for what it sent: the rest is not worth decoding
                    return
                self._dispatch(self._splitter.decode(frame))
        except Exception as exc:  # noqa: BLE001 - a bad frame must not break the reader
            self._break(f"a frame from the worker broke the host's reader ({type(exc).__name__}: {exc})")

    def _on_stderr(self, data: bytes) -> None:
        lines = (self._stderr_partial + data).split(b"\n")
        self._stderr_partial = lines.pop()[-64 * 1024 :]
        for line in lines:
            self._stderr.append(line.decode(errors="replace"))

    def _break(self, why: str, kind: type[SandboxError] = ProtocolError) -> None:
        """Stop trusting the channel: fail every pending call with ``why`` and kill the worker."""
        if self.broken is not None:
            return
        self.broken = why
        error = kind(f"worker {self.worker_id}: {why}", data={"worker_id": self.worker_id})
        self._broken_error = error
        for pending in self._pending.values():
            pending.queue.put_nowait(error)
        self._signal_group(signal.SIGKILL)

    def _garbage(self, what: str) -> None:
        self.garbage_frames += 1
        if self.garbage_frames >= GARBAGE_KILL:
            self._break(f"sent {self.garbage_frames} malformed or unexpected frames (last: {what}); retired")

    def _dispatch(self, msg: Request | Notification | Response | Malformed) -> None:
        if isinstance(msg, Malformed):
            pending = self._pending.get(msg.id) if msg.id is not None else None
            if pending is not None:
                pending.queue.put_nowait(ProtocolError(f"worker sent a bad frame: {msg.message}"))
            elif isinstance(msg.id, str):  # a call of the worker's own: answer it, never leave it waiting
                self._answer_nowait(Response(msg.id, error=msg.error_object()))
            self._garbage(msg.message)
        elif isinstance(msg, Response):
            pending = self._pending.get(msg.id) if msg.id is not None else None
            if pending is not None and pending.output_pending and msg.error is None:
                pending.held = msg  # the output is still on its way: answer after its end frame
            elif pending is not None:
                pending.queue.put_nowait(msg)
            elif not self._was_issued(msg.id):
                self._garbage(f"an answer to unknown id {msg.id!r:.40}")
        elif isinstance(msg, Notification):
            if msg.method == EVENT_METHOD:
                self._route_event(msg.params)
            elif msg.method == "exec.stdin_closed":
                target = self._pending.get(msg.params.get("id"))  # type: ignore[arg-type]
                if target is not None:
                    target.stdin_closed = True
            elif msg.method == PRELOADED:
                self._preloaded(msg.params)
            elif msg.method == "cancel":  # the worker gave up on one of its calls to us
                call = self._host_calls.get(msg.params.get("id"))  # type: ignore[arg-type]
                if call is not None:
                    call.cancel()
            else:
                self._garbage(f"unknown notification {msg.method!r:.40}")
        elif msg.method == EGRESS_OPEN and self.egress is not None and msg.id not in self._egress_calls:
            task = asyncio.create_task(self._serve_egress(msg, self.egress))
            self._egress_calls[msg.id] = task
            task.add_done_callback(functools.partial(self._egress_done, msg.id))
        elif msg.id in self._host_calls or len(self._host_calls) >= MAX_HOST_CALLS:
            if msg.id in self._host_calls:
                refusal = GatewayError("refused: duplicate call id", data={"reason": "refused"})
            else:  # the API's own answer when busy: the client waits and retries
                refusal = GatewayError(f"refused: this worker has {MAX_HOST_CALLS} host calls in flight; retry "
                                       "shortly", data={"reason": "overloaded", "retry_after": 1, "retryable": True})
            self._answer_nowait(Response(msg.id, error=refusal.to_wire()))
        else:
            task = asyncio.create_task(self._serve_host_call(msg))
            self._host_calls[msg.id] = task
            task.add_done_callback(functools.partial(self._host_call_done, msg.id))

    def serves_network(self, network: tuple[str, ...] | None) -> bool:
        """Whether a request narrowing the network to ``network`` may run here: the worker is bound to
        no narrowing yet, or to this one (what runs in it keeps its policy; none is ever widened)."""
        if self.egress is None or not self.network_bound:
            return True
        if self.network is None or network is None:
            return self.network is network
        return set(self.network) == set(network)  # the same entries in another order: the same policy

    def _note_preload(self, report: object) -> None:
        """Keep the preload state an answer (``initialize``, ``bind``, ``preload``) reports."""
        if not isinstance(report, dict) or self.preload_state in ("ready", "failed"):  # an end is final
            return
        if report.get("state") in ("none", "pending", "running", "ready", "failed"):
            self.preload_report = dict(report)

    def _preloaded(self, params: dict[str, Any]) -> None:
        """``worker.preloaded``: the preload ended (once per worker; a second one is garbage)."""
        if self.preload_state in ("ready", "failed") or params.get("state") not in ("ready", "failed"):
            self._garbage("an unexpected worker.preloaded")
            return
        self.preload_report = dict(params)
        if self.preload_state == "failed":
            _log.warning("worker %s: agent preload failed (%s); retiring it", self.worker_id,
                           str(params.get("error"))[:300])
        if self._on_preloaded is not None:
            self._on_preloaded(self)

    async def preload_agent(self) -> None:
        """Ask an idle worker to load the agent now (it answers at once; ``worker.preloaded`` follows)."""
        self._note_preload(await self.call(PRELOAD_METHOD, {"mode": "agent"}, timeout=self.config.startup_timeout))

    def _was_issued(self, msg_id: RequestId | None) -> bool:
        """Whether ``msg_id`` is one of ours (an answer that came after its caller gave up)."""
        return isinstance(msg_id, int) and 0 < msg_id <= self._last_id

    def _answer_nowait(self, response: Response) -> None:
        stdin = self._process.stdin if self._process is not None else None
        if stdin is not None and not stdin.is_closing():
            stdin.write(encode(response))

    def _egress_done(self, call_id: RequestId, _task: asyncio.Task[None]) -> None:
        self._egress_calls.pop(call_id, None)

    def _host_call_done(self, call_id: RequestId, _task: asyncio.Task[None]) -> None:
        self._host_calls.pop(call_id, None)

    def _route_event(self, params: dict[str, Any]) -> None:
        request_id = params.get("request_id")
        pending = self._pending.get(request_id) if isinstance(request_id, int | str) else None
        if pending is None:
            if not self._was_issued(request_id):
                self._garbage("an event for no request")
            return
        try:
            event = Event.from_dict(params)
        except ValueError as exc:
            self._garbage(str(exc))
            return
        if event.type in ("stdout", "stderr"):
            if not self._count_output(pending, output_size(event)):
                return
        else:
            self._hold(0)
        pending.queue.put_nowait(event)

    def _on_output(self, request_id: int, kind: int, payload: bytes) -> None:
        """One frame from the data pipe: output of a request, or the end of it."""
        pending = self._pending.get(request_id)
        if pending is None:
            if not self._was_issued(request_id):
                self._garbage("output for no request")
            return
        if kind == datapipe.KIND_END:
            pending.output_pending = False
            if pending.held is not None:
                pending.queue.put_nowait(pending.held)
                pending.held = None
            return
        if self._count_output(pending, len(payload)):
            pending.queue.put_nowait(Event(datapipe.STREAMS[kind], {"bytes": payload}))

    def _count_output(self, pending: _Pending, size: int) -> bool:
        """Count a request's output; False (and the worker broken) far past the output limit."""
        pending.output += size
        limit = self.config.limits.output_mb * 1024 * 1024
        if limit and pending.output > limit + OUTPUT_SLACK:
            self._break(f"sent {pending.output} bytes of output, past the {self.config.limits.output_mb} MB limit")
            return False
        self._hold(size)
        return True

    def _hold(self, size: int) -> None:
        """Count an event (``size`` output bytes) waiting for a caller; pause reading past the marks."""
        self._buffered += size
        self._queued += 1
        if (self._buffered > BUFFER_HIGH or self._queued > QUEUE_HIGH) and not self._reading_paused:
            self._set_reading(paused=True)

    def _taken(self, size: int) -> None:
        """A caller took an event: resume reading once below both low marks."""
        self._buffered = max(0, self._buffered - size)
        self._queued = max(0, self._queued - 1)
        if self._buffered < BUFFER_LOW and self._queued < QUEUE_LOW and self._reading_paused:
            self._set_reading(paused=False)

    def _set_reading(self, *, paused: bool) -> None:
        control = self._process.stdout if self._process is not None else None
        for pipe in (control, self._data):
            if pipe is not None and not pipe.is_closing():
                if paused:
                    pipe.pause_reading()
                else:
                    pipe.resume_reading()
        self._reading_paused = paused

    def _bad_output(self, exc: Exception) -> None:
        self._break(f"its output pipe broke the host's reader ({type(exc).__name__}: {exc})")

    async def _serve_egress(self, request: Request, relay: Relay) -> None:
        """Answer one ``egress.open``: the host decides and connects (its own cap, not MAX_HOST_CALLS:
        the relay refuses past ``network.max_connections``, connecting or open)."""
        try:
            result = await relay.open(request.params)
        except Exception as exc:  # noqa: BLE001 - the worker must get an answer, not a hang
            result = {"ok": False, "status": 502, "reason": "connect_failed", "message": f"host error: {exc!r:.200}"}
        with contextlib.suppress(SandboxError):
            await self._send(Response(request.id, result=result))

    async def _serve_host_call(self, request: Request) -> None:
        """Answer a call the worker made to the host, streaming chunks then a response."""
        if self._host_handler is None:
            error = GatewayError(f"the host serves no {request.method!r} calls").to_wire()
            with contextlib.suppress(SandboxError):
                await self._send(Response(request.id, error=error))
            return
        try:
            async for chunk in self._host_handler(self, request.method, request.params):
                await self._send(Notification(HOST_CHUNK, {"call_id": request.id, **chunk}))
            response = Response(request.id, result={})
        except SandboxError as exc:
            response = Response(request.id, error=exc.to_wire())
        except Exception as exc:  # noqa: BLE001 - the worker must get an answer, not a hang (nor the text)
            _log.error("host call %s of worker %s failed: %s: %s", request.method, self.worker_id,
                       type(exc).__name__, exc)
            failed = GatewayError("host call failed (reason: internal; details are in the host's log)",
                                  data={"reason": "internal"})
            response = Response(request.id, error=failed.to_wire())
        with contextlib.suppress(SandboxError):
            await self._send(response)

    def _on_exit(self) -> None:
        """The process has exited and its pipes are closed: fail what is pending, clean up."""
        if self._exited.is_set():
            return
        try:
            for msg in self._splitter.close():
                self._dispatch(msg)
        except Exception as exc:  # noqa: BLE001 - the exit must be recorded whatever the last frame was
            self.broken = self.broken or f"its last frame broke the host's reader ({type(exc).__name__})"
        if self._stderr_partial:
            self._stderr.append(self._stderr_partial.decode(errors="replace"))
            self._stderr_partial = b""
        code = self._process.returncode if self._process is not None else None
        if code is not None and code < 0:
            self.exit_signal = -code
        else:
            self.exit_status = code
        self._exited.set()
        self._writable.set()
        if self._verified is not None:
            self._verified.release()
        if self._data is not None:
            self._data.close()
        if self._stdin is not None:
            self._stdin.close()
        if self.state is not WorkerState.STOPPING:
            self.state = WorkerState.CRASHED
        error: SandboxError = self._crash_error("worker process exited")
        if self.broken is not None:
            error = self._broken_error or ProtocolError(
                f"worker {self.worker_id}: {self.broken}", data={"worker_id": self.worker_id}
            )
        for pending in self._pending.values():
            pending.queue.put_nowait(error)
        for task in (*self._host_calls.values(), *self._egress_calls.values()):
            task.cancel()
        if self.egress is not None:
            self.egress.close()
        self._swept = asyncio.get_running_loop().run_in_executor(None, self._sweep)

    def _sweep(self) -> None:
        """Kill what is left of the worker's session and release what its spec prepared.

        Runs in a thread: scanning /proc for the session and removing cgroups (which polls
        until they are empty) take milliseconds to seconds, too long for the event loop.
        The strict profile needs no session scan: its pid namespace dies with its init.
        """
        if self._pid is not None and (self._spec is None or self._spec.sweep_session):
            kill_session(self._pid)
        if self._placement is not None:  # a start cut short may have left it under way: not after the clean-up
            try:
                self._placement.wait(PLACEMENT_WAIT)
            except TimeoutError:
                _log.warning("worker %s: its placement did not end within %ss of its exit; cleaning up anyway",
                             self.worker_id, PLACEMENT_WAIT)  # fmt: skip
            except BaseException:  # noqa: BLE001 - its start already reported what it raised
                pass
        if self._spec is not None and self._spec.cleanup is not None:
            with contextlib.suppress(Exception):
                self._spec.cleanup()

    def _crash_error(self, what: str) -> WorkerCrashed:
        how = (
            f"killed by signal {self.exit_signal}"
            if self.exit_signal is not None
            else f"exit status {self.exit_status}"
            if self.exit_status is not None
            else "still exiting"
        )
        tail = self.stderr_tail(10)
        detail = f"; stderr: {tail[-1]}" if tail else ""
        reason = self._limit_struck(self._limits_at_start) if self.exit_signal == signal.SIGKILL else None
        if reason is not None:
            how = f"{how}: {reason}"
        return WorkerCrashed(
            f"worker {self.worker_id} {what} ({how}){detail}",
            data={
                "worker_id": self.worker_id,
                "exit_status": self.exit_status,
                "signal": self.exit_signal,
                "stderr": tail,
                **({"kill_reason": reason} if reason else {}),
            },
        )

    def limit_counts(self) -> dict[str, int]:
        """The launch spec's counters of struck limits (empty where there are none)."""
        if self._spec is None or self._spec.limit_events is None:
            return {}
        with contextlib.suppress(OSError):
            return self._spec.limit_events()
        return {}

    def _limit_struck(self, before: dict[str, int]) -> str | None:
        """The limit that struck since ``before`` (``memory limit 1024 MB``), if one did."""
        after = self.limit_counts()
        if after.get("memory", 0) > before.get("memory", 0):
            return f"memory limit {self.config.limits.memory_mb} MB"
        return None

    # ------------------------------------------------------------------ calls

    async def call(self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """A request whose events are ignored; returns the result or raises."""
        call = _Call(self, method, params or {}, timeout, emit_started=False)
        try:
            await call.open()
            while not call.over:
                await call.next()
        finally:
            await call.close()
        return call.result

    async def execute(
        self, method: str, params: dict[str, Any], timeout: float | None = None, *, stdin: StdinSource | None = None
    ) -> RequestResult:
        """``execute_stream`` collected into a :class:`RequestResult`."""
        events = await self.collect(method, params, timeout, stdin=stdin)
        done = events[-1].data if events and events[-1].type == "done" else {}
        return RequestResult(events, dict(done), self.worker_id)

    async def collect(
        self,
        method: str,
        params: dict[str, Any],
        timeout: float | None = None,
        *,
        stdin: StdinSource | None = None,
        network: tuple[str, ...] | None = None,
        bind_network: bool = True,
    ) -> list[Event]:
        """Every event of ``execute_stream``, as a list: the same request, without a generator
        between the answer and its caller (what a ``ping`` or a short ``exec`` pays for)."""
        call = _Call(self, method, self._exec_params(method, params), timeout, emit_started=True, stdin=stdin,
                     network=network, bind_network=bind_network)
        events: list[Event] = []
        try:
            started = await call.open()
            if started is not None:
                events.append(started)
            while not call.over:
                events.append(await call.next())
        finally:
            await call.close()
        return events

    def execute_stream(
        self,
        method: str,
        params: dict[str, Any],
        timeout: float | None = None,
        *,
        stdin: StdinSource | None = None,
        resize: AsyncIterable[tuple[int, int]] | None = None,
        network: tuple[str, ...] | None = None,
        bind_network: bool = True,
    ) -> AsyncGenerator[Event, None]:
        """Send a request and yield ``started``, its events, then ``done`` (or raise).

        ``stdin`` (``exec`` only) streams to the command as it is produced; the request's
        params then say ``"stdin": "stream"``. An ``exec`` gets ``limits.output_mb``.
        ``resize`` (a ``tty`` exec) gives the terminal's new ``(rows, cols)`` as they come.
        ``network`` narrows the egress policy (kept here, on the host); the first request binds
        the worker to its narrowing for good (see :meth:`serves_network`); ``bind_network=False``
        (a command that needs no network) runs under whatever the worker is bound to and binds nothing.
        """
        return self._stream(_Call(self, method, self._exec_params(method, params), timeout, emit_started=True,
                                  stdin=stdin, resize=resize, network=network, bind_network=bind_network))

    def _exec_params(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if method == "exec" and self.config.limits.output_mb:
            return {**params, "output_limit": self.config.limits.output_mb * 1024 * 1024}
        return params

    def _next_id(self) -> int:
        self._last_id += 1
        return self._last_id

    @staticmethod
    async def _stream(call: _Call) -> AsyncGenerator[Event, None]:
        try:
            started = await call.open()
            if started is not None:
                yield started
            while not call.over:
                yield await call.next()
        finally:
            await call.close()

    def _watch_cpu_budget(self) -> asyncio.Task[None] | None:
        """Start watching this request's CPU time in the worker's cgroup (``limits.cpu_budget_seconds``)."""
        budget = self.config.limits.cpu_budget_seconds
        usage = self._spec.cpu_usage if self._spec is not None else None
        if not budget or usage is None:
            return None
        start = usage()
        if start is None:
            return None
        self._budget_start = start
        return asyncio.create_task(self._enforce_cpu_budget(usage, int(budget * 1e9)))

    async def _enforce_cpu_budget(self, usage: Callable[[], int | None], budget_ns: int) -> None:
        """Poll the cgroup's CPU accounting; past the budget, kill the request's processes (the
        worker itself and its init stay), and the whole worker if it keeps burning CPU itself.
        While the worker's agent preload runs, the CPU is not the request's: it is not counted
        (up to ``PRELOAD_CPU_ALLOWANCE_NS`` per worker)."""
        last = self._budget_start
        while True:
            await asyncio.sleep(CPU_POLL)
            used = usage()
            if used is None:
                continue
            if self.preload_state in ("pending", "running") and self._preload_cpu_ns < PRELOAD_CPU_ALLOWANCE_NS:
                forgiven = min(max(0, used - last), PRELOAD_CPU_ALLOWANCE_NS - self._preload_cpu_ns)
                self._preload_cpu_ns += forgiven
                self._budget_start += forgiven
            last = used
            if used - self._budget_start <= budget_ns:
                continue
            if not self._budget_struck:
                self._budget_struck = True
                self._kill_request_processes()
            elif used - self._budget_start > budget_ns + CPU_GRACE_NS:  # the worker's own code (an agent loop) burns it
                budget = self.config.limits.cpu_budget_seconds
                self._break(f"CPU budget {budget:g} s exceeded by the worker itself", LimitExceeded)
                return

    def _kill_request_processes(self) -> None:
        """SIGKILL every process in the worker's cgroups but the worker and its ancestors (bwrap)."""
        spec, worker = self._spec, self._verified.worker_pid if self._verified is not None else None
        if spec is None or spec.cgroup_pids is None or worker is None:
            return
        keep = {worker}
        pid = worker
        while pid > 1 and pid != self._pid:
            pid = parent(pid)
            keep.add(pid)
        for victim in spec.cgroup_pids() - keep:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(victim, signal.SIGKILL)

    def _name_kill(self, done: dict[str, Any]) -> None:
        """Name the cgroup limits a request struck (``limits_hit``) and the one that killed it."""
        after, before = self.limit_counts(), self._limits_at_start
        hit = [name for name in ("memory", "processes") if after.get(name, 0) > before.get(name, 0)]
        if self._budget_struck:
            hit.append("cpu_budget")
            done.setdefault("kill_reason", f"CPU budget {self.config.limits.cpu_budget_seconds:g} s")
        if hit:
            done["limits_hit"] = hit
        if "kill_reason" not in done and done.get("signal") == signal.SIGKILL:
            reason = self._limit_struck(before)
            if reason is not None:
                done["kill_reason"] = reason

    async def _feed_stdin(self, request_id: int, pending: _Pending, source: StdinSource) -> None:
        """Stream ``source`` to request ``request_id``'s command as frames on the input pipe.

        Each frame waits for the pipe (the worker reads it only as fast as the command takes
        its stdin), so a command that does not read holds the sender here. The worker's
        ``exec.stdin_closed`` (the command closed its stdin) ends it; an error raised by
        ``source`` fails the request rather than truncating its stdin.
        """
        writer = self._stdin
        if writer is None:
            pending.queue.put_nowait(ProtocolError(f"worker {self.worker_id} has no input pipe for streamed stdin"))
            return
        chunks = aiter(source)
        try:
            async for chunk in chunks:
                for at in range(0, len(chunk), datapipe.MAX_PAYLOAD):
                    if pending.stdin_closed:
                        return
                    piece = chunk[at : at + datapipe.MAX_PAYLOAD]
                    writer.write(datapipe.frame(request_id, datapipe.KIND_STDIN, piece))
                    writer.write(piece)
                    await writer.drain()
            if not pending.stdin_closed:
                writer.write(datapipe.frame(request_id, datapipe.KIND_END))
                await writer.drain()
        except (BrokenPipeError, ConnectionResetError):
            return  # the worker is gone: its request fails with WorkerCrashed
        except Exception as exc:  # noqa: BLE001 - a failing source must fail the request, not truncate it
            error = exc if isinstance(exc, SandboxError) else SandboxError(f"reading stdin failed: {exc!r:.200}")
            pending.source_failed = True
            pending.queue.put_nowait(error)
        finally:  # a producer stopped early is told so now (it may hold a thread or a connection)
            close = getattr(chunks, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()

    async def _feed_resize(self, request_id: int, sizes: AsyncIterable[tuple[int, int]]) -> None:
        """Send each new window size of a terminal request as an ``exec.resize`` notification."""
        chunks = aiter(sizes)
        try:
            async for rows, cols in chunks:
                await self._send(Notification("exec.resize", {"id": request_id, "rows": rows, "cols": cols}))
        except SandboxError:
            return  # the worker is gone: its request fails on its own
        finally:
            close = getattr(chunks, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()

    def _started_data(self, method: str) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "user_id": self.user_id,
            "method": method,
            "profile": self.profile,
            "pid": self.pid,
        }

    def _done_data(self, result: Any, began: float) -> dict[str, Any]:
        data: dict[str, Any] = dict(result) if isinstance(result, dict) else {"result": result}
        data.setdefault("duration_s", round(time.monotonic() - began, 6))
        data["worker_id"] = self.worker_id
        data["profile"] = self.profile
        return data

    async def cancel(self, request_id: RequestId) -> None:
        """Ask the worker to cancel one request (its stream then raises RequestCancelled)."""
        with contextlib.suppress(SandboxError):
            await self._send(Notification("cancel", {"id": request_id}))

    async def _abandon(self, request_id: RequestId, pending: _Pending) -> None:
        """Cancel a request and wait ``cancel_grace`` for its answer, else kill the worker."""
        if not self.alive:
            return
        await self.cancel(request_id)
        deadline = time.monotonic() + self.config.cancel_grace
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                item = await asyncio.wait_for(pending.queue.get(), remaining)
            except TimeoutError:
                break
            if isinstance(item, Event):
                self._taken(output_size(item))
            if isinstance(item, Response | SandboxError):
                return
            if isinstance(item, _Deadline):
                continue
        if self.state is WorkerState.STARTING:  # the start's own clean-up kills it and waits
            self._signal_group(signal.SIGKILL)
            return
        await self.stop(grace=0)

    @property
    def bound_at_spawn(self) -> bool:
        """Whether the workspace was fixed when the sandbox was made (no ``bind`` follows)."""
        return self._spec is not None and self._spec.bound_at_spawn

    async def bind(self, user_id: str, workspace: Path, prepare: Callable[[], object] | None = None) -> None:
        """Assign a pre-warmed worker to ``user_id``'s workspace (``prepare`` creates it, when
        given: an unbound strict worker may instead be handed a spare made for a new user)."""
        if self._spec is not None and self._spec.attach is not None:
            await self._claim(user_id, workspace, prepare or (lambda: None))
        else:
            if prepare is not None:
                await asyncio.to_thread(prepare)
            await self._enter(user_id, str(workspace))
        self.user_id, self.workspace = user_id, workspace

    async def _claim(self, user_id: str, workspace: Path, prepare: Callable[[], object]) -> None:
        """Attach ``workspace`` to this unbound worker's sandbox, switch it to the user's uid, verify.

        A worker that switched ahead (:meth:`_assume`) takes a new user's claim only: the spare
        becomes theirs, and its ``bind`` enters the workspace with the uid checked at the switch.

        Once: the worker is marked as the user's before the first step, so that whatever
        fails it is never offered to anyone else; any failure kills it (its slot is detached
        after it exited, by the spec's clean-up). An error of the attach itself (the host's
        checks of the workspace) carries ``data["claim"] = "attach"``: the caller may then
        start a worker for the user the ordinary way, which checks the same and says why.
        """
        spec = self._spec
        assert spec is not None and spec.attach is not None
        if self._verified is None or self._pid is None or self.user_id is not None:
            raise IsolationUnavailable(f"worker {self.worker_id} cannot be claimed (not verified, or claimed before)")
        self.user_id, self.workspace = user_id, workspace
        began = time.perf_counter()
        handover: asyncio.Future[dict[str, Any] | None] | None = None
        try:
            spare = spec.spare
            promised = spare.promise(workspace) if spare is not None else None
            if self._switched_to is not None and promised is None:
                raise IsolationUnavailable(f"worker {self.worker_id} switched ahead to a new user's uid: it cannot "
                                           f"serve {user_id!r}, who has a uid or a workspace",
                                           data={"claim": "attach"})  # fmt: skip
            if spare is not None and promised is not None:  # a new user: handed over while the worker switches uid
                attached = promised
                handover = asyncio.ensure_future(asyncio.to_thread(spare.claim, workspace))
            else:
                attached = await self._attach(spec.attach, workspace, prepare)
            self.workspace_in_sandbox = str(attached["workspace"])
            params = {"user_id": user_id, "workspace": self.workspace_in_sandbox, "uid": attached["uid"],
                      "gid": attached["gid"], "expect_mounts": attached["expect_mounts"]}
            attached_at = time.perf_counter()
            try:
                reply = await self.call("bind", params)
            finally:
                bound_at = time.perf_counter()
                if handover is not None:  # never left running: its outcome decides the spare's fate
                    await asyncio.shield(self._handed_over(handover, user_id))
            handed_at = time.perf_counter()
            answer: dict[str, Any] = reply if isinstance(reply, dict) else {}
            if self._switched_to is None:
                self._take_identity(attached, answer)
                verified = verify.claimed(self.config, spec.plan, self._verified, self.report,
                                          attached["uid"], attached["gid"], self._claim_expected)  # fmt: skip
            else:  # switched and verified before the claim; only our own code ran in it since
                verified = self._verified
            if "landlock" in answer:
                self.report["landlock"] = answer["landlock"]
            verify.bound(verified, answer)
        except BaseException as exc:
            why = exc.message if isinstance(exc, SandboxError) else f"{type(exc).__name__}: {exc}"
            self._break(f"claim for {user_id!r} failed: {why}", IsolationUnavailable)
            raise
        self._verified = verified
        self.report["verified_by_host"] = verified.by_host
        self.report["verified_from_report"] = verified.from_report
        self.claimed_spare = attached.get("spare") is True
        self.claim_seconds = {"attach": attached_at - began, "bind": bound_at - attached_at,
                              "handover": handed_at - bound_at, "verify": time.perf_counter() - handed_at}  # fmt: skip

    async def _attach(self, attach: Callable[[Path, Callable[[], object]], dict[str, Any]], workspace: Path,
                      prepare: Callable[[], object]) -> dict[str, Any]:  # fmt: skip
        try:
            return await asyncio.to_thread(attach, workspace, prepare)
        except SandboxError as exc:
            exc.data.setdefault("claim", "attach")
            raise
        except OSError as exc:
            raise IsolationUnavailable(f"cannot attach the workspace of {self.user_id!r}: {exc}",
                                       data={"claim": "attach"}) from None

    @staticmethod
    async def _handed_over(handover: asyncio.Future[dict[str, Any] | None], user_id: str) -> None:
        """Wait for the spare's hand-over; the claim fails (attach: the user gets a worker of
        their own) when the user turned out to have a uid or a workspace after all."""
        try:
            taken = await handover
        except OSError as exc:
            raise IsolationUnavailable(f"cannot hand the spare workspace to {user_id!r}: {exc}",
                                       data={"claim": "attach"}) from None
        except SandboxError as exc:
            exc.data.setdefault("claim", "attach")
            raise
        if taken is None:
            raise IsolationUnavailable(f"{user_id!r} got a uid or a workspace while the spare was handed over",
                                       data={"claim": "attach"})

    async def _enter(self, user_id: str, workspace: str) -> None:
        """Bind the worker inside and check the layers binding brings (a mismatch kills it)."""
        if self._verified is None:
            raise IsolationUnavailable(f"worker {self.worker_id} was never verified by the host; not binding it")
        self._check_bound(await self.call("bind", {"user_id": user_id, "workspace": workspace}))

    def _check_bound(self, reply: object) -> None:
        """Take a ``bind`` answer: the layers it reports must match the plan (a mismatch kills the worker)."""
        assert self._verified is not None
        answer: dict[str, Any] = reply if isinstance(reply, dict) else {}
        self._note_preload(answer.get("preload"))
        if "landlock" in answer:
            self.report["landlock"] = answer["landlock"]
        try:
            verify.bound(self._verified, answer)
        except IsolationUnavailable as exc:
            self._break(exc.message)
            raise
        self.report["verified_from_report"] = self._verified.from_report

    async def ping(self) -> float:
        """Round-trip time of a ``ping`` in seconds."""
        began = time.perf_counter()
        await self.call("ping", {}, timeout=self.config.startup_timeout)
        return time.perf_counter() - began

    # ------------------------------------------------------------------ stop

    async def stop(self, grace: float | None = None) -> None:
        """Close stdin, wait, SIGTERM the group, wait, SIGKILL; idempotent and shielded."""
        await asyncio.shield(self._stop(self.config.shutdown_grace if grace is None else grace))

    async def _stop(self, grace: float) -> None:
        if self.state is WorkerState.STARTING and self._starting is not None and not self._starting.done():
            self._stopped_while_starting = True  # a stop wins over a start: nothing may outlive it
            self._starting.cancel()
            await asyncio.wait([self._starting])
        if self._process is None:
            self.state = WorkerState.STOPPED
            return
        if not self._exited.is_set():
            if self.state is not WorkerState.CRASHED:
                self.state = WorkerState.STOPPING
            if self._process.stdin is not None:
                self._process.stdin.close()
            if not await self._wait_exit(grace):
                self._signal_group(signal.SIGTERM)
                if not await self._wait_exit(grace):
                    self._signal_group(signal.SIGKILL)
                    await self._wait_exit(None)
        self._process.close()
        await self._cleaned()
        if self.state is not WorkerState.CRASHED:
            self.state = WorkerState.STOPPED

    async def _cleaned(self) -> None:
        """Wait for the clean-up after exit, whatever it raised."""
        if self._swept is not None:
            with contextlib.suppress(Exception):
                await self._swept

    async def _kill_now(self) -> None:
        if self._process is None:  # never spawned: release what the launch spec prepared
            if self._spec is not None and self._spec.cleanup is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._spec.cleanup)
            return
        if not self._exited.is_set():
            self._signal_group(signal.SIGKILL)
            await self._wait_exit(None)
        self._process.close()
        await self._cleaned()

    async def _wait_exit(self, timeout: float | None) -> bool:
        if timeout is not None and timeout <= 0:
            return self._exited.is_set()
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._pid is None or self._exited.is_set():
            return
        if sig is signal.SIGKILL:  # bwrap's sandbox init may not yet be bound to die with it
            kill_group_and_children(self._pid)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._pid, sig)


def output_size(event: Event) -> int:
    """About how many bytes an output event holds, without decoding it (0 for other events)."""
    if event.type not in ("stdout", "stderr"):
        return 0
    raw = event.data.get("bytes")
    if isinstance(raw, bytes):
        return len(raw)
    text = event.data.get("data") or event.data.get("b64")
    return len(text) if isinstance(text, str) else 0


class _Pipes:
    """What the worker's process does, to its handle (:class:`sandbox_core.worker_process.Sink`)."""

    def __init__(self, worker: SandboxWorker) -> None:
        self.on_stdout = worker._on_stdout
        self.on_stderr = worker._on_stderr
        self.on_exit = worker._on_exit
        self._writable = worker._writable

    def on_writable(self, writable: bool) -> None:
        if writable:
            self._writable.set()
        else:
            self._writable.clear()
