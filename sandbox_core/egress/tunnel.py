"""One relayed connection on the host: the upstream socket and the sandbox client's socket, spliced.

Once the host has decided and connected, the worker hands it the client's own socket (the
accepted proxy connection, over the egress socketpair: :mod:`sandbox_core.egress.relay`), so the
bytes of a connection cross one process and no framing at all. Each direction is a thread of
its own that splices (``splice(2)``) its source socket into a pipe of its own and the pipe into
the other socket, blocking, without copying the bytes through Python (measured: an event loop
driving the same splices reached ~0.42x a direct download, a blocking thread per direction at
the ceiling of one relay process, ~0.5x). A direction reads its source only once its pipe is
empty, so what the host holds per direction is one pipe (at most :data:`PIPE_BYTES`); a side
that stops reading stops the other side's socket, whose bytes then wait in the kernel's socket
buffers (each side's own memory). End of file on one side is a half close of the other
(``shutdown(SHUT_WR)``); an error on either socket ends both at once, and so does the relay's
byte cap, once the bytes within it are passed on (exact to the byte).

Ending is by ``shutdown(SHUT_RDWR)``, which wakes both threads; the sockets are closed only by
the last thread to leave (under the lock :meth:`Tunnel.abort` takes too), so no descriptor is
closed while a thread may still use its number. A connection that ends by an error (or by
:meth:`Tunnel.abort`) is *reset* on both sides (``SO_LINGER`` zero, so the close sends RST), and
the side whose bytes crossed the cap is reset: a peer that is still sending learns at once.
A plain close would leave it a FIN, which a sender blocked on a zero window may never see
(measured: a server writing a download the sandbox dropped sat in CLOSE_WAIT until the orphaned
socket timed out, holding its thread and descriptor).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable

from sandbox_core import datapipe

CHUNK = 1024 * 1024
"""How much one splice may move."""
PIPE_BYTES = 1024 * 1024
"""Capacity asked of each direction's pipe (F_SETPIPE_SZ; the default 64 KiB if refused)."""
_FLAGS = getattr(os, "SPLICE_F_MOVE", 0)
_RESET = struct.pack("ii", 1, 0)
"""``SO_LINGER`` on with a zero time: ``close`` sends RST and drops what is unsent."""


class Tunnel:
    """Both directions of one connection; :meth:`abort`, an error or the end of both closes everything.

    ``count`` is called (from the directions' threads) with every byte count read and answers
    how many of them may pass; fewer than all ends the connection once those are passed on.
    ``on_closed`` is called on the event loop once every descriptor is closed."""

    def __init__(
        self,
        upstream: socket.socket,
        client: socket.socket,
        *,
        count: Callable[[int], int],
        on_closed: Callable[[Tunnel], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sockets = (upstream, client)
        for sock in self._sockets:
            sock.setblocking(True)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._count = count
        self._on_closed = on_closed
        self._lock = threading.Lock()
        self._running = 2
        self._reset: set[socket.socket] = set()
        self.closed = False
        """Every descriptor of the connection is closed."""
        for src, dst, name in ((upstream, client, "down"), (client, upstream, "up")):
            threading.Thread(target=self._pump, args=(src, dst), name=f"egress-{name}", daemon=True).start()

    def abort(self, reset: tuple[socket.socket, ...] | None = None) -> None:
        """End the connection at once (from any thread): both sockets shut down, so both threads leave.

        ``reset`` (default: both) are the sockets whose close sends RST."""
        with self._lock:
            if self.closed:
                return
            self._reset.update(self._sockets if reset is None else reset)
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        """One direction, until end of file (then a half close of ``dst``) or an error (then both end)."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, datapipe.F_SETPIPE_SZ, PIPE_BYTES)
        try:
            while True:
                n = os.splice(src.fileno(), write_end, CHUNK, flags=_FLAGS)
                if not n:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    break
                allowed = self._count(n)
                left = allowed
                while left:
                    left -= os.splice(read_end, dst.fileno(), left, flags=_FLAGS)
                if allowed < n:  # the cap falls inside this read: what is within it is passed on
                    self.abort(reset=(src,))
                    break
        except OSError:
            self.abort()
        finally:
            os.close(read_end)
            os.close(write_end)
            self._left()

    def _left(self) -> None:
        with self._lock:
            self._running -= 1
            if self._running:
                return
            self.closed = True
            for sock in self._sockets:
                if sock in self._reset:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                sock.close()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for the news
            self._loop.call_soon_threadsafe(self._on_closed, self)
