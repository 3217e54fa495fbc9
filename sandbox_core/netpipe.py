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
sandbox, :data:`UPLOAD_WINDOW` sandbox → host; a read never asks for more than the window's
room, and a receiver accepts a window plus one read, :data:`READ_BYTES`); the receiver credits
bytes once its own socket has taken them. Apart from the windows, a side whose outgoing pipe is
full stops reading every socket until the pipe drains (:class:`PipeOut`): the bytes then wait
in the kernel's socket buffers, not in this process. Neither side ever has to stop reading a
pipe, so a connection whose far end is slow cannot stall another (no head-of-line blocking),
and what a side buffers for one connection is bounded by the window plus one read. A peer that
sends past the window, or credits more than it was sent, loses that connection (CLOSE), never
the worker.

Neither side copies a connection's bytes through Python on the fast path. Out: a socket is
spliced (``splice(2)``) into a small staging pipe, the frame's header is written to the net
pipe and the staged bytes are spliced after it (:class:`PipeOut`). In: a ``DATA`` payload for
a socket with nothing buffered is spliced from the net pipe into the socket (:class:`PipeIn`).
Sockets are plain non-blocking sockets driven by ``add_reader``/``add_writer`` (an asyncio
transport owns its descriptor's reading and could not share it with ``splice``). A reader
handles several chunks per wake-up (:data:`_STEPS`) before it lets the loop run others.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import termios
from collections import deque
from collections.abc import Callable

from sandbox_core import datapipe
from sandbox_core.datapipe import KIND_NET_CLOSE, KIND_NET_CREDIT, KIND_NET_DATA, KIND_NET_EOF

READ_BYTES = 1024 * 1024
"""How much one read of a net pipe or a relayed socket may take."""
DOWNLOAD_WINDOW = 4 * 1024 * 1024
"""Bytes of one connection in flight host → sandbox. A window is what one credit round trip
carries: at ~3 ms per round trip on a busy 2-core host, 1 MiB capped a download at ~330 MB/s."""
UPLOAD_WINDOW = 1024 * 1024
"""Bytes of one connection in flight sandbox → host: what the host may have to hold per
connection for a server that reads slowly (the sandbox's own memory holds the rest)."""
STAGE_BYTES = 1024 * 1024
"""Capacity asked of a side's staging pipe (F_SETPIPE_SZ; the default 64 KiB if refused)."""
CREDIT_BATCH = 128 * 1024
"""Credit is returned in pieces of at least this many bytes (fewer frames); below any window."""
_CREDIT = struct.Struct(">I")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_STEPS = 64
"""Frames (or pieces of one) a reader handles per wake-up before it lets the loop run others."""
_F_GETPIPE_SZ = 1032
PARK_SECONDS = 0.05
"""How long a net pipe's reader waits for a full socket before it copies the payload instead."""


class Mux:
    """One end of the net pipes: frames out through a :class:`PipeOut`, frames in routed by id."""

    def __init__(self, on_violation: Callable[[str], None] | None = None) -> None:
        self.streams: dict[int, Stream] = {}
        self.out: PipeOut | None = None
        self.reader: PipeIn | None = None
        self._on_violation = on_violation
        self.closed = False
        self.pipe_full = False
        """The outgoing pipe is full: no connection reads its socket until it drains."""
        self._buffer: memoryview | None = None

    def read_buffer(self) -> memoryview:
        """The one buffer sockets are read into where splice is not available (no allocation per read)."""
        if self._buffer is None:
            self._buffer = memoryview(bytearray(READ_BYTES))
        return self._buffer

    def attach(self, out: PipeOut) -> None:
        self.out = out

    def set_pipe_full(self, full: bool) -> None:
        if full == self.pipe_full:
            return
        self.pipe_full = full
        for stream in list(self.streams.values()):
            stream.update_reading()

    def send(self, conn_id: int, kind: int, payload: bytes | memoryview = b"") -> None:
        out = self.out
        if out is None or self.closed:
            return
        out.write(datapipe.HEADER.pack(conn_id, kind, len(payload)), payload)

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


class PipeOut:
    """The writing end of the outgoing net pipe, written by hand so socket bytes can be spliced in.

    Frames go out in the order they are given. While the pipe takes everything, a write goes
    straight in; what it cannot take waits in a queue (bytes, or a count of bytes waiting in
    the staging pipe), the mux is told the pipe is full (every socket stops being read), and
    the queue is written out when the pipe is writable again. :meth:`splice_from` moves a
    socket's bytes through the staging pipe into one ``DATA`` frame without reading them: it
    is only used while nothing waits, so the staging pipe holds at most one frame's rest.
    At a broken pipe (the peer is gone) every connection is closed.
    """

    def __init__(self, fd: int, mux: Mux) -> None:
        self._fd = fd
        self._mux = mux
        self._queue: deque[memoryview | int] = deque()
        """What waits for the pipe, in order: bytes, or that many bytes of the staging pipe."""
        self._stage: tuple[int, int] | None = None
        self._stage_size = 0
        self.splice = hasattr(os, "splice")
        self.closed = False
        self._loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        mux.attach(self)

    @property
    def idle(self) -> bool:
        """Nothing waits: the next frame goes straight into the pipe."""
        return not self._queue and not self.closed

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        self._loop.remove_writer(self._fd)
        for fd in (self._fd, *(self._stage or ())):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._stage = None
        self._mux.close()

    def write(self, head: bytes, payload: bytes | memoryview = b"") -> None:
        """One frame (its header and payload) after everything given before."""
        if self.closed:
            return
        parts = [memoryview(head), memoryview(payload)] if payload else [memoryview(head)]
        if not self._queue:
            try:
                n = os.writev(self._fd, parts)
            except BlockingIOError:
                n = 0
            except OSError:
                self.close()
                return
            while parts and n >= len(parts[0]):
                n -= len(parts[0])
                parts.pop(0)
            if parts and n:
                parts[0] = parts[0][n:]
        if parts:
            # what waits is copied: a payload may be a view of a buffer that is read into again
            self._queue.extend(memoryview(bytes(part)) for part in parts)
            self._wait()

    def splice_from(self, conn_id: int, fd: int, limit: int) -> int:
        """Up to ``limit`` bytes of socket ``fd`` as one ``DATA`` frame; 0 at end of file.

        Raises BlockingIOError when the socket has nothing, OSError when it failed. Only while
        :attr:`idle`."""
        stage = self._staging()
        moved = os.splice(fd, stage[1], min(limit, self._stage_size, datapipe.MAX_PAYLOAD), flags=_SPLICE_FLAGS)
        if moved:
            self.write(datapipe.HEADER.pack(conn_id, KIND_NET_DATA, moved))
            self._push(moved)
        return moved

    def _staging(self) -> tuple[int, int]:
        if self._stage is None:
            read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            with contextlib.suppress(OSError):
                fcntl.fcntl(write_end, datapipe.F_SETPIPE_SZ, STAGE_BYTES)
            self._stage_size = fcntl.fcntl(write_end, _F_GETPIPE_SZ)
            self._stage = (read_end, write_end)
        return self._stage

    def _push(self, n: int) -> None:
        """``n`` staged bytes after what is queued (the header before them is written or queued)."""
        if not self._queue and self._stage is not None:
            try:
                n -= os.splice(self._stage[0], self._fd, n, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                pass
            except OSError:
                self.close()
                return
        if n:
            self._queue.append(n)
            self._wait()

    def _wait(self) -> None:
        if len(self._queue) and not self.closed:
            if not self._mux.pipe_full:
                self._loop.add_writer(self._fd, self._writable)
            self._mux.set_pipe_full(True)

    def _writable(self) -> None:
        queue = self._queue
        try:
            while queue:
                item = queue[0]
                if isinstance(item, int):
                    assert self._stage is not None
                    n = os.splice(self._stage[0], self._fd, item, flags=_SPLICE_FLAGS)
                    if n < item:
                        queue[0] = item - n
                        return
                else:
                    n = os.write(self._fd, item)
                    if n < len(item):
                        queue[0] = item[n:]
                        return
                queue.popleft()
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        self._loop.remove_writer(self._fd)
        self._mux.set_pipe_full(False)


class Stream:
    """One relayed connection at one end: a local socket on one side, frames of one id on the other.

    The socket is the host's upstream socket, or the proxy's client socket once its request
    head is answered (:meth:`attach`). Frames from the peer that arrive before :meth:`start`
    (an upstream that speaks first, while the proxy still writes its ``200``) are held,
    bounded by the window.
    """

    def __init__(
        self,
        mux: Mux,
        conn_id: int,
        sock: socket.socket | None = None,
        *,
        count: Callable[[int], bool] | None = None,
        on_closed: Callable[[Stream], None] | None = None,
        started: bool = True,
        send_window: int = UPLOAD_WINDOW,
        receive_window: int = DOWNLOAD_WINDOW,
    ) -> None:
        self.mux, self.id = mux, conn_id
        self.sock: socket.socket | None = None
        self._count = count
        """Called with each byte count relayed (both directions); False aborts the connection."""
        self._on_closed = on_closed
        self._unacked = 0
        """Bytes this end sent and the peer has not credited."""
        self._inflight = 0
        """Bytes the peer sent that this end has not credited."""
        self._owed = 0
        """Bytes the socket took and not credited yet."""
        self._pending: deque[memoryview] = deque()
        """Bytes for the socket that it did not take yet."""
        self._pending_peer: deque[bool] = deque()
        """Whether each pending piece is the peer's (credited once written) or this end's own."""
        self._reading = self._writing = False
        self._send_window = send_window
        """What the peer lets this end have in flight."""
        self._receive_window = receive_window
        """What this end lets the peer have in flight (past it and one read: CLOSE)."""
        self._held: list[bytes] | None = None if started else []
        self._held_eof = False
        self._eof_in = self._eof_out = False
        self._shutdown = False
        """The peer's EOF is to be passed on once the pending bytes are written."""
        self._close_when_written = False
        self.finished = False
        self.sent = self.received = 0
        mux.streams[conn_id] = self
        if sock is not None:
            self.attach(sock)
            self.update_reading()

    # -------------------------------------------------------- the local socket

    def attach(self, sock: socket.socket) -> None:
        """The local socket (not read until :meth:`update_reading`)."""
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._loop = asyncio.get_running_loop()

    def update_reading(self) -> None:
        """Read the socket only while the window has room and the outgoing pipe is not full."""
        sock = self.sock
        if sock is None:
            return
        want = not (self.finished or self._eof_out or self.mux.pipe_full or self._unacked >= self._send_window)
        if want != self._reading:
            self._reading = want
            if want:
                self._loop.add_reader(sock.fileno(), self._readable)
            else:
                self._loop.remove_reader(sock.fileno())

    def _readable(self) -> None:
        sock, out = self.sock, self.mux.out
        for _ in range(_STEPS):
            if sock is None or out is None or not self._reading or not out.idle:
                return
            room = self._send_window - self._unacked
            try:
                if out.splice:
                    n = out.splice_from(self.id, sock.fileno(), min(room, READ_BYTES))
                    if n and not self._counted(n):
                        return
                else:
                    buffer = self.mux.read_buffer()
                    n = sock.recv_into(buffer, min(room, READ_BYTES))
                    if n and not self._counted(n):
                        return
                    if n:
                        self._send_data(buffer[:n])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._lost()
                return
            if not n:
                self.eof_received()
                return
            self.sent += n
            self._unacked += n
            self.update_reading()

    def _counted(self, n: int) -> bool:
        if self._count is not None and not self._count(n):
            self.abort()
            return False
        return True

    def _send_data(self, data: bytes | memoryview) -> None:
        for at in range(0, len(data), datapipe.MAX_PAYLOAD):
            self.mux.send(self.id, KIND_NET_DATA, data[at : at + datapipe.MAX_PAYLOAD])

    def data_received(self, data: bytes | memoryview) -> None:
        """Bytes of the local side read before the socket was handed over (a request head)."""
        if self.finished or not data or not self._counted(len(data)):
            return
        self.sent += len(data)
        self._send_data(data)
        self._unacked += len(data)
        self.update_reading()

    def eof_received(self) -> None:
        if not self.finished and not self._eof_out:
            self._eof_out = True
            self.update_reading()
            self.mux.send(self.id, KIND_NET_EOF)
            self._maybe_finish()

    def _lost(self) -> None:
        """The socket failed: the peer is told and the connection ends."""
        if not self.finished:
            self.mux.send(self.id, KIND_NET_CLOSE)
            self._drop()
        self._close_socket()

    # -------------------------------------------------------- frames from the peer

    def on_frame(self, kind: int, payload: bytes) -> None:
        if kind == KIND_NET_DATA:
            self._inflight += len(payload)
            if self._inflight > self._receive_window + READ_BYTES or self._eof_in:
                self.abort()  # past its window (and the one read that may cross it), or data after its EOF
                return
            if not self._counted(len(payload)):
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
            self._close_socket()

    def splice_target(self) -> int | None:
        """The socket's descriptor when peer data may go to it directly (nothing pending), else None."""
        sock = self.sock
        if self.finished or self._held is not None or self._eof_in or sock is None or self._pending:
            return None
        return sock.fileno()

    def spliced(self, n: int) -> None:
        """``n`` bytes of a ``DATA`` payload went from the pipe straight into the socket."""
        self._inflight += n
        if self._inflight > self._receive_window + READ_BYTES or not self._counted(n):
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

    def write_local(self, data: bytes) -> None:
        """Bytes of this end's own for the socket (the proxy's ``200``), before the peer's."""
        self._write(data, peer=False)

    def _write(self, payload: bytes | memoryview, *, peer: bool = True) -> None:
        sock = self.sock
        if sock is None:
            return
        view = memoryview(payload)
        if not self._pending:
            try:
                sent = sock.send(view)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._lost()
                return
            if peer:
                self._owed += sent
            view = view[sent:]
            if not view:
                if peer:
                    self._credit(force=False)
                return
        self._pending.append(memoryview(bytes(view)))
        self._pending_peer.append(peer)
        if not self._writing:
            self._writing = True
            self._loop.add_writer(sock.fileno(), self._writable)

    def _writable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            while self._pending:
                piece = self._pending[0]
                sent = sock.send(piece)
                if self._pending_peer[0]:
                    self._owed += sent
                if sent < len(piece):
                    self._pending[0] = piece[sent:]
                    return
                self._pending.popleft()
                self._pending_peer.popleft()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._lost()
            return
        self._writing = False
        self._loop.remove_writer(sock.fileno())
        self._credit(force=True)
        if self._shutdown:
            self._shutdown_write()
        if self._close_when_written:
            self._close_socket()

    def _credit(self, *, force: bool) -> None:
        if self.finished or not self._owed or (not force and self._owed < CREDIT_BATCH):
            return
        n, self._owed = self._owed, 0
        self._inflight -= n
        self.mux.send(self.id, KIND_NET_CREDIT, _CREDIT.pack(n))

    def _write_eof(self) -> None:
        if self._pending:
            self._shutdown = True
        else:
            self._shutdown_write()
        self._maybe_finish()

    def _shutdown_write(self) -> None:
        self._shutdown = False
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    def _maybe_finish(self) -> None:
        if self._eof_in and self._eof_out and not self.finished:
            self._drop()
            if self._pending:
                self._close_when_written = True  # what is still pending is written first
            else:
                self._close_socket()

    # -------------------------------------------------------- ending

    def abort(self, *, tell: bool = True) -> None:
        """End the connection at once; the peer is told unless it is gone."""
        if not self.finished:
            if tell:
                self.mux.send(self.id, KIND_NET_CLOSE)
            self._drop()
        self._close_socket()

    def _drop(self) -> None:
        self.finished = True
        if self.mux.streams.get(self.id) is self:
            del self.mux.streams[self.id]
        if self._on_closed is not None:
            callback, self._on_closed = self._on_closed, None
            callback(self)

    def _close_socket(self) -> None:
        """Forget the socket's callbacks and close it (what is pending is dropped)."""
        sock, self.sock = self.sock, None
        self._pending.clear()
        self._pending_peer.clear()
        self._close_when_written = False
        if sock is None:
            return
        if self.mux.reader is not None:
            self.mux.reader.forget(sock.fileno())
        if self._reading:
            self._loop.remove_reader(sock.fileno())
        if self._writing:
            self._loop.remove_writer(sock.fileno())
        self._reading = self._writing = False
        sock.close()


class PipeIn:
    """The reading end of the incoming net pipe, read by hand so data can skip user space.

    Headers are read as they are; a ``DATA`` payload whose connection's socket has nothing
    pending is moved from the pipe to the socket with ``splice(2)`` (no copy through this
    process). When that socket is full (its client reads slower than the bytes come) and it is
    the only connection, the reader **parks**: it stops reading the pipe until the socket takes
    more, for at most :data:`PARK_SECONDS`. With other connections open (whose frames may be
    behind in the pipe), past that limit, or where there is no splice, the payload is read and
    kept for the socket like any bytes, so one connection never holds up another for longer
    than that. Both ways keep the connection's byte order:
    splicing happens only while the stream holds nothing. Other frames are small and read
    whole. At end of file (the peer is gone) every connection is closed.
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
        self._parked: tuple[int, asyncio.TimerHandle] | None = None
        """The full socket this reader waits for, and the time limit of the wait."""
        self._copy_once = False
        self._loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._readable)
        mux.reader = self

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._unpark()
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._mux.close()

    def _park(self, sock_fd: int) -> None:
        """Wait for ``sock_fd`` to take more (or :data:`PARK_SECONDS`) before reading the pipe on."""
        self._loop.remove_reader(self._fd)
        self._loop.add_writer(sock_fd, self._resume)
        self._parked = (sock_fd, self._loop.call_later(PARK_SECONDS, self._resume, True))

    def _unpark(self) -> bool:
        if self._parked is None:
            return False
        sock_fd, timer = self._parked
        self._parked = None
        timer.cancel()
        self._loop.remove_writer(sock_fd)
        if not self._closed:
            self._loop.add_reader(self._fd, self._readable)
        return True

    def _resume(self, timed_out: bool = False) -> None:
        if self._unpark():
            self._copy_once = timed_out
            self._readable()

    def forget(self, sock_fd: int) -> None:
        """Socket ``sock_fd`` is being closed: stop waiting for it."""
        if self._parked is not None and self._parked[0] == sock_fd:
            self._unpark()

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
        target = stream.splice_target() if stream is not None and self._splice and not self._copy_once else None
        self._copy_once = False
        if stream is not None and target is not None:
            full = False
            try:
                moved = os.splice(self._fd, target, remaining, flags=_SPLICE_FLAGS)
            except BlockingIOError:  # the pipe is empty for now, or the socket is full
                moved, full = -1, True
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
            if full and len(self._mux.streams) == 1:
                self._park(target)
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
