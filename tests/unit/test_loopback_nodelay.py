"""Loopback TCP in the sandbox answers without Nagle's delay (TCP_NODELAY on the server side).

A model call through the in-sandbox model endpoint once cost ~44 ms instead of ~1 ms: a
reply written in pieces waited for the client's delayed ACK. asyncio sets TCP_NODELAY on
every TCP transport it makes; this pins that for the endpoint's accepted connections, so a
move to raw sockets cannot bring the delay back unnoticed.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sandbox_core.inside.model_endpoint import ModelEndpoint


async def _no_host(method: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    nothing: tuple[dict[str, Any], ...] = ()  # never called: the request below is refused first
    for chunk in nothing:
        yield chunk


async def test_model_endpoint_connections_have_tcp_nodelay(monkeypatch: pytest.MonkeyPatch) -> None:
    server = ModelEndpoint(_no_host)
    flags: list[int] = []
    accept = server._accept

    async def spy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Any) -> None:
        flags.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        await accept(reader, writer, conn)

    monkeypatch.setattr(server, "_accept", spy)
    await server.start("127.0.0.1", 0)
    try:
        assert server._server is not None
        port = server._server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /nothing HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert flags == [1]
    finally:
        await server.close()
