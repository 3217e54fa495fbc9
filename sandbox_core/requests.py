"""What a caller asks a worker to do, and the collected result of doing it."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from sandbox_core.events import Event


@dataclass(frozen=True)
class ExecRequest:
    """Run a command in the user's workspace: ``argv`` (no shell) or a ``shell`` string."""

    argv: tuple[str, ...] | None = None
    shell: str | None = None
    stdin: bytes | str | None = None
    timeout: float | None = None
    """Deadline in seconds; None = the config's request_timeout."""

    method = "exec"

    def __post_init__(self) -> None:
        if (self.argv is None) == (self.shell is None):
            raise ValueError("ExecRequest needs exactly one of argv and shell")
        if self.argv is not None and not self.argv:
            raise ValueError("argv must not be empty")

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.argv is not None:
            params["argv"] = list(self.argv)
        else:
            params["shell"] = self.shell
        if self.stdin is not None:
            raw = self.stdin.encode() if isinstance(self.stdin, str) else self.stdin
            params["stdin_b64"] = base64.b64encode(raw).decode()
        return params


@dataclass(frozen=True)
class AgentRequest:
    """Run the Claude agent on ``prompt`` (continuing ``conversation_id`` if given)."""

    prompt: str
    system: str | None = None
    model: str | None = None
    max_turns: int | None = None
    max_tokens: int | None = None
    tools: tuple[str, ...] | None = None
    conversation_id: str = "default"
    timeout: float | None = None

    method = "agent.run"

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"prompt": self.prompt, "conversation_id": self.conversation_id}
        for key in ("system", "model", "max_turns", "max_tokens"):
            value = getattr(self, key)
            if value is not None:
                params[key] = value
        if self.tools is not None:
            params["tools"] = list(self.tools)
        return params


@dataclass(frozen=True)
class RawRequest:
    """Any worker method by name (``ping``, ``agent.reset``, ``audit.probe``...)."""

    method: str
    payload: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None

    def params(self) -> dict[str, Any]:
        return dict(self.payload)


Request = ExecRequest | AgentRequest | RawRequest


@dataclass
class RequestResult:
    """``execute_stream()`` collected: every event, and the final result."""

    events: list[Event]
    result: dict[str, Any]
    worker_id: str

    def _joined(self, kind: str, key: str) -> str:
        return "".join(str(e.data.get(key, "")) for e in self.events if e.type == kind)

    @property
    def stdout(self) -> str:
        return self._joined("stdout", "data")

    @property
    def stderr(self) -> str:
        return self._joined("stderr", "data")

    @property
    def text(self) -> str:
        return self._joined("text", "text")

    @property
    def exit_code(self) -> int | None:
        code = self.result.get("exit_code")
        return code if isinstance(code, int) else None
