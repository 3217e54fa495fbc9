"""ModelGateway: what it refuses, what it forwards, how it meters (against a local Messages API)."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from sandbox_core.config import ModelConfig, Secret
from sandbox_core.errors import GatewayError
from sandbox_core.gateway import ModelGateway, resolve_provider
from sandbox_core.gateway.budget import estimate_input
from tests.messages_server import MessagesServer, error, json_reply, text_reply

KEY = "sk-ant-real-" + "0123456789abcdef"
BODY = {"model": "claude-sonnet-5-5", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def _params(url: str = "http://gateway.sandbox/v1/messages", *, body: Any = None, method: str = "POST",
            headers: list[list[str]] | None = None) -> dict[str, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(BODY if body is None else body).encode()
    return {"method": method, "url": url, "headers": headers or [], "body_b64": base64.b64encode(raw).decode()}


async def _collect(
    gateway: ModelGateway, params: dict[str, Any], user: str = "u1", run: str | None = None
) -> tuple[dict[str, Any], bytes]:
    start: dict[str, Any] = {}
    body = b""
    async for chunk in gateway.handle(user, params, run=run):
        if chunk["kind"] == "start":
            start = chunk
        else:
            body += base64.b64decode(chunk["data_b64"])
    return start, body


@pytest.fixture
def server() -> Iterator[MessagesServer]:
    with MessagesServer() as srv:
        yield srv


Make = Callable[..., ModelGateway]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """Gateways that are closed (with their HTTP connections) when the test ends."""
    made: list[ModelGateway] = []

    def factory(**fields: Any) -> ModelGateway:
        made.append(ModelGateway(ModelConfig(**fields)))
        return made[-1]

    yield factory
    for gateway in made:
        await gateway.aclose()


def _real(make: Make, server: MessagesServer, **changes: Any) -> ModelGateway:
    return make(provider="anthropic", api_key=Secret(KEY), base_url=server.url, **changes)


@pytest.mark.parametrize("url", [
    "http://evil.example/v1/messages",
    "http://gateway.sandbox.evil.example/v1/messages",
    "http://user:pw@gateway.sandbox/v1/messages",
    "http://127.0.0.1:9/v1/messages",
    "file:///etc/passwd",
])
async def test_refuses_other_hosts(url: str) -> None:
    gateway = ModelGateway(ModelConfig(provider="offline"))
    with pytest.raises(GatewayError, match="is not the model API"):
        await _collect(gateway, _params(url))
    assert gateway.stats()["u1"]["refused"] == 1 and gateway.stats()["u1"]["calls"] == 0


@pytest.mark.parametrize(("url", "method", "why"), [
    ("http://gateway.sandbox/v1/models", "POST", "only GET"),
    ("http://gateway.sandbox/v1/files", "POST", "not a Messages API endpoint"),
    ("http://gateway.sandbox/v1/messages/batches", "POST", "not a Messages API endpoint"),
    ("http://gateway.sandbox/v1/messages/../files", "POST", "not a Messages API endpoint"),
    ("http://gateway.sandbox/v1/messages?x=1", "POST", "query"),
    ("http://gateway.sandbox/v1/messages", "GET", "only POST"),
])
async def test_refuses_other_paths_queries_and_methods(url: str, method: str, why: str) -> None:
    with pytest.raises(GatewayError, match=why):
        await _collect(ModelGateway(ModelConfig(provider="offline")), _params(url, method=method))


async def test_refuses_oversized_and_non_json_bodies() -> None:
    gateway = ModelGateway(ModelConfig(provider="offline", max_body_bytes=1024))
    big = {**BODY, "messages": [{"role": "user", "content": "x" * 2000}]}
    with pytest.raises(GatewayError, match="max_body_bytes"):
        await _collect(gateway, _params(body=big))
    with pytest.raises(GatewayError, match="JSON object"):
        await _collect(gateway, _params(body=b"not json"))
    start, _ = await _collect(gateway, _params("http://gateway.sandbox/v1/messages?beta=true"))
    assert start["status"] == 200


async def test_real_key_replaces_worker_credentials(make: Make, server: MessagesServer) -> None:
    server.push(text_reply("hello"))
    worker_headers = [
        ["authorization", "Bearer sandbox-gateway"], ["x-api-key", "stolen"], ["cookie", "a=b"],
        ["proxy-authorization", "Basic eA=="], ["anthropic-version", "2023-06-01"],
        ["anthropic-beta", "b1, prompt-caching-2024-07-31"],
        ["host", "gateway.sandbox"], ["content-length", "999999"],
    ]
    start, body = await _collect(_real(make, server), _params(headers=worker_headers))
    assert start["status"] == 200 and b"event: message_stop" in body
    seen = server.requests[0]
    assert seen.path == "/v1/messages" and seen.method == "POST" and seen.body == BODY
    assert seen.headers["x-api-key"] == KEY and seen.headers["authorization"] == f"Bearer {KEY}"
    assert "cookie" not in seen.headers and "proxy-authorization" not in seen.headers
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert "sandbox-gateway" not in json.dumps(seen.headers) and "stolen" not in json.dumps(seen.headers)


async def test_base_url_path_prefix(make: Make, server: MessagesServer) -> None:
    server.push(text_reply("a"), text_reply("b"))
    gateway = make(provider="anthropic", api_key=Secret(KEY), base_url=server.url + "/proxy/")
    await _collect(gateway, _params())
    await _collect(gateway, _params(server.url + "/proxy/v1/messages/count_tokens"))
    assert [r.path for r in server.requests] == ["/proxy/v1/messages", "/proxy/v1/messages/count_tokens"]
    with pytest.raises(GatewayError, match="not the model API"):
        await _collect(gateway, _params(server.url + "/v1/messages"))


async def test_body_streams_back_as_it_arrives(make: Make, server: MessagesServer) -> None:
    reply = text_reply("one two three")
    reply.hold_at = 3  # message_start, ping, content_block_start go out; the rest waits
    server.push(reply)
    gateway = _real(make, server)
    seen = b""
    released = False
    async for chunk in gateway.handle("u1", _params()):
        if chunk["kind"] == "body":
            seen += base64.b64decode(chunk["data_b64"])
            if b"content_block_start" in seen and not released:
                assert b"text_delta" not in seen  # the server has not sent it yet
                server.release()
                released = True
    assert released and seen.count(b"text_delta") == 3 and seen.endswith(b"event: message_stop\ndata: "
                                                                          b'{"type": "message_stop"}\n\n')
    stats = gateway.stats()["u1"]
    assert (stats["calls"], stats["input_tokens"], stats["output_tokens"], stats["errors"]) == (1, 10, 5, 0)


async def test_json_usage_and_error_statuses_pass_through(make: Make, server: MessagesServer) -> None:
    message: dict[str, Any] = {"id": "m", "type": "message", "role": "assistant", "model": "x", "content": [],
               "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 7, "output_tokens": 3,
                                                                           "cache_read_input_tokens": 2}}
    server.push(json_reply(message), error(429, "rate_limit_error", "slow down", [("retry-after", "3")]),
                error(529, "overloaded_error", "Overloaded"))
    gateway = _real(make, server)
    await _collect(gateway, _params(body={**BODY, "stream": False}))
    start, body = await _collect(gateway, _params())
    assert start["status"] == 429 and ["retry-after", "3"] in start["headers"]
    start, body = await _collect(gateway, _params())
    assert start["status"] == 529 and json.loads(body)["error"]["type"] == "overloaded_error"
    assert gateway.stats()["u1"] == {"calls": 3, "refused": 0, "errors": 2, "input_tokens": 9, "output_tokens": 3}


async def test_stream_cut_midway_is_a_gateway_error(make: Make, server: MessagesServer) -> None:
    reply = text_reply("one two three")
    reply.cut_after = 4
    server.push(reply)
    gateway = _real(make, server)
    with pytest.raises(GatewayError, match="stream broke") as caught:
        await _collect(gateway, _params())
    assert caught.value.data["reason"] == "stream_broken"
    assert gateway.stats()["u1"]["errors"] == 1 and gateway.stats()["u1"]["input_tokens"] == 10


async def test_unreachable_api_is_retryable(make: Make) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gateway = make(provider="anthropic", api_key=Secret(KEY), base_url=f"http://127.0.0.1:{port}")
    with pytest.raises(GatewayError, match="cannot reach") as caught:
        await _collect(gateway, _params())
    assert caught.value.data["retryable"] is True and KEY not in caught.value.message


async def test_user_and_run_budgets(make: Make, server: MessagesServer) -> None:
    """Each call books its input estimate + max_tokens; what it really used is settled after."""
    body = {**BODY, "max_tokens": 20}
    estimate = estimate_input(json.dumps(body).encode())
    server.push(*(text_reply("x", input_tokens=10, output_tokens=5) for _ in range(4)))
    gateway = _real(make, server, user_token_budget=45 + estimate, request_token_budget=15 + estimate)
    await _collect(gateway, _params(body=body), run="r1")  # only 15 output tokens fit: max_tokens lowered
    assert server.requests[0].body["max_tokens"] == 15
    with pytest.raises(GatewayError, match="request_token_budget") as caught:
        await _collect(gateway, _params(body=body), run="r1")
    assert caught.value.data == {"reason": "request_budget", "used": 15, "reserved": 0}
    await _collect(gateway, _params(body=body), run="r2")
    await _collect(gateway, _params(body=body))
    with pytest.raises(GatewayError, match="user_token_budget"):
        await _collect(gateway, _params(body=body), run="r3")
    await _collect(gateway, _params(body=body), user="u2")  # budgets are per user
    assert gateway.stats()["u1"]["refused"] == 2 and len(server.requests) == 4
    assert gateway.ledger.used("u1") == (45, 0)
    assert [r.body["max_tokens"] for r in server.requests] == [15, 15, 15, 15]


async def test_missing_key_says_how_to_set_it() -> None:
    gateway = ModelGateway(ModelConfig(provider="anthropic"))
    with pytest.raises(GatewayError, match=r"ANTHROPIC_API_KEY.*model\.api_key") as caught:
        await _collect(gateway, _params())
    assert caught.value.data["reason"] == "no_api_key"


def test_provider_resolution() -> None:
    assert resolve_provider(ModelConfig()) == "offline"
    assert resolve_provider(ModelConfig(api_key=Secret("k"))) == "anthropic"
    assert resolve_provider(ModelConfig(provider="offline", api_key=Secret("k"))) == "offline"
    assert ModelGateway(ModelConfig(provider="anthropic")).provider == "anthropic"


async def test_calls_over_max_user_calls_are_refused_as_overloaded_until_one_ends() -> None:
    gateway = ModelGateway(ModelConfig(provider="offline", max_user_calls=1))
    first = gateway.handle("u1", _params())
    assert (await anext(first))["kind"] == "start"  # in flight
    with pytest.raises(GatewayError) as info:
        await _collect(gateway, _params())
    assert info.value.data == {"reason": "overloaded", "retry_after": 1, "retryable": True}
    assert "model.max_user_calls" in info.value.message
    start, _ = await _collect(gateway, _params(), user="u2")  # another user's calls are their own
    assert start["status"] == 200
    async for _chunk in first:
        pass
    start, _ = await _collect(gateway, _params())
    assert start["status"] == 200
    assert gateway.stats()["u1"]["refused"] == 1
