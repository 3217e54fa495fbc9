"""The worker's first steps, taken before asyncio and the serving machinery are imported.

The worker's entry (:mod:`boot`) moves the protocol off fds 0/1 (as :mod:`worker_main`
describes), then reads the channel with plain blocking reads and answers
the handshake itself: ``initialize`` (the in-process isolation layers are applied and
reported, as before) and, when the host says one follows (``bind_follows``), the ``bind``
of a worker that is bound at spawn, and any ``ping`` in between. Only then does it import
:mod:`worker_main` (asyncio alone is ~35 ms of CPU) and hand over: the asyncio parts of
``initialize`` (the data and input pipes, the loopback model endpoint and network proxy)
are attached before the first frame that needs them is read, and whatever this phase read
but did not serve is fed to the serving loop first.

Any frame this phase does not fully understand (a malformed or oversized one, another
method, ``initialize`` twice) is not answered here: the serving loop gets it and answers it
as it always did. A layer that cannot be applied fails ``initialize`` here, as it did there
(fail closed); a listener that cannot be attached after the answer (its port is fixed by the
plan in the sandbox's own network namespace, so only a broken sandbox gets there) ends the
worker with a message on stderr instead of serving without it.

Frames are read and written through :mod:`sandbox_core.wirejson` (the ``json`` module's own C
scanner and quoting, without ``json``: its ``re`` and ``enum`` were a fifth of a strict
worker's spawn-to-ready), in the exact wire form of :func:`sandbox_core.protocol.encode`, so
this phase does not import the protocol module (dataclasses, regular expressions) either.
"""

from __future__ import annotations

import os
import stat
import sys

from sandbox_core import codes
from sandbox_core.errors import ProtocolError, SandboxError
from sandbox_core.wirejson import json_text, json_value

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms of the boot)
if TYPE_CHECKING:
    from typing import Any

_READ = 64 * 1024
PROTOCOL_VERSION = "1"
"""Kept equal to :data:`sandbox_core.protocol.PROTOCOL_VERSION` (a unit test checks)."""
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
"""Kept equal to :data:`sandbox_core.protocol.DEFAULT_MAX_FRAME` (a unit test checks)."""
MAX_NESTING = 64
"""Kept equal to :data:`sandbox_core.protocol.MAX_NESTING`: a deeper frame is the loop's to refuse."""


class Booted:
    """What the handshake settled, for the serving loop's executor to adopt."""

    __slots__ = ("data_fd", "handoff_fd", "initialized", "input_ended", "pending", "plan", "preload", "report",
                 "stdin_fd", "user_id", "worker_id", "workspace")  # fmt: skip

    def __init__(self) -> None:
        self.initialized = False
        self.worker_id = ""
        self.plan: dict[str, Any] = {}
        self.report: dict[str, Any] = {}
        self.user_id: str | None = None
        self.workspace: str | None = None
        self.data_fd: int | None = None
        self.stdin_fd: int | None = None
        self.handoff_fd: Any = None
        self.input_ended = False
        self.preload = False
        """The host asked for the agent preload (started by the serving loop once confinement is complete)."""
        self.pending = b""
        """Bytes read from the channel and not served here: the serving loop reads them first."""


def take_protocol_fds() -> tuple[int, int]:
    """Move the protocol to private fds; fd 0 becomes /dev/null and fd 1 a copy of stderr."""
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto_in, proto_out


def frame(obj: dict[str, Any]) -> bytes:
    """One NDJSON frame, byte for byte what :func:`sandbox_core.protocol.encode` writes."""
    return json_text(obj, ascii=False).encode() + b"\n"


def answer(request_id: int | str, result: Any) -> bytes:
    return frame({"jsonrpc": "2.0", "id": request_id, "result": result})


def refusal(request_id: int | str, exc: Exception) -> bytes:
    """The error answer the serving loop would give for ``exc`` (same codes, same wording)."""
    if isinstance(exc, SandboxError):
        error = exc.to_wire()
        inner = exc.data.get("code")
        if isinstance(inner, int):
            error["code"] = inner
    else:
        error = {"code": codes.INTERNAL_ERROR, "message": f"{type(exc).__name__}: {exc}"}
    return frame({"jsonrpc": "2.0", "id": request_id, "error": error})


def request(line: bytes) -> tuple[int | str, str, dict[str, Any]] | None:
    """``(id, method, params)`` of a well-formed request, else None (the serving loop judges it)."""
    try:
        obj = json_value(line.decode())  # a frame is UTF-8 (ValueError when it is not)
    except (ValueError, RecursionError):
        return None
    brackets = line.count(b"[") + line.count(b"{")
    if brackets > MAX_NESTING and _depth(obj) > MAX_NESTING:  # the loop refuses it
        return None
    if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0":
        return None
    request_id, method, params = obj.get("id"), obj.get("method"), obj.get("params", {})
    if isinstance(request_id, bool) or not isinstance(request_id, int | str):
        return None
    if not isinstance(method, str) or not isinstance(params, dict):
        return None
    return request_id, method, params


def _depth(obj: Any) -> int:
    """How deep containers nest in ``obj`` (1 for a flat object), without recursion."""
    deepest, todo = 0, [(obj, 1)]
    while todo:
        item, level = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        todo.extend((child, level + 1) for child in children)
    return deepest


def _pipe_fd(params: dict[str, Any], name: str) -> int | None:
    """The pipe end ``params[name]`` names, made private to the worker (commands never get it)."""
    fd = params.get(name)
    if not isinstance(fd, int) or isinstance(fd, bool):
        return None
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        raise ProtocolError(f"{name} {fd} is not a pipe")
    os.set_inheritable(fd, False)
    return fd


def initialize(booted: Booted, params: dict[str, Any]) -> dict[str, Any]:
    """Apply the plan's in-process layers; the answer to ``initialize``.

    The listeners the plan asks for are reported at the fixed ports it names; they are
    attached by :meth:`sandbox_core.inside.worker_main.SandboxExecutor.adopt` before any
    command can run (and a worker that cannot attach them exits).
    """
    from sandbox_core.inside import confine

    if booted.initialized:
        raise ProtocolError("already initialized")
    plan = dict(params.get("plan") or {})
    endpoint, network = plan.get("model_endpoint"), plan.get("network")
    if isinstance(endpoint, dict) and not (isinstance(endpoint.get("port"), int)
                                           and isinstance(endpoint.get("max_body"), int)):  # fmt: skip
        raise ProtocolError("model_endpoint needs an int port and max_body")
    report = confine.apply(plan)
    if plan.get("await_user"):  # unbound: the rules that do not name the workspace, before the claim
        confine.prepare_landlock(plan)
    booted.worker_id = str(params.get("worker_id", ""))
    booted.plan, booted.report = plan, report
    booted.initialized = True
    booted.data_fd, booted.stdin_fd = _pipe_fd(params, "data_fd"), _pipe_fd(params, "stdin_fd")
    booted.handoff_fd = params.get("handoff_fd")
    booted.preload = params.get("preload") == "agent"
    if isinstance(endpoint, dict):  # the sandbox's own loopback (shared.MODEL_ENDPOINT_HOST)
        report["model_endpoint"] = f"127.0.0.1:{endpoint['port']}"
    port = network.get("proxy_port") if isinstance(network, dict) else None
    if isinstance(network, dict) and isinstance(port, int):  # else reported once it listens
        report["network"] = {"proxy": f"127.0.0.1:{port}", "mode": network.get("mode")}
    workspace = params.get("workspace")
    if isinstance(workspace, str):
        enter(booted, str(params.get("user_id", "")), workspace)
    return {
        "protocol": PROTOCOL_VERSION,
        "pid": os.getpid(),
        "layers": report,
        "data_pipe": booted.data_fd is not None,
        "stdin_pipe": booted.stdin_fd is not None,
        "preload": {"state": "pending" if booted.preload else "none"},
    }


def bind(booted: Booted, params: dict[str, Any]) -> dict[str, Any]:
    """Assign a user and workspace to the worker (once); the answer to ``bind``."""
    user_id, workspace = params.get("user_id"), params.get("workspace")
    if not isinstance(user_id, str) or not isinstance(workspace, str):
        raise ProtocolError("bind needs user_id and workspace strings")
    if booted.user_id is not None and booted.user_id != user_id:
        raise SandboxError(f"worker is already bound to {booted.user_id!r}")
    enter(booted, user_id, workspace)
    result: dict[str, Any] = {"user_id": user_id, "workspace": workspace,
                              "preload": {"state": "pending" if booted.preload else "none"}}
    if "landlock" in booted.report:  # the host checks it against the plan
        result["landlock"] = booted.report["landlock"]
    return result


def enter(booted: Booted, user_id: str, workspace: str) -> None:
    """Move into the workspace and apply the layers that need it (landlock)."""
    from sandbox_core.inside import confine

    os.chdir(workspace)
    booted.user_id, booted.workspace = user_id, workspace
    home = booted.plan.get("home")
    os.environ["HOME"] = home if isinstance(home, str) else workspace
    confine.after_bind(booted.plan, workspace, booted.report)


def ping(params: dict[str, Any]) -> dict[str, Any]:
    import time

    return {"pong": True, "time": time.time(), "echo": params.get("echo")}


class _Reader:
    """Blocking line reads from the channel, holding at most ``max_frame`` bytes of a frame."""

    def __init__(self, fd: int, max_frame: int) -> None:
        self._fd = fd
        self._max = max_frame
        self.buf = b""
        self.eof = False

    def line(self) -> bytes | None:
        """The next whole line (without its newline); None at end of input or past the limit."""
        while (nl := self.buf.find(b"\n")) < 0:
            if self.eof or len(self.buf) > self._max:
                return None
            chunk = os.read(self._fd, _READ)
            if not chunk:
                self.eof = True
                return None
            self.buf += chunk
        line, self.buf = self.buf[:nl], self.buf[nl + 1 :]
        if len(line) > self._max:
            self.buf = line + b"\n" + self.buf
            return None
        return line


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def serve_handshake(proto_in: int, proto_out: int, max_frame: int) -> Booted:
    """Answer ``initialize`` (and the ``bind`` and ``ping`` frames that may follow it) blocking.

    Returns as soon as a frame needs the serving loop, the handshake is over, or the input
    ends; what was read and not served is left in :attr:`Booted.pending`.
    """
    booted = Booted()
    reader = _Reader(proto_in, max_frame)
    bind_follows = False
    while (line := reader.line()) is not None:
        if not line.strip():
            continue
        parsed = request(line)
        method = parsed[1] if parsed is not None else None
        if parsed is None or not (
            (method == "initialize" and not booted.initialized)
            or (method in ("bind", "ping") and booted.initialized)
        ):
            reader.buf = line + b"\n" + reader.buf
            break
        request_id, _, params = parsed
        try:
            if method == "initialize":
                result = initialize(booted, params)
                # an unbound worker (await_user) is bound later, by the serving loop
                bind_follows = params.get("bind_follows") is True and booted.plan.get("await_user") is not True
            elif method == "bind":
                result = bind(booted, params)
            else:
                result = ping(params)
            reply = answer(request_id, result)
        except Exception as exc:  # noqa: BLE001 - answered as the serving loop would answer it
            reply = refusal(request_id, exc)
            bind_follows = False
        _write(proto_out, reply)
        if method == "bind" or (method == "initialize" and not bind_follows):
            break
    booted.pending = reader.buf
    booted.input_ended = reader.eof
    return booted
