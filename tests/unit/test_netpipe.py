"""The net pipes' byte path in one process: real pipes, real sockets, both ends' muxes.

``inside`` plays the proxy's end (a client socket), ``host`` the relay's (an upstream socket);
the two talk over two real pipes exactly as across the sandbox boundary.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from sandbox_core import datapipe, netpipe
from tests.helpers import wait_for

pytestmark = pytest.mark.skipif(not hasattr(os, "splice"), reason="no splice(2) on this platform")


@dataclass
class Ends:
    inside: netpipe.Mux
    host: netpipe.Mux
    closers: list[netpipe.PipeIn | netpipe.PipeOut]

    def connect(self, conn: int) -> tuple[socket.socket, socket.socket, netpipe.Stream, netpipe.Stream]:
        """One relayed connection: (client socket, server socket, inside stream, host stream)."""
        client, proxied = socket.socketpair()
        upstream, server = socket.socketpair()
        for sock in (client, server):
            sock.setblocking(False)
        inside = netpipe.Stream(self.inside, conn, proxied, send_window=netpipe.UPLOAD_WINDOW,
                                receive_window=netpipe.DOWNLOAD_WINDOW)  # fmt: skip
        host = netpipe.Stream(self.host, conn, upstream, send_window=netpipe.DOWNLOAD_WINDOW,
                              receive_window=netpipe.UPLOAD_WINDOW)  # fmt: skip
        return client, server, inside, host


@pytest.fixture
async def ends() -> AsyncIterator[Ends]:
    inside, host = netpipe.Mux(), netpipe.Mux()
    up_read, up_write = os.pipe2(os.O_CLOEXEC)
    down_read, down_write = os.pipe2(os.O_CLOEXEC)
    closers: list[netpipe.PipeIn | netpipe.PipeOut] = [
        netpipe.PipeOut(up_write, inside), netpipe.PipeIn(up_read, host),
        netpipe.PipeOut(down_write, host), netpipe.PipeIn(down_read, inside),
    ]  # fmt: skip
    yield Ends(inside, host, closers)
    for closer in closers:
        closer.close()


async def _read_all(sock: socket.socket) -> bytes:
    loop, out = asyncio.get_running_loop(), bytearray()
    while data := await loop.sock_recv(sock, 1 << 20):
        out += data
    return bytes(out)


async def _send_and_shut(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    sock.shutdown(socket.SHUT_WR)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_bytes_arrive_as_sent_both_ways_with_half_closes(ends: Ends) -> None:
    client, server, inside, host = ends.connect(1)
    down, up = os.urandom(24 * 1024 * 1024 + 17), os.urandom(3 * 1024 * 1024 + 5)
    sends = (_send_and_shut(server, down), _send_and_shut(client, up))
    both = asyncio.gather(_read_all(client), _read_all(server), *sends)
    got_down, got_up, _, _ = await asyncio.wait_for(both, 60)
    assert got_down == down and got_up == up
    await wait_for(lambda: inside.finished and host.finished, 10, "both ends finished after both EOFs")
    assert (host.sent, inside.received, inside.sent, host.received) == (len(down), len(down), len(up), len(up))
    assert not ends.inside.streams and not ends.host.streams
    client.close()
    server.close()


async def test_a_client_that_does_not_read_stops_the_server_at_one_window(ends: Ends) -> None:
    client, server, inside, host = ends.connect(1)
    data = os.urandom(4 * netpipe.DOWNLOAD_WINDOW)
    sending = asyncio.create_task(_send_and_shut(server, data))
    await wait_for(lambda: host._unacked == netpipe.DOWNLOAD_WINDOW, 20, "the host stops at its window")
    # the inside holds what the client's socket did not take, never more than the window and one read
    assert sum(map(len, inside._pending)) <= netpipe.DOWNLOAD_WINDOW + netpipe.READ_BYTES
    assert not sending.done()  # the rest waits in the server's socket, not in either process
    assert await asyncio.wait_for(_read_all(client), 60) == data
    await sending
    client.close()
    server.close()


async def test_a_stalled_connection_does_not_hold_up_another(ends: Ends) -> None:
    stalled_client, stalled_server, _, stalled = ends.connect(1)
    client, server, _, _ = ends.connect(2)
    stalling = asyncio.create_task(_send_and_shut(stalled_server, os.urandom(3 * netpipe.DOWNLOAD_WINDOW)))
    await wait_for(lambda: stalled._unacked == netpipe.DOWNLOAD_WINDOW, 20, "the stalled connection at its window")
    data = os.urandom(8 * 1024 * 1024)
    got, _ = await asyncio.wait_for(asyncio.gather(_read_all(client), _send_and_shut(server, data)), 60)
    assert got == data
    stalling.cancel()
    for sock in (stalled_client, stalled_server, client, server):
        sock.close()


async def test_descriptors_return_to_baseline_after_many_connections(ends: Ends) -> None:
    warm_client, warm_server, _, _ = ends.connect(1)  # the staging pipes are made once per side
    warm = asyncio.gather(_read_all(warm_client), _read_all(warm_server),
                          _send_and_shut(warm_server, b"x"), _send_and_shut(warm_client, b"y"))  # fmt: skip
    await asyncio.wait_for(warm, 20)
    warm_client.close()
    warm_server.close()
    await wait_for(lambda: not ends.host.streams and not ends.inside.streams, 10, "the warm-up connection gone")
    baseline = _open_fds()
    for round_ in range(4):
        pairs = [ends.connect(2 + round_ * 50 + i) for i in range(50)]
        for i, (client, server, _, host) in enumerate(pairs):
            if i % 3 == 0:
                host.abort()  # the host's end goes at once: the inside's client is cut
            elif i % 3 == 1:
                server.close()  # the server hangs up
            else:
                await _send_and_shut(server, os.urandom(100_000))
                await _send_and_shut(client, b"request")
        for client, server, _, _ in pairs:
            await asyncio.wait_for(_drain_or_reset(client), 20)
            client.close()
            server.close()
        await wait_for(lambda: not ends.host.streams and not ends.inside.streams, 20, "every connection gone")
    assert _open_fds() == baseline


async def _drain_or_reset(sock: socket.socket) -> None:
    try:
        await _read_all(sock)
    except ConnectionError:
        pass


async def test_a_peer_past_its_window_loses_only_its_connection() -> None:
    mux = netpipe.Mux()
    out_read, out_write = os.pipe2(os.O_CLOEXEC)
    writer = netpipe.PipeOut(out_write, mux)
    greedy, other = netpipe.Stream(mux, 1, receive_window=netpipe.UPLOAD_WINDOW), netpipe.Stream(mux, 2)
    read_end, write_end = os.pipe()
    reader = netpipe.PipeIn(read_end, mux)
    payload = b"x" * datapipe.MAX_PAYLOAD
    frames = (netpipe.UPLOAD_WINDOW + netpipe.READ_BYTES) // datapipe.MAX_PAYLOAD + 1  # past a window and one read
    with os.fdopen(write_end, "wb") as pipe:
        feeding = asyncio.create_task(asyncio.to_thread(
            pipe.write, (datapipe.frame(1, datapipe.KIND_NET_DATA, payload) + payload) * frames))  # fmt: skip
        await wait_for(lambda: greedy.finished, 10, "the greedy connection aborted")
        await feeding
    assert 1 not in mux.streams and not other.finished and mux.streams[2] is other
    assert os.read(out_read, 1 << 16) == datapipe.frame(1, datapipe.KIND_NET_CLOSE)
    reader.close()
    writer.close()
    os.close(out_read)


async def test_the_pipe_writer_keeps_frame_order_and_stops_sockets_while_full() -> None:
    mux = netpipe.Mux()
    out_read, out_write = os.pipe2(os.O_CLOEXEC)
    writer = netpipe.PipeOut(out_write, mux)
    local, far = socket.socketpair()
    far.setblocking(False)
    stream = netpipe.Stream(mux, 7, local, send_window=netpipe.DOWNLOAD_WINDOW)
    data = os.urandom(3 * 1024 * 1024)
    sending = asyncio.create_task(_send_and_shut(far, data))
    await wait_for(lambda: mux.pipe_full, 10, "the pipe full (nobody reads it)")
    assert not stream._reading
    mux.send(9, datapipe.KIND_NET_EOF)  # a frame given while the pipe is full waits its turn

    got: list[tuple[int, int, bytes]] = []
    raw = bytearray()

    def read_frames() -> None:
        os.set_blocking(out_read, True)
        while (7, datapipe.KIND_NET_EOF, b"") not in got:
            raw.extend(os.read(out_read, 1 << 20))
            while len(raw) >= datapipe.HEADER.size:
                conn, kind, length = datapipe.HEADER.unpack_from(raw)
                if len(raw) < datapipe.HEADER.size + length:
                    break
                got.append((conn, kind, bytes(raw[datapipe.HEADER.size : datapipe.HEADER.size + length])))
                del raw[: datapipe.HEADER.size + length]

    await asyncio.wait_for(asyncio.to_thread(read_frames), 30)
    data_frames = [frame for frame in got if frame[1] == datapipe.KIND_NET_DATA]
    assert all(conn == 7 for conn, _, _ in data_frames)
    assert b"".join(payload for _, _, payload in data_frames) == data
    assert got.index((9, datapipe.KIND_NET_EOF, b"")) > 0  # after the bytes that were waiting when it was given
    await wait_for(lambda: not mux.pipe_full, 10, "the pipe drained")
    sending.cancel()
    writer.close()  # closes every connection of the mux too
    assert stream.finished and stream.sock is None
    far.close()
    os.close(out_read)
