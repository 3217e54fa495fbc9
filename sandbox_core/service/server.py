"""Running the service: uvicorn on a Unix socket (0600, or 0660 for ``service.socket_group``)
or a loopback TCP port.

Signals: the first SIGTERM or SIGINT drains — listeners close (no new runs), in-flight
runs get ``service.drain_grace`` seconds to finish; a run still going then is stopped, and
its streams end with a last ``error`` event, :class:`ServerShuttingDown`, instead of being
cut mid-body (the log gets one line per run stopped). A second SIGINT stops the runs at
once. Either way the pool is shut down before the process exits, leaving no worker behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import ConfigError, ServerShuttingDown
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.record import open_record
from sandbox_core.service import logs
from sandbox_core.service.app import ServiceState, create_app
from sandbox_core.service.auth import UNIX_PEER, TokenTable
from sandbox_core.service.paths import default_socket_path
from sandbox_core.service.trust import peer_uid

WS_MAX_MESSAGE = 1024 * 1024
"""Largest WebSocket message a client may send (terminal keys come in far smaller ones)."""

log = logging.getLogger("sandbox.service")

STREAM_END_GRACE = 10.0
"""Seconds after the drain for the streams of stopped runs to deliver their last event and
close, before uvicorn cancels what is left."""


class PeerCredProtocol(H11Protocol):
    """uvicorn's h11 protocol, recording a Unix-socket peer's uid as the ASGI client."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        uid = peer_uid(sock) if sock is not None else None
        if uid is not None:
            self.client = (UNIX_PEER, uid)


class PeerCredWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol (after an upgrade), recording a Unix-socket peer's uid too."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        uid = peer_uid(sock) if sock is not None else None
        if uid is not None:
            self.client = (UNIX_PEER, uid)


def socket_gid(group: str | None) -> int | None:
    """The gid of ``service.socket_group`` (a name or a number), None when unset."""
    if group is None:
        return None
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError("service.socket_group", f"no group {group!r} on this host (groupadd it, or give a gid)"
                          ) from None  # fmt: skip


def bind_unix(path: Path, group: int | None = None) -> socket.socket:
    """A listening Unix socket at ``path``: 0600 in a 0700 directory we own, or with ``group``
    0660 in a 0750 directory of that group. The directory is checked (and its mode and group
    set) through a descriptor on every start."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("service.socket_path", f"cannot create {path.parent}: {exc.strerror or exc}; "
                          "set XDG_RUNTIME_DIR, or service.socket_path (--socket) to a path you own") from None
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        parent = os.fstat(dir_fd)
        if parent.st_uid != os.getuid() or parent.st_mode & 0o022:
            raise ConfigError("service.socket_path", f"{path.parent} must be owned by us and not group/world-writable")
        if group is not None:
            os.fchown(dir_fd, -1, group)
            os.fchmod(dir_fd, 0o750)
        elif stat.S_IMODE(parent.st_mode) & 0o077:
            os.fchmod(dir_fd, 0o700)  # no group asked for: nobody else may even look in
    finally:
        os.close(dir_fd)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # stale socket of a dead server
            else:
                probe.close()
                raise ConfigError("service.socket_path", f"a server is already listening on {path}")
            finally:
                probe.close()
        else:
            raise ConfigError("service.socket_path", f"{path} exists and is not a socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    if group is not None:
        os.chown(path, -1, group)  # in our own 0750 directory: nobody else can swap it
        os.chmod(path, 0o660)
    else:
        os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def bind_tcp(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("listen", f"expected HOST:PORT, got {listen!r}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), int(port)))
    sock.listen(128)
    return sock


async def drain(state: ServiceState, grace: float, forced: Callable[[], bool] = lambda: False) -> int:
    """Refuse new runs, give the runs in flight ``grace`` seconds (until ``forced()``), then stop
    the rest with :class:`ServerShuttingDown`, one log line each; returns how many were stopped."""
    state.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while (running := state.runs.running()) and not forced() and (left := deadline - loop.time()) > 0:
        tasks = [r.task for r in running if r.task is not None]
        await asyncio.wait(tasks, timeout=min(left, 0.1))  # ticks: a second signal ends the wait
    cut = state.runs.running()
    for run in cut:
        age = time.time() - run.created
        log.warning("sandbox: stopped run %s (%s of %s, %.1f s old): the server is shutting down",
                    run.run_id, run.kind, run.owner.user_id, age)
    error = ServerShuttingDown(
        f"the server is shutting down: the run did not finish within the drain (service.drain_grace = {grace:g} s)",
        data={"setting": "service.drain_grace", "limit": grace},
    )
    await asyncio.gather(*(state.runs.cut(run, error) for run in cut))
    return len(cut)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServiceState, drain_grace: float) -> None:
        super().__init__(config)
        self._service = state
        self._drain_grace = drain_grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown (listeners close, connections finish) with our drain beside it:
        the streams of the runs it stops end with their last event, so uvicorn has nothing to cut."""
        drained = asyncio.create_task(drain(self._service, self._drain_grace, lambda: self.force_exit))
        try:
            await super().shutdown(sockets)
        finally:
            await drained

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._service.draining = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals when it returns, which would kill us before
        # the pool is shut down; we drain and exit normally instead.
        self._captured_signals.clear()


async def serve(
    config: ProcessSandboxConfig,
    *,
    listen: str | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until a signal; ``listen`` = ``HOST:PORT`` for TCP, else the Unix socket."""
    if listen is not None:
        if config.service.tokens_file is None:
            raise ConfigError("service.tokens_file", "TCP listening needs a tokens file (service.tokens_file)")
        tokens = TokenTable.from_file(config.service.tokens_file)
        sock = bind_tcp(listen)
        where = "http://{}:{}".format(*sock.getsockname()[:2])
        transport = "tcp"
        path: Path | None = None
    else:
        tokens = TokenTable()
        path = default_socket_path(config)
        sock = bind_unix(path, socket_gid(config.service.socket_group))
        where = f"unix:{path}"
        transport = "unix"
    try:
        record = open_record(config)
    except (OSError, sqlite3.Error) as exc:
        sock.close()
        raise ConfigError("state_dir", f"cannot open the record in {config.state_dir}: {exc}; "
                          "set state_dir to a directory the service can write, or "
                          "record.enabled = false") from None  # fmt: skip
    orchestrator = SandboxOrchestrator(config, record=record, origin="service")
    state = ServiceState(config, orchestrator, transport=transport, tokens=tokens)
    key = config.model.api_key
    log_config = logs.configure(config.service.log_level, [str(key)] if key else [])
    uconfig = uvicorn.Config(
        create_app(state),
        http=PeerCredProtocol,
        ws=PeerCredWebSocketProtocol,
        ws_max_size=WS_MAX_MESSAGE,
        lifespan="off",
        log_config=log_config,
        log_level=config.service.log_level,
        access_log=True,
        timeout_graceful_shutdown=int(config.service.drain_grace + STREAM_END_GRACE + 1),
    )
    server = _Server(uconfig, state, config.service.drain_grace)
    await orchestrator.start()
    try:
        if on_ready is not None:
            loop = asyncio.get_running_loop()
            loop.call_soon(on_ready, where)
        await server.serve(sockets=[sock])
    finally:
        state.draining = True
        # uvicorn closes its listeners only on a normal exit: when serve() is cancelled (an
        # embedding program stops it) they are still registered with the event loop, and
        # closing the socket under them would leave a stale registration that a later
        # listener on the same descriptor number inherits (and never gets a connection).
        for listener in getattr(server, "servers", []):
            listener.close()
        await state.runs.cancel_all()
        await orchestrator.shutdown(grace=0 if server.force_exit else config.shutdown_grace)
        if record is not None:
            await asyncio.to_thread(record.close)
        sock.close()
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        await asyncio.to_thread(logs.close)  # the lines still queued, for a bounded time
