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
socket once a window of bytes is sent and not yet credited (:data:`DOWNLOAD_WINDOW` host →
sandbox, :data:`UPLOAD_WINDOW` sandbox → host; the read that crosses it is sent whole, so a
receiver accepts a window plus one read, :data:`READ_BYTES`); the receiver credits bytes once
its own socket has taken them. Apart from the windows, a side whose outgoing pipe is backed
up (:data:`PIPE_HIGH`) stops reading every socket until it drains. Neither side ever has to stop
reading a pipe, so a connection whose far end is slow cannot stall another (no head-of-line
blocking), and what a side buffers for one connection is bounded by the window plus one
read. A peer that sends past the window, or credits more than it was sent, loses that
connection (CLOSE), never the worker.

Each side reads its incoming pipe by hand (:class:`PipeIn`): a ``DATA`` payload for a socket
with nothing buffered moves from the pipe into the socket with ``splice(2)``, never through
the process. Sockets are read into one buffer per side (no allocation per read). What the relay
still copies is the host's: the upstream socket into its buffer, the buffer into the pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
import termios
from collections.abc import Callable

from sandbox_core import datapipe
from sandbox_core.datapipe import KIND_NET_CLOSE, KIND_NET_CREDIT, KIND_NET_DATA, KIND_NET_EOF

READ_BYTES = 1024 * 1024
"""How much one read of a net pipe or a relayed socket may take (asyncio's default is 256 KiB)."""
DOWNLOAD_WINDOW = 4 * 1024 * 1024
"""Bytes of one connection in flight host → sandbox. A window is what one credit round trip
carries: at ~3 ms per round trip on a busy 2-core host, 1 MiB capped a download at ~330 MB/s.
What the host buffers of all downloads together is bounded apart from it (:data:`PIPE_HIGH`)."""
UPLOAD_WINDOW = 1024 * 1024
"""Bytes of one connection in flight sandbox → host: what the host may have to hold per
connection for a server that reads slowly (the sandbox's own memory holds the rest)."""
PIPE_HIGH = 256 * 1024
"""Bytes a side may hold for its outgoing net pipe (beyond the pipe's own 1 MiB) before every
connection stops reading its socket: the bytes then wait in the kernel's socket buffers, not
in this process (asyncio's pipe buffer is a bytearray that every partial write shifts)."""
CREDIT_BATCH = 128 * 1024
"""Credit is returned in pieces of at least this many bytes (fewer frames); below any window."""
_CREDIT = struct.Struct(">I")


class Mux:
    """One end of the net pipes: frames out on a write transport, frames in routed by id."""

    def __init__(self, on_violation: Callable[[str], None] | None = None) -> None:
        self.streams: dict[int, Stream] = {}
        self._out: asyncio.WriteTransport | None = None
        self._on_violation = on_violation
        self.closed = False
        self.pipe_full = False
        """The outgoing pipe has :data:`PIPE_HIGH` buffered: no connection reads its socket."""
        self._buffer: memoryview | None = None

    def read_buffer(self) -> memoryview:
        """The one buffer every connection's socket is read into (no allocation per read)."""
        if self._buffer is None:
            self._buffer = memoryview(bytearray(READ_BYTES))
        return self._buffer

    def attach(self, out: asyncio.WriteTransport) -> None:
        self._out = out
        out.set_write_buffer_limits(high=PIPE_HIGH, low=PIPE_HIGH // 4)

    def set_pipe_full(self, full: bool) -> None:
        self.pipe_full = full
        for stream in list(self.streams.values()):
            stream.update_reading()

    def send(self, conn_id: int, kind: int, payload: bytes | memoryview = b"") -> None:
        out = self._out
        if out is None or self.closed or out.is_closing():
            return
        out.write(datapipe.HEADER.pack(conn_id, kind, len(payload)))
        if payload:
            out.write(payload)

    def violation(self, why: str) -> None:
        if self._on_violation is not None:
            self._on_violation(why)

    def deliver(self, conn_id: int, kind: int, payload: bytes) -> None:
        """One whole frame (or a piece of a ``DATA`` payload) to its connection."""
        stream = self.streams.get(conn_id)
        if stream is not None:  # else a late frame of a connection already gone
            stream.on_frame(kind, payload)

    def close(self) -> None:
        """Abort every connection (the worker is gone, or its pipe spoke garbage)."""
        self.closed = True
        for stream in list(self.streams.values()):
            stream.abort(tell=False)


class Stream(asyncio.BufferedProtocol):
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
        send_window: int = UPLOAD_WINDOW,
        receive_window: int = DOWNLOAD_WINDOW,
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
        self._send_window = send_window
        """What the peer lets this end have in flight."""
        self._receive_window = receive_window
        """What this end lets the peer have in flight (past it and one read: CLOSE)."""
        self._held: list[bytes] | None = None if started else []
        self._held_eof = False
        self._eof_in = self._eof_out = False
        self.finished = False
        self.sent = self.received = 0
        mux.streams[conn_id] = self

    # -------------------------------------------------------- the local socket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=0)  # pause_writing whenever the kernel did not take it all

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.mux.read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        # The socket was read into the mux's one buffer; what the pipe cannot take at once its
        # transport copies, so the buffer is free again when this returns.
        self.data_received(self.mux.read_buffer()[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.finished:
            return
        if self._count is not None and not self._count(len(data)):
            self.abort()
            return
        self.sent += len(data)
        for at in range(0, len(data), datapipe.MAX_PAYLOAD):
            self.mux.send(self.id, KIND_NET_DATA, data[at : at + datapipe.MAX_PAYLOAD])
        self._unacked += len(data)
        self.update_reading()

    def update_reading(self) -> None:
        """Read the socket only while the window has room and the outgoing pipe is not full."""
        if self.transport is None or self.finished:
            return
        pause = self._unacked >= self._send_window or self.mux.pipe_full
        if pause != self._read_paused:
            self._read_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def paused_by_caller(self) -> None:
        """The transport was handed over paused (the proxy read a request head on it)."""
        self._read_paused = True

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

    def on_frame(self, kind: int, payload: bytes) -> None:
        if kind == KIND_NET_DATA:
            self._inflight += len(payload)
            if self._inflight > self._receive_window + READ_BYTES or self._eof_in:
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
            self.update_reading()
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

    def splice_target(self) -> int | None:
        """The socket's descriptor when peer data may go to it directly (nothing buffered), else None."""
        transport = self.transport
        if (
            self.finished or self._held is not None or self._eof_in or transport is None
            or transport.is_closing() or transport.get_write_buffer_size()
        ):  # fmt: skip
            return None
        sock = transport.get_extra_info("socket")
        return sock.fileno() if sock is not None else None

    def spliced(self, n: int) -> None:
        """``n`` bytes of a ``DATA`` payload went from the pipe straight into the socket."""
        self._inflight += n
        if self._inflight > self._receive_window + READ_BYTES or (self._count is not None and not self._count(n)):
            self.abort()
            return
        self.received += n
        self._owed += n
        self._credit(force=False)

    def start(self) -> None:
        """Write out what the peer sent before the local side was ready, and go on relaying."""
        held, self._held = self._held or [], None
        for payload in held:
            self._write(payload)
        if self._held_eof:
            self._write_eof()

    def _write(self, payload: bytes) -> None:
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


_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_STEPS = 64
"""Frames (or pieces of one) a reader handles per wake-up before it lets the loop run others."""


class PipeIn:
    """The reading end of the incoming net pipe, read by hand so data can skip user space.

    Headers are read as they are; a ``DATA`` payload whose connection's socket has nothing
    buffered is moved from the pipe to the socket with ``splice(2)`` (no copy through this
    process); otherwise (the socket is full, or the platform has no splice) it is read and
    written through the socket's transport like any bytes. Both keep the connection's byte
    order: splicing happens only while the transport holds nothing. Other frames are small
    and read whole. At end of file (the peer is gone) every connection is closed.
    """

    def __init__(self, fd: int, mux: Mux) -> None:
        self._fd = fd
        self._mux = mux
        self._head = b""
        self._frame: list[int] | None = None
        """[conn, kind, bytes still to come] of the frame being read."""
        self._small = b""
        self._splice = hasattr(os, "splice")
        self._closed = False
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self._readable)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._mux.close()

    def _readable(self) -> None:
        try:
            for _ in range(_STEPS):
                if self._closed or not self._step():
                    return
        except datapipe.FrameError as exc:
            self.close()
            self._mux.violation(str(exc))
        except OSError:
            self.close()

    def _read(self, n: int) -> bytes | None:
        """Up to ``n`` bytes; None when the pipe is empty for now; b"" closes at end of file."""
        try:
            data = os.read(self._fd, n)
        except BlockingIOError:
            return None
        if not data:
            self.close()
        return data

    def _step(self) -> bool:
        """Handle what the pipe holds of one frame; False when there is nothing more for now."""
        if self._frame is None:
            data = self._read(datapipe.HEADER.size - len(self._head))
            if not data:
                return False
            self._head += data
            if len(self._head) < datapipe.HEADER.size:
                return True
            conn, kind, length = datapipe.HEADER.unpack(self._head)
            self._head = b""
            if kind not in datapipe.NET_KINDS or length > datapipe.MAX_PAYLOAD:
                raise datapipe.FrameError(f"not a net frame (kind {kind}, length {length})")
            if kind == KIND_NET_DATA and length == 0:
                return True
            self._frame = [conn, kind, length]
            if length == 0:
                self._done(b"")
            return True
        conn, kind, remaining = self._frame
        if kind != KIND_NET_DATA:  # a few bytes: read the whole payload, then deliver it
            data = self._read(remaining - len(self._small))
            if not data:
                return False
            self._small += data
            if len(self._small) == remaining:
                payload, self._small = self._small, b""
                self._done(payload)
            return True
        stream = self._mux.streams.get(conn)
        target = stream.splice_target() if stream is not None and self._splice else None
        if stream is not None and target is not None:
            try:
                moved = os.splice(self._fd, target, remaining, flags=_SPLICE_FLAGS)
            except BlockingIOError:  # the pipe is empty for now, or the socket is full
                moved = -1
            except OSError:  # the socket is gone: the bytes are read and dropped below
                moved = -1
            if moved == 0:
                self.close()
                return False
            if moved > 0:
                stream.spliced(moved)
                self._advance(moved)
                return True
            if _readable_bytes(self._fd) == 0:
                return False
        data = self._read(min(remaining, READ_BYTES))
        if not data:
            return False
        self._advance(len(data))
        if stream is not None:
            stream.on_frame(KIND_NET_DATA, data)  # a piece of the payload: written in order
        return True

    def _advance(self, n: int) -> None:
        assert self._frame is not None
        self._frame[2] -= n
        if self._frame[2] == 0:
            self._frame = None

    def _done(self, payload: bytes) -> None:
        assert self._frame is not None
        conn, kind, _ = self._frame
        self._frame = None
        self._mux.deliver(conn, kind, payload)


def _readable_bytes(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    try:
        raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


class PipeWriter(asyncio.Protocol):
    """The writing end of the outgoing net pipe: past :data:`PIPE_HIGH` buffered, sockets stop."""

    def __init__(self, mux: Mux) -> None:
        self._mux = mux

    def pause_writing(self) -> None:
        self._mux.set_pipe_full(True)

    def resume_writing(self) -> None:
        self._mux.set_pipe_full(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._mux.close()
