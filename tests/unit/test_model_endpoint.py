"""The model endpoint's HTTP side in process, over real loopback sockets, with the gateway as its host."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sandbox_core.config import ModelConfig
from sandbox_core.gateway import ModelGateway
from sandbox_core.inside.model_endpoint import ModelEndpoint
from tests.helpers import wait_for

BODY = json.dumps({"model": "claude-sonnet-5-5", "max_tokens": 64, "stream": True,
                   "messages": [{"role": "user", "content": "hello"}]}).encode()  # fmt: skip


class Host:
    """The gateway as the endpoint's ``call_host``, recording each call and whether it was closed early."""

    def __init__(self, **model: Any) -> None:
        self.gateway = ModelGateway(ModelConfig(provider="offline", **model))
        self.calls: list[dict[str, Any]] = []
        self.closed_early = 0

    async def call_host(self, method: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.calls.append(params)
        finished = False
        try:
            async for chunk in self.gateway.handle("u1", params, run="r"):
                yield chunk
            finished = True
        finally:
            self.closed_early += not finished


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[Host, int]]:
    host = Host()
    server = ModelEndpoint(host.call_host, max_body=4096)
    await server.start("127.0.0.1", 0)
    assert server._server is not None
    port = server._server.sockets[0].getsockname()[1]
    yield host, port
    await server.close()


async def _exchange(port: int, raw: bytes, *, read_all: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10) if read_all else await reader.readuntil(b"\r\n\r\n")
    writer.close()
    return data


def _post(body: bytes = BODY, extra: str = "", version: str = "HTTP/1.1") -> bytes:
    head = (f"POST /v1/messages {version}\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n")  # fmt: skip
    return head.encode() + body


async def test_streams_sse_in_http_chunks(endpoint: tuple[Host, int]) -> None:
    host, port = endpoint
    answer = await _exchange(port, _post())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"transfer-encoding: chunked" in head
    assert b"event: message_start" in body and body.endswith(b"0\r\n\r\n")
    assert host.calls[0]["url"] == "http://gateway.sandbox/v1/messages"
    assert "host" not in {k for k, _ in host.calls[0]["headers"]}


async def test_http10_chunked_uploads_and_expect_continue(endpoint: tuple[Host, int]) -> None:
    host, port = endpoint
    answer = await _exchange(port, _post(version="HTTP/1.0"))
    assert answer.startswith(b"HTTP/1.0 200") and b"connection: close" in answer and b"message_stop" in answer
    chunked = (b"POST /v1/messages HTTP/1.1\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
               + b"%x\r\n%b\r\n" % (10, BODY[:10]) + b"%x\r\n%b\r\n" % (len(BODY) - 10, BODY[10:]) + b"0\r\n\r\n")
    assert (await _exchange(port, chunked)).startswith(b"HTTP/1.1 200")
    absolute = _post().replace(b"POST /v1/messages", b"POST http://127.0.0.1:8765/v1/messages?beta=true")
    assert (await _exchange(port, absolute)).startswith(b"HTTP/1.1 200")
    assert host.calls[-1]["url"] == "http://gateway.sandbox/v1/messages?beta=true"
    answer = await _exchange(port, _post(extra="expect: 100-continue\r\n"))
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200")


async def test_bad_requests_get_http_errors(endpoint: tuple[Host, int]) -> None:
    host, port = endpoint
    assert (await _exchange(port, b"NONSENSE\r\n\r\n")).startswith(b"HTTP/1.1 400")
    assert (await _exchange(port, _post(b"x" * 5000))).startswith(b"HTTP/1.1 413")
    assert (await _exchange(port, b"GET / HTTP/1.1\r\n" + b"x-a: b\r\n" * 5000 + b"\r\n")).startswith(b"HTTP/1.1 400")
    refused = await _exchange(port, _post(json.dumps({**json.loads(BODY), "container": "c"}).encode()))
    assert refused.startswith(b"HTTP/1.1 403") and b"x-sandbox-gateway-reason: container" in refused
    assert json.loads(refused.partition(b"\r\n\r\n")[2])["error"]["type"] == "permission_error"
    missing = await _exchange(port, b"GET /v1/files HTTP/1.1\r\nconnection: close\r\n\r\n")
    assert missing.startswith(b"HTTP/1.1 404") and b"x-should-retry: false" in missing
    assert len(host.calls) == 2  # the malformed ones never reached the host


async def test_keep_alive_carries_several_requests(endpoint: tuple[Host, int]) -> None:
    host, port = endpoint
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    one = _post().replace(b"connection: close\r\n", b"")
    writer.write(one + one)
    await writer.drain()
    seen = b""
    while seen.count(b"0\r\n\r\n") < 2:
        seen += await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    assert seen.count(b"HTTP/1.1 200 OK") == 2 and len(host.calls) == 2


async def test_a_client_that_goes_away_ends_its_host_call(endpoint: tuple[Host, int]) -> None:
    host, port = endpoint
    gate = asyncio.Event()

    async def slow(method: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        try:
            yield {"kind": "start", "status": 200, "headers": [["content-type", "text/event-stream"]]}
            await gate.wait()
            yield {"kind": "body", "data_b64": ""}
        finally:
            host.closed_early += 1

    server = ModelEndpoint(slow)
    await server.start("127.0.0.1", 0)
    assert server._server is not None
    port = server._server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_post())
    await reader.readuntil(b"\r\n\r\n")
    writer.transport.abort()
    await wait_for(lambda: not server._connections or host.closed_early > 0, 5, "connection noticed gone")
    await server.close()  # a connection still waiting on the host is cancelled; its call closed
    assert host.closed_early == 1
