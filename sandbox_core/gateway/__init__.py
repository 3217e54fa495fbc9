"""The host side of model calls made from inside the sandbox.

A worker's SDK sends each HTTP request as a ``gateway.request`` call (see
``sandbox_core.inside.agent.transport``). :meth:`ModelGateway.handle` checks it, then answers with
chunks: ``{"kind": "start", "status", "headers"}`` once, then ``{"kind": "body",
"data_b64"}`` as the response body arrives (server-sent events are passed on one read at a
time, never buffered to the end).

What is accepted: ``POST`` to ``/v1/messages`` or ``/v1/messages/count_tokens`` (an
optional ``?beta=true`` query, which older SDKs add to beta calls, is kept), addressed to
the placeholder host ``gateway.sandbox`` or to the configured base URL's own origin and
path prefix, with a JSON object body of at most ``max_body_bytes``. Anything else raises
:class:`~sandbox_core.errors.GatewayError` saying why. Credentials the worker sent
(``authorization``, ``x-api-key``, ``cookie``, ``proxy-*``) are dropped, and the real key
is added as the documented ``x-api-key`` and as ``Authorization: Bearer`` (what the
installed SDK sends), so either kind of endpoint or proxy accepts it.

Providers: ``anthropic`` forwards to ``base_url`` with httpx2; ``offline`` answers with
:mod:`sandbox_core.gateway.offline`, in process; ``auto`` is ``anthropic`` when an API key is
configured, else ``offline``.

Metering, per user: calls, refused calls, errors (status >= 400 or a broken stream), and
input/output tokens read from the ``message_start`` / ``message_delta`` usage of a stream
or the ``usage`` of a JSON reply. Budgets: ``request_token_budget`` caps the tokens of one
agent run (calls carrying the same ``run_id``; a call without one is a run of its own) and
``user_token_budget`` the tokens of a user; a call made once a budget is used up is
refused. A budget can be exceeded by the one call that crosses it, never by a second.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx2

from sandbox_core.config import ModelConfig
from sandbox_core.errors import GatewayError
from sandbox_core.shared import GATEWAY_HOST

ALLOWED_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
ALLOWED_QUERIES = frozenset({"", "beta=true"})
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "cookie", "cookie2"})
HOP_HEADERS = frozenset({"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te",
                         "upgrade", "trailer", "accept-encoding", "expect"})
RESPONSE_DROP = frozenset({"content-encoding", "content-length", "transfer-encoding", "connection",
                           "keep-alive", "set-cookie"})
MAX_CHUNK = 256 * 1024
MAX_JSON_METERED = 16 * 1024 * 1024
_RUNS_KEPT = 1024


def _refused(why: str) -> GatewayError:
    return GatewayError(f"refused: {why}", data={"reason": "refused"})


def resolve_provider(config: ModelConfig) -> Literal["anthropic", "offline"]:
    """``auto`` means ``anthropic`` when an API key is configured, else ``offline``."""
    return config.effective_provider


@dataclass
class UserStats:
    calls: int = 0
    refused: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class _Call:
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    json: dict[str, Any]
    run_id: str | None


class UsageMeter:
    """Reads token usage from a response body as it passes (SSE or JSON)."""

    def __init__(self, content_type: str) -> None:
        self.sse = content_type.startswith("text/event-stream")
        self._buf = bytearray()
        self.input_tokens = 0
        self.output_tokens = 0

    def feed(self, data: bytes) -> None:
        self._buf += data
        if not self.sse:
            if len(self._buf) > MAX_JSON_METERED:  # too big to be a reply we can meter: give up on it
                self._buf = bytearray(b"{}")
            return
        *lines, rest = self._buf.split(b"\n")
        self._buf = bytearray(rest[-MAX_CHUNK:])
        for line in lines:
            if line.startswith(b"data:"):
                self._event(bytes(line[5:]))

    def finish(self) -> None:
        if not self.sse and self._buf:
            self._usage(self._load(bytes(self._buf)).get("usage"), start=True)

    @staticmethod
    def _load(raw: bytes) -> dict[str, Any]:
        try:
            obj = json.loads(raw)
        except ValueError:
            return {}
        return obj if isinstance(obj, dict) else {}

    def _event(self, raw: bytes) -> None:
        obj = self._load(raw)
        if obj.get("type") == "message_start" and isinstance(obj.get("message"), dict):
            self._usage(obj["message"].get("usage"), start=True)
        elif obj.get("type") == "message_delta":
            self._usage(obj.get("usage"), start=False)

    def _usage(self, usage: Any, *, start: bool) -> None:
        if not isinstance(usage, dict):
            return
        fields = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        inputs = [usage[f] for f in fields if isinstance(usage.get(f), int)]
        if inputs or start:
            self.input_tokens = sum(inputs) if inputs else self.input_tokens
        if isinstance(usage.get("output_tokens"), int):
            self.output_tokens = usage["output_tokens"]


class ModelGateway:
    """Checks, meters and performs the model calls of every worker; one per orchestrator."""

    def __init__(self, config: ModelConfig, *, transport: httpx2.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.provider = resolve_provider(config)
        self._transport = transport
        self._client: httpx2.AsyncClient | None = None
        self._users: dict[str, UserStats] = {}
        self._runs: OrderedDict[tuple[str, str], int] = OrderedDict()
        base = urlsplit(config.base_url)
        self._base_origin = (base.scheme, base.netloc.lower())
        self._base_prefix = base.path.rstrip("/")

    def stats(self) -> dict[str, dict[str, int]]:
        """Calls, refusals, errors and tokens per user id."""
        return {user: asdict(stats) for user, stats in self._users.items()}

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def handle(self, user_id: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Serve one ``gateway.request`` of ``user_id``: chunks, or GatewayError."""
        stats = self._users.setdefault(user_id, UserStats())
        try:
            call = self._parse(params)
            self._check_budget(user_id, call.run_id, stats)
            if self.provider == "anthropic" and not self.config.api_key:
                raise GatewayError(
                    "the anthropic provider needs an API key: set ANTHROPIC_API_KEY on the host, or "
                    "model.api_key in the config file (or use --provider offline)", data={"reason": "no_api_key"}
                )
        except GatewayError:
            stats.refused += 1
            raise
        stats.calls += 1
        meter: UsageMeter | None = None
        try:
            source = self._offline(call) if self.provider == "offline" else self._forward(call)
            async for status, headers, data in source:
                if meter is None:
                    meter = UsageMeter(dict(headers).get("content-type", ""))
                    if status >= 400:
                        stats.errors += 1
                    yield {"kind": "start", "status": status, "headers": [list(h) for h in headers]}
                for start in range(0, len(data), MAX_CHUNK):
                    piece = data[start : start + MAX_CHUNK]
                    meter.feed(piece)
                    yield {"kind": "body", "data_b64": base64.b64encode(piece).decode("ascii")}
            if meter is not None:
                meter.finish()
        except GatewayError:
            stats.errors += 1
            raise
        finally:
            if meter is not None:
                self._record(user_id, call.run_id, meter.input_tokens + meter.output_tokens)
                stats.input_tokens += meter.input_tokens
                stats.output_tokens += meter.output_tokens

    # ------------------------------------------------------------------ checks

    def _parse(self, params: dict[str, Any]) -> _Call:
        method, url, raw_headers = params.get("method"), params.get("url"), params.get("headers")
        body_b64, run_id = params.get("body_b64", ""), params.get("run_id")
        if not isinstance(method, str) or not isinstance(url, str) or not isinstance(body_b64, str):
            raise _refused("gateway.request needs method, url and body_b64 strings")
        if method.upper() != "POST":
            raise _refused(f"only POST to the Messages API is allowed, not {method.upper()}")
        path, query = self._route(url)
        if len(body_b64) > (self.config.max_body_bytes + 2) // 3 * 4:
            raise _refused(f"request body larger than model.max_body_bytes ({self.config.max_body_bytes})")
        try:
            body = base64.b64decode(body_b64, validate=True)
            obj = json.loads(body)
        except (binascii.Error, ValueError):
            raise _refused("the request body is not base64 of a JSON object") from None
        if not isinstance(obj, dict):
            raise _refused("the request body is not a JSON object")
        headers: list[tuple[str, str]] = []
        for pair in raw_headers if isinstance(raw_headers, list) else []:
            if isinstance(pair, list | tuple) and len(pair) == 2:
                name = str(pair[0]).lower()
                if name not in CREDENTIAL_HEADERS and name not in HOP_HEADERS and not name.startswith("proxy-"):
                    headers.append((name, str(pair[1])))
        return _Call(path, query, headers, body, obj, run_id if isinstance(run_id, str) and run_id else None)

    def _route(self, url: str) -> tuple[str, str]:
        """The API path of ``url`` (prefix removed), or GatewayError naming what is wrong."""
        parts = urlsplit(url)
        origin = (parts.scheme, parts.netloc.lower())
        path = parts.path
        if parts.hostname == GATEWAY_HOST and not parts.username and not parts.password:
            pass
        elif origin == self._base_origin and path.startswith(self._base_prefix + "/"):
            path = path[len(self._base_prefix):]
        else:
            raise _refused(f"{parts.netloc or url!r} is not the model API; requests may only go to "
                           f"{GATEWAY_HOST} (the configured base URL)")
        if path not in ALLOWED_PATHS:
            allowed = ", ".join(sorted(ALLOWED_PATHS))
            raise _refused(f"path {path!r} is not a Messages API endpoint (allowed: {allowed})")
        if parts.query not in ALLOWED_QUERIES:
            raise _refused(f"query {parts.query!r} is not allowed")
        return path, parts.query

    def _check_budget(self, user_id: str, run_id: str | None, stats: UserStats) -> None:
        used_by_user = stats.input_tokens + stats.output_tokens
        budget = self.config.user_token_budget
        if budget and used_by_user >= budget:
            raise GatewayError(f"refused: user {user_id!r} has used {used_by_user} of {budget} tokens "
                               "(model.user_token_budget)", data={"reason": "user_budget", "used": used_by_user})
        budget = self.config.request_token_budget
        used_by_run = self._runs.get((user_id, run_id), 0) if run_id else 0
        if budget and used_by_run >= budget:
            raise GatewayError(f"refused: this run has used {used_by_run} of {budget} tokens "
                               "(model.request_token_budget)", data={"reason": "request_budget", "used": used_by_run})

    def _record(self, user_id: str, run_id: str | None, tokens: int) -> None:
        if run_id is None:
            return
        key = (user_id, run_id)
        self._runs[key] = self._runs.get(key, 0) + tokens
        self._runs.move_to_end(key)
        while len(self._runs) > _RUNS_KEPT:
            self._runs.popitem(last=False)

    # ------------------------------------------------------------------ backends

    async def _offline(self, call: _Call) -> AsyncIterator[tuple[int, list[tuple[str, str]], bytes]]:
        from sandbox_core.gateway import offline

        reply = offline.respond(call.path, call.json)
        if not reply.chunks:
            yield reply.status, reply.headers, b""
        for chunk in reply.chunks:
            yield reply.status, reply.headers, chunk

    def _http(self) -> httpx2.AsyncClient:
        if self._client is None:
            timeout = httpx2.Timeout(self.config.request_timeout, connect=min(30.0, self.config.request_timeout))
            self._client = httpx2.AsyncClient(timeout=timeout, transport=self._transport, follow_redirects=False)
        return self._client

    async def _forward(self, call: _Call) -> AsyncIterator[tuple[int, list[tuple[str, str]], bytes]]:
        key = str(self.config.api_key or "")
        url = self.config.base_url.rstrip("/") + call.path + (f"?{call.query}" if call.query else "")
        headers = [*call.headers, ("x-api-key", key), ("authorization", f"Bearer {key}")]
        client = self._http()
        request = client.build_request("POST", url, headers=headers, content=call.body)
        try:
            response = await client.send(request, stream=True)
        except httpx2.TimeoutException as exc:
            raise GatewayError(f"model API timed out: {type(exc).__name__}",
                               data={"reason": "timeout", "retryable": True}) from None
        except httpx2.HTTPError as exc:
            raise GatewayError(f"cannot reach the model API: {type(exc).__name__}: {exc}",
                               data={"reason": "unreachable", "retryable": True}) from None
        try:
            out_headers = [(k.lower(), v) for k, v in response.headers.multi_items() if k.lower() not in RESPONSE_DROP]
            yield response.status_code, out_headers, b""
            async for data in response.aiter_bytes():
                yield response.status_code, out_headers, data
        except httpx2.HTTPError as exc:
            raise GatewayError(f"the model API stream broke: {type(exc).__name__}: {exc}",
                               data={"reason": "stream_broken"}) from None
        finally:
            await response.aclose()
