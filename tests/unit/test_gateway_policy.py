"""The gateway's one policy, rule by rule, against the local Messages API (and the real SDK for the race)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anthropic
import httpx2
import pytest

from sandbox_core.config import ModelConfig, Secret, load_config
from sandbox_core.errors import ConfigError, GatewayError
from sandbox_core.gateway import ModelGateway, Scrubber
from sandbox_core.gateway.budget import estimate_input
from sandbox_core.inside.agent.transport import GatewayRefused, GatewayTransport
from sandbox_core.shared import GATEWAY_BASE_URL, PLACEHOLDER_API_KEY
from tests.helpers import wait_for
from tests.messages_server import MessagesServer, Recorded, Reply, json_reply, stream, text_reply

KEY = "sk-ant-policy-" + "0123456789abcdef0123"
BODY: dict[str, Any] = {"model": "claude-sonnet-5-5", "max_tokens": 64,
                        "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
URL = "http://gateway.sandbox/v1/messages"


def _params(body: Any = None, *, url: str = URL, method: str = "POST", headers: list[list[str]] | None = None,
            **extra: Any) -> dict[str, Any]:  # fmt: skip
    raw = b"" if body is False else json.dumps(BODY if body is None else body).encode()
    return {"method": method, "url": url, "headers": headers or [], "body_b64": base64.b64encode(raw).decode(),
            **extra}


async def _collect(gateway: ModelGateway, params: dict[str, Any], *, user: str = "u1",
                   run: str | None = None) -> tuple[dict[str, Any], bytes]:  # fmt: skip
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
async def real(server: MessagesServer) -> AsyncIterator[Make]:
    """Gateways to the local Messages API with the real key, closed when the test ends."""
    made: list[ModelGateway] = []

    def factory(**fields: Any) -> ModelGateway:
        made.append(ModelGateway(ModelConfig(provider="anthropic", api_key=Secret(KEY), base_url=server.url,
                                             **fields)))  # fmt: skip
        return made[-1]

    yield factory
    for gateway in made:
        await gateway.aclose()


# ---------------------------------------------------------------- headers


async def test_only_allowlisted_headers_reach_the_api(real: Make, server: MessagesServer) -> None:
    server.push(text_reply("ok"))
    sent = [
        ["x-http-method-override", "DELETE"], ["x-original-url", "/v1/files"], ["x-forwarded-host", "evil.example"],
        ["user-agent", "curl/8"], ["anthropic-workspace-id", "wrkspc_other"], ["anthropic-user-profile-id", "p"],
        ["x-api-key", "stolen"], ["authorization", "Bearer sandbox-gateway"], ["cookie", "a=b"],
        ["anthropic-version", "2023-06-01"], ["accept", "application/json"], ["content-type", "application/json"],
        ["anthropic-beta", "mcp-client-2025-04-04, prompt-caching-2024-07-31,files-api-2025-04-14"],
        ["x-stainless-lang", "python"], ["x-stainless-retry-count", "0"], ["x-stainless-os", "Linux\r\nx-evil: 1"],
    ]  # fmt: skip
    start, _ = await _collect(real(), _params(headers=sent))
    assert start["status"] == 200
    seen = server.requests[0].headers
    forwarded = set(seen) - {"host", "content-length", "accept-encoding", "connection", "x-api-key",
                             "authorization", "user-agent"}  # fmt: skip  (httpx's own and the real key)
    assert forwarded == {"anthropic-version", "accept", "content-type", "anthropic-beta", "x-stainless-lang",
                         "x-stainless-retry-count"}  # fmt: skip
    assert seen["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert seen["x-api-key"] == KEY and seen["authorization"] == f"Bearer {KEY}"
    assert "curl" not in seen.get("user-agent", "") and "x-evil" not in seen


async def test_allowed_betas_are_configurable(real: Make, server: MessagesServer) -> None:
    server.push(text_reply("ok"))
    gateway = real(allowed_betas=("my-beta-2026-01-01",))
    await _collect(gateway, _params(headers=[["anthropic-beta", "prompt-caching-2024-07-31,my-beta-2026-01-01"]]))
    assert server.requests[0].headers["anthropic-beta"] == "my-beta-2026-01-01"


# ---------------------------------------------------------------- bodies


SERVER_TOOLS = ["web_search_20250305", "web_fetch_20250910", "code_execution_20250825", "mcp_toolset",
                "advisor_20260301", "tool_search_tool_regex_20251119", "browser_toolset_20260801", "new_tool_20300101"]
CLIENT_TOOLS = [{"name": "t", "input_schema": {"type": "object"}},
                {"type": "custom", "name": "t", "input_schema": {"type": "object"}},
                {"type": "bash_20250124", "name": "bash"},
                {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
                {"type": "computer_20251124", "name": "computer", "display_width_px": 1, "display_height_px": 1},
                {"type": "memory_20250818", "name": "memory"}]  # fmt: skip


@pytest.mark.parametrize(("extra", "reason", "setting"), [
    ({"mcp_servers": [{"type": "url", "url": "https://evil.example/mcp", "name": "x"}]}, "mcp_servers",
     "allow_mcp_servers"),
    ({"container": "container_011CZ"}, "container", "allow_container"),
    ({"thread": {"type": "continue", "previous_message_id": "msg_other_user"}}, "field", "extra_body_fields"),
    ({"fallbacks": ["claude-opus-9"]}, "field", "extra_body_fields"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url",
                                                  "url": "http://169.254.169.254/"}}]}]}, "remote_source",
     "allow_remote_sources"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "document", "source": {"type": "file", "file_id": "file_of_another_user"}}]}]}]}, "remote_source",
     "allow_remote_sources"),
    ({"model": "gpt-5"}, "model", "allowed_models"),
    ({"max_tokens": "lots"}, "max_tokens", None),
])  # fmt: skip
async def test_refused_bodies_never_reach_the_api(
    real: Make, server: MessagesServer, extra: dict[str, Any], reason: str, setting: str | None
) -> None:
    gateway = real()
    with pytest.raises(GatewayError) as caught:
        await _collect(gateway, _params({**BODY, **extra}))
    assert caught.value.data["reason"] == reason
    if setting is not None:
        assert f"model.{setting}" in caught.value.message
    assert server.requests == [] and gateway.stats()["u1"]["refused"] == 1


@pytest.mark.parametrize("kind", SERVER_TOOLS)
async def test_server_side_tools_are_refused_unless_allowed(real: Make, server: MessagesServer, kind: str) -> None:
    body = {**BODY, "tools": [{"type": kind, "name": "x"}]}
    with pytest.raises(GatewayError, match="runs at the provider") as caught:
        await _collect(real(), _params(body))
    assert caught.value.data["reason"] == "server_tool" and server.requests == []
    server.push(text_reply("ok"))
    await _collect(real(allow_server_tools=True), _params(body))
    assert server.requests[0].body["tools"][0]["type"] == kind


async def test_client_tools_and_operator_switches_pass(real: Make, server: MessagesServer) -> None:
    server.push(text_reply("a"), text_reply("b"), text_reply("c"))
    await _collect(real(), _params({**BODY, "tools": CLIENT_TOOLS}))
    assert server.requests[0].body["tools"] == CLIENT_TOOLS
    mcp = {**BODY, "mcp_servers": [{"type": "url", "url": "https://mcp.example/", "name": "m"}], "container": "c1"}
    await _collect(real(allow_mcp_servers=True, allow_container=True), _params(mcp))
    assert server.requests[1].body == mcp
    await _collect(real(extra_body_fields=("speed",)), _params({**BODY, "speed": "fast"}))
    assert server.requests[2].body["speed"] == "fast"


async def test_model_allowlist_is_globs(real: Make, server: MessagesServer) -> None:
    server.push(text_reply("ok"))
    gateway = real(allowed_models=("claude-haiku-*",))
    with pytest.raises(GatewayError, match=r"model 'claude-sonnet-5-5' is not allowed \(model.allowed_models"):
        await _collect(gateway, _params())
    await _collect(gateway, _params({**BODY, "model": "claude-haiku-5-1"}))
    assert len(server.requests) == 1


async def test_max_tokens_is_clamped(real: Make, server: MessagesServer, caplog: pytest.LogCaptureFixture) -> None:
    server.push(text_reply("ok"), text_reply("ok"))
    gateway = real(max_tokens_limit=1000)
    with caplog.at_level(logging.INFO, "sandbox_core.gateway"):
        await _collect(gateway, _params({**BODY, "max_tokens": 1_000_000}))
    await _collect(gateway, _params({**BODY, "max_tokens": 10}))
    assert [r.body["max_tokens"] for r in server.requests] == [1000, 10]
    assert server.requests[0].body["messages"] == BODY["messages"]
    assert "max_tokens 1000000 clamped to 1000" in caplog.text
    with pytest.raises(GatewayError, match="max_tokens must be a positive integer"):
        await _collect(gateway, _params({k: v for k, v in BODY.items() if k != "max_tokens"}))


async def test_models_endpoints_and_their_methods() -> None:
    gateway = ModelGateway(ModelConfig(provider="offline"))
    start, body = await _collect(gateway, _params(False, url="http://gateway.sandbox/v1/models?limit=5",
                                                  method="GET"))  # fmt: skip
    assert start["status"] == 200 and json.loads(body)["data"][0]["id"] == "claude-sonnet-5-5"
    start, _ = await _collect(gateway, _params(False, url="http://gateway.sandbox/v1/models/claude-sonnet-5-5",
                                               method="GET"))  # fmt: skip
    assert start["status"] == 200
    for url, method, reason in [("/v1/models", "POST", "method"), ("/v1/models?limit=5&limit=6", "GET", "query"),
                                ("/v1/models/../files", "GET", "path"), ("/v1/files", "GET", "path"),
                                ("/v1/messages", "PUT", "method")]:  # fmt: skip
        with pytest.raises(GatewayError) as caught:
            await _collect(gateway, _params(False, url="http://gateway.sandbox" + url, method=method))
        assert caught.value.data["reason"] == reason, url


# ---------------------------------------------------------------- runs and budgets


async def test_the_run_is_the_hosts_and_the_workers_claim_is_ignored(real: Make, server: MessagesServer) -> None:
    server.push(*(text_reply("x", input_tokens=10, output_tokens=5) for _ in range(3)))
    body = {**BODY, "max_tokens": 100}
    estimate = estimate_input(json.dumps(body).encode())
    gateway = real(request_token_budget=45 + estimate)
    await _collect(gateway, _params(body, run_id="claimed-fresh-1"), run="host-run-A")
    await _collect(gateway, _params(body, run_id="claimed-fresh-2"), run="host-run-A")
    assert gateway.ledger.used("u1", "host-run-A") == (30, 0)
    assert gateway.ledger.used("u1", "claimed-fresh-1") == (0, 0)
    await _collect(gateway, _params(body, run_id="claimed-fresh-3"), run="host-run-A")
    with pytest.raises(GatewayError, match="request_token_budget"):
        await _collect(gateway, _params(body, run_id="another"), run="host-run-A")
    assert [r.body["max_tokens"] for r in server.requests] == [45, 30, 15]  # what was left of the run


async def test_concurrent_calls_cannot_overshoot_the_user_budget(real: Make, server: MessagesServer) -> None:
    """20 calls at once through the real SDK under a 5,000-token budget: what is metered stays under it."""

    def worst_case(recorded: Recorded) -> Reply:  # every call uses all of its max_tokens
        usage = {"input_tokens": 10, "output_tokens": recorded.body["max_tokens"]}
        reply = json_reply({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-5-5",
                            "content": [{"type": "text", "text": "x"}], "stop_reason": "max_tokens",
                            "stop_sequence": None, "usage": usage})  # fmt: skip
        reply.hold_at = 0  # nothing is answered before every call has been forwarded or refused
        return reply

    server.push(*([worst_case] * 20))
    gateway = real(user_token_budget=5000)

    def call_host(method: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return gateway.handle("u1", params, run=None)

    http = httpx2.AsyncClient(transport=GatewayTransport(call_host))
    client = anthropic.AsyncAnthropic(api_key=PLACEHOLDER_API_KEY, base_url=GATEWAY_BASE_URL, max_retries=0,
                                      http_client=http)
    calls = [asyncio.ensure_future(client.messages.create(model="claude-sonnet-5-5", max_tokens=1000,
                                                          messages=[{"role": "user", "content": "hi"}]))
             for _ in range(20)]  # fmt: skip
    def decided() -> bool:
        return len(server.requests) + gateway.stats().get("u1", {}).get("refused", 0) == 20

    await wait_for(decided, 10, "every call forwarded or refused")
    server.release()
    results = await asyncio.gather(*calls, return_exceptions=True)
    await client.close()
    answered = [r for r in results if isinstance(r, anthropic.types.Message)]
    refused = [r for r in results if isinstance(r, GatewayRefused)]
    stats = gateway.stats()["u1"]
    assert len(answered) + len(refused) == 20 and 1 <= len(answered) <= 5 and refused
    assert {r.error.data["reason"] for r in refused} == {"user_budget"}
    assert stats["input_tokens"] + stats["output_tokens"] <= 5000
    assert gateway.ledger.used("u1") == (stats["input_tokens"] + stats["output_tokens"], 0)


# ---------------------------------------------------------------- the key


@pytest.mark.parametrize("bad", [KEY + "\n", KEY + "\r\n", " " + KEY, KEY[:10] + "\t" + KEY[10:], KEY + "\x00"])
def test_a_key_with_whitespace_or_control_characters_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"ANTHROPIC_API_KEY": bad, "XDG_CONFIG_HOME": "/nonexistent"})
    assert caught.value.data.get("field", "model.api_key") == "model.api_key"
    assert KEY not in str(caught.value) and KEY[:12] not in str(caught.value.to_wire())
    with pytest.raises(ConfigError, match="printable ASCII"):
        ModelConfig(api_key=Secret(bad))


async def test_http_layer_text_stays_on_the_host(caplog: pytest.LogCaptureFixture) -> None:
    def explode(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.LocalProtocolError(f"Illegal header value b'{KEY} '")

    gateway = ModelGateway(ModelConfig(provider="anthropic", api_key=Secret(KEY)),
                           transport=httpx2.MockTransport(explode))  # fmt: skip
    with caplog.at_level(logging.WARNING, "sandbox_core.gateway"), pytest.raises(GatewayError) as caught:
        await _collect(gateway, _params())
    wire = json.dumps(caught.value.to_wire())
    assert caught.value.data["reason"] == "unreachable" and "Illegal header" not in wire and KEY not in wire
    assert "Illegal header value" in caplog.text and KEY not in caplog.text and "[redacted]" in caplog.text
    await gateway.aclose()


async def test_the_key_is_scrubbed_from_everything_sent_to_the_worker(real: Make, server: MessagesServer) -> None:
    half = len(KEY) // 2
    echo = [f'{{"type":"error","error":{{"type":"authentication_error","message":"bad key {KEY[:half]}'.encode(),
            f'{KEY[half:]} and again {KEY}"}}}}'.encode()]  # fmt: skip
    server.push(Reply(401, [("content-type", "application/json"), ("x-echo", f"key={KEY}")], echo, chunked=True),
                stream([b"data: " + KEY[:5].encode(), KEY[5:].encode() + b"\n\n"]))  # fmt: skip
    chunks = [c async for c in real().handle("u1", _params(), run="r")]
    everything = json.dumps(chunks) + b"".join(base64.b64decode(c["data_b64"]) for c in chunks[1:]).decode()
    assert KEY not in everything and everything.count("[redacted]") == 3
    body = b"".join(base64.b64decode(c["data_b64"]) for c in chunks[1:])
    assert json.loads(body)["error"]["message"] == "bad key [redacted] and again [redacted]"
    _, streamed = await _collect(real(), _params())
    assert streamed == b"data: [redacted]\n\n"


def test_scrubber_holds_back_only_a_possible_start_of_the_key() -> None:
    scrub = Scrubber("sk-secret")
    assert scrub.feed(b"event: x\n\n") == b"event: x\n\n"  # nothing held: SSE is not delayed
    assert scrub.feed(b"abc sk-se") == b"abc "
    assert scrub.feed(b"cret!") == b"[redacted]!"
    assert scrub.feed(b"sk") == b"" and scrub.flush() == b"sk"
    assert Scrubber(None).feed(b"sk-secret") == b"sk-secret"


async def test_json_replies_are_metered_and_refusals_counted(real: Make, server: MessagesServer) -> None:
    message: dict[str, Any] = {"id": "m", "type": "message", "role": "assistant", "model": "x", "content": [],
               "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 7, "output_tokens": 3}}
    server.push(json_reply(message))
    gateway = real()
    await _collect(gateway, _params())
    assert gateway.stats()["u1"]["input_tokens"] == 7 and gateway.ledger.used("u1") == (10, 0)


async def test_the_agent_runtimes_sdk_retries_a_busy_gateway(real: Make, server: MessagesServer) -> None:
    """Over model.max_user_calls, the agent runtime's transport makes the SDK retry (a connection
    failure to it), and the call gets through once the call in flight ended."""
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-5-5",
               "content": [{"type": "text", "text": "x"}], "stop_reason": "end_turn", "stop_sequence": None,
               "usage": {"input_tokens": 1, "output_tokens": 1}}  # fmt: skip
    held = json_reply(message)
    held.hold_at = 0
    server.push(held, json_reply(message))
    gateway = real(max_user_calls=1)

    def call_host(method: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return gateway.handle("u1", params, run=None)

    http = httpx2.AsyncClient(transport=GatewayTransport(call_host))
    client = anthropic.AsyncAnthropic(api_key=PLACEHOLDER_API_KEY, base_url=GATEWAY_BASE_URL, max_retries=5,
                                      http_client=http)
    def ask() -> Any:
        return client.messages.create(model="claude-sonnet-5-5", max_tokens=10,
                                      messages=[{"role": "user", "content": "hi"}])

    first = asyncio.ensure_future(ask())
    await wait_for(lambda: len(server.requests) == 1, 10, "the first call forwarded")
    second = asyncio.ensure_future(ask())
    await wait_for(lambda: gateway.stats()["u1"]["refused"] >= 1, 10, "the second call refused as overloaded")
    server.release()
    results = await asyncio.gather(first, second)
    await client.close()
    assert [r.content[0].text for r in results] == ["x", "x"]
    assert len(server.requests) == 2
