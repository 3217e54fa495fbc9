"""The network crossing's byte path: relayed connections multiplexed over two pipes, with credit.

A strict worker whose policy allows network gets two more pipes from the host, the **net
pipes** (worker → host and host → worker). Every relayed connection has an id (chosen by
the inside, which asks for it with ``egress.open`` on the control pipe) and its bytes travel
as :mod:`sandbox_core.datapipe` frames of the net kinds:

    DATA     the connection's bytes
    EOF      the sender will send no more (a half close: the other direction goes on)
    CREDIT   payload u32: the receiver has written that many more bytes to its socket
    CLOSE    the connection is gone (either side, at once)

Flow control is credit per connection, like an SSH channel's window: a side stops reading its
socket once :data:`WINDOW` bytes are sent and not yet credited (the read that crosses it is
sent whole, so a receiver accepts a window plus one read, :data:`READ_BYTES`); the
receiver credits bytes once its own socket has taken them. Neither side ever has to stop
reading a pipe, so a connection whose far end is slow cannot stall another (no head-of-line
blocking), and what a side buffers for one connection is bounded by the window plus one
read. A peer that sends past the window, or credits more than it was sent, loses that
connection (CLOSE), never the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable

from sandbox_core import datapipe
from sandbox_core.datapipe import KIND_NET_CLOSE, KIND_NET_CREDIT, KIND_NET_DATA, KIND_NET_EOF

READ_BYTES = 1024 * 1024
"""How much one read of a net pipe or a relayed socket may take (asyncio's default is 256 KiB)."""
WINDOW = 1024 * 1024
"""Bytes of one connection that may be in flight (sent, not yet credited) in one direction."""
CREDIT_BATCH = 128 * 1024
"""Credit is returned in pieces of at least this many bytes (fewer frames); must be < WINDOW."""
_CREDIT = struct.Struct(">I")


class Splitter:
    """Net-pipe bytes to frames without copying payloads that arrived whole in one read.

    A payload inside one read is delivered as a ``memoryview`` of that read's (immutable)
    bytes; one split across reads is joined once. Receivers only ``len()`` it, write it to a
    transport (which copies what it must keep) or hold it until they do.
    """

    def __init__(self, deliver: Callable[[int, int, bytes | memoryview], None]) -> None:
        self._deliver = deliver
        self._head = b""
        self._frame: tuple[int, int, int] | None = None
        self._parts: list[memoryview] = []
        self._have = 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        at, end = 0, len(view)
        while at < end:
            if self._frame is None:
                need = datapipe.HEADER.size - len(self._head)
                if not self._head and end - at >= datapipe.HEADER.size:
                    conn, kind, length = datapipe.HEADER.unpack_from(view, at)
                    at += datapipe.HEADER.size
                else:
                    self._head += bytes(view[at : at + need])
                    at += min(need, end - at)
                    if len(self._head) < datapipe.HEADER.size:
                        return
                    conn, kind, length = datapipe.HEADER.unpack(self._head)
                    self._head = b""
                if kind not in datapipe.NET_KINDS or length > datapipe.MAX_PAYLOAD:
                    raise datapipe.FrameError(f"not a net frame (kind {kind}, length {length})")
                self._frame, self._parts, self._have = (conn, kind, length), [], 0
            conn, kind, length = self._frame
            take = min(length - self._have, end - at)
            if take == length:  # the whole payload in this read: no copy
                payload: bytes | memoryview = view[at : at + take]
            else:
                self._parts.append(view[at : at + take])
                self._have += take
                if self._have < length:
                    return
                payload = b"".join(self._parts)
                self._parts = []
            at += take
            self._frame = None
            self._deliver(conn, kind, payload)


class Mux:
    """One end of the net pipes: frames out on a write transport, frames in routed by id."""

    def __init__(self, on_violation: Callable[[str], None] | None = None) -> None:
        self.streams: dict[int, Stream] = {}
        self._out: asyncio.WriteTransport | None = None
        self._split = Splitter(self._deliver)
        self._on_violation = on_violation
        self.closed = False

    def attach(self, out: asyncio.WriteTransport) -> None:
        self._out = out

    def feed(self, data: bytes) -> None:
        """Bytes read from the incoming net pipe; a stream of non-frames closes the mux."""
        try:
            self._split.feed(data)
        except datapipe.FrameError as exc:
            self.close()
            if self._on_violation is not None:
                self._on_violation(str(exc))

    def send(self, conn_id: int, kind: int, payload: bytes | memoryview = b"") -> None:
        out = self._out
        if out is None or self.closed or out.is_closing():
            return
        out.write(datapipe.HEADER.pack(conn_id, kind, len(payload)))
        if payload:
            out.write(payload)

    def _deliver(self, conn_id: int, kind: int, payload: bytes | memoryview) -> None:
        stream = self.streams.get(conn_id)
        if stream is not None:  # else a late frame of a connection already gone
            stream.on_frame(kind, payload)

    def close(self) -> None:
        """Abort every connection (the worker is gone, or its pipe spoke garbage)."""
        self.closed = True
        for stream in list(self.streams.values()):
            stream.abort(tell=False)


class Stream(asyncio.Protocol):
    """One relayed connection at one end: a local socket on one side, frames of one id on the other.

    It is the socket's protocol (the host's upstream socket; the proxy's client socket once
    its request head is answered). Frames from the peer that arrive before :meth:`start`
    (an upstream that speaks first, while the proxy still writes its ``200``) are held,
    bounded by the window.
    """

    def __init__(
        self,
        mux: Mux,
        conn_id: int,
        *,
        count: Callable[[int], bool] | None = None,
        on_closed: Callable[[Stream], None] | None = None,
        started: bool = True,
    ) -> None:
        self.mux, self.id = mux, conn_id
        self.transport: asyncio.Transport | None = None
        self._count = count
        """Called with each byte count relayed (both directions); False aborts the connection."""
        self._on_closed = on_closed
        self._unacked = 0
        """Bytes this end sent and the peer has not credited."""
        self._inflight = 0
        """Bytes the peer sent that this end has not credited."""
        self._owed = 0
        """Bytes written to the socket (or its buffer) and not credited yet."""
        self._write_paused = False
        self._read_paused = False
        self._held: list[bytes | memoryview] | None = None if started else []
        self._held_eof = False
        self._eof_in = self._eof_out = False
        self.finished = False
        self.sent = self.received = 0
        mux.streams[conn_id] = self

    # -------------------------------------------------------- the local socket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        _read_more(transport)
        transport.set_write_buffer_limits(high=0)  # pause_writing whenever the kernel did not take it all

    def data_received(self, data: bytes) -> None:
        if self.finished:
            return
        if self._count is not None and not self._count(len(data)):
            self.abort()
            return
        self.sent += len(data)
        for at in range(0, len(data), datapipe.MAX_PAYLOAD):
            self.mux.send(self.id, KIND_NET_DATA, data[at : at + datapipe.MAX_PAYLOAD])
        self._unacked += len(data)
        if self._unacked >= WINDOW and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if not self.finished and not self._eof_out:
            self._eof_out = True
            self.mux.send(self.id, KIND_NET_EOF)
            self._maybe_finish()
        return True  # the other direction may go on

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            self.mux.send(self.id, KIND_NET_CLOSE)
            self._drop()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._credit(force=True)

    # -------------------------------------------------------- frames from the peer

    def on_frame(self, kind: int, payload: bytes | memoryview) -> None:
        if kind == KIND_NET_DATA:
            self._inflight += len(payload)
            if self._inflight > WINDOW + READ_BYTES or self._eof_in:
                self.abort()  # past its window (and the one read that may cross it), or data after its EOF
                return
            if self._count is not None and not self._count(len(payload)):
                self.abort()
                return
            self.received += len(payload)
            if self._held is not None:
                self._held.append(payload)
            else:
                self._write(payload)
        elif kind == KIND_NET_CREDIT:
            (n,) = _CREDIT.unpack(payload) if len(payload) == _CREDIT.size else (-1,)
            if not 0 < n <= self._unacked:
                self.abort()
                return
            self._unacked -= n
            if self._read_paused and self._unacked < WINDOW and self.transport is not None:
                self._read_paused = False
                self.transport.resume_reading()
        elif kind == KIND_NET_EOF:
            self._eof_in = True
            if self._held is not None:
                self._held_eof = True
            else:
                self._write_eof()
        elif kind == KIND_NET_CLOSE:
            self._drop()
            if self.transport is not None:
                self.transport.abort()

    def start(self) -> None:
        """Write out what the peer sent before the local side was ready, and go on relaying."""
        held, self._held = self._held or [], None
        for payload in held:
            self._write(payload)
        if self._held_eof:
            self._write_eof()

    def _write(self, payload: bytes | memoryview) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(payload)
        self._owed += len(payload)
        if not self._write_paused:
            self._credit(force=False)

    def _credit(self, *, force: bool) -> None:
        if self.finished or not self._owed or (not force and self._owed < CREDIT_BATCH):
            return
        n, self._owed = self._owed, 0
        self._inflight -= n
        self.mux.send(self.id, KIND_NET_CREDIT, _CREDIT.pack(n))

    def _write_eof(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(OSError, RuntimeError, NotImplementedError):
                if transport.can_write_eof():
                    transport.write_eof()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._eof_in and self._eof_out and not self.finished:
            self._drop()
            if self.transport is not None:
                self.transport.close()  # what is still buffered is written first

    # -------------------------------------------------------- ending

    def abort(self, *, tell: bool = True) -> None:
        """End the connection at once; the peer is told unless it is gone."""
        if not self.finished:
            if tell:
                self.mux.send(self.id, KIND_NET_CLOSE)
            self._drop()
        if self.transport is not None:
            self.transport.abort()

    def _drop(self) -> None:
        self.finished = True
        if self.mux.streams.get(self.id) is self:
            del self.mux.streams[self.id]
        if self._on_closed is not None:
            callback, self._on_closed = self._on_closed, None
            callback(self)


def _read_more(transport: asyncio.BaseTransport) -> None:
    """Let asyncio's selector transports read :data:`READ_BYTES` at a time (fewer, larger reads)."""
    if isinstance(getattr(transport, "max_size", None), int):
        transport.max_size = READ_BYTES  # type: ignore[attr-defined]


class PipeReader(asyncio.Protocol):
    """The reading end of the incoming net pipe: its bytes go to the mux as they arrive."""

    def __init__(self, mux: Mux) -> None:
        self._mux = mux

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _read_more(transport)

    def data_received(self, data: bytes) -> None:
        self._mux.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._mux.close()


class PipeWriter(asyncio.Protocol):
    """The writing end of the outgoing net pipe (credit bounds what it buffers: no pausing)."""

    def __init__(self, mux: Mux) -> None:
        self._mux = mux

    def connection_lost(self, exc: Exception | None) -> None:
        self._mux.close()
