"""What the record keeps of one request: its run row and journal entries, from its events.

:class:`RunLog` is fed every event of one request as the orchestrator yields it, and the
way the request ended. What the worker reports (tool calls, usage) is recorded as the worker
reported it: it is evidence of what the sandbox claimed, next to what the host saw (the
outcome, the kill reason, the crash).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from sandbox_core.errors import RequestCancelled, RequestTimeout, SandboxError, WorkerCrashed
from sandbox_core.events import Event
from sandbox_core.record.store import Record
from sandbox_core.requests import AgentRequest, ExecRequest, Request


def new_run_id() -> str:
    """``run_`` and 16 hex digits from ``os.urandom``: ``secrets.token_hex``'s bytes, without
    loading ``secrets`` (with ``hmac``, ``random`` and ``base64``, 3-5 ms of every one-shot CLI)."""
    return f"run_{os.urandom(8).hex()}"


def request_summary(request: Request) -> tuple[str, dict[str, Any]]:
    """(kind, bounded summary) of a request: argv or shell for exec, the prompt for an agent."""
    if isinstance(request, ExecRequest):
        summary: dict[str, Any] = {"argv": list(request.argv)} if request.argv else {"shell": request.shell}
        if request.timeout is not None:
            summary["timeout"] = request.timeout
        summary["stdin"] = request.stdin is not None
        if request.tty is not None:  # an interactive session: what was typed is not recorded
            return "terminal", {**summary, "tty": True}
        return "exec", summary
    if isinstance(request, AgentRequest):
        return "agent", {"prompt": request.prompt, "model": request.model, "conversation_id": request.conversation_id}
    return request.method, {"method": request.method}


class RunLog:
    """The record of one request in flight."""

    def __init__(self, record: Record, run_id: str, user_id: str, request: Request, origin: str) -> None:
        self.record = record
        self.run_id = run_id
        self.user_id = user_id
        self.kind, summary = request_summary(request)
        self.conversation = request.conversation_id if isinstance(request, AgentRequest) else None
        record.run_started(run_id, user_id, self.kind, origin, summary, self.conversation)
        kind = self.kind if self.kind in ("exec", "agent", "terminal") else "exec"
        record.journal(kind, {"origin": origin, **summary}, user_id=user_id, run_id=run_id)
        self._done: dict[str, Any] = {}

    def event(self, event: Event) -> Event:
        """Record what ``event`` says; the event to pass on (a ``done`` without the history it
        carried for the record)."""
        kind, data = event.type, event.data
        if kind == "started":
            self.record.run_updated(self.run_id, worker_id=str(data.get("worker_id", "")))
        elif kind == "tool_use":
            self._journal("tool", {"id": data.get("id"), "name": data.get("name"), "input": data.get("input")})
        elif kind == "tool_result":
            self._journal("tool", {"id": data.get("id"), "result": data.get("output"), "is_error": data.get("is_error"),
                                   "exit_code": data.get("exit_code")})  # fmt: skip
        elif kind == "usage":
            tokens_in, tokens_out = _int(data.get("input_tokens")), _int(data.get("output_tokens"))
            self._journal("model", {"input_tokens": tokens_in, "output_tokens": tokens_out})
            self.record.run_tokens(self.run_id, tokens_in, tokens_out)
        elif kind == "done":
            self._done = dict(data)
            history = data.get("history")
            if isinstance(history, list) and self.conversation is not None:
                self.record.save_conversation(self.user_id, self.conversation, history)
            if "history" in data:
                return Event("done", {k: v for k, v in data.items() if k != "history"}, event.seq)
        return event

    def finished(self, error: BaseException | None) -> None:
        """Close the run row: ``error`` None is a normal end (the ``done`` event says how)."""
        done = self._done
        if error is None:
            exit_code = done.get("exit_code")
            reason = done.get("kill_reason")
            self.record.run_updated(self.run_id, outcome="ok", ended=_now(),
                                    exit_code=exit_code if isinstance(exit_code, int) else None,
                                    kill_reason=reason if isinstance(reason, str) else None)  # fmt: skip
            if isinstance(reason, str) and reason:
                self._journal("limit", {"kill_reason": reason, "exit_code": exit_code})
            return
        cancelled = isinstance(error, RequestCancelled | asyncio.CancelledError)
        outcome = "timed_out" if isinstance(error, RequestTimeout) else "cancelled" if cancelled else "failed"
        wire = error.to_wire() if isinstance(error, SandboxError) else {"message": "cancelled"}
        self.record.run_updated(self.run_id, outcome=outcome, ended=_now(),
                                error={**wire, "error": type(error).__name__})  # fmt: skip
        if isinstance(error, WorkerCrashed):
            self._journal("crash", {"message": error.message, "data": error.data})
        elif isinstance(error, RequestTimeout):
            self._journal("limit", {"kill_reason": "timeout", "message": error.message})

    def _journal(self, kind: str, detail: dict[str, Any]) -> None:
        self.record.journal(kind, detail, user_id=self.user_id, run_id=self.run_id)


def _now() -> float:
    return time.time()


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
