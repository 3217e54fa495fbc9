"""The service's runs: each a task consuming one orchestrator stream, with an event buffer.

A run belongs to the principal that started it. Its events are numbered from 1 (the SSE
id) and buffered so a stream can re-attach with ``Last-Event-ID``. The buffer is bounded
in count and bytes (see :mod:`sandbox_core.service.buffer`), and a stream reads it through
a :class:`Cursor` at its own pace. The live stream is not cut short by the bound: when an
append would drop events a live stream has not read yet, the run waits for it (the wait
slows the worker's pipe, and so the command, never grows the server), for up to
``slow_client_seconds``. A stream that is still behind then is no longer waited for (until
it catches up again): it gets one ``gap`` event instead of what was dropped, then what
follows. So a stalled client costs a run at most that long per append, and memory stays
bounded either way.

What the registry keeps is bounded too: a finished run is released ``run_ttl`` seconds
after it finished; a user keeps at most ``max_runs_per_user`` runs (a new run releases
their oldest finished one, and is refused with :class:`TooManyRuns` when all are still
running); and at most ``keep_finished`` finished runs are kept in all.

Only the owner, or an operator, can see, stream or cancel a run; to anyone else it does
not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from sandbox_core.config import ServiceConfig
from sandbox_core.errors import SandboxError, TooManyRuns
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.requests import ExecRequest, Request
from sandbox_core.service import logs
from sandbox_core.service.auth import Principal
from sandbox_core.service.buffer import EventBuffer, Item, encoded, event_size
from sandbox_core.service.stdin import StdinRelay

MIB = 1024 * 1024


@dataclass(eq=False)
class Cursor:
    """One stream's place in a run: the id of the last item it has been given."""

    seq: int
    awaited: bool = True
    """The run waits for this stream before dropping what it has not read (False after it
    stalled for ``slow_client_seconds``, until it catches up)."""


@dataclass
class Run:
    """One agent run or exec started through the service."""

    run_id: str
    owner: Principal
    kind: str
    events: EventBuffer
    created: float = field(default_factory=time.time)
    state: str = "running"
    """running, ok, failed, cancelled."""
    error: dict[str, Any] | None = None
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when an event is appended or the run finishes."""
    readers: set[Cursor] = field(default_factory=set)
    advanced: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a reader moves on or leaves."""
    finished_at: float = 0.0
    """``time.monotonic()`` when the run finished (0 while it runs)."""
    expiry: asyncio.TimerHandle | None = None
    """Releases the run ``run_ttl`` seconds after it finished."""
    exit_code: Any = None
    """The command's exit code from its ``done`` event (None until then, or for agent runs)."""
    stdin: StdinRelay | None = None
    """Where ``POST /v1/runs/{id}/stdin`` hands the command its input (exec with stdin_stream)."""
    cut_by: SandboxError | None = None
    """Why the service stopped the run (its shutdown), which its last event then says."""

    @property
    def finished(self) -> bool:
        return self.state != "running"

    @property
    def last_seq(self) -> int:
        return self.events.last_seq

    def lagging(self, seq: int) -> list[Cursor]:
        """Awaited readers that have not read up to ``seq`` yet."""
        return [c for c in self.readers if c.awaited and c.seq < seq]

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "user_id": self.owner.user_id,
            "kind": self.kind,
            "state": self.state,
            "created": self.created,
            "events": self.last_seq,
            "buffered_events": len(self.events),
            "buffered_bytes": self.events.bytes,
            "dropped_events": self.events.dropped_events,
            "error": self.error,
        }


class RunRegistry:
    """Starts, finds, streams, cancels and releases runs on one orchestrator."""

    def __init__(
        self, orchestrator: SandboxOrchestrator, config: ServiceConfig | None = None, keep_finished: int = 1000
    ) -> None:
        self._orchestrator = orchestrator
        self._config = config or ServiceConfig()
        self._runs: dict[str, Run] = {}
        self._keep_finished = keep_finished

    def start(self, owner: Principal, kind: str, request: Request) -> Run:
        """Start a run for ``owner``; TooManyRuns when they keep the most runs, all running."""
        self._make_room_for(owner)
        buffer = EventBuffer(self._config.max_buffered_events, self._config.run_buffer_mb * MIB)
        run = Run(f"run_{secrets.token_hex(8)}", owner, kind, buffer)
        if isinstance(request, ExecRequest) and isinstance(request.stdin, StdinRelay):
            run.stdin = request.stdin
        run.task = asyncio.create_task(self._drive(run, request), name=run.run_id)
        self._runs[run.run_id] = run
        self._forget_old()
        return run

    def get(self, run_id: str, who: Principal) -> Run | None:
        """The run, if ``who`` may see it (its owner or an operator)."""
        run = self._runs.get(run_id)
        if run is None or not (who.is_operator or run.owner.user_id == who.user_id):
            return None
        return run

    def visible(self, who: Principal) -> list[Run]:
        return [r for r in self._runs.values() if who.is_operator or r.owner.user_id == who.user_id]

    @property
    def in_flight(self) -> int:
        return sum(1 for r in self._runs.values() if not r.finished)

    async def cancel(self, run: Run) -> None:
        """Cancel a run and wait until it has stopped (its processes are gone)."""
        if run.task is not None and not run.task.done():
            run.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(run.task)

    async def cancel_all(self) -> None:
        await asyncio.gather(*(self.cancel(r) for r in list(self._runs.values())))

    def running(self) -> list[Run]:
        return [r for r in self._runs.values() if not r.finished]

    async def cut(self, run: Run, error: SandboxError) -> None:
        """Stop a running run because of ``error`` (the service's shutdown): its streams get
        ``error`` as the run's last event, then end; returns once its processes are gone."""
        if run.finished or run.task is None or run.task.done():
            return
        run.cut_by = error
        await self.cancel(run)

    async def _drive(self, run: Run, request: Request) -> None:
        who = {"run_id": run.run_id, "user": run.owner.user_id, "kind": run.kind}
        logs.log().info("run %s started: %s by %s", run.run_id, run.kind, run.owner.user_id, extra=who)
        stream = self._orchestrator.execute_stream(run.owner.user_id, request, run_id=run.run_id, origin="service")
        try:
            async for event in stream:
                data = dict(event.json_data())  # output bytes become text or base64
                if event.type == "started":
                    data["run_id"] = run.run_id
                elif event.type == "done":
                    run.exit_code = data.get("exit_code")
                await self._append(run, encoded(event.type, data))
            run.state = "ok"
        except asyncio.CancelledError:
            if run.cut_by is not None:
                run.state = "failed"
                run.error = run.cut_by.to_wire()
                self._store(run, {"type": "error", "data": {**run.error, "error": type(run.cut_by).__name__}})
            else:
                run.state = "cancelled"
                run.error = {"code": "cancelled", "message": "run cancelled"}
                self._store(run, {"type": "error", "data": {"code": -32000, "message": "run cancelled"}})
        except SandboxError as exc:
            run.state = "failed"
            run.error = exc.to_wire()
            self._store(run, {"type": "error", "data": {**exc.to_wire(), "error": type(exc).__name__}})
        finally:
            await stream.aclose()
            if run.stdin is not None:
                await run.stdin.close()
            self._schedule_release(run)
            run.changed.set()
            logs.log().info("run %s %s (exit %s)", run.run_id, run.state, run.exit_code,
                            extra={**who, "state": run.state, "exit_code": run.exit_code,
                                   "error": (run.error or {}).get("message")})  # fmt: skip

    async def _append(self, run: Run, event: dict[str, Any]) -> None:
        """Store ``event``, first giving live readers time to read what it would drop."""
        size = event_size(event)
        victim = run.events.would_drop(size)
        if victim:
            await self._wait_for_readers(run, victim)
        self._store(run, event, size)

    async def _wait_for_readers(self, run: Run, seq: int) -> None:
        """Wait until awaited readers have read up to ``seq``, or stop awaiting them.

        While this waits the run reads nothing from its worker, whose pipe then fills.
        """
        deadline = time.monotonic() + self._config.slow_client_seconds
        while lagging := run.lagging(seq):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for cursor in lagging:
                    cursor.awaited = False
                return
            run.advanced.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.advanced.wait(), remaining)

    def _store(self, run: Run, event: dict[str, Any], size: int | None = None) -> None:
        run.events.append(event, size)
        run.changed.set()

    def _schedule_release(self, run: Run) -> None:
        """Release ``run`` once ``run_ttl`` seconds have passed (it has just finished)."""
        run.finished_at = time.monotonic()
        loop = asyncio.get_running_loop()
        run.expiry = loop.call_later(self._config.run_ttl, self._release, run)

    def _release(self, run: Run) -> None:
        """Forget ``run`` (a stream still reading it keeps it alive until that stream ends)."""
        if run.expiry is not None:
            run.expiry.cancel()
        if self._runs.get(run.run_id) is run:
            del self._runs[run.run_id]

    def _make_room_for(self, owner: Principal) -> None:
        """Release the owner's oldest finished runs so that one more fits under the cap.

        TooManyRuns when the owner's runs are all still running: those are never dropped.
        """
        cap = self._config.max_runs_per_user
        mine = [r for r in self._runs.values() if r.owner.user_id == owner.user_id]
        finished = sorted((r for r in mine if r.finished), key=lambda r: r.finished_at)
        if len(mine) - len(finished) >= cap:
            raise TooManyRuns(
                f"{owner.user_id!r} already has {cap} runs in flight (service.max_runs_per_user = {cap}); "
                "wait for one to finish, or cancel one",
                data={"setting": "service.max_runs_per_user", "limit": cap},
            )
        for run in finished[: max(0, len(mine) - cap + 1)]:
            self._release(run)

    def _forget_old(self) -> None:
        finished = [r for r in self._runs.values() if r.finished]
        for run in finished[: max(0, len(finished) - self._keep_finished)]:
            self._release(run)

    def attach(self, run: Run, after: int = 0) -> Cursor:
        """A reader of ``run`` from after id ``after``; the run waits for it from now on.

        Attach before the run can produce (the starting stream does so at once), so that
        nothing it should read is dropped before it reads.
        """
        cursor = Cursor(after)
        run.readers.add(cursor)
        return cursor

    async def follow(self, run: Run, cursor: Cursor, keepalive: float = 15.0) -> AsyncGenerator[Item | None, None]:
        """Yield ``(seq, event)`` after the cursor until the run ends; ``None`` = keep-alive.

        When the stream has fallen behind what the buffer kept, the next item is the
        ``gap`` event, then what follows. Closing the generator detaches the cursor.
        """
        try:
            while True:
                while (item := run.events.next_after(cursor.seq)) is not None:
                    yield item
                    cursor.seq = item[0]
                    run.advanced.set()
                cursor.awaited = True  # caught up: wait for this stream again
                if run.finished:
                    return
                run.changed.clear()
                if run.events.next_after(cursor.seq) is not None or run.finished:
                    continue
                try:
                    await asyncio.wait_for(run.changed.wait(), keepalive)
                except TimeoutError:
                    yield None
        finally:
            run.readers.discard(cursor)
            run.advanced.set()
