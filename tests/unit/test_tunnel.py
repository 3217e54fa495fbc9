"""The host's half of a relayed connection in one process: real sockets, a real egress socketpair.

The "worker" here is the test: it holds the inside end of the socketpair and hands the host
what a worker could (the client's socket, or something else), exactly as across the boundary.
"""

from __future__ import annotations

import array
import asyncio
import hashlib
import os
import socket
import struct
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from sandbox_core.config import NetworkPolicy
from sandbox_core.egress import Relay
from sandbox_core.egress.tunnel import Tunnel
from sandbox_core.shared import EGRESS_HANDOFF
from tests.helpers import wait_for


def _pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback (a listener made and closed for it)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        left = socket.create_connection(listener.getsockname())
        right, _ = listener.accept()
    return left, right


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _drain(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_bytes_cross_both_ways_with_half_closes_and_every_descriptor_is_closed() -> None:
    before = _fds()
    server, upstream = _pair()  # server: the remote end; upstream: the host's socket
    curl, client = _pair()  # curl: the sandbox's client; client: the socket the worker hands over
    closed = asyncio.Event()
    counted: list[int] = []

    def count(n: int) -> int:
        counted.append(n)
        return n

    Tunnel(upstream, client, count=count, on_closed=lambda _: closed.set())
    down, up = os.urandom(5_000_000), os.urandom(300_000)
    curl_got: list[bytes] = []
    reader = threading.Thread(target=lambda: curl_got.append(_drain(curl)))
    reader.start()
    await asyncio.to_thread(curl.sendall, up)
    curl.shutdown(socket.SHUT_WR)  # the upload ends; the download goes on
    server_got = await asyncio.to_thread(_drain, server)
    await asyncio.to_thread(server.sendall, down)
    server.shutdown(socket.SHUT_WR)
    await asyncio.to_thread(reader.join, 20)
    assert hashlib.sha256(server_got).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(curl_got[0]).digest() == hashlib.sha256(down).digest()
    await asyncio.wait_for(closed.wait(), 20)
    assert sum(counted) == len(up) + len(down)
    server.close()
    curl.close()
    assert _fds() == before


async def test_the_cap_passes_the_bytes_within_it_then_ends_both_sides() -> None:
    server, upstream = _pair()
    curl, client = _pair()
    closed = asyncio.Event()
    budget = [1_000_000]

    def count(n: int) -> int:
        allowed = min(n, budget[0])
        budget[0] -= allowed
        return allowed

    Tunnel(upstream, client, count=count, on_closed=lambda _: closed.set())
    sender = asyncio.ensure_future(asyncio.to_thread(_send_until_broken, server, 50_000_000))
    got = await asyncio.to_thread(_drain_until_reset, curl)
    await asyncio.wait_for(closed.wait(), 20)
    assert got == 1_000_000  # exactly what the cap allows, then the end
    assert await asyncio.wait_for(sender, 20) < 50_000_000  # the remote side was cut off too
    server.close()
    curl.close()


async def test_a_client_that_resets_resets_the_remote_too() -> None:
    """A connection that ends by an error is reset upstream: a remote that waits, or is blocked on a
    full window, learns at once (TCP_CLOSE), where a half close would leave it in CLOSE_WAIT."""
    server, upstream = _pair()
    curl, client = _pair()
    closed = asyncio.Event()
    Tunnel(upstream, client, count=lambda n: n, on_closed=lambda _: closed.set())
    curl.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    curl.close()  # the client resets its connection
    await asyncio.wait_for(closed.wait(), 20)
    await wait_for(lambda: _tcp_state(server) == TCP_CLOSE, 10, "the remote's connection reset")
    server.close()


TCP_CLOSE = 7


def _tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def _send_until_broken(sock: socket.socket, size: int) -> int:
    sent, block = 0, bytes(1 << 16)
    try:
        while sent < size:
            sent += sock.send(block)
    except OSError:
        pass
    return sent


def _drain_until_reset(sock: socket.socket) -> int:
    got = 0
    try:
        while chunk := sock.recv(1 << 20):
            got += len(chunk)
    except OSError:
        pass
    return got


@dataclass
class Host:
    relay: Relay
    worker_end: socket.socket
    listener: socket.socket

    def hand(self, conn: int, *fds: int) -> None:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        self.worker_end.sendmsg([EGRESS_HANDOFF.pack(conn)], rights)

    async def open(self, conn: int, first: str = "") -> socket.socket:
        """An allowed ``egress.open``; the remote's side of the upstream connection it made."""
        port = self.listener.getsockname()[1]
        answer = await self.relay.open({"conn": conn, "host": "registry.test", "port": port, "first": first})
        assert answer["ok"], answer
        remote, _ = await asyncio.to_thread(self.listener.accept)
        return remote


@pytest.fixture
async def host() -> AsyncIterator[Host]:
    net = NetworkPolicy(mode="allowlist", allow=("registry.test",), hosts={"registry.test": "127.0.0.1"},
                        allow_private=("127.0.0.1/32",))  # fmt: skip
    relay = Relay(net, "w-test", lambda: "alice")
    host_end, worker_end = socket.socketpair()
    await relay.attach(host_end.detach())
    listener = socket.create_server(("127.0.0.1", 0))
    yield Host(relay, worker_end, listener)
    relay.close()
    worker_end.close()
    listener.close()


async def test_a_handed_client_socket_is_relayed_after_the_first_bytes(host: Host) -> None:
    remote = await host.open(7, first="GET / HTTP/1.1\r\nHost: registry.test\r\n\r\n\xff")
    curl, client = _pair()
    host.hand(7, client.fileno())
    client.close()  # the worker keeps no copy
    remote.sendall(b"answer")
    remote.shutdown(socket.SHUT_WR)
    assert await asyncio.to_thread(_drain, curl) == b"answer"
    curl.sendall(b"body")
    curl.shutdown(socket.SHUT_WR)
    assert await asyncio.to_thread(_drain, remote) == b"GET / HTTP/1.1\r\nHost: registry.test\r\n\r\n\xffbody"
    await wait_for(lambda: host.relay.open_connections == 0, 20, "the tunnel closed")
    remote.close()
    curl.close()


@pytest.mark.parametrize("what", ["a pipe", "a unix socket", "no descriptor", "two descriptors", "unknown id"])
async def test_a_handoff_that_is_not_one_tcp_socket_of_a_waiting_connection_is_refused(host: Host, what: str) -> None:
    remote = await host.open(3)
    before = _fds()
    read_end, write_end = os.pipe()
    unix_a, unix_b = socket.socketpair()
    curl, client = _pair()
    handed = {
        "a pipe": (3, (write_end,)),
        "a unix socket": (3, (unix_a.fileno(),)),
        "no descriptor": (3, ()),
        "two descriptors": (3, (client.fileno(), client.fileno())),
        "unknown id": (4, (client.fileno(),)),
    }[what]
    host.hand(handed[0], *handed[1])
    client.close()  # the worker keeps no copy
    if what == "unknown id":  # a late handoff (say, after the wait timed out): that socket alone is closed
        assert await asyncio.wait_for(asyncio.to_thread(curl.recv, 10), 20) == b""
        assert host.relay.open_connections == 1
    else:  # the worker's network ends: the waiting upstream connection is closed, not relayed
        assert await asyncio.wait_for(asyncio.to_thread(remote.recv, 10), 20) == b""
        await wait_for(lambda: host.relay.open_connections == 0, 20, "no connection left")
    for sock in (unix_a, unix_b, curl, remote):
        sock.close()
    for fd in (read_end, write_end):
        os.close(fd)
    await wait_for(lambda: _fds() <= before, 20, "every descriptor received is closed")
    answer = await host.relay.open({"conn": 5, "host": "registry.test", "port": host.listener.getsockname()[1]})
    if what == "unknown id":
        assert answer["ok"] is True  # the network goes on
    else:
        assert answer["ok"] is False and "no egress socketpair" in answer["message"]
