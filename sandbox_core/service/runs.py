"""The service's runs: each a task consuming one orchestrator stream, with an event buffer.

A run belongs to the principal that started it. Its events are numbered from 1 (the SSE
id) and buffered (bounded) so a stream can re-attach with ``Last-Event-ID``. Only the
owner, or an operator, can see, stream or cancel a run; to anyone else it does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sandbox_core.errors import SandboxError
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.requests import ExecRequest, Request
from sandbox_core.service.auth import Principal
from sandbox_core.service.stdin import StdinRelay


@dataclass
class Run:
    """One agent run or exec started through the service."""

    run_id: str
    owner: Principal
    kind: str
    created: float = field(default_factory=time.time)
    events: list[dict[str, Any]] = field(default_factory=list)
    first_seq: int = 1
    """SSE id of ``events[0]`` (older events were dropped from the buffer)."""
    state: str = "running"
    """running, ok, failed, cancelled."""
    error: dict[str, Any] | None = None
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    stdin: StdinRelay | None = None
    """Where ``POST /v1/runs/{id}/stdin`` hands the command its input (exec with stdin_stream)."""

    @property
    def finished(self) -> bool:
        return self.state != "running"

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.events) - 1

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "user_id": self.owner.user_id,
            "kind": self.kind,
            "state": self.state,
            "created": self.created,
            "events": self.last_seq,
            "error": self.error,
        }


class RunRegistry:
    """Starts, finds, streams and cancels runs on one orchestrator."""

    def __init__(self, orchestrator: SandboxOrchestrator, max_events: int = 10000, keep_finished: int = 1000):
        self._orchestrator = orchestrator
        self._runs: dict[str, Run] = {}
        self._max_events = max_events
        self._keep_finished = keep_finished

    def start(self, owner: Principal, kind: str, request: Request) -> Run:
        run = Run(f"run_{secrets.token_hex(8)}", owner, kind)
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

    async def _drive(self, run: Run, request: Request) -> None:
        stream = self._orchestrator.execute_stream(run.owner.user_id, request)
        try:
            async for event in stream:
                data = dict(event.json_data())  # output bytes become text or base64
                if event.type == "started":
                    data["run_id"] = run.run_id
                self._append(run, {"type": event.type, "data": data})
            run.state = "ok"
        except asyncio.CancelledError:
            run.state = "cancelled"
            run.error = {"code": "cancelled", "message": "run cancelled"}
            self._append(run, {"type": "error", "data": {"code": -32000, "message": "run cancelled"}})
        except SandboxError as exc:
            run.state = "failed"
            run.error = exc.to_wire()
            self._append(run, {"type": "error", "data": {**exc.to_wire(), "error": type(exc).__name__}})
        finally:
            await stream.aclose()
            if run.stdin is not None:
                await run.stdin.close()
            run.changed.set()

    def _append(self, run: Run, event: dict[str, Any]) -> None:
        run.events.append(event)
        if len(run.events) > self._max_events:
            drop = len(run.events) - self._max_events
            del run.events[:drop]
            run.first_seq += drop
        run.changed.set()

    def _forget_old(self) -> None:
        finished = [r for r in self._runs.values() if r.finished]
        for run in finished[: max(0, len(finished) - self._keep_finished)]:
            self._runs.pop(run.run_id, None)

    async def follow(
        self, run: Run, after: int = 0, keepalive: float = 15.0
    ) -> AsyncIterator[tuple[int, dict[str, Any]] | None]:
        """Yield ``(seq, event)`` after ``after`` until the run ends; ``None`` = keep-alive."""
        next_seq = max(after + 1, run.first_seq)
        while True:
            while next_seq <= run.last_seq:
                yield next_seq, run.events[next_seq - run.first_seq]
                next_seq += 1
            if run.finished:
                return
            run.changed.clear()
            if next_seq <= run.last_seq or run.finished:
                continue
            try:
                await asyncio.wait_for(run.changed.wait(), keepalive)
            except TimeoutError:
                yield None
