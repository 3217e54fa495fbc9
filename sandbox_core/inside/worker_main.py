"""Sandbox-side entry point: the JSON-RPC loop (:class:`IPCHandler`) and the methods it serves.

The worker starts in :mod:`boot` (``python -m sandbox_core.inside.boot [MAX_FRAME_BYTES]``)
and :mod:`handshake`: it moves the protocol off fds 0/1 onto private descriptors and points
fd 0 at /dev/null and fd 1 at stderr, so a stray ``print`` or a child's output can never
corrupt the channel, and answers ``initialize`` (which applies the in-process isolation
layers and reports what is in force) before asyncio is imported. Then :func:`serve` takes
over: it serves requests concurrently (one task per request, each
cancellable with a ``cancel`` notification), and exits on ``shutdown`` or end of input.
The worker can also call the host (``call_host``) for the model gateway; those calls are
matched by id and their streamed chunks arrive as ``host.chunk`` notifications.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from sandbox_core import codes
from sandbox_core.errors import IsolationUnavailable, ProtocolError, RequestCancelled, SandboxError
from sandbox_core.inside.channel import Channel, InputPipe, OutputPipe, RequestContext
from sandbox_core.protocol import (
    FrameSplitter,
    Malformed,
    Message,
    Notification,
    Request,
    RequestId,
    Response,
)
from sandbox_core.shared import PRELOAD_METHOD, PRELOADED, proxy_environment

if TYPE_CHECKING:
    from sandbox_core.inside.agent.preload import Preload
    from sandbox_core.inside.handshake import Booted
    from sandbox_core.inside.model_endpoint import ModelEndpoint
    from sandbox_core.inside.proxy import Proxy
    from sandbox_core.inside.runner import StdinSink
    from sandbox_core.inside.terminal import Terminals

ATTACH_FAILED = 70
"""Exit status of a worker that answered ``initialize`` but could not attach its listeners."""

OBSERVED_AT_BIND = ("uid", "gid", "no_new_privs", "seccomp", "capabilities_zero", "rlimits", "umask", "open_fds")
"""What an unbound worker reports again after its uid switch at ``bind``."""
PRELOAD_END_LIMIT = 60.0
"""How long a claimed unbound worker's ``bind`` waits for a preload still running (then it fails)."""

Handler = Callable[["RequestContext", dict[str, Any]], Awaitable[Any]]


def _enable_site_packages(site_dir: str | None) -> None:
    """Add the third-party packages (the worker starts with ``-S`` to boot faster).

    ``site_dir`` is where the plan put them (the strict profile's staged packages); without
    one, what start-up would have done: venv prefix, site-packages, .pth files.
    """
    if not sys.flags.no_site or "site" in sys.modules:
        return
    import site

    if site_dir:
        site.addsitedir(site_dir)
    else:
        site.main()


class SandboxExecutor:
    """The methods a worker serves. ``agent.*`` methods load their module on first use."""

    def __init__(self) -> None:
        self.worker_id = ""
        self.user_id: str | None = None
        self.workspace: str | None = None
        """The user's workspace as the worker sees it (a plain string: pathlib is not imported to serve)."""
        self.initialized = False
        self.awaiting_user = False
        """An unbound strict worker before its ``bind``: it serves nothing but ``assume``, ``bind`` and ``shutdown``."""
        self._switched: tuple[int, int] | None = None
        """The uid and gid an unbound worker switched to ahead of its claim (``assume``), for good."""
        self._switch_tried = False
        """An unbound worker's one attempt at its uid switch was made (at ``assume`` or ``bind``)."""
        self.report: dict[str, Any] = {}
        self.plan: dict[str, Any] = {}
        self.stop_requested = asyncio.Event()
        self.state: dict[str, Any] = {}
        """Per-worker state of lazily loaded runtimes (e.g. the agent's conversations)."""
        self.stdin_sinks: dict[RequestId, StdinSink] = {}
        """Streamed stdin of running ``exec`` requests, by request id."""
        self.output: OutputPipe | None = None
        """The pipe to the host that command output travels on (given at ``initialize``)."""
        self.input: InputPipe | None = None
        """The pipe from the host that streamed stdin travels on (given at ``initialize``)."""
        self.running: set[RequestId] = set()
        """Requests being served (kept by the IPCHandler)."""
        self.last_request_id = 0
        """The highest integer request id seen: a stdin frame for a higher one is early."""
        self.terminals: Terminals | None = None
        """The ptys of running terminal requests (made on the first one)."""
        self.proxy: Proxy | None = None
        """The network proxy on the sandbox's loopback (strict profile), started at ``initialize``."""
        self.channel: Channel | None = None
        """The control pipe (set by the IPCHandler), to tell the host a command closed stdin."""
        self.model_endpoint: ModelEndpoint | None = None
        """The loopback model endpoint, where the plan asks for one (strict)."""
        self.preload_mode = "none"
        """``agent``: load the agent once confinement is complete (asked at ``initialize`` or by ``preload``)."""
        self._preload: Preload | None = None
        self._methods: dict[str, Handler] = {
            "initialize": self.initialize,
            "assume": self.assume,
            "bind": self.bind,
            "exec": self.exec,
            "shutdown": self.shutdown,
            PRELOAD_METHOD: self.preload,
            "agent.run": self._lazy("sandbox_core.inside.agent.runtime", "run"),
            "agent.reset": self._lazy("sandbox_core.inside.agent.runtime", "reset"),
            "audit.probe": self._lazy("sandbox_core.inside.probes", "probe"),
        }

        self.quick: dict[str, Callable[[dict[str, Any]], Any]] = {"ping": self.ping}
        """Methods answered inline by the reader: instant, never cancelled, no task."""

    def lookup(self, method: str) -> Handler | None:
        return self._methods.get(method)

    def _lazy(self, module: str, name: str) -> Handler:
        async def handler(ctx: RequestContext, params: dict[str, Any]) -> Any:
            import importlib

            self._site_packages()
            fn: Handler = getattr(importlib.import_module(module), name)
            return await fn(ctx, params)

        return handler

    def _site_packages(self) -> None:
        """Third-party packages on the path, and the SDK's type packages loaded name by name."""
        from sandbox_core.inside.agent import lazy_sdk

        site_dir = self.plan.get("site_packages")
        _enable_site_packages(site_dir if isinstance(site_dir, str) else None)
        lazy_sdk.install()

    def require_workspace(self) -> str:
        if self.workspace is None:
            raise SandboxError("worker is not bound to a user yet", data={"code": codes.NOT_BOUND})
        return self.workspace

    async def initialize(self, ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        """Apply the in-process isolation layers of the plan and report what is in force.

        Normally answered by :mod:`handshake` before this loop runs; here when the first
        frames were not ones the handshake serves.
        """
        from sandbox_core.inside import handshake

        if self.initialized:
            raise ProtocolError("already initialized")
        booted = handshake.Booted()
        answer = handshake.initialize(booted, params)
        await self.adopt(booted)
        answer["preload"] = self.preload_report()
        return answer

    async def adopt(self, booted: Booted) -> None:
        """Take over what the handshake settled and attach its asyncio parts: the data and input
        pipes, the loopback model endpoint and the network proxy (at the ports it reported)."""
        self.worker_id, self.plan, self.report = booted.worker_id, booted.plan, booted.report
        self.awaiting_user = self.plan.get("await_user") is True
        if booted.preload:
            self.preload_mode = "agent"
        self.initialized = True
        if booted.data_fd is not None:
            self.output = await OutputPipe.open(booted.data_fd)
        if booted.stdin_fd is not None:
            self.input = InputPipe.open(booted.stdin_fd, self.route_stdin)
        endpoint = self.plan.get("model_endpoint")
        if isinstance(endpoint, dict):
            await self._start_model_endpoint(endpoint)
        network = self.plan.get("network")
        if isinstance(network, dict) and self.channel is not None:
            from sandbox_core.inside import proxy

            self.proxy = await proxy.start(self.channel, network, booted.handoff_fd)
            os.environ.update(proxy_environment(self.proxy.port))
            self.report["network"] = {"proxy": f"127.0.0.1:{self.proxy.port}", "mode": network.get("mode")}
        if booted.workspace is not None:
            self.user_id, self.workspace = booted.user_id, booted.workspace
        if self.awaiting_user:  # once the answer is out: a claim then finds them imported
            asyncio.get_running_loop().call_soon(self._preload_for_claim)
        self._confinement_complete()

    async def _start_model_endpoint(self, spec: dict[str, Any]) -> None:
        """Listen on the sandbox's own loopback for model calls of any client, and point commands at it.

        Only where the plan asks (strict: the port is in the sandbox's own network namespace).
        """
        from sandbox_core.inside.model_endpoint import ModelEndpoint
        from sandbox_core.shared import MODEL_ENDPOINT_HOST, PLACEHOLDER_API_KEY

        if self.channel is None:
            raise ProtocolError("no channel to the host for the model endpoint")
        port, max_body = spec.get("port"), spec.get("max_body")
        if not isinstance(port, int) or not isinstance(max_body, int):
            raise ProtocolError("model_endpoint needs an int port and max_body")
        self.model_endpoint = ModelEndpoint(self.channel.call_host, max_body=max_body)
        await self.model_endpoint.start(MODEL_ENDPOINT_HOST, port)
        os.environ["ANTHROPIC_BASE_URL"] = f"http://{MODEL_ENDPOINT_HOST}:{port}"
        os.environ["ANTHROPIC_API_KEY"] = PLACEHOLDER_API_KEY
        self.report["model_endpoint"] = f"{MODEL_ENDPOINT_HOST}:{port}"

    def ping(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "time": time.time(), "echo": params.get("echo")}

    async def assume(self, ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        """Switch an unbound worker to the uid of the spare workspace attached to it, before any
        user claims it (once, for good): a new user's ``bind`` then only enters the workspace.

        Only our own code has run here, and the switch is the one ``bind`` would make (the
        mounts checked, the uid for good, no capabilities, ``HOME``); the host verifies the
        result from ``/proc`` before it offers the worker to anyone. A failure leaves the
        worker refusing every ``bind``: it only awaits its shutdown.
        """
        if not self.awaiting_user or self._switch_tried:
            raise SandboxError("assume is for an unbound worker that has not switched its uid yet (once)")
        self._switch_tried = True
        self._switched = await self._become_user(params)
        return {"observed": {k: self.report.get(k) for k in OBSERVED_AT_BIND}}

    async def _become_user(self, params: dict[str, Any]) -> tuple[int, int]:
        from sandbox_core.inside import confine

        await self._single_threaded()
        confine.become_user(self.plan, params, self.report)
        return int(params["uid"]), int(params["gid"])  # checked as ints by become_user

    async def _single_threaded(self) -> None:
        """Wait for a preload thread to end: the uid switch's capability drop and Landlock are per thread."""
        if self._preload is not None:
            await self._preload.ended(PRELOAD_END_LIMIT)

    async def bind(self, ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        """Assign a user and workspace to a pre-warmed worker (once)."""
        user_id, workspace = params.get("user_id"), params.get("workspace")
        if not isinstance(user_id, str) or not isinstance(workspace, str):
            raise ProtocolError("bind needs user_id and workspace strings")
        if self.user_id is not None and self.user_id != user_id:
            raise SandboxError(f"worker is already bound to {self.user_id!r}")
        switched_now = False
        if self.awaiting_user:  # an unbound strict worker: the host attached the workspace
            if self.user_id is not None:
                raise SandboxError("a failed bind is never retried: this worker only awaits its shutdown")
            self.user_id = user_id  # one attempt: a failure leaves it refusing everything
            if self._switched is not None:  # switched at assume: the claim must name that uid
                if (params.get("uid"), params.get("gid")) != self._switched:
                    raise IsolationUnavailable("bind names another uid than the one this worker switched to")
                await self._single_threaded()  # a preload asked for after the switch: gone before Landlock
            elif self._switch_tried:
                raise SandboxError("a failed uid switch is never retried: this worker only awaits its shutdown")
            else:
                self._switch_tried = switched_now = True
                self._switched = await self._become_user(params)
            self.awaiting_user = False
        self._enter(user_id, workspace)
        answer: dict[str, Any] = {"user_id": user_id, "workspace": workspace, "preload": self.preload_report()}
        if switched_now:
            answer["observed"] = {k: self.report.get(k) for k in OBSERVED_AT_BIND}
        if "landlock" in self.report:  # the host checks it against the plan
            answer["landlock"] = self.report["landlock"]
        return answer

    def _enter(self, user_id: str, workspace: str) -> None:
        from sandbox_core.inside import confine

        os.chdir(workspace)
        self.user_id, self.workspace = user_id, workspace
        os.environ["HOME"] = self._home_for(workspace)
        confine.after_bind(self.plan, workspace, self.report)
        self._confinement_complete()

    # ------------------------------------------------------------------ agent preload

    def _confinement_complete(self) -> None:
        """Called after each confinement step; starts the agent preload once the last one is in force.

        The one place the preload thread starts. Landlock (and seccomp) restrict the thread
        that applies them and the threads it starts later, never a thread already running;
        under a plan with Landlock rules the last step is ``bind`` (the rules name the
        workspace), else ``initialize``.
        """
        if self.preload_mode != "agent" or self._preload is not None or not self.initialized:
            return
        if self.awaiting_user:  # unbound: the uid switch and Landlock come at bind
            return
        if isinstance(self.plan.get("landlock"), dict) and "landlock" not in self.report:
            return  # not yet: Landlock comes at bind
        self._start_preload({"landlock": self.report.get("landlock", "none planned")})

    def _start_preload(self, confined: dict[str, Any], claim: tuple[str, str] | None = None) -> None:
        if self.channel is None:
            return
        from sandbox_core.inside.agent import preload

        self._site_packages()
        channel = self.channel
        self._preload = preload.start(
            self.state, channel.call_host, channel.send,
            lambda done: channel.send_nowait(Notification(PRELOADED, done.report())),
            confined=confined, claim=claim,
        )

    def _claim_to_come(self) -> tuple[str, str] | None:
        """The workspace and ``HOME`` an unbound worker's claim binds (``claim_workspace`` in its
        plan: the same path for every user), as :meth:`_enter` will set them; None if unknown."""
        workspace = self.plan.get("claim_workspace")
        return (workspace, self._home_for(workspace)) if isinstance(workspace, str) else None

    def _home_for(self, workspace: str) -> str:
        """The ``HOME`` a bind to ``workspace`` sets: the plan's, else the workspace."""
        home = self.plan.get("home")
        return home if isinstance(home, str) else workspace

    def preload_report(self) -> dict[str, Any]:
        """``none`` (not asked), ``pending`` (waiting for confinement), ``running``, ``ready``, ``failed``."""
        if self._preload is not None:
            return self._preload.report()
        return {"state": "pending" if self.preload_mode == "agent" else "none"}

    async def preload(self, ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        """``preload {mode: "agent"}``: load the agent now (or once confinement is complete)."""
        if params.get("mode") != "agent":
            raise ProtocolError("preload needs mode 'agent'")
        self.preload_mode = "agent"
        if self.awaiting_user:
            asyncio.get_running_loop().call_soon(self._preload_for_claim)
        self._confinement_complete()
        return self.preload_report()

    def _preload_for_claim(self) -> None:
        """An unbound worker, idle until its claim: import what the claim and its first command need,
        and under agent preload run the whole preload now, so that the claim finds it agent-ready.

        The preload thread runs before ``bind`` and must be gone by then (:meth:`bind` waits for
        it, then Landlock refuses a process with a second thread): the uid switch, the capability
        drop and Landlock come after it, to a single-threaded worker.
        """
        from sandbox_core.inside import landlock, runner  # noqa: F401

        if self.preload_mode == "agent" and self.awaiting_user and self._preload is None:
            before = "the thread ended before the uid switch and Landlock"
            if self._switched is not None:
                before = "the thread ended before Landlock (it ran as the uid switched to ahead)"
            self._start_preload({"before_bind": before}, claim=self._claim_to_come())

    async def exec(self, ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        from sandbox_core.inside.runner import run_command

        streamed = params.get("stdin") == "stream" and isinstance(ctx.request.id, int)
        sink = self.stdin_sink(int(ctx.request.id)) if streamed else None
        pipe = self.output if params.get("output") == "data_pipe" else None
        def alone() -> bool:  # asked when the request cleans up: another may have come since it began
            return self.running <= {ctx.request.id} and self._pid_namespace_is_ours()

        if params.get("tty") is not None:
            from sandbox_core.inside.terminal import Terminals, run_terminal

            if self.terminals is None:
                self.terminals = Terminals()
            return await run_terminal(ctx, params, sink, pipe, self.terminals, alone=alone)
        return await run_command(ctx, params, sink, pipe, alone=alone)

    def resize(self, params: dict[str, Any]) -> None:
        """``exec.resize {id, rows, cols}``: a running terminal's new window size."""
        if self.terminals is not None:
            self.terminals.resize(params)

    def _pid_namespace_is_ours(self) -> bool:
        """Whether the sandbox made a pid namespace for this worker alone: the plan says it
        unshared one (the host verified it after start), and we are the direct child of that
        namespace's init (bwrap). Then ``kill(-1)`` reaches only the sandbox; on the host it
        would reach every process of our uid, so both must hold."""
        namespaces = (self.plan.get("host_layers") or {}).get("namespaces") or []
        return "pid" in namespaces and os.getppid() == 1 and os.getpid() != 1

    def stdin_sink(self, request_id: int) -> StdinSink | None:
        """The stdin sink of a request (made by whichever needs it first: frame or request)."""
        from sandbox_core.inside.runner import StdinSink

        if self.input is None:
            return None
        sink = self.stdin_sinks.get(request_id)
        if sink is None:
            sink = self.stdin_sinks[request_id] = StdinSink(self.input, lambda: self._stdin_closed(request_id))
        return sink

    def route_stdin(self, request_id: int) -> StdinSink | None:
        """Where a frame from the input pipe goes: its request's sink (made by the first frame
        when the request has not been read yet); None, and the frame is dropped, once it is over."""
        if request_id in self.stdin_sinks or request_id in self.running or request_id > self.last_request_id:
            return self.stdin_sink(request_id)
        return None

    def _stdin_closed(self, request_id: int) -> None:
        if self.channel is not None:
            self.channel.send_nowait(Notification("exec.stdin_closed", {"id": request_id}))

    def drop_stdin(self, request_id: RequestId) -> None:
        sink = self.stdin_sinks.pop(request_id, None)
        if sink is not None:
            sink.close()

    async def shutdown(self, ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        self.stop_requested.set()
        return {}


class IPCHandler:
    """Dispatches frames as they arrive: requests become tasks, answers go to host calls."""

    def __init__(self, channel: Channel, executor: SandboxExecutor) -> None:
        self._channel = channel
        self._executor = executor
        self._tasks: dict[RequestId, asyncio.Task[None]] = {}
        self._replies: set[asyncio.Task[None]] = set()
        self._garbage = 0
        self.closed = asyncio.Event()
        """Set at end of input (the host went away or closed our stdin)."""
        executor.channel = channel

    async def serve(self) -> None:
        """Run until ``shutdown`` or end of input; then cancel what is still running."""
        stop_task = asyncio.create_task(self._executor.stop_requested.wait())
        closed_task = asyncio.create_task(self.closed.wait())
        await asyncio.wait({stop_task, closed_task}, return_when=asyncio.FIRST_COMPLETED)
        for task in (stop_task, closed_task, *self._tasks.values()):
            task.cancel()
        await asyncio.gather(stop_task, closed_task, *self._tasks.values(), return_exceptions=True)

    def dispatch(self, msg: Message) -> None:
        """Handle one incoming frame without blocking the reader."""
        if isinstance(msg, Malformed):
            self._garbage += 1
            self._channel.send_nowait(Response(msg.id, error=msg.error_object()))
        elif isinstance(msg, Request):
            quick = self._executor.quick.get(msg.method)
            if quick is not None and self._executor.initialized:
                self._channel.send_nowait(Response(msg.id, result=quick(msg.params)))
            elif quick is not None:  # a quick method exists, but not before the handshake
                error = {"code": codes.INVALID_REQUEST, "message": "initialize first"}
                self._channel.send_nowait(Response(msg.id, error=error))
            else:
                self._start(msg)
        elif isinstance(msg, Notification) and msg.method == "exec.resize":
            self._executor.resize(msg.params)
        elif isinstance(msg, Notification) and msg.method == "cancel":
            task = self._tasks.get(msg.params.get("id"))  # type: ignore[arg-type]
            if task is not None:
                task.cancel()
        else:
            self._channel.route(msg)

    def _start(self, request: Request) -> None:
        if request.id in self._tasks:
            error = {"code": codes.INVALID_REQUEST, "message": "duplicate id"}
            duplicate = asyncio.create_task(self._channel.send(Response(request.id, error=error)))
            self._replies.add(duplicate)
            duplicate.add_done_callback(self._replies.discard)
            return
        task = asyncio.create_task(self._run(request))
        self._tasks[request.id] = task
        self._executor.running.add(request.id)
        if isinstance(request.id, int):
            self._executor.last_request_id = max(self._executor.last_request_id, request.id)
        task.add_done_callback(lambda _t: self._finished(request.id))

    def _finished(self, request_id: RequestId) -> None:
        self._tasks.pop(request_id, None)
        self._executor.running.discard(request_id)
        self._executor.drop_stdin(request_id)

    async def _run(self, request: Request) -> None:
        handler = self._executor.lookup(request.method)
        if handler is None:
            error: dict[str, Any] | None = {
                "code": codes.METHOD_NOT_FOUND,
                "message": f"method not found: {request.method}",
            }
            await self._channel.send(Response(request.id, error=error))
            return
        if not self._executor.initialized and request.method != "initialize":
            error = {"code": codes.INVALID_REQUEST, "message": "initialize first"}
            await self._channel.send(Response(request.id, error=error))
            return
        if self._executor.awaiting_user and request.method not in ("assume", "bind", "shutdown", PRELOAD_METHOD):
            error = {"code": codes.NOT_BOUND, "message": "an unbound worker serves nothing before bind"}
            await self._channel.send(Response(request.id, error=error))
            return
        ctx = RequestContext(request, self._channel, self._executor)
        try:
            result = await handler(ctx, request.params)
            response = Response(request.id, result=result)
        except asyncio.CancelledError:
            response = Response(request.id, error=RequestCancelled("request cancelled").to_wire())
        except SandboxError as exc:
            wire = exc.to_wire()
            inner = exc.data.get("code")
            if isinstance(inner, int):
                wire["code"] = inner
            response = Response(request.id, error=wire)
        except Exception as exc:  # noqa: BLE001 - any handler bug becomes an error answer
            response = Response(
                request.id,
                error={"code": codes.INTERNAL_ERROR, "message": f"{type(exc).__name__}: {exc}"},
            )
        await self._channel.send(response)


READ_BYTES = 64 * 1024
"""Bytes asked of each read of the protocol pipe: what a pipe holds. (asyncio's pipe transport
asks 256 KiB, a buffer past malloc's mmap threshold: a fresh mapping for every frame.)"""


class _Inbound:
    """The protocol pipe's reading end: read in the loop's own callback, frames dispatched as bytes arrive."""

    def __init__(self, handler: IPCHandler, max_frame: int) -> None:
        self._handler = handler
        self._splitter = FrameSplitter(max_frame)
        self._fd = -1

    def attach(self, fd: int) -> None:
        """Read ``fd`` from now on, until its end."""
        os.set_blocking(fd, False)
        self._fd = fd
        asyncio.get_running_loop().add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self.data_received(data)
            return
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)
        self.eof_received()

    def data_received(self, data: bytes) -> None:
        for msg in self._splitter.feed(data):
            self._handler.dispatch(msg)

    def eof_received(self) -> None:
        for msg in self._splitter.close():
            self._handler.dispatch(msg)
        self._handler.closed.set()


async def _amain(proto_in: int, proto_out: int, max_frame: int, booted: Booted | None) -> None:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(proto_out, "wb", 0)
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    executor = SandboxExecutor()
    handler = IPCHandler(Channel(writer), executor)
    if booted is not None and booted.initialized:
        try:
            await executor.adopt(booted)
        except Exception as exc:  # noqa: BLE001 - reported, and the worker ends: fail closed
            sys.stderr.write(f"sandbox worker: cannot attach what initialize reported: {type(exc).__name__}: {exc}\n")
            raise SystemExit(ATTACH_FAILED) from None
    inbound = _Inbound(handler, max_frame)
    if booted is not None and booted.pending:
        inbound.data_received(booted.pending)  # read by the handshake, not served there
    inbound.attach(proto_in)
    try:
        await handler.serve()
    finally:
        transport.close()


def serve(proto_in: int, proto_out: int, max_frame: int, booted: Booted | None = None) -> None:
    """Serve the channel until ``shutdown`` or end of input, after :mod:`handshake` (``booted``)."""
    from sandbox_core.inside.children import watch_with_pidfds

    watch_with_pidfds()
    asyncio.run(_amain(proto_in, proto_out, max_frame, booted))
