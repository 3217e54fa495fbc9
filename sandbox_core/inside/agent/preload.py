"""Agent preload: make an idle worker's first ``agent.run`` as fast as its second.

A fresh worker's first agent run pays for ``import anthropic`` (about a second of CPU), the
models and validators the SDK builds on first use, and the client's construction. Preload
pays that while the worker is idle, in a thread of its own:

1. import the SDK and the agent modules;
2. build the client that real runs use, on the worker's gateway connection (the control
   pipe; it sends nothing until a run makes a model call);
3. run one canned turn through :func:`sandbox_core.inside.agent.runtime.run` with the whole
   toolset, against an in-process transport that answers with a fixed text reply: no host
   call, no model call, no tool call, nothing of the user's touched;
4. collect garbage and hand freed heap back to the kernel (``malloc_trim``).

The thread runs at a lower priority (``NICE``; Linux sets it per thread), so the preload of
a refilled worker does not slow the requests other workers serve meanwhile.

The thread is started by the worker once its confinement is complete
(``SandboxExecutor._confinement_complete``): Landlock and seccomp restrict the thread that
applies them and the threads it starts afterwards, never one that already runs. An unbound
strict worker (pre-warmed, not yet any user's) is the exception: it preloads while it waits, so
that a claim finds it agent-ready, and its ``bind`` first waits for the thread to be gone
(:meth:`Preload.ended`); the uid switch, the capability drop and Landlock then apply to a
single-threaded process, and Landlock refuses to apply otherwise. Nothing of a user exists in
the sandbox before ``bind``: the canned turn touches nothing but the SDK's own objects.

The outcome reaches the event loop with ``call_soon_threadsafe``: ``ready`` (the client is
kept in the executor's state for the runs to use) or ``failed`` (the worker tells the host,
which retires it).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from sandbox_core.inside.agent.runtime import CLIENT, PRELOAD, TOOLS

_CANNED_TEXT = "ready"
NICE = 10
"""The preload thread's nice value: it is idle-time work, and a pool refills (and preloads) just as a
new user's request runs on another worker."""


class Preload:
    """One preload: its state, and an event set (on the worker's loop) when it ends."""

    def __init__(self, confined: dict[str, Any]) -> None:
        self.confined = confined
        """The confinement in force when the thread started (``landlock``: the worker's report of it)."""
        self.state = "running"
        self.done = asyncio.Event()
        self.seconds: float | None = None
        self.cpu_seconds: float | None = None
        self.error: str | None = None
        self.thread: threading.Thread | None = None

    async def ended(self, limit: float) -> None:
        """Wait until the preload is over and its thread has left the process (``/proc/self/task``).

        An unbound worker preloads before its claim and must be single-threaded again before
        ``bind`` drops its capabilities and applies Landlock (both per thread): a thread that
        outlived them would run unconfined. Fails closed after ``limit`` seconds.
        """
        from sandbox_core.errors import IsolationUnavailable

        deadline = time.monotonic() + limit
        try:
            await asyncio.wait_for(self.done.wait(), limit)
        except TimeoutError:
            raise IsolationUnavailable(f"the agent preload did not end within {limit:g}s of the claim") from None
        if self.thread is not None:
            self.thread.join(max(0.0, deadline - time.monotonic()))
        while len(os.listdir("/proc/self/task")) > 1:  # the joined thread's task is gone a moment later
            if time.monotonic() > deadline:
                raise IsolationUnavailable("a thread is still running in the worker after its preload ended")
            await asyncio.sleep(0.001)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state, "confined": self.confined}
        if self.seconds is not None:
            out["seconds"] = self.seconds
        if self.cpu_seconds is not None:
            out["cpu_seconds"] = self.cpu_seconds
        if self.error is not None:
            out["error"] = self.error
        return out


def start(
    state: dict[str, Any], call_host: Any, send: Any, on_done: Callable[[Preload], None],
    confined: dict[str, Any], claim: tuple[str, str] | None = None,
) -> Preload:
    """Start preloading in a daemon thread; ``on_done(preload)`` runs on this loop at its end.

    ``claim`` (an unbound worker): the workspace and ``HOME`` its claim will give it, for which
    the file tools are built too, so that the first run after the claim finds them in the cache
    (measured: that run built them, ~6 ms before its request went out)."""
    loop = asyncio.get_running_loop()
    preload = Preload(confined)
    state[PRELOAD] = preload

    def finish(client: Any, error: str | None, seconds: float, cpu: float) -> None:
        preload.seconds, preload.cpu_seconds = round(seconds, 3), round(cpu, 3)
        if error is None:
            state[CLIENT] = client
            preload.state = "ready"
        else:
            preload.state, preload.error = "failed", error
        preload.done.set()
        on_done(preload)

    def work() -> None:
        with contextlib.suppress(OSError):  # this thread only: requests of other workers come first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        began, cpu = time.monotonic(), time.thread_time()
        client: Any = None
        error: str | None = None
        try:
            client = _load(call_host, send, state.setdefault(TOOLS, {}), claim)
        except BaseException as exc:  # noqa: BLE001 - any failure is reported, and the worker retired
            error = f"{type(exc).__name__}: {exc}"[:500]
        _trim()
        loop.call_soon_threadsafe(finish, client, error, time.monotonic() - began, time.thread_time() - cpu)

    preload.thread = threading.Thread(target=work, name="sandbox-preload", daemon=True)
    preload.thread.start()
    return preload


def _load(call_host: Any, send: Any, tools: dict[Any, Any], claim: tuple[str, str] | None = None) -> Any:
    """Import, build the real client, run the canned turn (and build the claim's file tools);
    returns the client."""
    from sandbox_core.inside.agent import runtime

    client = runtime.gateway_client(call_host, send)
    asyncio.run(_canned_turn(tools))
    if claim is not None:
        _claim_tools(tools, *claim)
    return client


def _claim_tools(tools: dict[Any, Any], workspace: str, home: str) -> None:
    """The file tools a run will want once the claim has bound ``workspace`` and set ``HOME``
    (nothing else of the environment changes at bind). They only hold the path and the
    environment: nothing is resolved, opened or run until a tool is called."""
    from sandbox_core.inside.agent.tools import TOOL_NAMES, WorkspaceShell, workspace_tools

    path = Path(workspace)
    file_tools = tuple(n for n in TOOL_NAMES if n != "bash")  # the shell is for bash only: never started here
    workspace_tools(path, WorkspaceShell(path, {}), file_tools, cache=tools, environ={**os.environ, "HOME": home})


async def _canned_turn(tools: dict[Any, Any] | None = None) -> None:
    """One turn through ``runtime.run``; the file tools it builds go to ``tools`` (the runs' cache)."""
    import httpx2
    from anthropic import AsyncAnthropic

    from sandbox_core.inside.agent import runtime
    from sandbox_core.shared import GATEWAY_BASE_URL, PLACEHOLDER_API_KEY

    class Canned(httpx2.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            await request.aread()
            return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=_sse(),
                                   request=request)

    canned = AsyncAnthropic(api_key=PLACEHOLDER_API_KEY, base_url=GATEWAY_BASE_URL, max_retries=0,
                            http_client=httpx2.AsyncClient(transport=Canned(), trust_env=False))
    ctx = _Context(Path(os.getcwd()), {CLIENT: canned, TOOLS: {} if tools is None else tools})
    try:
        result = await runtime.run(ctx, {"prompt": "preload"})
    finally:
        await canned.close()
    if result.get("stop_reason") != "end_turn" or ctx.texts != [_CANNED_TEXT]:
        raise RuntimeError(f"the canned turn did not run through: {result!r:.200}")


def _trim() -> None:
    """Free what the import and the canned turn left behind, and give the heap back."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the heap stays as it is
        pass


class _Context:
    """Just enough of a ``RequestContext`` for :func:`runtime.run` (events are counted, dropped)."""

    def __init__(self, workspace: Path, state: dict[str, Any]) -> None:
        self.workspace = workspace
        self.executor = self
        self.state = state
        self.channel = self
        self.texts: list[str] = []

    def call_host(self, method: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        raise RuntimeError("the canned turn makes no host call")

    async def emit(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "text":
            self.texts.append(str(data.get("text")))


def _sse() -> bytes:
    import json

    def event(kind: str, data: dict[str, Any]) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"

    return "".join((
        event("message_start", {"message": {
            "id": "msg_preload", "type": "message", "role": "assistant", "model": "preload", "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}}}),
        event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": _CANNED_TEXT}}),
        event("content_block_stop", {"index": 0}),
        event("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                "usage": {"output_tokens": 1}}),
        event("message_stop", {}),
    )).encode()
