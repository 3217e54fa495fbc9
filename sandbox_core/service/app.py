"""The HTTP API (Starlette): runs streamed as server-sent events, pool control, metrics.

Routes (all JSON unless noted; ``/v1`` is the API version):

    GET  /v1/health                    liveness, draining flag          anyone
    GET  /openapi.json                 the OpenAPI 3.1 schema           anyone
    POST /v1/runs/agent                start an agent run, SSE stream   user
    POST /v1/runs/exec                 start an exec, SSE stream        user
    GET  /v1/runs                      the caller's runs (and recorded) user; operator: all
    GET  /v1/journal                   the record's journal entries     user (own); operator: all
    GET  /v1/runs/{id}                 one run's summary                owner
    GET  /v1/runs/{id}/events          (re)attach to a run's stream     owner
    POST /v1/runs/{id}/cancel          cancel a run                     owner
    WS   /v1/terminal                  a pty session in your sandbox    user
    GET  /v1/stats                     pool stats                       operator
    GET  /v1/workers                   list workers                     operator
    POST /v1/workers/launch            {"count": N, "user_id"?: U}      operator
    POST /v1/workers/stop              {"worker_ids"|"user_id"|"all"}   operator
    GET  /metrics                      Prometheus text format           operator

An SSE event per sandbox event: ``id`` is the run's event sequence number, ``event`` the
event type, ``data`` its JSON; ``: keep-alive`` comments while nothing happens; a ``gap``
event where a run's bounded buffer dropped events a stream had not read. Wrong or missing
credentials get a bare 401, a role that may not act a bare 403, another user's run a 404
(it does not exist for them). A body over ``service.max_body_mb`` gets 413, a run beyond
``service.max_runs_per_user`` (all running) 429, both with a JSON error naming the setting.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.egress.policy import check_narrowing
from sandbox_core.errors import BodyTooLarge, ConfigError, LimitExceeded, SandboxError, TooManyRuns
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.protocol import MAX_NESTING, too_deep
from sandbox_core.record import Record, parse_duration
from sandbox_core.requests import AgentRequest, ExecRequest, network_from_json
from sandbox_core.service import logs
from sandbox_core.service.auth import UNIX_PEER, Principal, TokenTable, bearer_token, principal_for_uid
from sandbox_core.service.body_limit import BodyLimit, body_too_large
from sandbox_core.service.buffer import data_json
from sandbox_core.service.openapi import openapi_schema
from sandbox_core.service.runs import MIB, Run, RunRegistry
from sandbox_core.service.stdin import StdinRelay
from sandbox_core.service.terminal import denial, serve_terminal

Endpoint = Callable[[Request], Awaitable[Response]]


class ServiceState:
    """What the routes share: the orchestrator, the runs, the auth mode, the drain flag."""

    def __init__(
        self,
        config: ProcessSandboxConfig,
        orchestrator: SandboxOrchestrator,
        *,
        transport: str,
        tokens: TokenTable | None = None,
    ) -> None:
        self.config = config
        self.orchestrator = orchestrator
        self.runs = RunRegistry(orchestrator, config.service)
        self.transport = transport
        self.tokens = tokens or TokenTable()
        self.draining = False

    @property
    def record(self) -> Record | None:
        return self.orchestrator.record

    def authenticate(self, request: HTTPConnection) -> Principal | None:
        if self.transport == "unix":
            client = request.scope.get("client")
            if client and client[0] == UNIX_PEER:
                return principal_for_uid(int(client[1]), self.config.service.operator_uids)
            return None
        token = bearer_token(request.headers.get("authorization"))
        return self.tokens.lookup(token) if token else None

    def refused(self, request: Request, status: int, who: Principal | None) -> None:
        """Log and journal an auth failure (never the credential: only whether one was sent)."""
        client = request.scope.get("client") or ("", "")
        header = request.headers.get("authorization")
        detail = {"status": status, "method": request.method, "path": request.url.path,
                  "transport": self.transport, "credential": "bearer" if header else "none",
                  "peer": f"uid {client[1]}" if client[0] == UNIX_PEER else str(client[0])}  # fmt: skip
        logs.log().warning("refused %s %s: %d (%s)", request.method, request.url.path, status, detail["peer"],
                           extra=detail)  # fmt: skip
        if self.record is not None:
            self.record.journal("auth", detail, user_id=who.user_id if who else None)


def _state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


def _denied(status: int) -> Response:
    return PlainTextResponse("unauthorized" if status == 401 else "forbidden", status_code=status)


def guarded(role: str) -> Callable[[Callable[[Request, Principal], Awaitable[Response]]], Endpoint]:
    """Authenticate the caller and require ``role`` (user or operator) before the route."""

    def wrap(fn: Callable[[Request, Principal], Awaitable[Response]]) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            state = _state(request)
            who = state.authenticate(request)
            if who is None:
                state.refused(request, 401, None)
                return _denied(401)
            if role == "operator" and not who.is_operator:
                state.refused(request, 403, who)
                return _denied(403)
            return await fn(request, who)

        return endpoint

    return wrap


async def _json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; ConfigError (400) for anything else, deep nesting included
    (refused before parsing: the parser recurses, and a RecursionError would be a 500)."""
    raw = await request.body()
    if too_deep(raw):
        raise ConfigError("body", f"request body nests deeper than {MAX_NESTING}")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ConfigError("body", "request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ConfigError("body", "request body must be a JSON object")
    return body


def _bad_request(exc: Exception) -> Response:
    """400 with the message; a ConfigError also names its ``field`` (and the ``entry``, if one)."""
    data = {k: v for k, v in exc.data.items() if k in ("field", "entry")} if isinstance(exc, ConfigError) else {}
    return JSONResponse({"error": str(exc), **data}, status_code=400)


def _network(body: dict[str, Any]) -> tuple[str, ...] | None:
    """The body's ``network`` narrowing, or ConfigError (400)."""
    try:
        return network_from_json(body.get("network"))
    except ValueError as exc:
        raise ConfigError("network", str(exc)) from None


def _limited(exc: LimitExceeded, status: int) -> Response:
    """A bound's refusal: the message, and the setting and value that refused it."""
    return JSONResponse({"error": exc.message, "setting": exc.setting, "limit": exc.limit}, status_code=status)


def sse(seq: int | None, event: dict[str, Any] | None) -> bytes:
    """One SSE frame (or a keep-alive comment)."""
    if event is None:
        return b": keep-alive\n\n"
    return f"id: {seq}\nevent: {event['type']}\ndata: {data_json(event)}\n\n".encode()


def _stream(state: ServiceState, run: Run, after: int, owns_run: bool) -> StreamingResponse:
    cursor = state.runs.attach(run, after)

    async def body() -> AsyncIterator[bytes]:
        finished = False
        items = state.runs.follow(run, cursor, state.config.service.keepalive_seconds)
        try:
            async with contextlib.aclosing(items):
                async for item in items:
                    yield sse(None, None) if item is None else sse(*item)
            finished = True
        finally:
            if not finished and owns_run and state.config.service.cancel_on_disconnect:
                await state.runs.cancel(run)

    headers = {"Cache-Control": "no-cache", "X-Run-Id": run.run_id, "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _agent_request(body: dict[str, Any]) -> AgentRequest:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ConfigError("prompt", "must be a non-empty string")
    tools = body.get("tools")
    return AgentRequest(
        prompt=prompt,
        system=body.get("system"),
        model=body.get("model"),
        max_turns=body.get("max_turns"),
        max_tokens=body.get("max_tokens"),
        tools=tuple(tools) if isinstance(tools, list) else None,
        conversation_id=str(body.get("conversation_id", "default")),
        timeout=body.get("timeout"),
        resume=body.get("resume") is True,  # the history itself never comes from a client: the record has it
        network=_network(body),
    )


def _exec_request(body: dict[str, Any]) -> ExecRequest:
    """An exec request from a JSON body: stdin as ``stdin`` (text), ``stdin_b64`` (bytes) or
    ``stdin_stream: true`` (the bytes follow in ``POST /v1/runs/{id}/stdin``)."""
    argv, shell, stdin, stdin_b64 = body.get("argv"), body.get("shell"), body.get("stdin"), body.get("stdin_b64")
    try:
        raw = base64.b64decode(stdin_b64, validate=True) if isinstance(stdin_b64, str) else None
        source: bytes | str | StdinRelay | None = raw if raw is not None else stdin if isinstance(stdin, str) else None
        if body.get("stdin_stream") is True:
            source = StdinRelay()
        return ExecRequest(
            argv=tuple(argv) if isinstance(argv, list) else None,
            shell=shell if isinstance(shell, str) else None,
            stdin=source,
            timeout=float(body["timeout"]) if body.get("timeout") is not None else None,
            network=_network(body),
        )
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ConfigError("body", str(exc)) from None


def _start(kind: str) -> Endpoint:
    @guarded("user")
    async def start(request: Request, who: Principal) -> Response:
        state = _state(request)
        if state.draining or state.orchestrator.closed:
            return JSONResponse({"error": "the service is draining"}, status_code=503)
        try:
            body = await _json_body(request)
            req = _agent_request(body) if kind == "agent" else _exec_request(body)
            check_narrowing(state.config.network, who.user_id, req.network)  # narrows, never widens
        except ConfigError as exc:
            return _bad_request(exc)
        try:
            run = state.runs.start(who, kind, req)
        except TooManyRuns as exc:
            return _limited(exc, 429)
        return _stream(state, run, 0, owns_run=True)

    return start


def _since(request: Request) -> float | None:
    """``?since=`` as seconds ago (``3600``) or a duration (``90s``, ``15m``, ``1h``, ``2d``)."""
    text = request.query_params.get("since")
    return None if not text else time.time() - parse_duration(text)


def _mine(request: Request, who: Principal) -> str | None:
    """The user whose rows a caller sees: their own, or (operators) ``?user=`` or everyone."""
    return request.query_params.get("user") if who.is_operator else who.user_id


@guarded("user")
async def list_runs(request: Request, who: Principal) -> Response:
    """Runs in memory (live, with buffer figures) and, from the record, every finished one kept there."""
    state = _state(request)
    try:
        since, user = _since(request), _mine(request, who)
        limit = min(int(request.query_params.get("limit", "100")), 1000)
    except ValueError as exc:
        return _bad_request(exc)
    live = [r.summary() for r in state.runs.visible(who) if user is None or r.owner.user_id == user]
    live = [r for r in live if since is None or r["created"] >= since]
    rows: list[dict[str, Any]] = []
    if state.record is not None:
        recorded = await asyncio.to_thread(state.record.runs, user_id=user, since=since, limit=limit)
        seen = {r["run_id"] for r in live}
        rows = [{**r, "state": r["outcome"], "created": r["started"], "recorded": True}
                for r in recorded if r["run_id"] not in seen]  # fmt: skip
    runs = sorted(live + rows, key=lambda r: float(r.get("created") or 0), reverse=True)[:limit]
    return JSONResponse({"runs": runs})


@guarded("user")
async def journal(request: Request, who: Principal) -> Response:
    """Journal entries after ``?after=ID``: operators see everyone's (or ``?user=``), users their own."""
    state = _state(request)
    if state.record is None:
        return JSONResponse({"error": "the record is off (record.enabled = false)"}, status_code=404)
    try:
        since, user = _since(request), _mine(request, who)
        after = int(request.query_params.get("after", "0"))
        limit = min(int(request.query_params.get("limit", "200")), 1000)
    except ValueError as exc:
        return _bad_request(exc)
    kind = request.query_params.get("kind")
    entries = await asyncio.to_thread(state.record.entries, user_id=user, kind=kind, since=since, after=after,
                                      limit=limit)  # fmt: skip
    return JSONResponse({"entries": entries})


def _find(request: Request, who: Principal) -> Run | None:
    return _state(request).runs.get(request.path_params["run_id"], who)


@guarded("user")
async def get_run(request: Request, who: Principal) -> Response:
    run = _find(request, who)
    if run is not None:
        return JSONResponse(run.summary())
    state = _state(request)
    if state.record is not None:  # finished and released: what the record kept of it
        rows = await asyncio.to_thread(state.record.runs, run_id=request.path_params["run_id"], limit=1)
        if rows and (who.is_operator or rows[0]["user_id"] == who.user_id):
            return JSONResponse({**rows[0], "state": rows[0]["outcome"], "created": rows[0]["started"],
                                 "recorded": True})  # fmt: skip
    return JSONResponse({"error": "no such run"}, status_code=404)


@guarded("user")
async def run_events(request: Request, who: Principal) -> Response:
    run = _find(request, who)
    if run is None:
        return JSONResponse({"error": "no such run"}, status_code=404)
    after = 0
    with contextlib.suppress(ValueError):
        after = int(request.headers.get("last-event-id", "0"))
    return _stream(_state(request), run, after, owns_run=False)


@guarded("user")
async def run_stdin(request: Request, who: Principal) -> Response:
    """The streamed stdin of an exec run started with ``stdin_stream: true``: the request body,
    read as the command takes it; the response comes when the body ends or the run does."""
    run = _find(request, who)
    if run is None:
        return JSONResponse({"error": "no such run"}, status_code=404)
    relay = run.stdin
    if relay is None or relay.attached:
        why = "already has its stdin" if relay is not None else "was not started with stdin_stream: true"
        return JSONResponse({"error": f"run {run.run_id} {why}"}, status_code=409)
    relay.attached = True
    taken = 0
    async for chunk in request.stream():
        if not chunk:
            continue
        if not await relay.put(chunk):
            return JSONResponse({"bytes": taken, "closed": True})
        taken += len(chunk)
    await relay.put(None)
    return JSONResponse({"bytes": taken, "closed": relay.closed})


@guarded("user")
async def cancel_run(request: Request, who: Principal) -> Response:
    run = _find(request, who)
    if run is None:
        return JSONResponse({"error": "no such run"}, status_code=404)
    await _state(request).runs.cancel(run)
    return JSONResponse(run.summary())


@guarded("operator")
async def stats(request: Request, who: Principal) -> Response:
    state = _state(request)
    data = state.orchestrator.get_pool_stats()
    data["runs_in_flight"] = state.runs.in_flight
    return JSONResponse(data)


@guarded("operator")
async def workers(request: Request, who: Principal) -> Response:
    return JSONResponse({"workers": _state(request).orchestrator.list_workers()})


@guarded("operator")
async def launch_workers(request: Request, who: Principal) -> Response:
    try:
        body = await _json_body(request)
        count = int(body.get("count", 1))
        user = body.get("user_id")
        if user is not None and not isinstance(user, str):
            raise ConfigError("user_id", "must be a string")
    except (ConfigError, ValueError, TypeError) as exc:
        return _bad_request(exc)
    try:
        ids = await _state(request).orchestrator.launch(count, user)
    except ConfigError as exc:
        return _bad_request(exc)
    except SandboxError as exc:
        return JSONResponse({"error": exc.message}, status_code=409)
    return JSONResponse({"launched": ids})


@guarded("operator")
async def stop_workers(request: Request, who: Principal) -> Response:
    try:
        body = await _json_body(request)
    except ConfigError as exc:
        return _bad_request(exc)
    ids = body.get("worker_ids")
    stopped = await _state(request).orchestrator.stop_workers(
        worker_ids=[str(i) for i in ids] if isinstance(ids, list) else None,
        user_id=body.get("user_id") if isinstance(body.get("user_id"), str) else None,
        everything=body.get("all") is True,
    )
    return JSONResponse({"stopped": stopped})


async def terminal(websocket: WebSocket) -> None:
    """``WS /v1/terminal``: a pty session in the caller's own sandbox (see :mod:`.terminal`)."""
    state: ServiceState = websocket.app.state.service
    who = state.authenticate(websocket)
    if who is None:
        await websocket.send_denial_response(denial(401))
        return
    if state.draining or state.orchestrator.closed:
        await websocket.send_denial_response(denial(503))
        return
    await websocket.accept()
    await serve_terminal(websocket, who.user_id, state.orchestrator)


def _file_target(request: Request, who: Principal) -> tuple[str, str] | Response:
    """(user, path) of a file route: the caller's own workspace; an operator may name ``user``."""
    user = request.query_params.get("user") or who.user_id
    if user != who.user_id and not who.is_operator:
        return _denied(403)
    return user, request.query_params.get("path") or "."


def _file_error(exc: SandboxError) -> Response:
    status = 413 if isinstance(exc, LimitExceeded) else 404 if exc.data.get("reason") == "not_found" else 409
    if exc.data.get("reason") == "quota":
        status = 507
    return JSONResponse({"error": exc.message, **{k: v for k, v in exc.data.items() if k != "user_id"}},
                        status_code=status)


@guarded("user")
async def upload_files(request: Request, who: Principal) -> Response:
    """``PUT /v1/files?path=DIR``: the body is a tar stream, unpacked into DIR inside the user's sandbox
    (``&mode=cp``: ``cp -r`` rules, the stream's one top entry becomes DIR unless DIR is a directory)."""
    target = _file_target(request, who)
    if isinstance(target, Response):
        return target
    user, path = target

    async def body() -> AsyncIterator[bytes]:
        async for chunk in request.stream():
            if chunk:
                yield chunk

    try:
        into = request.query_params.get("mode") != "cp"
        summary = await _state(request).orchestrator.files.upload_tar(user, path, body(), into=into)
    except SandboxError as exc:
        return _file_error(exc)
    return JSONResponse({"path": path, "summary": summary})


@guarded("user")
async def download_files(request: Request, who: Principal) -> Response:
    """``GET /v1/files?path=P``: a tar stream of P (``&list=1``: its entries; ``&stat=1``: its stat)."""
    target = _file_target(request, who)
    if isinstance(target, Response):
        return target
    user, path = target
    files = _state(request).orchestrator.files
    try:
        if request.query_params.get("list"):
            return JSONResponse({"entries": await files.list(user, path)})
        if request.query_params.get("stat"):
            return JSONResponse(await files.stat(user, path))
        stream = files.download_tar(user, path)
        first = await anext(stream, b"")  # an error before any byte is still an HTTP status
    except SandboxError as exc:
        return _file_error(exc)

    async def rest() -> AsyncIterator[bytes]:
        try:
            if first:
                yield first
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()

    return StreamingResponse(rest(), media_type="application/x-tar")


@guarded("user")
async def delete_files(request: Request, who: Principal) -> Response:
    target = _file_target(request, who)
    if isinstance(target, Response):
        return target
    user, path = target
    try:
        recursive = bool(request.query_params.get("recursive"))
        await _state(request).orchestrator.files.remove(user, path, recursive=recursive)
    except SandboxError as exc:
        return _file_error(exc)
    return JSONResponse({"removed": path})


async def health(request: Request) -> Response:
    state = _state(request)
    return JSONResponse({"status": "draining" if state.draining else "ok", "profile": state.config.profile})


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_schema())


@guarded("operator")
async def metrics(request: Request, who: Principal) -> Response:
    state = _state(request)
    return PlainTextResponse(prometheus(state.orchestrator.get_pool_stats(), state.runs.in_flight),
                             media_type="text/plain; version=0.0.4")


def prometheus(stats: dict[str, Any], runs_in_flight: int) -> str:
    """Pool stats in the Prometheus text exposition format."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float | None]]) -> None:
        lines.append(f"# HELP sandbox_{name} {help_text}")
        lines.append(f"# TYPE sandbox_{name} {kind}")
        for labels, value in samples:
            if value is not None:
                lines.append(f"sandbox_{name}{labels} {value}")

    w = stats["workers"]
    metric("workers", "gauge", "Workers by state.",
           [(f'{{state="{s}"}}', w[s]) for s in ("starting", "idle", "busy", "stopping", "prewarmed")])
    metric("requests_total", "counter", "Requests by outcome.",
           [(f'{{outcome="{k}"}}', v) for k, v in stats["requests"].items() if k != "in_flight"])
    for key in ("crashes", "restarts", "recycled", "reaped", "evicted", "spawned", "start_failures"):
        metric(f"{key}_total", "counter", f"Workers {key.replace('_', ' ')}.", [("", stats[key])])
    metric("queue_depth", "gauge", "Requests waiting for a worker.", [("", stats["queue_depth"])])
    metric("runs_in_flight", "gauge", "Service runs not finished.", [("", runs_in_flight)])
    lat = stats["spawn_latency_ms"]
    metric("spawn_latency_ms", "summary", "Worker spawn latency.",
           [('{quantile="0.5"}', lat["p50"]), ('{quantile="0.95"}', lat["p95"])])
    metric("uptime_seconds", "gauge", "Seconds since the pool started.", [("", stats["uptime_s"])])
    return "\n".join(lines) + "\n"


def create_app(state: ServiceState) -> Starlette:
    """The Starlette app over ``state`` (whose orchestrator the caller starts and stops)."""
    routes = [
        Route("/v1/health", health),
        Route("/openapi.json", openapi),
        Route("/v1/runs/agent", _start("agent"), methods=["POST"]),
        Route("/v1/runs/exec", _start("exec"), methods=["POST"]),
        Route("/v1/runs", list_runs),
        Route("/v1/runs/{run_id}", get_run),
        Route("/v1/runs/{run_id}/events", run_events),
        Route("/v1/runs/{run_id}/stdin", run_stdin, methods=["POST"]),
        Route("/v1/runs/{run_id}/cancel", cancel_run, methods=["POST"]),
        WebSocketRoute("/v1/terminal", terminal),
        Route("/v1/journal", journal),
        Route("/v1/files", download_files, methods=["GET"]),
        Route("/v1/files", upload_files, methods=["PUT"]),
        Route("/v1/files", delete_files, methods=["DELETE"]),
        Route("/v1/stats", stats),
        Route("/v1/workers", workers),
        Route("/v1/workers/launch", launch_workers, methods=["POST"]),
        Route("/v1/workers/stop", stop_workers, methods=["POST"]),
        Route("/metrics", metrics),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(BodyLimit, max_bytes=state.config.service.max_body_mb * MIB)],
        exception_handlers={BodyTooLarge: body_too_large},
    )
    app.state.service = state
    return app


__all__ = ["ServiceState", "create_app", "prometheus", "sse"]
