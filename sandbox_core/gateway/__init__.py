"""The host side of model calls made from inside the sandbox.

A worker sends each HTTP request as a ``gateway.request`` call: the agent runtime's SDK
transport (``sandbox_core.inside.agent.transport``) and the loopback model endpoint that any
command can use (``sandbox_core.inside.model_endpoint``) send the same call, so one policy
governs both. :meth:`ModelGateway.handle` checks it, then answers with chunks:
``{"kind": "start", "status", "headers"}`` once, then ``{"kind": "body", "data_b64"}`` as
the response body arrives (server-sent events are passed on one read at a time, never
buffered to the end).

What is accepted: the routes, headers and bodies of :mod:`sandbox_core.gateway.policy`,
addressed to the placeholder host ``gateway.sandbox`` or to the configured base URL's own
origin and path prefix, with a body of at most ``max_body_bytes``. Anything else raises
:class:`~sandbox_core.errors.GatewayError` saying why, with a reason code in
``data["reason"]``. The real key is added as the documented ``x-api-key`` and as
``Authorization: Bearer`` (what the installed SDK sends), so either kind of endpoint or
proxy accepts it.

What goes back to the worker never holds the key: failures of the HTTP layer go back as a
reason code (``unreachable``, ``timeout``, ``stream_broken``...), their details only to the
host's log (logger ``sandbox_core.gateway``, the key redacted), and every string and body
byte sent to the worker is scrubbed of the key as a last step.

Providers: ``anthropic`` forwards to ``base_url`` with httpx2; ``offline`` answers with
:mod:`sandbox_core.gateway.offline`, in process; ``auto`` is ``anthropic`` when an API key is
configured, else ``offline``.

Metering, per user: calls, refused calls, errors (status >= 400 or a broken stream), and
input/output tokens read from the ``message_start`` / ``message_delta`` usage of a stream
or the ``usage`` of a JSON reply. Budgets (:mod:`sandbox_core.gateway.budget`) are
reservations: ``request_token_budget`` caps the tokens of one run, the ``agent.run`` or
command the **host** bound the call to (``run``; whatever run id the worker claims is
ignored), and ``user_token_budget`` those of a user; each call books its estimated input
plus ``max_tokens`` before it is forwarded, so concurrent calls cannot overshoot.

Concurrency: at most ``model.max_user_calls`` calls of one user are in flight at once (each
worker also takes at most ``MAX_HOST_CALLS``); one more is refused at once with reason
``overloaded`` and ``retry_after`` seconds, which the model endpoint answers as the API
does when it is busy (503 ``overloaded_error``, ``retry-after``), and so does the agent
runtime's transport to its SDK client, so a client waits and retries instead of hanging on
the host.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx2

from sandbox_core.config import ModelConfig
from sandbox_core.errors import GatewayError
from sandbox_core.gateway.budget import Ledger, Reservation, estimate_input
from sandbox_core.gateway.policy import Checked, GatewayPolicy, refused
from sandbox_core.shared import GATEWAY_HOST

RESPONSE_DROP = frozenset({"content-encoding", "content-length", "transfer-encoding", "connection",
                           "keep-alive", "set-cookie"})
MAX_CHUNK = 256 * 1024
MAX_JSON_METERED = 16 * 1024 * 1024
REDACTED = "[redacted]"
RETRY_AFTER = 1
"""Seconds a client refused for concurrency is told to wait (``retry-after``)."""
log = logging.getLogger("sandbox_core.gateway")


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


class Scrubber:
    """Removes a secret from text and from a byte stream (also one split across chunks)."""

    def __init__(self, secret: str | None) -> None:
        self.secret = secret or ""
        self._raw = self.secret.encode()
        self._tail = b""

    def text(self, value: str) -> str:
        return value.replace(self.secret, REDACTED) if self.secret else value

    def value(self, value: Any) -> Any:
        """A JSON-like value with the secret removed from every string in it."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(k)): self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value

    def feed(self, data: bytes) -> bytes:
        """The bytes that are safe to pass on now; a tail that may begin the secret waits."""
        if not self._raw:
            return data
        buf = (self._tail + data).replace(self._raw, REDACTED.encode())
        keep = 0
        for n in range(min(len(self._raw) - 1, len(buf)), 0, -1):
            if buf.endswith(self._raw[:n]):
                keep = n
                break
        self._tail = buf[len(buf) - keep :] if keep else b""
        return buf[: len(buf) - keep]

    def flush(self) -> bytes:
        tail, self._tail = self._tail, b""
        return tail


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
        self.policy = GatewayPolicy(config)
        self.ledger = Ledger(config.user_token_budget, config.request_token_budget)
        self._transport = transport
        self._client: httpx2.AsyncClient | None = None
        self._users: dict[str, UserStats] = {}
        self._in_flight: dict[str, int] = {}
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

    async def handle(
        self, user_id: str, params: dict[str, Any], *, run: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Serve one ``gateway.request`` of ``user_id`` bound by the host to ``run``: chunks, or GatewayError.

        ``run`` is the host's name for the request the worker is serving (an ``agent.run``
        or a command); None makes the call a run of its own. Every string and body byte
        yielded, and every error raised, is scrubbed of the API key.
        """
        scrub = Scrubber(str(self.config.api_key or ""))
        try:
            async for status, headers, data in self._serve(user_id, params, run):
                if status is not None:
                    yield {"kind": "start", "status": status, "headers": scrub.value([list(h) for h in headers])}
                piece = scrub.feed(data) if data is not None else scrub.flush()
                for start in range(0, len(piece), MAX_CHUNK):
                    chunk = piece[start : start + MAX_CHUNK]
                    yield {"kind": "body", "data_b64": base64.b64encode(chunk).decode("ascii")}
        except GatewayError as exc:
            raise GatewayError(scrub.text(exc.message), data=scrub.value(exc.data)) from None
        except Exception as exc:  # noqa: BLE001 - a gateway bug must not reach the worker as text
            log.error("model gateway failed for user %s: %s", user_id, scrub.text(f"{type(exc).__name__}: {exc}"))
            raise GatewayError("the model gateway failed (reason: internal; details are in the host's log)",
                               data={"reason": "internal"}) from None

    async def _serve(
        self, user_id: str, params: dict[str, Any], run: str | None
    ) -> AsyncIterator[tuple[int | None, list[tuple[str, str]], bytes | None]]:
        """(status, headers, b"") once, then (None, [], data) per piece, then (None, [], None) at the end."""
        stats = self._users.setdefault(user_id, UserStats())
        try:
            call = self._parse(params)
            if self._in_flight.get(user_id, 0) >= self.config.max_user_calls:
                raise refused(f"this user has {self.config.max_user_calls} model calls in flight "
                              "(model.max_user_calls); retry shortly", "overloaded", retry_after=RETRY_AFTER,
                              retryable=True)
            if self.provider == "anthropic" and not self.config.api_key:
                raise GatewayError(
                    "the anthropic provider needs an API key: set ANTHROPIC_API_KEY on the host, or "
                    "model.api_key in the config file (or use --provider offline)", data={"reason": "no_api_key"}
                )
            estimate = estimate_input(call.body) if call.json is not None and call.path == "/v1/messages" else 0
            reservation = self.ledger.reserve(user_id, run, estimate, call.max_tokens)
        except GatewayError as exc:
            stats.refused += 1
            log.info("model call of %s refused: %s", user_id, exc.data.get("reason"))
            raise
        if reservation.max_tokens < call.max_tokens:
            call.notes.append(f"max_tokens {call.max_tokens} lowered to {reservation.max_tokens} (budget)")
            call.set_max_tokens(reservation.max_tokens)
        if call.notes:
            log.info("model call of %s: %s", user_id, "; ".join(call.notes))
        stats.calls += 1
        meter: UsageMeter | None = None
        self._in_flight[user_id] = self._in_flight.get(user_id, 0) + 1
        try:
            source = self._offline(call) if self.provider == "offline" else self._forward(call)
            async for status, headers, data in source:
                if meter is None:
                    meter = UsageMeter(dict(headers).get("content-type", ""))
                    if status >= 400:
                        stats.errors += 1
                    yield status, headers, b""
                meter.feed(data)
                yield None, [], data
            if meter is not None:
                meter.finish()
            yield None, [], None
        except GatewayError:
            stats.errors += 1
            raise
        finally:
            left = self._in_flight.pop(user_id) - 1
            if left:
                self._in_flight[user_id] = left
            self._settle(reservation, stats, meter)

    def _settle(self, reservation: Reservation, stats: UserStats, meter: UsageMeter | None) -> None:
        used_in, used_out = (meter.input_tokens, meter.output_tokens) if meter is not None else (0, 0)
        self.ledger.settle(reservation, used_in + used_out)
        stats.input_tokens += used_in
        stats.output_tokens += used_out

    # ------------------------------------------------------------------ checks

    def _parse(self, params: dict[str, Any]) -> Checked:
        """The call in ``params`` checked against the policy (the worker's ``run_id``, if any, is ignored)."""
        method, url, body_b64 = params.get("method"), params.get("url"), params.get("body_b64", "")
        if not isinstance(method, str) or not isinstance(url, str) or not isinstance(body_b64, str):
            raise refused("gateway.request needs method, url and body_b64 strings")
        path, query = self._route(url)
        if len(body_b64) > (self.config.max_body_bytes + 2) // 3 * 4:
            raise refused(f"request body larger than model.max_body_bytes ({self.config.max_body_bytes})", "body")
        try:
            body = base64.b64decode(body_b64, validate=True)
        except (binascii.Error, ValueError):
            raise refused("the request body is not base64 of a JSON object", "body") from None
        return self.policy.check(method, path, query, params.get("headers"), body)

    def _route(self, url: str) -> tuple[str, str]:
        """The API path of ``url`` (prefix removed) and its query, or GatewayError naming what is wrong."""
        parts = urlsplit(url)
        origin = (parts.scheme, parts.netloc.lower())
        path = parts.path
        if parts.hostname == GATEWAY_HOST and not parts.username and not parts.password:
            pass
        elif origin == self._base_origin and path.startswith(self._base_prefix + "/"):
            path = path[len(self._base_prefix):]
        else:
            raise refused(f"{parts.netloc or url!r} is not the model API; requests may only go to "
                          f"{GATEWAY_HOST} (the configured base URL)", "host")
        return path, parts.query

    # ------------------------------------------------------------------ backends

    async def _offline(self, call: Checked) -> AsyncIterator[tuple[int, list[tuple[str, str]], bytes]]:
        from sandbox_core.gateway import offline

        if call.method == "POST":
            reply = offline.respond(call.path, call.json)
        else:
            reply = offline.models(call.path, self.config.model)
        if not reply.chunks:
            yield reply.status, reply.headers, b""
        for chunk in reply.chunks:
            yield reply.status, reply.headers, chunk

    def _http(self) -> httpx2.AsyncClient:
        if self._client is None:
            timeout = httpx2.Timeout(self.config.request_timeout, connect=min(30.0, self.config.request_timeout))
            self._client = httpx2.AsyncClient(timeout=timeout, transport=self._transport, follow_redirects=False)
        return self._client

    def _http_failed(self, exc: Exception, what: str, reason: str, **data: Any) -> GatewayError:
        """A reason code for the worker; the exception's text (which can quote a header) to the host's log."""
        detail = Scrubber(str(self.config.api_key or "")).text(f"{type(exc).__name__}: {exc}")
        log.warning("model API call failed (%s): %s", reason, detail)
        return GatewayError(f"{what} (reason: {reason}; details are in the host's log)",
                            data={"reason": reason, **data})

    async def _forward(self, call: Checked) -> AsyncIterator[tuple[int, list[tuple[str, str]], bytes]]:
        key = str(self.config.api_key or "")
        url = self.config.base_url.rstrip("/") + call.path + (f"?{call.query}" if call.query else "")
        headers = [*call.headers, ("x-api-key", key), ("authorization", f"Bearer {key}")]
        client = self._http()
        try:
            request = client.build_request(call.method, url, headers=headers,
                                           content=call.final_body() if call.method == "POST" else None)
            response = await client.send(request, stream=True)
        except httpx2.TimeoutException as exc:
            raise self._http_failed(exc, "the model API timed out", "timeout", retryable=True) from None
        except (httpx2.HTTPError, httpx2.InvalidURL, ValueError) as exc:
            raise self._http_failed(exc, "cannot reach the model API", "unreachable", retryable=True) from None
        try:
            out_headers = [(k.lower(), v) for k, v in response.headers.multi_items() if k.lower() not in RESPONSE_DROP]
            yield response.status_code, out_headers, b""
            async for data in response.aiter_bytes():
                yield response.status_code, out_headers, data
        except httpx2.HTTPError as exc:
            raise self._http_failed(exc, "the model API stream broke", "stream_broken") from None
        finally:
            await response.aclose()
