"""The offline model answers the Messages API wire format, as parsed by the real SDK."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic import AsyncAnthropic

from sandbox_core.config import ModelConfig
from sandbox_core.gateway import ModelGateway, offline
from sandbox_core.inside.agent.transport import GatewayTransport
from sandbox_core.shared import GATEWAY_BASE_URL, PLACEHOLDER_API_KEY

MODEL = "claude-sonnet-5-5"
BASH = {"name": "bash", "description": "run", "input_schema": {"type": "object"}}
READ = {"name": "read", "description": "read", "input_schema": {"type": "object"}}
WRITE = {"name": "write", "description": "write", "input_schema": {"type": "object"}}


def _handler(request: httpx2.Request) -> httpx2.Response:
    reply = offline.respond(request.url.path, json.loads(request.content))
    return httpx2.Response(reply.status, headers=reply.headers, content=b"".join(reply.chunks))


def _client() -> AsyncAnthropic:
    return AsyncAnthropic(api_key="x", base_url="http://offline.test", max_retries=0,
                          http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(_handler)))


async def test_stream_parses_with_the_sdk_and_calls_bash() -> None:
    client = _client()
    texts: list[str] = []
    async with client.beta.messages.stream(
        model=MODEL, max_tokens=500, tools=[BASH],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "run: ls -la\nand also `echo hi`"}],
    ) as stream:
        async for event in stream:
            if event.type == "text":
                texts.append(event.text)
        message = await stream.get_final_message()
    assert message.stop_reason == "tool_use"
    assert len(texts) > 1, "text arrives as several deltas"
    uses = [b for b in message.content if b.type == "tool_use"]
    assert [(u.name, u.input) for u in uses] == [("bash", {"command": "ls -la"}), ("bash", {"command": "echo hi"})]
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert "ls -la" in "".join(texts)
    await client.close()


async def test_json_reply_parses() -> None:
    client = _client()
    message = await client.messages.create(
        model=MODEL, max_tokens=500, tools=[READ],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "read: notes.txt"}],
    )
    assert message.stop_reason == "tool_use"
    calls = [(b.name, b.input) for b in message.content if b.type == "tool_use"]
    assert calls == [("read", {"file_path": "notes.txt"})]
    await client.close()


async def test_tool_results_are_summarised_with_their_real_output() -> None:
    client = _client()
    long_output = "line\n" * 1000
    message = await client.messages.create(
        model=MODEL, max_tokens=4000, tools=[BASH],  # type: ignore[list-item]
        messages=[
            {"role": "user", "content": "run: ls"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t1", "name": "bash", "input": {"command": "ls"}},
                {"type": "tool_use", "id": "t2", "name": "bash", "input": {"command": "x"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "alpha.txt\nbeta.txt"},
                {"type": "tool_result", "tool_use_id": "t2", "content": [{"type": "text", "text": long_output}],
                 "is_error": True},
            ]},
        ],
    )
    assert message.stop_reason == "end_turn"
    text = "".join(b.text for b in message.content if b.type == "text")
    assert "alpha.txt\nbeta.txt" in text and "`ls` succeeded" in text and "`x` failed" in text
    assert "more characters]" in text and len(text) < 3000


def test_directives_fences_and_offered_tools() -> None:
    prompt = (
        "run: echo one\n"
        "write: out/a.txt\n```\nhello `not a command`\n```\n"
        "```\nrm -rf `never`\n```\n"
        "read: out/a.txt\nglob: **/*.txt\ngrep: hel+o\n"
    )
    body = {"model": MODEL, "max_tokens": 1000, "messages": [{"role": "user", "content": prompt}],
            "tools": [BASH, READ, WRITE]}
    message = json.loads(offline.respond("/v1/messages", body).chunks[0])
    calls = [(b["name"], b["input"]) for b in message["content"] if b["type"] == "tool_use"]
    assert calls == [
        ("bash", {"command": "echo one"}),
        ("write", {"file_path": "out/a.txt", "content": "hello `not a command`\n"}),
        ("read", {"file_path": "out/a.txt"}),
    ]
    text = message["content"][0]["text"]
    assert "Skipped, the glob tool is not enabled" in text and "Skipped, the grep tool" in text


def test_same_request_same_bytes_and_no_directive_help() -> None:
    body = {"model": MODEL, "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": "hello"}]}
    first, second = offline.respond("/v1/messages", body), offline.respond("/v1/messages", body)
    assert first.chunks == second.chunks
    text = b"".join(first.chunks).decode()
    assert "event: message_start" in text and "event: message_stop" in text and "run: CMD" in text


def test_count_tokens_max_tokens_and_bad_requests() -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 400}]}
    counted = json.loads(offline.respond("/v1/messages/count_tokens", body).chunks[0])
    assert counted["input_tokens"] >= 100
    cut = json.loads(offline.respond("/v1/messages", {**body, "max_tokens": 2}).chunks[0])
    assert cut["stop_reason"] == "max_tokens" and cut["usage"]["output_tokens"] == 2
    bad = offline.respond("/v1/messages", {"model": MODEL})
    assert bad.status == 400 and json.loads(bad.chunks[0])["error"]["type"] == "invalid_request_error"


async def test_bad_request_is_a_typed_sdk_error() -> None:
    client = _client()
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.create(model=MODEL, max_tokens=10, messages=[])  # the API needs at least one
    await client.close()


async def test_through_the_gateway_and_transport() -> None:
    gateway = ModelGateway(ModelConfig(provider="offline"))

    def call_host(method: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        assert method == "gateway.request"
        return gateway.handle("ann", params)

    client = AsyncAnthropic(api_key=PLACEHOLDER_API_KEY, base_url=GATEWAY_BASE_URL,
                            http_client=httpx2.AsyncClient(transport=GatewayTransport(call_host), trust_env=False))
    async with client.beta.messages.stream(
        model=MODEL, max_tokens=500, tools=[BASH],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "run: uname -a"}],
    ) as stream:
        message = await stream.get_final_message()
    assert [b.input for b in message.content if b.type == "tool_use"] == [{"command": "uname -a"}]
    stats = gateway.stats()["ann"]
    assert stats["calls"] == 1 and stats["input_tokens"] == message.usage.input_tokens
    assert stats["output_tokens"] == message.usage.output_tokens
    await client.close()
