"""The inside half of the network crossing: an HTTP proxy on the sandbox's own loopback.

The strict sandbox has a network namespace with loopback only. The worker listens on
``127.0.0.1:EGRESS_PROXY_PORT`` there, and every command gets ``HTTP_PROXY``,
``HTTPS_PROXY``, ``ALL_PROXY`` and ``NO_PROXY`` (both spellings) pointing at it, so pip,
npm, git, curl and urllib use it unchanged. It speaks ``CONNECT host:port`` (tunnels: TLS
goes end to end) and plain HTTP with an absolute URI (``GET http://host/path``, sent on as
origin form with ``Connection: close``: one request per connection).

The proxy decides nothing and relays nothing: it asks the host (``egress.open``) for each
connection, and the host checks its policy, resolves the name and connects; the proxy then
answers ``CONNECT`` with ``200`` and hands the client's socket to the host over the egress
socketpair (``SCM_RIGHTS``, :mod:`sandbox_core.egress.relay`), which splices it to the upstream
socket itself, and closes its own copy. A refusal is answered ``403`` (``502`` when the host
could not connect) with the host's reason as the status line's phrase, for ``CONNECT`` and
plain requests alike, and a body naming the host, the port and the policy.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import os
import socket
from typing import Any

from sandbox_core.errors import SandboxError
from sandbox_core.frozen import Frozen, init_field
from sandbox_core.inside.channel import Channel
from sandbox_core.shared import EGRESS_HANDOFF, EGRESS_OPEN, EGRESS_PROXY_PORT

MAX_HEAD = 64 * 1024
"""Largest request head (request line and headers) the proxy reads."""
ACCEPT_RETRY_SECONDS = 1.0
"""How long the proxy stops accepting when it is out of descriptors."""
_HOP_HEADERS = frozenset({b"proxy-connection", b"proxy-authorization", b"connection", b"keep-alive"})
"""Headers for this hop only: never sent on."""


class BadRequest(ValueError):
    """The client's request is not one the proxy speaks."""


class ProxyRequest(Frozen):
    """Where one request goes; ``head``, for plain HTTP: the head to send upstream (origin form,
    ``Connection: close``)."""

    __slots__ = ("connect", "head", "host", "port")
    connect: bool
    host: str
    port: int
    head: bytes

    def __init__(self, connect: bool, host: str, port: int, head: bytes = b"") -> None:
        init_field(self, "connect", connect)
        init_field(self, "host", host)
        init_field(self, "port", port)
        init_field(self, "head", head)


def parse_head(head: bytes) -> ProxyRequest:
    """The destination of one request head (ending with the blank line), or BadRequest."""
    lines = head.split(b"\r\n")
    try:
        method, target, version = lines[0].decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the request line is not 'METHOD TARGET HTTP/1.x'") from None
    if not version.startswith("HTTP/1."):
        raise BadRequest(f"{version!r} is not HTTP/1.x")
    if method == "CONNECT":
        host, sep, port = target.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
            raise BadRequest(f"CONNECT needs host:port, got {target!r}")
        return ProxyRequest(True, host.strip("[]"), int(port))
    if not target.lower().startswith("http://"):
        if target.lower().startswith("https://"):
            raise BadRequest("an https:// URL goes through CONNECT (set HTTPS_PROXY, not a plain request)")
        raise BadRequest("this is a proxy: send an absolute http:// URI or CONNECT")
    from urllib.parse import urlsplit  # only here: with ipaddress ~9 ms of every worker's start

    try:
        url = urlsplit(target)
        port_number = url.port or 80
    except ValueError as exc:
        raise BadRequest(f"bad URL {target!r}: {exc}") from None
    if not url.hostname:
        raise BadRequest(f"no host in {target!r}")
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    # Host is the URI's, whatever the client said: the host checked the URI's name, so the
    # request must not name another site served at the same address.
    out = [f"{method} {path} {version}".encode("ascii"), b"Host: " + url.netloc.rpartition("@")[2].encode("idna")]
    for line in lines[1:]:
        name = line.split(b":", 1)[0].strip().lower()
        if line and name not in _HOP_HEADERS and name != b"host":
            out.append(line)
    out.append(b"Connection: close")
    return ProxyRequest(False, url.hostname, port_number, b"\r\n".join(out) + b"\r\n\r\n")


def refusal(status: int, message: str, host: str, port: int, policy: str) -> bytes:
    """The whole answer to a refused request: the reason as the status phrase and in the body."""
    phrase = "".join(c if 32 <= ord(c) < 127 else "?" for c in message)[:300] or "Forbidden"
    body = f"sandbox network: {message}\nhost: {host}\nport: {port}\npolicy: {policy or '-'}\n".encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1", "replace") + body


class Proxy:
    """The listening proxy of one worker: a plain listening socket; each client a :class:`_Client`.

    Sockets are plain non-blocking sockets (not asyncio transports), so that once a request is
    answered the client's socket can be handed to the host with nothing of it kept here."""

    def __init__(self, channel: Channel, handoff: socket.socket | None) -> None:
        self.channel = channel
        self.handoff = handoff
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._clients: set[_Client] = set()
        self.listener: socket.socket | None = None
        self.port = EGRESS_PROXY_PORT

    async def start(self, port: int = EGRESS_PROXY_PORT) -> None:
        self.port = port
        listener = socket.create_server(("127.0.0.1", port), backlog=128)
        listener.setblocking(False)
        os.set_inheritable(listener.fileno(), False)
        self.listener = listener
        asyncio.get_running_loop().add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        listener = self.listener
        for _ in range(64):
            if listener is None:
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except (ConnectionAbortedError, ConnectionResetError):  # that client is gone already
                continue
            except OSError:  # out of descriptors: stop accepting for a while (else the loop spins)
                loop = asyncio.get_running_loop()
                loop.remove_reader(listener.fileno())
                loop.call_later(ACCEPT_RETRY_SECONDS, self._accept_again)
                return
            self._clients.add(_Client(self, sock))

    def _accept_again(self) -> None:
        if self.listener is not None:
            asyncio.get_running_loop().add_reader(self.listener.fileno(), self._accept)

    def serve(self, client: _Client, head: bytes, rest: bytes) -> None:
        task = asyncio.create_task(self._serve(client, head, rest))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, client: _Client, head: bytes, rest: bytes) -> None:
        sock = client.sock
        try:
            request = parse_head(head)
        except BadRequest as exc:
            client.refuse(refusal(400, str(exc), "-", 0, ""))
            return
        conn = next(self._ids)
        first = b"" if request.connect else request.head
        first += rest
        try:
            params = {"conn": conn, "host": request.host, "port": request.port, "first": first.decode("latin-1")}
            answer: Any = await self.channel.ask_host(EGRESS_OPEN, params)
        except SandboxError as exc:
            answer = {"ok": False, "status": 502, "message": f"the host did not answer: {exc.message}"}
        except BaseException:
            client.close()
            raise
        if not isinstance(answer, dict):
            answer = {"ok": False, "status": 502, "message": "the host's answer was not understood"}
        if not answer.get("ok") or self.handoff is None:
            status = answer.get("status")
            client.refuse(refusal(
                status if isinstance(status, int) else 403, str(answer.get("message") or "refused"),
                request.host, request.port, str(answer.get("policy") or ""),
            ))  # fmt: skip
            return
        if request.connect:  # before the handover: the host's bytes come after it
            with contextlib.suppress(OSError):
                sock.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
        fds = array.array("i", [sock.fileno()])
        try:  # one small record: the socketpair's buffer takes it whole
            self.handoff.sendmsg([EGRESS_HANDOFF.pack(conn)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
        except OSError:
            pass  # the host is gone or busy: it closes the connection it holds after its timeout
        client.close()

    def forget(self, client: _Client) -> None:
        self._clients.discard(client)

    def close(self) -> None:
        if self.listener is not None:
            asyncio.get_running_loop().remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
        for client in list(self._clients):
            client.close()
        for task in self._tasks:
            task.cancel()


class _Client:
    """A client connection until its request head is read and answered."""

    def __init__(self, proxy: Proxy, sock: socket.socket) -> None:
        self._proxy = proxy
        self.sock = sock
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        self._reading = True
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self.sock.fileno())

    def _readable(self) -> None:
        try:
            data = self.sock.recv(MAX_HEAD + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()  # gone before its request head was whole
            return
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                self.refuse(refusal(431, f"request head over {MAX_HEAD} bytes", "-", 0, ""))
            return
        self._stop_reading()
        head, rest = bytes(self._buf[: end + 4]), bytes(self._buf[end + 4 :])
        self._buf = bytearray()
        self._proxy.serve(self, head, rest)

    def refuse(self, answer: bytes) -> None:
        """Answer and close (the answer is small: the socket's buffer takes it whole)."""
        with contextlib.suppress(OSError):
            self.sock.send(answer)
        self.close()

    def close(self) -> None:
        self._stop_reading()
        self._proxy.forget(self)
        self.sock.close()


async def start(channel: Channel, network: dict[str, Any], handoff_fd: Any) -> Proxy:
    """The worker's proxy, listening, with the egress socketpair (if the host gave one)."""
    handoff: socket.socket | None = None
    if isinstance(handoff_fd, int) and not isinstance(handoff_fd, bool):
        os.set_inheritable(handoff_fd, False)  # commands never inherit it
        handoff = socket.socket(fileno=handoff_fd)
        handoff.setblocking(False)
    proxy = Proxy(channel, handoff)
    port = network.get("proxy_port", EGRESS_PROXY_PORT)
    await proxy.start(port if isinstance(port, int) else EGRESS_PROXY_PORT)
    return proxy
