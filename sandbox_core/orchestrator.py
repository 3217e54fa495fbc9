"""SandboxOrchestrator: a pool of sandboxed workers shared by many users.

Rules of the pool:

* **Affinity.** A worker, once bound, serves one user only, one request at a time. A
  user's request goes to an idle worker of theirs; if all are busy and the user has fewer
  than ``max_workers_per_user``, the user gets another worker; otherwise the request
  queues until one of the user's workers is free.
* **Cap.** At most ``max_workers`` processes exist (starting, idle, busy or stopping).
  When the pool is full, an idle worker of another user (least recently used first) is
  evicted to make room; if none is idle, the request waits up to ``acquire_timeout`` and
  then fails with :class:`PoolExhausted`.
* **Pre-warm.** ``min_idle`` unbound workers are kept ready (profiles that allow binding
  after spawn); a request claims one and binds it to the user's workspace. Refill happens
  in the background, never on the request path.
* **Agent preload.** With ``preload = "agent"`` (or ``"auto"`` once the pool has seen an agent
  request) workers load the agent while idle (SDK, client, one canned offline turn), agent
  requests prefer agent-ready workers, and a worker whose preload fails is retired.
* **Reap and recycle.** A background loop removes dead workers, stops workers idle for
  ``worker_timeout``, and a worker is retired after ``max_requests_per_worker`` requests
  or when it sent garbage on the protocol channel.
* **Crash recovery.** A crashed worker is removed; its in-flight request fails with
  :class:`WorkerCrashed`; the user's next request gets a fresh worker on the same
  workspace. ``start_failure_threshold`` consecutive start failures open a circuit breaker
  for ``circuit_reset`` seconds: requests then fail at once with :class:`CircuitOpen`.
* **Shutdown.** Stop accepting, give in-flight requests ``shutdown_grace`` seconds, then
  stop every worker; afterwards no worker process or descendant is left.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import itertools
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

from sandbox_core.config import ModelConfig, ProcessSandboxConfig
from sandbox_core.egress.policy import check_narrowing
from sandbox_core.errors import (
    CircuitOpen,
    ConfigError,
    GatewayError,
    PoolClosed,
    PoolExhausted,
    RequestCancelled,
    RequestTimeout,
    SandboxError,
)
from sandbox_core.events import Event
from sandbox_core.isolation import spares, tenants
from sandbox_core.isolation.launch import can_prewarm, can_switch_ahead, launch_spec, prepare_workspace, sweep_leftovers
from sandbox_core.names import validate_user_id
from sandbox_core.process_tree import kill_session
from sandbox_core.record import Record, RunLog, new_run_id
from sandbox_core.requests import (
    LAST_CONVERSATION,
    AgentRequest,
    ExecRequest,
    Request,
    RequestResult,
    any_network,
    network_param,
)
from sandbox_core.terminal import LOGIN_SHELL, TerminalSession, terminal_session
from sandbox_core.worker import Launcher, SandboxWorker, WorkerState

if TYPE_CHECKING:
    from sandbox_core.files import PoolFiles
    from sandbox_core.gateway import ModelGateway
    from sandbox_core.head_start import HeadStart


DEMAND_WINDOW = 10.0
"""Seconds of claims the pre-warm refill sizes itself by (see ``_warm_target``)."""


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclasses.dataclass(frozen=True)
class _Grant:
    """A worker (or a slot, as a registered worker not started yet) reserved for one request."""

    worker: SandboxWorker
    how: str
    """``idle`` (the user's own), ``claim`` (a pre-warmed one to bind) or ``spawn`` (a slot)."""


class _Served:
    """``async with _Served(pool, user_id, request) as worker``: a worker of the user's for one
    request, counted in flight while it runs, its outcome counted and the worker given back after."""

    __slots__ = ("_pool", "_request", "_user_id", "_worker")

    def __init__(self, pool: SandboxOrchestrator, user_id: str, request: Request) -> None:
        self._pool, self._user_id, self._request = pool, user_id, request
        self._worker: SandboxWorker | None = None

    async def __aenter__(self) -> SandboxWorker:
        self._worker = await self._pool._serve_begin(self._user_id, self._request)
        return self._worker

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        assert self._worker is not None
        await self._pool._serve_end(self._worker, exc)


class SandboxOrchestrator:
    """Async pool of :class:`SandboxWorker` processes; use as ``async with``."""

    def __init__(
        self,
        config: ProcessSandboxConfig,
        *,
        launcher: Launcher = launch_spec,
        gateway: ModelGateway | None = None,
        record: Record | None = None,
        origin: str = "library",
        head_start: HeadStart | None = None,
    ) -> None:
        self.config = config
        self.record = record
        """Where each request's run row and journal entries go (None: nothing is recorded).
        The caller opens and closes it (:func:`sandbox_core.record.open_record`)."""
        self.origin = origin
        """Where requests come from, for the record (``library``, ``cli``, ``service``)."""
        self._launcher = launcher
        self._gateway = gateway
        self._old_gateways: list[ModelGateway] = []
        self._workers: dict[str, SandboxWorker] = {}
        self._changed = asyncio.Condition()
        self._ids = itertools.count(1)
        # os.urandom: secrets.token_hex's bytes, without loading secrets (with hmac and random, 3-5 ms of a one-shot)
        self._tag = head_start.tag if head_start is not None else os.urandom(2).hex()
        self._can_switch_ahead = config.new_user_spares > 0 and can_switch_ahead(config)
        self._head_start = head_start
        """A process spawned for the first worker of one user before this pool existed (adopted by
        that user's first spawn; discarded at shutdown otherwise)."""
        self._closed = False
        self._started = False
        self._cleanup_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        """Pre-warm spawns (cancelled at shutdown)."""
        self._stopping: set[asyncio.Future[None]] = set()
        """Stops of retired workers (awaited at shutdown, never cancelled)."""
        self._started_at = time.monotonic()
        self._failures_in_row = 0
        self._circuit_until = 0.0
        self._last_start_error: str | None = None
        self._crashed_users: set[str] = set()
        self._spawn_latency: list[float] = []
        self._waiting = 0
        self._queue: dict[str, collections.deque[asyncio.Future[_Grant]]] = {}
        """The fair queue: users in order of their turn, each with its waiting requests."""
        self._in_flight = 0
        self._counters: dict[str, int] = dict.fromkeys(
            ("ok", "failed", "timed_out", "cancelled", "crashes", "restarts", "recycled",
             "reaped", "spawned", "start_failures", "evicted", "claimed", "claim_fallbacks", "preload_failed"), 0)
        self._user_requests: dict[str, int] = {}
        self._claims: collections.deque[float] = collections.deque(maxlen=1024)
        """When pre-warmed workers were claimed lately (the demand the refill follows)."""
        self._preload_mode = "agent" if config.preload == "agent" else "none"
        """What workers load while idle now: ``auto`` turns to ``agent`` at the first agent request."""
        self._preload_failures_in_row = 0
        self._preload_off: str | None = None
        """Why preloading stopped (``start_failure_threshold`` failures in a row), if it did."""
        self._agent_turns: set[asyncio.Future[_Grant]] = set()
        """Queued turns of agent requests (they prefer agent-ready workers)."""
        self.swept: list[str] = []
        """Cgroups of dead orchestrators removed at start."""

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> SandboxOrchestrator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def start(self) -> None:
        """Start the cleanup loop and the pre-warm refill (idempotent)."""
        if self._started:
            return
        if self._closed:
            raise PoolClosed("the orchestrator was shut down")
        self._started = True
        self.swept = await asyncio.to_thread(sweep_leftovers, self.config)
        self._cleanup_task = asyncio.create_task(self._cleanup_loop(), name="sandbox-cleanup")
        self._refill()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def files(self) -> PoolFiles:
        """Files in and out of users' workspaces, moved inside each user's sandbox (:mod:`sandbox_core.files`)."""
        from sandbox_core.files import PoolFiles

        return PoolFiles(self)

    # ------------------------------------------------------------------ requests

    async def execute(self, user_id: str, request: Request) -> RequestResult:
        """Run ``request`` for ``user_id`` and collect every event."""
        if self.record is not None or (isinstance(request, ExecRequest) and request.resize is not None):
            stream = self.execute_stream(user_id, request)
            try:
                events = [event async for event in stream]
            finally:
                await stream.aclose()
        else:  # nothing to record or to stream: the worker's answers straight into a list
            request = await self._prepare(user_id, request)
            async with _Served(self, user_id, request) as worker:
                events = await worker.collect(
                    request.method, request.params(), request.timeout,
                    stdin=request.stdin_stream() if isinstance(request, ExecRequest) else None,
                    network=network_param(request), bind_network=not any_network(request),
                )
        done = events[-1].data if events and events[-1].type == "done" else {}
        worker_id = str(done.get("worker_id", ""))
        return RequestResult(events, dict(done), worker_id)

    async def execute_stream(
        self, user_id: str, request: Request, *, run_id: str | None = None, origin: str | None = None
    ) -> AsyncGenerator[Event, None]:
        """Run ``request`` for ``user_id`` on their worker, yielding events as they happen.

        With a :attr:`record`, the request is recorded as run ``run_id`` (default: a new id)
        started from ``origin`` (default: :attr:`origin`).
        """
        request = await self._prepare(user_id, request)
        log = None
        if self.record is not None:
            log = RunLog(self.record, run_id or new_run_id(), user_id, request, origin or self.origin)
        stream = self._execute(user_id, request)
        try:
            async for raw in stream:
                yield raw if log is None else log.event(raw)
        except BaseException as exc:  # GeneratorExit too: the caller stopped reading
            if log is not None:
                log.finished(exc if isinstance(exc, Exception | asyncio.CancelledError) else asyncio.CancelledError())
            raise
        else:
            if log is not None:
                log.finished(None)
        finally:
            await stream.aclose()

    async def _prepare(self, user_id: str, request: Request) -> Request:
        """Check ``request`` for ``user_id`` and fill in its defaults (and its history, when recorded)."""
        validate_user_id(user_id)
        check_narrowing(self.config.network, user_id, network_param(request))
        if not self._started:
            await self.start()
        request = self._with_defaults(request)
        if self.record is not None and isinstance(request, AgentRequest):
            request = await self._with_history(user_id, request)
        return request

    async def _execute(self, user_id: str, request: Request) -> AsyncGenerator[Event, None]:
        async with _Served(self, user_id, request) as worker:
            stream = worker.execute_stream(
                request.method, request.params(), request.timeout,
                stdin=request.stdin_stream() if isinstance(request, ExecRequest) else None,
                resize=request.resize if isinstance(request, ExecRequest) else None,
                network=network_param(request), bind_network=not any_network(request),
            )
            try:
                async for event in stream:
                    yield event
            finally:
                await stream.aclose()

    async def _serve_begin(self, user_id: str, request: Request) -> SandboxWorker:
        """A worker for ``request``, counted in flight (see :class:`_Served`)."""
        agent = isinstance(request, AgentRequest)
        if agent:
            self._want_agents()
        try:
            worker = await self._acquire_serving(user_id, network_param(request), agent=agent,
                                                 any_policy=any_network(request))
        except SandboxError as exc:
            self._counters["failed"] += 1  # a request that never got a worker failed too
            raise self._closing_error(exc) from exc
        self._in_flight += 1
        self._user_requests[user_id] = self._user_requests.get(user_id, 0) + 1
        return worker

    async def _serve_end(self, worker: SandboxWorker, exc: BaseException | None) -> None:
        """Count how the request on ``worker`` ended and give the worker back; raise what the
        caller should see instead of ``exc`` (PoolClosed when the pool shut down under it)."""
        outcome = "ok" if exc is None else "timed_out" if isinstance(exc, RequestTimeout) else "cancelled"
        if isinstance(exc, SandboxError) and not isinstance(exc, RequestTimeout | RequestCancelled):
            outcome = "failed"
        try:
            if isinstance(exc, SandboxError) and not isinstance(exc, RequestTimeout):
                closing = self._closing_error(exc)
                if closing is not exc:
                    raise closing from exc
        finally:
            self._counters[outcome] += 1
            self._in_flight -= 1
            await self._release(worker)

    def terminal(
        self,
        user_id: str,
        argv: tuple[str, ...] | list[str] = LOGIN_SHELL,
        *,
        rows: int = 24,
        cols: int = 80,
        term: str | None = None,
        timeout: float | None = None,
        stdin: bool = True,
        network: tuple[str, ...] | None = None,
    ) -> TerminalSession:
        """An interactive session of ``argv`` (default: the login shell) on a pty in ``user_id``'s
        sandbox: ``async with pool.terminal(...) as t`` (see :mod:`sandbox_core.terminal`).

        It holds one of the user's workers busy while open and ends at ``timeout`` (default
        ``terminal_timeout``, else ``request_timeout``) like any request; ``network`` narrows
        the network policy for it as for any request (a widening entry: ConfigError, at once).
        """
        validate_user_id(user_id)
        check_narrowing(self.config.network, user_id, network)
        if timeout is None and self.config.terminal_timeout > 0:
            timeout = self.config.terminal_timeout
        return terminal_session(
            lambda request: self.execute_stream(user_id, request),
            argv, rows=rows, cols=cols, term=term, timeout=timeout, stdin=stdin, network=network,
        )

    def _closing_error(self, exc: SandboxError) -> SandboxError:
        """``exc``, or PoolClosed when the pool shut down under the request (its worker was
        stopped, or stopped while starting): the cause is the shutdown, not the worker."""
        if self._closed and not isinstance(exc, PoolClosed):
            return PoolClosed(f"the pool shut down while the request ran ({exc.message})", data=exc.data)
        return exc

    async def _with_history(self, user_id: str, request: AgentRequest) -> AgentRequest:
        """Ask the worker for the conversation (the record keeps it); with ``resume``, send the
        kept one along (``@last``: the user's most recent), for a worker that does not hold it."""
        record = self.record
        assert record is not None
        conversation, history = request.conversation_id, request.history
        if request.resume:
            await asyncio.to_thread(record.flush)  # what an earlier run of this pool saved is read back
            if conversation == LAST_CONVERSATION:
                last = await asyncio.to_thread(record.last_conversation, user_id)
                if last is None:
                    raise ConfigError("conversation_id", f"{user_id!r} has no conversation to continue yet")
                conversation = last
            if history is None:
                kept = await asyncio.to_thread(record.conversation, user_id, conversation)
                if kept is None and request.conversation_id != LAST_CONVERSATION:
                    raise ConfigError("conversation_id", f"no conversation {conversation!r} of {user_id!r} is kept")
                history = tuple(kept or ())
        return dataclasses.replace(request, conversation_id=conversation, history=history, return_history=True)

    def _with_defaults(self, request: Request) -> Request:
        """An agent request with the config's model, max_tokens and max_turns filled in."""
        if not isinstance(request, AgentRequest):
            return request
        model = self.config.model
        return dataclasses.replace(
            request,
            model=request.model or model.model,
            max_tokens=request.max_tokens or model.max_tokens,
            max_turns=request.max_turns or model.max_turns,
            timeout=request.timeout or max(self.config.request_timeout, model.request_timeout),
        )

    # ------------------------------------------------------------------ acquire

    async def _acquire(self, user_id: str, *, agent: bool = False) -> SandboxWorker:
        """A worker for ``user_id``, waiting in the fair queue for up to ``acquire_timeout``
        (an agent request prefers an agent-ready one)."""
        deadline = time.monotonic() + self.config.acquire_timeout
        self._waiting += 1
        try:
            front = False
            while True:
                grant = await self._wait_turn(user_id, deadline, front=front, agent=agent)
                worker = await self._take(grant, user_id)
                if worker is not None and grant.how == "idle" and not worker.reachable:
                    # it died after it was reserved for this request, before the request resumed
                    # (a kill that landed as its last request ended): nothing was sent to it
                    if worker.alive:  # its pipe is closed and its exit not seen yet
                        self._retire(worker)
                    else:
                        await self._release(worker)
                    worker = None
                if worker is not None:
                    return worker
                front = True  # a pre-warmed worker that failed to bind, or a dead one: the turn is not lost
        finally:
            self._waiting -= 1

    async def _acquire_serving(self, user_id: str, network: tuple[str, ...] | None, *,
                               agent: bool = False, any_policy: bool = False) -> SandboxWorker:
        """A worker for ``user_id`` that may serve a request narrowing the network to ``network``.

        Workers are pooled per policy: one bound to another narrowing (wider or not) is recycled,
        never reused, so what a request leaves running never outlives its own policy. A request
        that needs no network (``any_policy``: a file transfer) takes any of them.
        """
        while True:
            worker = await self._acquire(user_id, agent=agent)
            if any_policy or worker.serves_network(network):
                return worker
            self._counters["recycled"] += 1
            self._retire(worker)
            await self._notify()

    async def _wait_turn(self, user_id: str, deadline: float, *, front: bool, agent: bool = False) -> _Grant:
        """Queue behind ``user_id``'s earlier requests until the dispatcher reserves a worker
        or a slot for this one; PoolExhausted at ``deadline``."""
        if self._closed:
            raise PoolClosed("the orchestrator is shutting down")
        self._check_circuit()
        if not self._queue:  # nobody waits: the dispatcher would grant this turn at once, so grant it here
            grant = self._reserve(user_id, agent=agent)
            if grant is not None:
                return grant
        turn: asyncio.Future[_Grant] = asyncio.get_running_loop().create_future()
        if agent:
            self._agent_turns.add(turn)
            turn.add_done_callback(self._agent_turns.discard)
        queue = self._queue.setdefault(user_id, collections.deque())
        if front:
            queue.appendleft(turn)
        else:
            queue.append(turn)
        self._dispatch()
        try:
            if not turn.done():
                await asyncio.wait([turn], timeout=max(0.0, deadline - time.monotonic()))
        except BaseException:  # cancelled while waiting: give back what it was granted
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._give_back(turn.result())
            raise
        finally:
            if not turn.done():
                turn.cancel()
                self._leave_queue(user_id, turn)
        if turn.cancelled():
            raise self._exhausted(user_id)
        return turn.result()

    def _leave_queue(self, user_id: str, turn: asyncio.Future[_Grant]) -> None:
        queue = self._queue.get(user_id)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(turn)
        if not queue:
            del self._queue[user_id]

    def _dispatch(self) -> None:
        """Hand what is free to the waiting requests, one user at a time in turn.

        Users wait in a ring (``_queue``, in order of their turn); each has a FIFO of
        requests. The first user in the ring whose head request can be served now gets a
        reservation (an idle worker of theirs, a pre-warmed one, or a slot, evicting another
        user's idle worker when the pool is full) and goes to the back of the ring. So one
        user's burst takes one turn per round: it cannot starve another user's first request.
        Runs whenever the pool changes (:meth:`_notify`); never awaits.
        """
        if self._closed:
            for queue in self._queue.values():
                for turn in queue:
                    if not turn.done():
                        turn.set_exception(PoolClosed("the orchestrator is shutting down"))
            self._queue.clear()
            return
        served = True
        while served:
            served = False
            for user_id in list(self._queue):
                queue = self._queue[user_id]
                while queue and queue[0].done():
                    queue.popleft()
                if not queue:
                    del self._queue[user_id]
                    continue
                try:
                    grant = self._reserve(user_id, agent=queue[0] in self._agent_turns)
                except SandboxError as exc:  # the circuit opened: fail the turn, not the ring
                    queue.popleft().set_exception(exc)
                    grant = None
                    served = True
                if grant is not None:
                    queue.popleft().set_result(grant)
                    served = True
                if served:
                    del self._queue[user_id]
                    if queue:
                        self._queue[user_id] = queue  # to the back of the ring
                    break

    def _reserve(self, user_id: str, *, agent: bool = False) -> _Grant | None:
        """What ``user_id``'s next request can have right now, reserved for it (never awaits).

        Agent requests take agent-ready workers first; other requests leave those for them.
        """
        mine = [w for w in self._workers.values() if w.user_id == user_id]
        for worker in sorted(mine, key=lambda w: w.agent_ready != agent):
            if worker.state is WorkerState.IDLE and worker.healthy:
                worker.state = WorkerState.BUSY
                return _Grant(worker, "idle")
        if len(mine) >= self.config.max_workers_per_user:
            return None
        prewarmed = self._idle_unbound()
        if any(w.new_users_only for w in prewarmed) and not self._is_new_user(user_id):
            prewarmed = [w for w in prewarmed if not w.new_users_only]  # switched to a uid that is not theirs
        prewarmed.sort(key=lambda w: _claim_order(w, agent))
        if prewarmed:
            prewarmed[0].state = WorkerState.BUSY
            return _Grant(prewarmed[0], "claim")
        self._check_circuit()  # a worker would be started: not while spawning is paused
        if self._capacity() <= 0 and not self._evict_one(user_id):
            return None
        return _Grant(self._new_worker(user_id), "spawn")  # holds its slot (and the user's) from now on

    def _is_new_user(self, user_id: str) -> bool:
        """Whether a worker switched ahead may be offered to ``user_id`` (no workspace, no uid);
        False when the host cannot tell (the claim that follows then checks and says why). A
        map that fails closed raises, and the turn fails with it."""
        try:
            return spares.is_new_user(self.config, user_id)
        except OSError:
            return False

    def _give_back(self, grant: _Grant) -> None:
        """Undo a reservation whose request went away before it took it."""
        if grant.how == "spawn":
            self._workers.pop(grant.worker.worker_id, None)
        elif grant.worker.worker_id in self._workers:
            grant.worker.state = WorkerState.IDLE
        self._dispatch()

    async def _take(self, grant: _Grant, user_id: str) -> SandboxWorker | None:
        """Turn a reservation into a worker: bind a pre-warmed one, start a reserved slot."""
        if grant.how == "idle":
            return grant.worker
        if grant.how == "claim":
            return await self._claim(grant.worker, user_id)
        return await self._start_for(grant.worker, user_id)

    def _exhausted(self, user_id: str) -> PoolExhausted:
        """The error of a request that waited ``acquire_timeout`` in vain, naming the cap that is full.

        The user's own cap (``max_workers_per_user``) when they hold that many workers, else
        the pool's (``max_workers``): the fix for one is not the fix for the other.
        """
        mine = sum(1 for w in self._workers.values() if w.user_id == user_id)
        if mine >= self.config.max_workers_per_user:
            setting, limit = "max_workers_per_user", self.config.max_workers_per_user
            held = f"all {mine} of the user's workers busy"
        else:
            setting, limit = "max_workers", self.config.max_workers
            held = f"all {len(self._workers)}/{limit} workers busy"
        return PoolExhausted(
            f"no worker free for {user_id!r} within {self.config.acquire_timeout:g}s ({held}; {setting} = {limit})",
            data={"setting": setting, "limit": limit, "max_workers": self.config.max_workers,
                  "max_workers_per_user": self.config.max_workers_per_user, "user_id": user_id},
        )

    def _idle_unbound(self) -> list[SandboxWorker]:
        return [
            w for w in self._workers.values()
            if w.user_id is None and w.state is WorkerState.IDLE and w.healthy
        ]

    def _capacity(self) -> int:
        return self.config.max_workers - len(self._workers)

    def _evict_one(self, for_user: str) -> bool:
        """Stop the least recently used idle worker of another user to free a slot."""
        idle = [
            w for w in self._workers.values()
            if w.state is WorkerState.IDLE and w.user_id not in (None, for_user)
        ]
        if not idle:
            idle = self._idle_unbound()
        if not idle:
            return False
        victim = min(idle, key=lambda w: w.last_used)
        self._counters["evicted"] += 1
        self._retire(victim)
        return True

    async def _claim(self, worker: SandboxWorker, user_id: str) -> SandboxWorker | None:
        """Bind a pre-warmed worker to ``user_id``; None when it failed (it is retired, never reused).

        When attaching the workspace failed on the host's own checks (an unbound strict worker;
        the error says ``claim: attach``), the user gets a worker started for them instead,
        which checks the same at spawn: the request then fails, if it must, for the reason the
        spawn gives, and is not retried on every other pre-warmed worker.
        """
        worker.state = WorkerState.BUSY
        try:
            workspace = self.config.workspace_for(user_id)
            await worker.bind(user_id, workspace, functools.partial(prepare_workspace, self.config, user_id))
            if worker.claimed_spare:  # the uid map's rename, made durable off the request path
                self._in_background(asyncio.to_thread(tenants.flush, self.config))
        except SandboxError as exc:
            self._retire(worker)
            if exc.data.get("claim") == "attach" and not self._closed:
                self._counters["claim_fallbacks"] += 1
                return await self._start_for(self._new_worker(user_id), user_id)
            return None
        except BaseException:  # the request went away mid-claim: the worker is no one's now
            self._retire(worker)
            raise
        self._counters["claimed"] += 1
        self._claims.append(time.monotonic())
        return worker  # refilled when the request is released: a spawn now would slow it down

    async def _spawn_for(self, user_id: str) -> SandboxWorker:
        return await self._start_for(self._new_worker(user_id), user_id)

    async def _start_for(self, worker: SandboxWorker, user_id: str) -> SandboxWorker:
        """Start ``worker``, registered for ``user_id`` (it holds its slot), and bind it."""
        try:
            prepared = worker.workspace  # a head start's was prepared when it was spawned
            workspace = prepared if prepared is not None else await asyncio.to_thread(
                prepare_workspace, self.config, user_id)
        except BaseException:
            self._workers.pop(worker.worker_id, None)
            await self._notify()
            raise
        worker.workspace = workspace
        await self._start(worker)
        worker.state = WorkerState.BUSY  # no await since start(): nobody else can claim it
        if user_id in self._crashed_users:
            self._crashed_users.discard(user_id)
            self._counters["restarts"] += 1
        if not worker.bound_at_spawn:
            try:
                await worker.bind(user_id, workspace)
            except BaseException:  # failed, or the request went away: nobody would release it
                self._retire(worker)
                raise
        return worker

    async def _spawn_warm_for(self, user_id: str) -> SandboxWorker:
        """A worker bound to ``user_id`` left idle (pre-warmed for that user)."""
        worker = await self._spawn_for(user_id)
        worker.state = WorkerState.IDLE
        await self._notify()
        return worker

    def _new_worker(self, user_id: str | None) -> SandboxWorker:
        head = self._head_start
        if head is not None and head.pending and user_id == head.user_id:
            self._head_start = None
        else:
            head = None
        worker = SandboxWorker(
            self.config,
            head.worker_id if head is not None else f"w{next(self._ids)}-{self._tag}",
            user_id=user_id,
            workspace=head.workspace if head is not None else None,
            head_start=head,
            host_handler=self._serve_host_call,
            launcher=self._launcher,
            on_egress=self._journal_egress if self.record is not None else None,
            preload=self._preload_mode,
            on_preloaded=self._preloaded,
        )
        self._workers[worker.worker_id] = worker
        return worker

    def _journal_egress(self, decision: dict[str, Any]) -> None:
        """An egress decision into the record's journal (who, where to, allowed or why not)."""
        if self.record is not None:
            user = decision.get("user_id")
            self.record.journal("egress", decision, user_id=user if isinstance(user, str) else None)

    async def _spawn(self) -> SandboxWorker:
        """Start one unbound (pre-warmed) worker."""
        worker = self._new_worker(None)
        await self._start(worker)
        return worker

    async def _start(self, worker: SandboxWorker) -> None:
        """Start a registered worker; failures remove it and feed the circuit breaker."""
        try:
            await worker.start()
        except BaseException as exc:
            self._workers.pop(worker.worker_id, None)
            if isinstance(exc, SandboxError):
                self._record_start_failure(exc)
            await self._notify()
            raise
        self._failures_in_row = 0
        self._counters["spawned"] += 1
        if worker.spawn_seconds is not None:
            self._spawn_latency.append(worker.spawn_seconds)
            del self._spawn_latency[:-1000]

    def _record_start_failure(self, exc: SandboxError) -> None:
        self._counters["start_failures"] += 1
        self._failures_in_row += 1
        self._last_start_error = exc.message
        if self._failures_in_row >= self.config.start_failure_threshold:
            self._circuit_until = time.monotonic() + self.config.circuit_reset

    def _check_circuit(self) -> None:
        if time.monotonic() < self._circuit_until:
            raise CircuitOpen(
                f"workers failed to start {self._failures_in_row} times in a row; not retrying "
                f"for {self._circuit_until - time.monotonic():.0f}s. Last error: {self._last_start_error}",
                data={"last_error": self._last_start_error},
            )

    # ------------------------------------------------------------------ release

    async def _release(self, worker: SandboxWorker) -> None:
        if not worker.alive:
            if worker.state is WorkerState.CRASHED:
                self._counters["crashes"] += 1
                if worker.user_id is not None:
                    self._crashed_users.add(worker.user_id)
            self._workers.pop(worker.worker_id, None)
            await worker.stop(grace=0)
        elif (
            self._closed
            or not worker.healthy
            or (self.config.max_requests_per_worker
                and worker.requests_served >= self.config.max_requests_per_worker)
        ):
            if not self._closed:
                self._counters["recycled"] += 1
            self._retire(worker)
        else:
            worker.state = WorkerState.IDLE
            self._preload_if_wanted(worker)
        self._refill()
        await self._notify()

    def _retire(self, worker: SandboxWorker) -> None:
        """Remove ``worker`` from the pool now and stop it in the background."""
        self._workers.pop(worker.worker_id, None)
        worker.state = WorkerState.STOPPING
        task = asyncio.ensure_future(self._stop_worker(worker))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop_worker(self, worker: SandboxWorker) -> None:
        await worker.stop()
        await self._notify()

    async def _notify(self) -> None:
        self._dispatch()
        if self._closed:  # only a shutdown waits for changes (and it closes the pool first)
            async with self._changed:
                self._changed.notify_all()

    def _in_background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ pre-warm, reap

    def _refill(self) -> None:
        """Start pre-warmed workers in the background up to ``min_idle`` (off the request path)."""
        if self._closed or self.config.min_idle == 0 or time.monotonic() < self._circuit_until:
            return  # min_idle = 0 turns pre-warming off (see _warm_target): nothing to check
        if not can_prewarm(self.config):
            return
        warming = [
            w for w in self._workers.values()
            if w.user_id is None and w.state in (WorkerState.NEW, WorkerState.STARTING, WorkerState.IDLE)
            and w.preload_state != "failed"
        ]
        for_new = sum(w.new_users_only for w in warming)
        switched = self._switched_target()
        wanted = [True] * (switched - for_new)  # the configured ones first, then any user's (demand)
        wanted += [False] * (self._warm_target() - switched - (len(warming) - for_new))
        for new_users_only in wanted[: max(0, self._capacity())]:
            # registered now, not when the task first runs: a second refill in the same loop turn
            # (a release and the cleanup loop, say) counts it, and the pool stays within max_workers
            worker = self._new_worker(None)
            worker.new_users_only = new_users_only
            self._in_background(self._prewarm_one(worker))

    def _warm_target(self) -> int:
        """How many unbound workers to keep warm: ``min_idle``, or as many as were claimed in the
        last :data:`DEMAND_WINDOW` seconds when that is more (a burst of new users), within the cap.
        Extra ones are reaped like any idle worker after ``worker_timeout``; ``min_idle = 0``
        turns pre-warming off, demand or not."""
        horizon = time.monotonic() - DEMAND_WINDOW
        while self._claims and self._claims[0] < horizon:
            self._claims.popleft()
        if self.config.min_idle == 0:
            return 0
        return max(self.config.min_idle, len(self._claims))

    def _switched_target(self) -> int:
        """How many of the :meth:`_warm_target` workers wait switched to a new user's uid
        (``new_user_spares``, at most ``min_idle``; none where no spare can be staged)."""
        return min(self.config.new_user_spares, self.config.min_idle) if self._can_switch_ahead else 0

    async def _prewarm_one(self, worker: SandboxWorker) -> None:
        if worker.state is not WorkerState.NEW or self._workers.get(worker.worker_id) is not worker:
            return  # stopped or dropped (a stop of all workers) before its start came up
        with contextlib.suppress(SandboxError):
            await self._start(worker)
            if worker.preload_state == "failed":  # it failed while starting: never served
                self._retire(worker)
                self._refill()
            self._preload_if_wanted(worker)
            await self._notify()

    # ------------------------------------------------------------------ agent preload

    def _want_agents(self) -> None:
        """An agent request: under ``preload = "auto"``, idle workers load the agent from now on."""
        if self.config.preload != "auto" or self._preload_mode == "agent" or self._preload_off is not None:
            return
        self._preload_mode = "agent"
        for worker in list(self._workers.values()):
            self._preload_if_wanted(worker)

    def _preload_if_wanted(self, worker: SandboxWorker) -> None:
        """Ask an idle worker that has not loaded the agent to do so (in the background)."""
        if (self._preload_mode == "agent" and not self._closed and worker.state is WorkerState.IDLE
                and worker.healthy and worker.preload_state == "none"):
            worker.preload_report = {"state": "pending"}  # asked once
            self._in_background(self._ask_preload(worker))

    async def _ask_preload(self, worker: SandboxWorker) -> None:
        try:
            await worker.preload_agent()
        except SandboxError as exc:  # it cannot be trusted to be agent-ready: retired
            worker.preload_report = {"state": "failed", "error": exc.message}
            self._preloaded(worker)

    def _preloaded(self, worker: SandboxWorker) -> None:
        """A worker's preload ended: a failed one is retired (never served as agent-ready), and
        ``start_failure_threshold`` failures in a row stop preloading for this pool."""
        if worker.preload_state != "failed":
            self._preload_failures_in_row = 0
            return
        self._counters["preload_failed"] += 1
        self._preload_failures_in_row += 1
        if self._preload_failures_in_row >= self.config.start_failure_threshold and self._preload_off is None:
            self._preload_mode = "none"
            self._preload_off = str(worker.preload_report.get("error", "preload failed"))
        if worker.worker_id in self._workers and worker.state is WorkerState.IDLE:
            self._retire(worker)
            self._refill()
            self._dispatch()

    async def _cleanup_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.config.cleanup_interval)
            await self.cleanup_idle_workers()

    async def cleanup_idle_workers(self) -> int:
        """Remove dead workers, reap idle ones past ``worker_timeout``, refill; returns reaped."""
        now = time.monotonic()
        reaped = 0
        for worker in list(self._workers.values()):
            if worker.state in (WorkerState.NEW, WorkerState.STARTING):
                continue
            if not worker.alive and worker.state is not WorkerState.BUSY:
                self._counters["crashes"] += 1
                if worker.user_id is not None:
                    self._crashed_users.add(worker.user_id)
                self._workers.pop(worker.worker_id, None)
                await worker.stop(grace=0)
            elif worker.state is WorkerState.IDLE and worker.preload_state == "failed":
                self._retire(worker)  # a failed preload that ended while it was busy or starting
            elif worker.state is WorkerState.IDLE and now - worker.last_used > self.config.worker_timeout:
                if worker.user_id is None and self._kept_warm(worker):
                    continue
                self._counters["reaped"] += 1
                reaped += 1
                self._retire(worker)
        self._refill()
        await self._notify()
        return reaped

    def _kept_warm(self, worker: SandboxWorker) -> bool:
        """Whether an idle unbound worker is one of the ``min_idle`` kept however long it waits
        (of its kind: switched for new users, or for anyone)."""
        switched = self._switched_target()
        kind = [w for w in self._idle_unbound() if w.new_users_only == worker.new_users_only]
        return len(kind) <= (switched if worker.new_users_only else self.config.min_idle - switched)

    # ------------------------------------------------------------------ host calls

    async def _serve_host_call(
        self, worker: SandboxWorker, method: str, params: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        if method != "gateway.request":
            raise GatewayError(f"the host serves no {method!r} calls")
        if worker.user_id is None:
            raise GatewayError("worker is not bound to a user")
        run = worker.current_run
        if run is None:
            raise GatewayError("refused: the worker is serving no request, so the call belongs to no run",
                               data={"reason": "no_run"})
        gateway = self.gateway
        async for chunk in gateway.handle(worker.user_id, params, run=run):
            yield chunk

    async def set_model_config(self, model: ModelConfig) -> None:
        """Use ``model`` (provider, model, key, budgets) for the next model calls.

        Workers and their conversations stay; calls already streaming finish on the old
        gateway, which is closed at shutdown.
        """
        self.config = self.config.replace(model=model)
        if self._gateway is not None:
            self._old_gateways.append(self._gateway)
            self._gateway = None

    @property
    def gateway(self) -> ModelGateway:
        """The model gateway (created on first use so ``exec`` never loads it)."""
        if self._gateway is None:
            from sandbox_core.gateway import ModelGateway

            self._gateway = ModelGateway(self.config.model)
        return self._gateway

    # ------------------------------------------------------------------ operator control

    def list_workers(self) -> list[dict[str, Any]]:
        """One row per worker, for ``sandbox workers list``."""
        now = time.monotonic()
        return [
            {
                "worker_id": w.worker_id,
                "state": w.state.value,
                "user_id": w.user_id,
                "pid": w.pid,
                "requests": w.requests_served,
                "idle_s": round(now - w.last_used, 3) if w.state is WorkerState.IDLE else 0.0,
                "age_s": round(now - w.created, 3),
                "profile": w.profile,
            }
            for w in self._workers.values()
        ]

    def worker_report(self, worker_id: str) -> dict[str, Any] | None:
        """The handshake report (isolation layers in force) of a live worker."""
        worker = self._workers.get(worker_id)
        return dict(worker.report) if worker is not None else None

    async def launch(self, count: int, user_id: str | None = None) -> list[str]:
        """Pre-warm ``count`` more workers now (bounded by the cap); returns their ids.

        Unbound workers where the profile allows it; with ``user_id`` (required by profiles
        that mount the workspace at spawn, like strict), workers warm for that user.
        """
        if not self._started:
            await self.start()
        if user_id is None and not can_prewarm(self.config):
            raise ConfigError(
                "user_id",
                f"the {self.config.profile} profile mounts a user's workspace when a worker starts: "
                "name the user to pre-warm workers for",
            )
        if user_id is not None:
            validate_user_id(user_id)
        count = min(count, self._capacity())
        spawns = [self._spawn_warm_for(user_id) if user_id is not None else self._spawn() for _ in range(count)]
        results = await asyncio.gather(*spawns, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors and len(errors) == len(results):
            raise errors[0]
        return [r.worker_id for r in results if isinstance(r, SandboxWorker)]

    async def stop_workers(
        self, *, worker_ids: list[str] | None = None, user_id: str | None = None, everything: bool = False
    ) -> int:
        """Stop idle or busy workers by id, by user, or all; busy ones have their request killed."""
        targets = [
            w for w in list(self._workers.values())
            if everything
            or (worker_ids is not None and w.worker_id in worker_ids)
            or (user_id is not None and w.user_id == user_id)
        ]
        for worker in targets:
            self._workers.pop(worker.worker_id, None)
        await asyncio.gather(*(w.stop(grace=0) for w in targets))
        await self._notify()
        return len(targets)

    # ------------------------------------------------------------------ shutdown

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish within ``grace``, then stop everything."""
        if self._closed and not self._workers and not self._background and not self._stopping:
            return
        self._closed = True
        await self._notify()
        limit = self.config.shutdown_grace if grace is None else grace
        deadline = time.monotonic() + limit
        while self._in_flight and time.monotonic() < deadline:
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), deadline - time.monotonic())
        if self._cleanup_task is not None:
            self._cleanup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cleanup_task
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        workers = list(self._workers.values())
        self._workers.clear()
        await asyncio.shield(asyncio.gather(*(w.stop(grace=0) for w in workers), return_exceptions=True))
        while self._stopping:  # retired workers finish stopping before we return
            await asyncio.gather(*list(self._stopping), return_exceptions=True)
        if self._head_start is not None:  # never adopted: nobody asked for that user's worker
            head, self._head_start = self._head_start, None
            await asyncio.shield(asyncio.to_thread(head.discard))
        sessions = [w.pid for w in workers if w.pid is not None and w.sweeps_session]
        if sessions:  # belt and braces after each stop's own sweep; a /proc scan, off the loop
            await asyncio.to_thread(lambda: [kill_session(pid) for pid in sessions])
        for gateway in [*self._old_gateways, *([self._gateway] if self._gateway is not None else [])]:
            await gateway.aclose()

    # ------------------------------------------------------------------ stats

    def get_pool_stats(self) -> dict[str, Any]:
        """Workers by state, per user, request outcomes, crashes, latency, queue depth."""
        by_state = dict.fromkeys(("starting", "idle", "busy", "stopping"), 0)
        users: dict[str, dict[str, int]] = {}
        for w in self._workers.values():
            key = "starting" if w.state is WorkerState.NEW else w.state.value
            if key in by_state:
                by_state[key] += 1
            if w.user_id is not None:
                row = users.setdefault(w.user_id, {"workers": 0, "busy": 0, "requests": 0})
                row["workers"] += 1
                row["busy"] += w.state is WorkerState.BUSY
        for user, count in self._user_requests.items():
            users.setdefault(user, {"workers": 0, "busy": 0, "requests": 0})["requests"] = count
        c = self._counters
        p50 = _percentile(self._spawn_latency, 0.5)
        p95 = _percentile(self._spawn_latency, 0.95)
        stats: dict[str, Any] = {
            "profile": self.config.profile,
            "workers": {
                "total": len(self._workers),
                **by_state,
                "prewarmed": len(self._idle_unbound()),
                "prewarmed_new_users": sum(w.new_users_only for w in self._idle_unbound()),
                "agent_ready": sum(1 for w in self._workers.values() if w.agent_ready),
                "max": self.config.max_workers,
            },
            "users": users,
            "requests": {
                "ok": c["ok"], "failed": c["failed"], "timed_out": c["timed_out"],
                "cancelled": c["cancelled"], "in_flight": self._in_flight,
            },
            "crashes": c["crashes"],
            "restarts": c["restarts"],
            "recycled": c["recycled"],
            "reaped": c["reaped"],
            "evicted": c["evicted"],
            "spawned": c["spawned"],
            "claimed": c["claimed"],
            "claim_fallbacks": c["claim_fallbacks"],
            "start_failures": c["start_failures"],
            "preload": {"setting": self.config.preload, "mode": self._preload_mode,
                        "failed": c["preload_failed"],
                        **({"stopped": self._preload_off} if self._preload_off is not None else {})},
            "circuit": "open" if time.monotonic() < self._circuit_until else "closed",
            "queue_depth": self._waiting,
            "spawn_latency_ms": {
                "p50": None if p50 is None else round(p50 * 1000, 2),
                "p95": None if p95 is None else round(p95 * 1000, 2),
                "count": len(self._spawn_latency),
            },
            "uptime_s": round(time.monotonic() - self._started_at, 3),
        }
        if self._gateway is not None:
            stats["gateway"] = self._gateway.stats()
        return stats


def _claim_order(worker: SandboxWorker, agent: bool) -> tuple[bool, ...]:
    """Which pre-warmed worker a claim takes first (lowest): an agent request an agent-ready one;
    another request one that is not preloading right now (its bind would wait for the preload
    to end), and of those one that did not preload, leaving the ready ones to agent requests."""
    if agent:
        return (not worker.agent_ready, not worker.new_users_only)
    return (worker.preload_state in ("pending", "running"), not worker.new_users_only, worker.agent_ready)
