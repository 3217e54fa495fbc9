"""SandboxWorker: the host-side handle of one sandboxed worker process.

Life: ``start()`` spawns the process from a :class:`LaunchSpec` and completes the
``initialize`` handshake within ``startup_timeout`` (else the process is killed).
Requests are multiplexed by id; events arrive as notifications and are routed to the
request's stream. While a request's consumer has ``QUEUE_HIGH`` events it has not taken,
the host stops reading the worker's stdout (the worker's writes wait, and so does its
command): a slow consumer slows the worker and never grows the host. When the process
dies, every pending call fails at once with :class:`WorkerCrashed` carrying the exit
status or signal and the last stderr lines.

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
import itertools
import os
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import (
    GatewayError,
    IsolationUnavailable,
    ProtocolError,
    RequestTimeout,
    SandboxError,
    WorkerCrashed,
    WorkerStartError,
    from_wire,
)
from sandbox_core.events import EVENT_METHOD, Event
from sandbox_core.isolation.launch import LaunchSpec, launch_spec
from sandbox_core.process_tree import kill_session
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
from sandbox_core.shared import HOST_CHUNK

HostHandler = Callable[["SandboxWorker", str, dict[str, Any]], AsyncIterator[dict[str, Any]]]
"""Serves a call the worker makes to the host (e.g. ``gateway.request``), yielding chunks."""
Launcher = Callable[[ProcessSandboxConfig, str, "Path | None"], LaunchSpec]
"""Turns a config into the launch spec of one worker (the seam for other launchers)."""

GARBAGE_LIMIT = 16
"""Malformed frames after which a worker is marked unhealthy (and recycled)."""
QUEUE_HIGH = 32
"""Events queued for one request and not yet taken by its consumer at which the host stops
reading the worker's stdout: the worker's writes then wait, and so does its command, so a
slow consumer slows the worker instead of growing the host."""
QUEUE_LOW = 8
"""Reading resumes once every request's queue is down to this many events."""


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


class _Pending:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Event | Response | SandboxError | _Deadline] = asyncio.Queue()


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
    ) -> None:
        self.config = config
        self.worker_id = worker_id
        self.user_id = user_id
        self.workspace = workspace
        self.state = WorkerState.NEW
        self.report: dict[str, Any] = {}
        self.requests_served = 0
        self.garbage_frames = 0
        self.created = time.monotonic()
        self.last_used = self.created
        self.spawn_seconds: float | None = None
        self.exit_status: int | None = None
        self.exit_signal: int | None = None
        self.workspace_in_sandbox: str | None = None
        self._host_handler = host_handler
        self._launcher = launcher
        self._spec: LaunchSpec | None = None
        self._transport: asyncio.SubprocessTransport | None = None
        self._pid: int | None = None
        self._ids = itertools.count(1)
        self._pending: dict[RequestId, _Pending] = {}
        self._host_calls: dict[RequestId, asyncio.Task[None]] = {}
        self._stderr: collections.deque[str] = collections.deque(maxlen=config.stderr_lines)
        self._stderr_partial = b""
        self._splitter = FrameSplitter(config.max_frame_bytes)
        self._writable = asyncio.Event()
        self._writable.set()
        self._exited = asyncio.Event()
        self._reading_paused = False

    # ------------------------------------------------------------------ info

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def alive(self) -> bool:
        return self._pid is not None and not self._exited.is_set()

    @property
    def healthy(self) -> bool:
        return self.alive and self.garbage_frames < GARBAGE_LIMIT

    @property
    def profile(self) -> str:
        return str(self.report.get("profile", self.config.profile))

    def stderr_tail(self, lines: int = 20) -> list[str]:
        return list(self._stderr)[-lines:]

    def __repr__(self) -> str:
        return f"<SandboxWorker {self.worker_id} {self.state.value} pid={self.pid} user={self.user_id}>"

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Spawn the process and finish the handshake within ``startup_timeout``."""
        if self.state is not WorkerState.NEW:
            raise WorkerStartError(f"worker {self.worker_id} was already started")
        self.state = WorkerState.STARTING
        began = time.monotonic()
        try:
            await asyncio.wait_for(self._spawn_and_handshake(), self.config.startup_timeout)
        except BaseException as exc:
            await asyncio.shield(self._kill_now())
            self.state = WorkerState.CRASHED
            if isinstance(exc, TimeoutError):
                raise WorkerStartError(
                    f"worker {self.worker_id} did not finish its handshake within "
                    f"{self.config.startup_timeout}s",
                    data={"stderr": self.stderr_tail()},
                ) from None
            if isinstance(exc, IsolationUnavailable | WorkerStartError):
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

    async def _spawn_and_handshake(self) -> None:
        spec = self._launcher(self.config, self.worker_id, self.workspace)
        self._spec = spec
        self.workspace_in_sandbox = spec.workspace_in_sandbox
        loop = asyncio.get_running_loop()
        transport, _ = await loop.subprocess_exec(
            lambda: _WorkerPipes(self),
            *spec.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=spec.env,
            cwd=spec.cwd,
            start_new_session=True,
            close_fds=True,
            pass_fds=spec.pass_fds,
        )
        self._transport = transport
        self._pid = transport.get_pid()
        if spec.after_spawn is not None:
            spec.after_spawn(self._pid)
        params: dict[str, Any] = {"worker_id": self.worker_id, "plan": spec.plan}
        if spec.bound_at_spawn and self.user_id is not None:
            params.update(user_id=self.user_id, workspace=spec.workspace_in_sandbox)
        reply = await self.call("initialize", params)
        if not isinstance(reply, dict) or reply.get("protocol") != PROTOCOL_VERSION:
            raise WorkerStartError(f"unexpected handshake reply: {reply!r:.200}")
        self.report = dict(reply.get("layers") or {})
        self.report["pid_in_sandbox"] = reply.get("pid")

    # ------------------------------------------------------------------ I/O

    async def _send(self, msg: Request | Notification | Response) -> None:
        stdin = self._transport.get_pipe_transport(0) if self._transport is not None else None
        if stdin is None or stdin.is_closing() or self._exited.is_set():
            raise self._crash_error("worker is not running")
        assert isinstance(stdin, asyncio.WriteTransport)
        stdin.write(encode(msg))
        if not self._writable.is_set():  # the worker is not reading: wait for the pipe
            await self._writable.wait()

    def _on_stdout(self, data: bytes) -> None:
        for msg in self._splitter.feed(data):
            self._dispatch(msg)

    def _on_stderr(self, data: bytes) -> None:
        lines = (self._stderr_partial + data).split(b"\n")
        self._stderr_partial = lines.pop()[-64 * 1024 :]
        for line in lines:
            self._stderr.append(line.decode(errors="replace"))

    def _dispatch(self, msg: Request | Notification | Response | Malformed) -> None:
        if isinstance(msg, Malformed):
            self.garbage_frames += 1
            pending = self._pending.get(msg.id) if msg.id is not None else None
            if pending is not None:
                pending.queue.put_nowait(ProtocolError(f"worker sent a bad frame: {msg.message}"))
        elif isinstance(msg, Response):
            pending = self._pending.get(msg.id) if msg.id is not None else None
            if pending is not None:
                pending.queue.put_nowait(msg)
        elif isinstance(msg, Notification):
            if msg.method == EVENT_METHOD:
                self._route_event(msg.params)
            elif msg.method == "cancel":  # the worker gave up on one of its calls to us
                call = self._host_calls.get(msg.params.get("id"))  # type: ignore[arg-type]
                if call is not None:
                    call.cancel()
        else:
            task = asyncio.create_task(self._serve_host_call(msg))
            self._host_calls[msg.id] = task
            task.add_done_callback(functools.partial(self._host_call_done, msg.id))

    def _host_call_done(self, call_id: RequestId, _task: asyncio.Task[None]) -> None:
        self._host_calls.pop(call_id, None)

    def _route_event(self, params: dict[str, Any]) -> None:
        request_id = params.get("request_id")
        pending = self._pending.get(request_id) if isinstance(request_id, int | str) else None
        if pending is None:
            return
        try:
            event = Event.from_dict(params)
        except ValueError:
            self.garbage_frames += 1
            return
        pending.queue.put_nowait(event)
        self._throttle(pending)

    def _throttle(self, pending: _Pending) -> None:
        """Stop reading the worker while ``pending`` holds too many events its consumer has not taken."""
        if not self._reading_paused and pending.queue.qsize() >= QUEUE_HIGH:
            pipe = self._stdout_pipe()
            if pipe is not None:
                pipe.pause_reading()
                self._reading_paused = True

    def _unthrottle(self) -> None:
        """Read the worker again once every request's consumer has caught up."""
        if self._reading_paused and all(p.queue.qsize() <= QUEUE_LOW for p in self._pending.values()):
            self._reading_paused = False
            pipe = self._stdout_pipe()
            if pipe is not None:
                pipe.resume_reading()

    def _stdout_pipe(self) -> asyncio.ReadTransport | None:
        pipe = self._transport.get_pipe_transport(1) if self._transport is not None else None
        return pipe if isinstance(pipe, asyncio.ReadTransport) and not pipe.is_closing() else None

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
        except Exception as exc:  # noqa: BLE001 - the worker must get an answer, not a hang
            response = Response(request.id, error=GatewayError(f"host call failed: {exc}").to_wire())
        with contextlib.suppress(SandboxError):
            await self._send(response)

    def _on_exit(self) -> None:
        """The process has exited and its pipes are closed: fail what is pending, clean up."""
        if self._exited.is_set():
            return
        for msg in self._splitter.close():
            self._dispatch(msg)
        if self._stderr_partial:
            self._stderr.append(self._stderr_partial.decode(errors="replace"))
            self._stderr_partial = b""
        code = self._transport.get_returncode() if self._transport is not None else None
        if code is not None and code < 0:
            self.exit_signal = -code
        else:
            self.exit_status = code
        self._exited.set()
        self._writable.set()
        if self.state is not WorkerState.STOPPING:
            self.state = WorkerState.CRASHED
        error = self._crash_error("worker process exited")
        for pending in self._pending.values():
            pending.queue.put_nowait(error)
        for task in self._host_calls.values():
            task.cancel()
        if self._pid is not None:
            kill_session(self._pid)
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
        return WorkerCrashed(
            f"worker {self.worker_id} {what} ({how}){detail}",
            data={
                "worker_id": self.worker_id,
                "exit_status": self.exit_status,
                "signal": self.exit_signal,
                "stderr": tail,
            },
        )

    # ------------------------------------------------------------------ calls

    async def call(self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """A request whose events are ignored; returns the result or raises."""
        raw: list[Any] = []
        async for _event in self._stream(method, params or {}, timeout, emit_started=False, raw=raw):
            pass
        return raw[0] if raw else None

    async def execute(self, method: str, params: dict[str, Any], timeout: float | None = None) -> RequestResult:
        """``execute_stream`` collected into a :class:`RequestResult`."""
        events = [e async for e in self.execute_stream(method, params, timeout)]
        done = events[-1].data if events and events[-1].type == "done" else {}
        return RequestResult(events, dict(done), self.worker_id)

    def execute_stream(
        self, method: str, params: dict[str, Any], timeout: float | None = None
    ) -> AsyncGenerator[Event, None]:
        """Send a request and yield ``started``, its events, then ``done`` (or raise)."""
        return self._stream(method, params, timeout, emit_started=True)

    async def _stream(
        self,
        method: str,
        params: dict[str, Any],
        timeout: float | None,
        *,
        emit_started: bool,
        raw: list[Any] | None = None,
    ) -> AsyncGenerator[Event, None]:
        request_id = next(self._ids)
        pending = _Pending()
        self._pending[request_id] = pending
        limit = self.config.request_timeout if timeout is None else timeout
        timer = asyncio.get_running_loop().call_later(limit, pending.queue.put_nowait, _DEADLINE)
        began = time.monotonic()
        finished = False
        last_seq = 0
        try:
            await self._send(Request(request_id, method, params))
            if emit_started:
                yield Event("started", self._started_data(method), 0)
            while True:
                item = await pending.queue.get()
                self._unthrottle()
                if isinstance(item, _Deadline):
                    await self._abandon(request_id, pending)
                    finished = True
                    raise RequestTimeout(
                        f"{method} timed out after {limit:g}s and was killed",
                        data={"worker_id": self.worker_id, "timeout": limit},
                    )
                if isinstance(item, Event):
                    last_seq = max(last_seq, item.seq)
                    yield item
                    continue
                finished = True
                if isinstance(item, SandboxError):
                    raise item
                if item.error is not None:
                    raise from_wire(item.error)
                if emit_started:  # control calls (bind, ping) are not requests
                    self.requests_served += 1
                self.last_used = time.monotonic()
                if raw is not None:
                    raw.append(item.result)
                yield Event("done", self._done_data(item.result, began), last_seq + 1)
                return
        finally:
            timer.cancel()
            if not finished:
                await asyncio.shield(self._abandon(request_id, pending))
            self._pending.pop(request_id, None)
            self._unthrottle()

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
            self._unthrottle()
            if isinstance(item, Response | SandboxError):
                return
            if isinstance(item, _Deadline):
                continue
        await self.stop(grace=0)

    async def bind(self, user_id: str, workspace: Path) -> None:
        """Assign a pre-warmed worker to ``user_id``'s workspace."""
        await self.call("bind", {"user_id": user_id, "workspace": str(workspace)})
        self.user_id, self.workspace = user_id, workspace

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
        if self._transport is None:
            self.state = WorkerState.STOPPED
            return
        if not self._exited.is_set():
            if self.state is not WorkerState.CRASHED:
                self.state = WorkerState.STOPPING
            stdin = self._transport.get_pipe_transport(0)
            if stdin is not None:
                stdin.close()
            if not await self._wait_exit(grace):
                self._signal_group(signal.SIGTERM)
                if not await self._wait_exit(grace):
                    self._signal_group(signal.SIGKILL)
                    await self._wait_exit(None)
        self._transport.close()
        if self.state is not WorkerState.CRASHED:
            self.state = WorkerState.STOPPED

    async def _kill_now(self) -> None:
        if self._transport is None:  # never spawned: release what the launch spec prepared
            if self._spec is not None and self._spec.cleanup is not None:
                with contextlib.suppress(Exception):
                    self._spec.cleanup()
            return
        if not self._exited.is_set():
            self._signal_group(signal.SIGKILL)
            await self._wait_exit(None)
        self._transport.close()

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
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._pid, sig)


class _WorkerPipes(asyncio.SubprocessProtocol):
    """Feeds the worker's pipes to its handle as bytes arrive (no reader tasks)."""

    EXIT_DRAIN = 1.0
    """Seconds to wait for the pipes to close after the process exited (a leaked
    descriptor must not keep pending calls waiting)."""

    def __init__(self, worker: SandboxWorker) -> None:
        self._worker = worker
        self._transport: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self._transport = transport

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        if fd == 1:
            self._worker._on_stdout(raw)
        elif fd == 2:
            self._worker._on_stderr(raw)

    def pause_writing(self) -> None:
        self._worker._writable.clear()

    def resume_writing(self) -> None:
        self._worker._writable.set()

    def process_exited(self) -> None:
        if self._transport is not None:
            asyncio.get_running_loop().call_later(self.EXIT_DRAIN, self._transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._worker._on_exit()
