"""The HTTP client of the service, used by the CLI in client mode (``--connect``).

``target`` is ``unix:/path``, a filesystem path of a socket, or an ``http(s)://`` URL;
the bearer token (TCP) comes from ``SANDBOX_TOKEN`` or a token file, never a flag.

On a Unix socket every connection the client opens is checked before the first request
byte is written on it (see :mod:`sandbox_core.service.trust`): the path and its directories
as the connection is made, and the listener's uid (``SO_PEERCRED``) on that very socket.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpcore2
import httpx2

from sandbox_core.errors import (
    ConfigError,
    FileTransferError,
    from_wire,
)
from sandbox_core.events import Event
from sandbox_core.service.thin import parse_sse
from sandbox_core.service.trust import check_peer, connect_checked, open_checked, trusted_uids
from sandbox_core.service.wire import ServiceError, ServiceUnreachable, check_status

__all__ = ["RemoteTerminal", "RemoteTerminalSession", "ServiceClient", "ServiceError", "ServiceUnreachable",
           "parse_sse"]

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection


class _CheckedUnixBackend(httpcore2.AnyIOBackend):
    """Opens connections to one service socket, each only after the trust checks pass.

    httpcore asks its network backend for every new connection (the first, and any after a
    keep-alive one closed), and writes a request only on a stream the backend returned: a
    stream whose listener is not trusted is closed here instead of returned.
    """

    def __init__(self, path: Path, trusted: frozenset[int]) -> None:
        self._path = path
        self._trusted = trusted

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore2.AsyncNetworkStream:
        try:
            with open_checked(self._path, self._trusted) as address:
                stream = await super().connect_unix_socket(address, timeout, socket_options)
        except OSError as exc:  # nothing there, or not ours to open
            raise httpcore2.ConnectError(f"{self._path}: {exc.strerror or exc}") from exc
        try:
            check_peer(stream.get_extra_info("socket"), self._path, self._trusted)
        except BaseException:
            await stream.aclose()
            raise
        return stream


class _CheckedUnixTransport(httpx2.AsyncHTTPTransport):
    """httpx2's transport over a Unix socket whose connections come from :class:`_CheckedUnixBackend`.

    httpx2 takes no network backend, so the connection pool it built is replaced by one
    that has ours (same limits as httpx2's defaults); everything else, including the
    mapping of httpcore's errors to httpx2's, is httpx2's own.
    """

    def __init__(self, path: Path, trusted: frozenset[int]) -> None:
        super().__init__(uds=str(path))
        self._pool = httpcore2.AsyncConnectionPool(
            max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0,
            uds=str(path), network_backend=_CheckedUnixBackend(path, trusted),
        )


def _transport(target: str, server_uids: Iterable[str | int]) -> tuple[str, httpx2.AsyncHTTPTransport]:
    if target.startswith(("http://", "https://")):
        return target.rstrip("/"), httpx2.AsyncHTTPTransport()
    path = target[len("unix:"):] if target.startswith("unix:") else target
    if not path.startswith("/"):
        raise ConfigError("connect", f"expected a socket path, unix:/path or http(s) URL, got {target!r}")
    return "http://sandbox", _CheckedUnixTransport(Path(path), trusted_uids(server_uids))


class ServiceClient:
    """Talks to a running ``sandbox serve``.

    On a Unix socket it talks only to a listener running as root, as this process's uid
    or as one of ``server_uids`` (``service.server_uids``); any other raises
    :class:`~sandbox_core.errors.UntrustedService` before a request is sent.
    """

    def __init__(
        self, target: str, token: str | None = None, timeout: float = 30.0, *,
        server_uids: Iterable[str | int] = (),
    ) -> None:
        base, transport = _transport(target, server_uids)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._target, self._headers = target, headers
        self._trusted = trusted_uids(server_uids)
        self._http = httpx2.AsyncClient(
            base_url=base, transport=transport, headers=headers,
            timeout=httpx2.Timeout(timeout, read=None),
        )
        self.last_run_id: str | None = None

    async def __aenter__(self) -> ServiceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = await self._http.request(method, path, json=body)
        except httpx2.TransportError as exc:
            raise ServiceUnreachable(f"cannot reach the service: {exc}") from exc
        self._check(response.status_code, response.text)
        return response.json()

    @staticmethod
    def _check(status: int, text: str) -> None:
        check_status(status, text)

    async def health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._json("GET", "/v1/health")
        return result

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._json("GET", "/v1/stats")
        return result

    async def runs(self, *, user_id: str | None = None, since: str | None = None, limit: int = 100
                   ) -> list[dict[str, Any]]:  # fmt: skip
        """``GET /v1/runs``: live and recorded runs (a user's own; an operator's choice of user)."""
        query = _query(user=user_id, since=since, limit=limit)
        result: list[dict[str, Any]] = (await self._json("GET", f"/v1/runs{query}"))["runs"]
        return result

    async def journal(self, *, user_id: str | None = None, kind: str | None = None, since: str | None = None,
                      after: int = 0, limit: int = 200) -> list[dict[str, Any]]:  # fmt: skip
        """``GET /v1/journal``: the record's entries after id ``after``."""
        query = _query(user=user_id, kind=kind, since=since, after=after or None, limit=limit)
        result: list[dict[str, Any]] = (await self._json("GET", f"/v1/journal{query}"))["entries"]
        return result

    async def workers(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = (await self._json("GET", "/v1/workers"))["workers"]
        return result

    async def launch(self, count: int, user_id: str | None = None) -> list[str]:
        body: dict[str, Any] = {"count": count}
        if user_id is not None:
            body["user_id"] = user_id
        result: list[str] = (await self._json("POST", "/v1/workers/launch", body))["launched"]
        return result

    async def stop_workers(
        self, *, worker_ids: list[str] | None = None, user_id: str | None = None, everything: bool = False
    ) -> int:
        body: dict[str, Any] = {"all": everything}
        if worker_ids is not None:
            body["worker_ids"] = worker_ids
        if user_id is not None:
            body["user_id"] = user_id
        result: int = (await self._json("POST", "/v1/workers/stop", body))["stopped"]
        return result

    async def cancel(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._json("POST", f"/v1/runs/{run_id}/cancel")
        return result

    async def send_stdin(self, run_id: str, chunks: AsyncIterable[bytes]) -> dict[str, Any]:
        """Stream ``chunks`` as the stdin of a run started with ``stdin_stream: true``."""
        try:
            response = await self._http.post(
                f"/v1/runs/{run_id}/stdin", content=chunks, headers={"Content-Type": "application/octet-stream"}
            )
        except httpx2.TransportError as exc:
            raise ServiceUnreachable(f"lost the service connection while sending stdin: {exc}") from exc
        self._check(response.status_code, response.text)
        result: dict[str, Any] = response.json()
        return result

    def terminal(
        self, argv: Sequence[str] | None = None, *, rows: int = 24, cols: int = 80, term: str | None = None,
        timeout: float | None = None, stdin: bool = True, network: tuple[str, ...] | None = None,
    ) -> RemoteTerminalSession:
        """A terminal session over ``WS /v1/terminal`` (``argv`` None: the login shell), in the
        sandbox of the user the credentials name; ``async with`` it for a :class:`RemoteTerminal`.
        ``network`` narrows the network policy (as a run's ``network``)."""
        opening: dict[str, Any] = {"rows": rows, "cols": cols, "stdin": stdin}
        if network is not None:
            from sandbox_core.requests import network_to_json

            opening["network"] = network_to_json(network)
        if argv is not None:
            opening["argv"] = list(argv)
        if term is not None:
            opening["term"] = term
        if timeout is not None:
            opening["timeout"] = timeout
        return RemoteTerminalSession(self._target, self._headers, self._trusted, opening)

    async def upload_tar(self, path: str, chunks: AsyncIterable[bytes], *, user: str | None = None,
                         cp: bool = False) -> dict[str, Any]:  # fmt: skip
        """``PUT /v1/files``: a tar stream unpacked at ``path`` in the workspace (``cp``: ``cp -r`` rules)."""
        params = {"path": path, **({"user": user} if user else {}), **({"mode": "cp"} if cp else {})}
        try:
            response = await self._http.put("/v1/files", params=params, content=chunks,
                                             headers={"Content-Type": "application/x-tar"})
        except httpx2.TransportError as exc:
            raise ServiceUnreachable(f"lost the service connection while uploading: {exc}") from exc
        self._check_files(response.status_code, response.text)
        result: dict[str, Any] = response.json()
        return result

    async def download_tar(self, path: str, *, user: str | None = None) -> AsyncGenerator[bytes, None]:
        """``GET /v1/files``: a tar stream of ``path`` in the workspace."""
        params = {"path": path, **({"user": user} if user else {})}
        try:
            async with self._http.stream("GET", "/v1/files", params=params) as response:
                if response.status_code >= 400:
                    self._check_files(response.status_code, (await response.aread()).decode(errors="replace"))
                async for chunk in response.aiter_bytes():
                    yield chunk
        except httpx2.TransportError as exc:
            raise ServiceUnreachable(f"lost the service connection while downloading: {exc}") from exc

    def _check_files(self, status: int, text: str) -> None:
        """A file route's error as the FileTransferError (or limit) the library would raise."""
        if status in (404, 409, 507):
            try:
                body = json.loads(text)
            except ValueError:
                body = {}
            raise FileTransferError(str(body.get("error") or text[:200]),
                                    data={"status": status, "reason": body.get("reason"), "path": body.get("path")})
        self._check(status, text)

    async def stream(self, kind: str, body: dict[str, Any]) -> AsyncGenerator[Event, None]:
        """Start a run (``agent`` or ``exec``) and yield its events; errors raise typed."""
        async for event in self._events("POST", f"/v1/runs/{kind}", body):
            yield event

    async def attach(self, run_id: str, after: int = 0) -> AsyncGenerator[Event, None]:
        headers = {"Last-Event-ID": str(after)} if after else None
        async for event in self._events("GET", f"/v1/runs/{run_id}/events", None, headers):
            yield event

    async def _events(
        self, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str] | None = None
    ) -> AsyncGenerator[Event, None]:
        try:
            async with self._http.stream(method, path, json=body, headers=headers) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    self._check(response.status_code, text)
                self.last_run_id = response.headers.get("x-run-id")
                async for seq, kind, data in parse_sse(response.aiter_lines()):
                    payload = json.loads(data)
                    if kind == "error":
                        raise from_wire(payload)
                    yield Event.from_dict({"type": kind, "seq": seq or 0, "data": payload})
        except httpx2.TransportError as exc:
            raise ServiceError(f"lost the service connection: {exc}") from exc


SERVICE_RESTART = 1012
"""The close code of a service that shuts down (uvicorn's)."""
WS_MAX_MESSAGE = 4 * 1024 * 1024
"""Largest message the client takes from the service (terminal output comes in far smaller ones)."""


class RemoteTerminal:
    """A terminal session on the service: the same calls as :class:`sandbox_core.terminal.Terminal`."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ended = False
        self.result: dict[str, Any] | None = None

    @property
    def exit_code(self) -> int | None:
        code = self.result.get("exit_code") if self.result is not None else None
        return code if isinstance(code, int) else None

    async def write(self, data: bytes) -> None:
        if data:
            await self._send(bytes(data))

    async def resize(self, rows: int, cols: int) -> None:
        await self._send(json.dumps({"type": "resize", "rows": rows, "cols": cols}))

    async def close_stdin(self) -> None:
        await self._send(json.dumps({"type": "eof"}))

    async def _send(self, message: bytes | str) -> None:
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):  # the end (or the loss) shows in read()
            await self._ws.send(message)

    async def read(self) -> bytes:
        """The next bytes of the terminal; ``b""`` at its end; the session's error raised typed."""
        from websockets.exceptions import ConnectionClosed

        while not self._ended:
            try:
                message = await self._ws.recv()
            except ConnectionClosed as exc:
                self._ended = True
                if exc.rcvd is not None and exc.rcvd.code == SERVICE_RESTART:
                    raise ServiceUnreachable("the service shut down and ended the session") from None
                raise ServiceUnreachable(f"lost the service connection: {exc}") from None
            if isinstance(message, bytes):
                if message:
                    return message
                continue
            try:
                body = json.loads(message)
            except ValueError:
                continue
            if not isinstance(body, dict):
                continue
            if body.get("type") == "exit":
                self._ended = True
                self.result = {k: v for k, v in body.items() if k != "type"}
            elif body.get("type") == "error":
                self._ended = True
                error = body.get("error")
                raise from_wire(error if isinstance(error, dict) else {"message": str(error)})
        return b""

    async def wait(self) -> int | None:
        while await self.read():
            pass
        return self.exit_code


class RemoteTerminalSession:
    """Connects (checking a Unix socket like every connection), opens the session, closes it on exit."""

    def __init__(self, target: str, headers: dict[str, str], trusted: frozenset[int], opening: dict[str, Any]) -> None:
        self._target, self._headers, self._trusted, self._opening = target, headers, trusted, opening
        self._ws: ClientConnection | None = None

    async def __aenter__(self) -> RemoteTerminal:
        import asyncio

        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidHandshake, InvalidStatus

        sock = None
        if self._target.startswith(("http://", "https://")):
            uri = "ws" + self._target.rstrip("/")[len("http"):] + "/v1/terminal"
        else:
            path = Path(self._target.removeprefix("unix:"))
            try:
                sock = await asyncio.to_thread(connect_checked, path, self._trusted)
            except OSError as exc:
                raise ServiceUnreachable(f"cannot reach the service: {path}: {exc.strerror or exc}") from exc
            sock.settimeout(None)
            uri = "ws://sandbox/v1/terminal"
        try:
            self._ws = await connect(uri, sock=sock, additional_headers=self._headers, max_size=WS_MAX_MESSAGE,
                                     open_timeout=30)
        except InvalidStatus as exc:
            status = exc.response.status_code
            ServiceClient._check(status, exc.response.body.decode(errors="replace") if exc.response.body else "")
            raise ServiceError(f"the service refused the terminal ({status})", data={"status": status}) from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            if sock is not None:
                sock.close()
            raise ServiceUnreachable(f"cannot reach the service: {exc}") from exc
        await self._ws.send(json.dumps(self._opening))
        return RemoteTerminal(self._ws)

    async def __aexit__(self, *exc: object) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()


def _query(**params: object) -> str:
    """``?a=1&b=2`` of the parameters that are not None (empty when none are)."""
    from urllib.parse import urlencode

    given = {k: str(v) for k, v in params.items() if v is not None}
    return "?" + urlencode(given) if given else ""
