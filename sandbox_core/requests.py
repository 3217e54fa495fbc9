"""What a caller asks a worker to do, and the collected result of doing it."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sandbox_core.events import Event
from sandbox_core.names import parse_host_entry

INLINE_STDIN = 64 * 1024
"""Stdin up to this size travels inside the ``exec`` request; more is streamed in chunks."""

Stdin = bytes | str | AsyncIterable[bytes]
Window = tuple[int, int]
"""A terminal's size: ``(rows, cols)``."""


@dataclass(frozen=True)
class ExecRequest:
    """Run a command in the user's workspace: ``argv`` (no shell) or a ``shell`` string."""

    argv: tuple[str, ...] | None = None
    shell: str | None = None
    stdin: Stdin | None = None
    """Bytes or text, or an async iterable of bytes streamed to the command as it produces
    them (the command starts at once; EOF when the iterable ends)."""
    timeout: float | None = None
    """Deadline in seconds; None = the config's request_timeout."""
    tty: Window | None = None
    """Run the command on a pseudo-terminal made inside the sandbox, of this ``(rows, cols)``
    size: stdout and stderr are the terminal's bytes (all as ``stdout``), stdin its keys."""
    term: str | None = None
    """``TERM`` for a ``tty`` command (letters, digits, ``._+-``; default ``xterm``)."""
    resize: AsyncIterable[Window] | None = None
    """New window sizes of a ``tty`` command, sent to it as they come."""
    network: tuple[str, ...] | None = None
    """Narrow the network policy for this request (``network.allow`` entries; a connection must
    pass these *and* the configured policy; ``()`` = none at all). It never widens the policy."""
    any_network: bool = False
    """The command needs no network and leaves nothing running (the file transfers' inside half):
    it runs on a worker of any network policy, narrowed or not, and binds none. It widens
    nothing: a narrowed worker keeps its narrowing, and an unbound one the configured policy."""

    method = "exec"

    def __post_init__(self) -> None:
        _check_network(self.network)
        if self.any_network and self.network is not None:
            raise ValueError("any_network is for a command that needs no network: it takes no network list")
        if (self.argv is None) == (self.shell is None):
            raise ValueError("ExecRequest needs exactly one of argv and shell")
        if self.argv is not None and not self.argv:
            raise ValueError("argv must not be empty")
        if self.tty is not None:
            check_window(*self.tty)
            if self.term is not None and not TERM_NAME.match(self.term):
                raise ValueError(f"term must be 1-64 letters, digits or ._+- characters, not {self.term!r}")
        elif self.resize is not None or self.term is not None:
            raise ValueError("resize and term are for a tty request")

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.argv is not None:
            params["argv"] = list(self.argv)
        else:
            params["shell"] = self.shell
        raw = self._stdin_bytes()
        if raw is not None and len(raw) <= INLINE_STDIN:
            params["stdin_b64"] = base64.b64encode(raw).decode()
        if self.tty is not None:
            params["tty"] = {"rows": self.tty[0], "cols": self.tty[1]}
            if self.term is not None:
                params["tty"]["term"] = self.term
        return params

    def stdin_stream(self) -> AsyncIterable[bytes] | None:
        """The stdin to stream (``None`` when there is none or it travels inline)."""
        if self.stdin is None or isinstance(self.stdin, bytes | str):
            raw = self._stdin_bytes()
            return _once(raw) if raw is not None and len(raw) > INLINE_STDIN else None
        return self.stdin

    def _stdin_bytes(self) -> bytes | None:
        if isinstance(self.stdin, str):
            return self.stdin.encode()
        return self.stdin if isinstance(self.stdin, bytes) else None


TERM_NAME = re.compile(r"^[A-Za-z0-9._+-]{1,64}$")
"""What a terminal's ``TERM`` may be (the worker falls back to ``xterm`` for anything else)."""
MAX_WINDOW_SIDE = 10_000
"""Largest number of rows or columns of a terminal (the worker refuses more)."""


def check_window(rows: int, cols: int) -> None:
    """ValueError unless ``rows`` and ``cols`` are whole numbers from 1 to MAX_WINDOW_SIDE."""
    for name, value in (("rows", rows), ("cols", cols)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_WINDOW_SIDE:
            raise ValueError(f"terminal {name} must be an integer from 1 to {MAX_WINDOW_SIDE}, not {value!r}")


def _check_network(entries: tuple[str, ...] | None) -> None:
    for entry in entries or ():
        parse_host_entry(entry)  # ValueError names the entry


def network_from_json(value: object) -> tuple[str, ...] | None:
    """The ``network`` of a JSON request body: absent, ``{"mode": "none"}`` (``()``: no network at
    all) or ``{"allow": [ENTRY, ...]}``; ValueError for anything else (naming a bad entry)."""
    if value is None:
        return None
    if isinstance(value, dict) and value == {"mode": "none"}:
        return ()
    if isinstance(value, dict) and set(value) == {"allow"} and isinstance(value["allow"], list):
        entries = value["allow"]
        if not all(isinstance(e, str) for e in entries):
            raise ValueError("network.allow entries must be strings (HOST or HOST:PORT)")
        _check_network(tuple(entries))
        return tuple(entries)
    raise ValueError('network must be {"mode": "none"} or {"allow": ["HOST[:PORT]", ...]}')


def network_to_json(entries: tuple[str, ...] | None) -> dict[str, Any] | None:
    """The JSON form of a request's narrowing (see :func:`network_from_json`)."""
    if entries is None:
        return None
    return {"allow": list(entries)} if entries else {"mode": "none"}


def network_param(request: object) -> tuple[str, ...] | None:
    """The request's own narrowing of the network policy (kept on the host, never sent)."""
    entries = getattr(request, "network", None)
    return tuple(entries) if entries is not None else None


def any_network(request: object) -> bool:
    """Whether the request may run on a worker of any network policy (see :attr:`ExecRequest.any_network`)."""
    return getattr(request, "any_network", False) is True


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


LAST_CONVERSATION = "@last"
"""The ``conversation_id`` of an :class:`AgentRequest` with ``resume`` that means "the user's most
recent conversation" (``sandbox run --continue``)."""


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
    resume: bool = False
    """Continue ``conversation_id`` from the durable record when the worker does not hold it
    (a new process, a reaped worker). ``conversation_id`` :data:`LAST_CONVERSATION` names the
    user's most recent one. Needs an orchestrator with a record."""
    history: tuple[Any, ...] | None = None
    """The conversation's messages so far, for a worker that does not hold them (filled in by
    the orchestrator from its record when ``resume``)."""
    return_history: bool = False
    """Ask the worker for the conversation's messages in ``done`` (the orchestrator asks when it
    keeps a record, stores them, and strips them from the event)."""
    network: tuple[str, ...] | None = None
    """Narrow the network policy for this run, as :attr:`ExecRequest.network`."""

    method = "agent.run"

    def __post_init__(self) -> None:
        _check_network(self.network)

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"prompt": self.prompt, "conversation_id": self.conversation_id}
        if self.history is not None:
            params["history"] = list(self.history)
        if self.return_history:
            params["return_history"] = True
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

    def _output(self, kind: str) -> bytes:
        return b"".join(e.chunk() for e in self.events if e.type == kind)

    @property
    def stdout(self) -> bytes:
        """The command's stdout, byte for byte."""
        return self._output("stdout")

    @property
    def stderr(self) -> bytes:
        """The command's stderr, byte for byte."""
        return self._output("stderr")

    @property
    def stdout_text(self) -> str:
        """``stdout`` as text (bytes that are not UTF-8 become U+FFFD)."""
        return self.stdout.decode(errors="replace")

    @property
    def stderr_text(self) -> str:
        """``stderr`` as text (bytes that are not UTF-8 become U+FFFD)."""
        return self.stderr.decode(errors="replace")

    @property
    def text(self) -> str:
        """The agent's text."""
        return "".join(str(e.data.get("text", "")) for e in self.events if e.type == "text")

    @property
    def kill_reason(self) -> str | None:
        """Which limit ended the command (``memory limit 1024 MB``), if one did."""
        reason = self.result.get("kill_reason")
        return reason if isinstance(reason, str) else None

    @property
    def exit_code(self) -> int | None:
        code = self.result.get("exit_code")
        return code if isinstance(code, int) else None
