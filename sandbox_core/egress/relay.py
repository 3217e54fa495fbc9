"""The host's half of one worker's network: decide each connection, resolve, connect, relay, log.

The inside asks with ``egress.open {conn, host, port[, first]}``; :meth:`Relay.open` answers
``{"ok": true, "address": ...}`` or ``{"ok": false, "status", "reason", "message",
"policy"}``. The name is checked first (:class:`~sandbox_core.egress.policy.Policy`), then
resolved **on the host** (``network.hosts`` overrides, else the system resolver in a
thread), every address is checked, and the host connects to an address it checked (an IP
literal, so nothing resolves it again: no DNS rebinding between the check and the connect),
then sends ``first`` (the request head of a plain HTTP request, as latin-1 text) upstream.

The bytes of the connection then skip the worker: the worker hands the host the client's own
socket (the proxy's accepted connection) over the **egress socketpair**, which the host made at
spawn: one record of the connection id (u64, big-endian) with the socket attached
(``SCM_RIGHTS``). The host checks the descriptor is a TCP socket (it can only be one of the
sandbox's own: the sandbox has loopback only), and splices upstream and client sockets into
each other itself (:mod:`sandbox_core.egress.tunnel`), counting every byte. The worker is never
given the upstream socket, and a connection the worker does not hand over within
``network.connect_timeout`` is closed. A record that does not carry exactly one TCP socket
ends the worker's network (every connection closed, the descriptors received closed); one for
a connection that waits for none (its wait timed out) has its socket closed.

Each worker has caps: ``network.max_connections`` open (or opening) at once, and
``network.max_mb`` relayed over its life; a connection that crosses the byte cap is
closed, and new ones are refused. Every decision is one line on the ``sandbox_core.egress``
logger: user, host, port, address, reason; refusals past ``network.log_refusals`` a minute
are counted instead and said in one summary line (:mod:`sandbox_core.egress.refusals`).
"""

from __future__ import annotations

import array
import asyncio
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from sandbox_core.config import NetworkPolicy
from sandbox_core.egress.policy import Address, Decision, Policy, normal_host
from sandbox_core.egress.refusals import RefusalLog
from sandbox_core.egress.tunnel import Tunnel
from sandbox_core.shared import EGRESS_HANDOFF

log = logging.getLogger("sandbox_core.egress")
MAX_CONN_ID = 2**64 - 1
MAX_FIRST = 256 * 1024
"""Largest ``first`` of an ``egress.open`` (a request head, at most the proxy's, plus what followed it)."""
_MiB = 1024 * 1024
_RECORDS_PER_WAKE = 64
_FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)
"""Room for one descriptor: any more a record carries are discarded by the kernel (MSG_CTRUNC)."""


class Relay:
    """One worker's connections: its decisions, its caps, and the tunnels of its handed-over sockets."""

    def __init__(
        self,
        net: NetworkPolicy,
        worker_id: str,
        user: Callable[[], str | None],
        on_decision: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.net = net
        self.worker_id = worker_id
        self._user = user
        self._on_decision = on_decision
        """Told every decision (the durable record's egress journal), after the log line."""
        self.tunnels: set[Tunnel] = set()
        self._waiting: dict[int, tuple[socket.socket, asyncio.TimerHandle]] = {}
        """Connected upstream sockets whose client socket the worker has not handed over yet."""
        self._opening = 0
        self._counting = threading.Lock()
        self.relayed = 0
        """Bytes relayed by this worker, both directions."""
        self.stats = {"allowed": 0, "refused": 0}
        self.request_network: tuple[str, ...] | None = None
        """The running request's own narrowing (set by the host's worker handle, never by the worker)."""
        self._byte_cap = net.max_mb * _MiB
        self._handoff: socket.socket | None = None
        self._record = b""
        self._record_fds: list[int] = []
        self.refusals = RefusalLog(net.log_refusals, self._suppressed)
        self._summary_timer: asyncio.TimerHandle | None = None

    async def attach(self, handoff_fd: int) -> None:
        """Take the host's end of the egress socketpair (the worker hands client sockets over it)."""
        sock = socket.socket(fileno=handoff_fd)
        sock.setblocking(False)
        self._handoff = sock
        asyncio.get_running_loop().add_reader(handoff_fd, self._handed)

    def close(self) -> None:
        """The worker is gone: every connection is closed at once (and the refusals not yet said, said)."""
        if self._summary_timer is not None:
            self._summary_timer.cancel()
            self._summary_timer = None
        self.refusals.flush()
        self._end_network()

    def _end_network(self) -> None:
        handoff, self._handoff = self._handoff, None
        if handoff is not None:
            asyncio.get_running_loop().remove_reader(handoff.fileno())
            handoff.close()
        for fd in self._record_fds:
            os.close(fd)
        self._record_fds.clear()
        for conn in list(self._waiting):
            self._drop_waiting(conn)
        for tunnel in list(self.tunnels):
            tunnel.abort()

    @property
    def open_connections(self) -> int:
        return len(self.tunnels) + len(self._waiting)

    def _violation(self, why: str) -> None:
        log.warning("egress worker=%s handoff broke: %s; its connections are closed", self.worker_id, why)
        self._end_network()

    def _handed(self) -> None:
        """Read handoff records: each pairs one waiting upstream socket with the client's socket."""
        handoff = self._handoff
        for _ in range(_RECORDS_PER_WAKE):  # a worker that floods the socketpair cannot hold the loop
            if handoff is None:
                return
            try:
                data, ancillary, flags, _ = handoff.recvmsg(EGRESS_HANDOFF.size - len(self._record), _FD_SPACE,
                                                           socket.MSG_CMSG_CLOEXEC)  # fmt: skip
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._violation(f"the egress socketpair failed ({exc.strerror})")
                return
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                    self._record_fds += received.tolist()
            if not data:
                self._end_network()  # the worker is gone
                return
            if flags & socket.MSG_CTRUNC:
                self._violation("a handoff record carried more than one descriptor")
                return
            self._record += data
            if len(self._record) < EGRESS_HANDOFF.size:
                continue
            (conn,), fds = EGRESS_HANDOFF.unpack(self._record), self._record_fds
            self._record, self._record_fds = b"", []
            if len(fds) != 1:
                self._record_fds = fds  # closed with the network
                self._violation(f"handoff of connection {conn} carried {len(fds)} descriptors, not 1")
                return
            self._start(conn, fds[0])
            handoff = self._handoff

    def _start(self, conn: int, fd: int) -> None:
        """The client's socket for waiting connection ``conn``: checked, then tunnelled to its upstream.

        Anything but a TCP socket ends the worker's network; a socket for a connection that is
        not waiting (its wait timed out, say) is closed alone."""
        try:
            client = socket.socket(fileno=fd)
        except OSError:  # not a socket
            os.close(fd)
            self._violation(f"connection {conn} was handed something that is not a socket")
            return
        if client.family not in (socket.AF_INET, socket.AF_INET6) or client.type != socket.SOCK_STREAM:
            client.close()
            self._violation(f"connection {conn} was handed a socket that is not TCP")
            return
        if conn not in self._waiting:
            client.close()
            log.warning("egress worker=%s handed a socket for connection %s, which waits for none; closed",
                        self.worker_id, conn)  # fmt: skip
            return
        upstream, timer = self._waiting.pop(conn)
        timer.cancel()
        self.tunnels.add(Tunnel(upstream, client, count=self._count, on_closed=self.tunnels.discard))

    def _drop_waiting(self, conn: int) -> None:
        waiting = self._waiting.pop(conn, None)
        if waiting is not None:
            waiting[1].cancel()
            waiting[0].close()

    def _count(self, n: int) -> int:
        """How many of ``n`` bytes read may be relayed (from the tunnels' threads too): all, or what
        is left of the byte cap; those are added to :attr:`relayed`."""
        with self._counting:
            allowed = n if not self._byte_cap else max(0, min(n, self._byte_cap - self.relayed))
            self.relayed += allowed
            return allowed

    async def open(self, params: dict[str, Any]) -> dict[str, Any]:
        """Decide one ``egress.open`` and, if allowed, connect; the answer for the inside."""
        user = self._user()
        conn, host, port = params.get("conn"), params.get("host"), params.get("port")
        first = params.get("first", "")
        if (
            not isinstance(conn, int) or isinstance(conn, bool) or not 0 < conn <= MAX_CONN_ID
            or not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool)
            or not 0 < port < 65536 or len(host) > 300 or not isinstance(first, str) or len(first) > MAX_FIRST
        ):  # fmt: skip
            return self._answer(user, str(host)[:80], port if isinstance(port, int) else 0, None,
                                Decision.refuse("bad_request", "egress.open needs conn, host and port"))
        try:
            head = first.encode("latin-1")
        except UnicodeEncodeError:
            return self._answer(user, str(host)[:80], port, None,
                                Decision.refuse("bad_request", "egress.open: first is not latin-1 text"))
        name = normal_host(host)
        policy = Policy.for_user(self.net, user, self.request_network)
        decision = policy.check_name(name, port)
        if not decision.allowed:
            return self._answer(user, name, port, None, decision, policy)
        if conn in self._waiting or self._handoff is None:
            decision = Decision.refuse("bad_request", f"connection id {conn} is already open"
                                       if self._handoff is not None else "this worker has no egress socketpair")
        elif self.open_connections + self._opening >= self.net.max_connections:
            decision = Decision.refuse(
                "max_connections", f"this worker has {self.net.max_connections} connections open "
                "(network.max_connections)")  # fmt: skip
        elif self._byte_cap and self.relayed >= self._byte_cap:
            decision = Decision.refuse("max_bytes", f"this worker relayed its {self.net.max_mb} MiB (network.max_mb)")
        if not decision.allowed:
            return self._answer(user, name, port, None, decision, policy)
        self._opening += 1
        try:
            return await asyncio.wait_for(self._connect(user, conn, name, port, policy, head),
                                          self.net.connect_timeout)  # fmt: skip
        except TimeoutError:
            self._drop_waiting(conn)  # connected just as the time ran out: not handed over
            decision = Decision.refuse("connect_failed", f"{name}:{port}: no connection within "
                                       f"{self.net.connect_timeout:g} s (network.connect_timeout)", 502)  # fmt: skip
            return self._answer(user, name, port, None, decision, policy)
        finally:
            self._opening -= 1

    async def _connect(
        self, user: str | None, conn: int, name: str, port: int, policy: Policy, head: bytes
    ) -> dict[str, Any]:
        try:
            candidates = await self._resolve(name, port, policy)
        except OSError as exc:
            why = exc.strerror or str(exc)
            decision = Decision.refuse("unresolvable", f"{name} does not resolve on the host ({why})", 502)
            return self._answer(user, name, port, None, decision, policy)
        allowed: list[Address] = []
        refusal: Decision | None = None
        for address in candidates:
            verdict = policy.check_address(name, address)
            if verdict.allowed:
                allowed.append(address)
            refusal = refusal or (None if verdict.allowed else verdict)
        if not allowed:
            assert refusal is not None
            return self._answer(user, name, port, candidates[0] if candidates else None, refusal, policy)
        loop = asyncio.get_running_loop()
        error: OSError | None = None
        for address in allowed:
            try:
                sock = socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
            except OSError as exc:  # out of descriptors: said as a failed connect, like any other
                error = exc
                continue
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, (str(address), port))
                if head:  # counted like the tunnel's bytes (the cap is not reached: checked above)
                    await loop.sock_sendall(sock, head[: self._count(len(head))])
            except OSError as exc:
                sock.close()
                error = exc
                continue
            except BaseException:  # cancelled (the connect timeout): the socket is not handed over
                sock.close()
                raise
            if self._handoff is None:  # the worker went away meanwhile
                sock.close()
                raise ConnectionAbortedError("the worker is gone")
            timer = loop.call_later(self.net.connect_timeout, self._drop_waiting, conn)
            self._waiting[conn] = (sock, timer)
            return self._answer(user, name, port, address, Decision(True, "allowed"), policy)
        why = (error.strerror or str(error)) if error is not None else "no address"
        decision = Decision.refuse("connect_failed", f"{name}:{port}: {why}", 502)
        return self._answer(user, name, port, allowed[0], decision, policy)

    async def _resolve(self, name: str, port: int, policy: Policy) -> list[Address]:
        """The addresses of ``name``: itself if a literal, ``network.hosts``, else DNS (in a thread)."""
        try:
            return [ipaddress.ip_address(name)]
        except ValueError:
            pass
        if name in policy.hosts:
            return [policy.hosts[name]]
        infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
        seen: list[Address] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            address = ipaddress.ip_address(sockaddr[0])
            if address not in seen:
                seen.append(address)
        return seen

    def _answer(
        self, user: str | None, host: str, port: int, address: Address | None, decision: Decision,
        policy: Policy | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Log the decision (a refusal only while :attr:`refusals` admits it) and turn it into the answer."""
        where = f"user={user} host={host} port={port} address={address or '-'}"
        if not decision.allowed:
            self.stats["refused"] += 1
            if not self.refusals.admit():
                self._summarise_later()
                return self._refusal(decision, policy)
        if self._on_decision is not None:
            self._on_decision({"worker_id": self.worker_id, "user_id": user, "host": host, "port": port,
                               "address": str(address) if address else None, "allowed": decision.allowed,
                               "reason": "allowed" if decision.allowed else decision.reason})  # fmt: skip
        if decision.allowed:
            self.stats["allowed"] += 1
            log.info("egress allowed worker=%s %s reason=allowed", self.worker_id, where)
            return {"ok": True, "address": str(address)}
        log.warning("egress refused worker=%s %s reason=%s: %s", self.worker_id, where, decision.reason,
                    decision.message)  # fmt: skip
        return self._refusal(decision, policy)

    @staticmethod
    def _refusal(decision: Decision, policy: Policy | None) -> dict[str, Any]:
        return {
            "ok": False,
            "status": decision.status,
            "reason": decision.reason,
            "message": decision.message,
            "policy": policy.describe() if policy is not None else "",
        }

    def _summarise_later(self) -> None:
        """Say the suppressed count when the window ends, even if no refusal comes after it."""
        if self._summary_timer is None:
            self._summary_timer = asyncio.get_running_loop().call_later(self.refusals.remaining(), self._window_ended)

    def _window_ended(self) -> None:
        self._summary_timer = None
        self.refusals.flush()

    def _suppressed(self, count: int, window: float) -> None:
        user = self._user()
        log.warning("egress refused worker=%s user=%s: %d more refusals suppressed in the last %g s "
                    "(network.log_refusals = %d)", self.worker_id, user, count, window, self.net.log_refusals)
        if self._on_decision is not None:
            self._on_decision({"worker_id": self.worker_id, "user_id": user, "host": None, "port": None,
                               "address": None, "allowed": False, "reason": "suppressed", "suppressed": count,
                               "window_s": window})  # fmt: skip
