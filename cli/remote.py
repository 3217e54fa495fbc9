"""Client mode: the commands talking to a running ``sandbox serve`` instead of an in-process pool.

:class:`Target` is where the service listens (``unix:/path`` or ``http(s)://HOST:PORT``);
:class:`RemotePool` is the part of the orchestrator's API the commands use
(``execute_stream``, stats, workers, launch, stop), over the service's HTTP API. The
service decides who the caller is from the credentials (the peer uid on the Unix socket,
the bearer token on TCP): a ``--user`` given here is not sent, only compared. A Unix socket
is used only if it passes the checks of :mod:`sandbox_core.service.trust` (its path, its
owner, and the uid of the process listening on it), default socket and ``--connect`` alike.

This module stays light (no HTTP client at import) so in-process commands do not pay for it.
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.service_exec import CANCEL_TIMEOUT  # one wait for a cancelled run, in every client of the service
from sandbox_core.errors import ConfigError, SandboxError
from sandbox_core.valueclass import dataclass

if TYPE_CHECKING:
    import asyncio

    from sandbox_core.events import Event
    from sandbox_core.requests import Request
    from sandbox_core.service.client import ServiceClient
    from sandbox_core.service.thin import ThinClient

URL_ENV = "SANDBOX_URL"
TOKEN_ENV = "SANDBOX_TOKEN"
TOKEN_FILE_ENV = "SANDBOX_TOKEN_FILE"


@dataclass(frozen=True)
class Target:
    """Where the service is: ``unix:/abs/path`` or ``http(s)://host:port``."""

    address: str
    explicit: bool = True
    """Named by ``--connect`` or ``SANDBOX_URL`` (else: the default socket, found answering)."""
    server_uids: tuple[str, ...] = ()
    """``service.server_uids``: uids trusted as the server on a Unix socket besides root and ours."""

    @property
    def tcp(self) -> bool:
        return self.address.startswith(("http://", "https://"))


def socket_answers(path: Path, server_uids: tuple[str, ...] = (), timeout: float = 1.0) -> bool:
    """True if a trusted service accepts connections at ``path``; False if nothing does.

    Raises :class:`~sandbox_core.errors.UntrustedService` when something is there that
    cannot be trusted (the probe connects, checks the listener's uid and sends nothing).
    """
    from sandbox_core.service.trust import connect_checked, trusted_uids

    try:
        probe = connect_checked(path, trusted_uids(server_uids), timeout)
    except OSError:
        return False
    probe.close()
    return True


def read_token(environ: Mapping[str, str]) -> tuple[str | None, Path | None]:
    """The bearer token: ``SANDBOX_TOKEN``, else the first line of ``SANDBOX_TOKEN_FILE``.

    Returns the token and the file it came from (None for the variable or no token).
    """
    token = environ.get(TOKEN_ENV, "").strip()
    if token:
        return token, None
    name = environ.get(TOKEN_FILE_ENV, "").strip()
    if not name:
        return None, None
    path = Path(name).expanduser()
    try:
        lines = path.read_text().strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(TOKEN_FILE_ENV, f"cannot read {path}: {reason}") from None
    if not lines or not lines[0].strip():
        raise ConfigError(TOKEN_FILE_ENV, f"{path} is empty")
    return lines[0].strip(), path


def exposed(path: Path) -> bool:
    """A token file group or others can read."""
    try:
        return bool(path.stat().st_mode & 0o077)
    except OSError:
        return False


def unix_identity() -> str:
    """The user the service gives this process over its Unix socket (the login name of our uid)."""
    from sandbox_core.service.auth import principal_for_uid

    return principal_for_uid(os.getuid()).user_id


def request_body(request: Request) -> tuple[str, dict[str, Any]]:
    """The service route (``agent`` or ``exec``) and JSON body for ``request``."""
    from cli.service_exec import exec_body, network_body
    from sandbox_core.requests import AgentRequest, ExecRequest

    body: dict[str, Any]
    if isinstance(request, ExecRequest):
        command = list(request.argv) if request.argv is not None else [request.shell or ""]
        body = exec_body(command, shell=request.argv is None, timeout=request.timeout, network=request.network)
        if isinstance(request.stdin, str):
            body["stdin"] = request.stdin
        elif isinstance(request.stdin, bytes):
            body["stdin_b64"] = base64.b64encode(request.stdin).decode()
        elif request.stdin is not None:
            body["stdin_stream"] = True  # the bytes follow in POST /v1/runs/{id}/stdin
        return "exec", body
    if isinstance(request, AgentRequest):
        body = {"prompt": request.prompt, "conversation_id": request.conversation_id}
        for key in ("system", "model", "max_turns", "max_tokens", "timeout"):
            value = getattr(request, key)
            if value is not None:
                body[key] = value
        if request.tools is not None:
            body["tools"] = list(request.tools)
        if request.resume:
            body["resume"] = True
        if request.network is not None:
            body["network"] = network_body(request.network)
        return "agent", body
    raise SandboxError(f"the service does not run {request.method!r} requests (use --local)")


class RemotePool:
    """The orchestrator API the commands use, served by a running ``sandbox serve``."""

    def __init__(
        self,
        client: ServiceClient | ThinClient,
        target: Target,
        *,
        profile: str,
        requested_user: str | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.target = target
        self.profile = profile
        self.identity: str | None = None
        """The user the service runs our requests as (None on TCP until the first run says)."""
        self.last_stats: dict[str, Any] | None = None
        self.last_workers: list[dict[str, Any]] | None = None
        self.operator: bool | None = None
        """False once the service refused stats (403); None while unknown."""
        self._requested_user = requested_user
        self._warn = warn
        self._warned = False
        self._poller: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        target: Target,
        *,
        token: str | None = None,
        requested_user: str | None = None,
        warn: Callable[[str], None] | None = None,
        thin: bool = False,
    ) -> RemotePool:
        """Connect and check the service answers (:class:`ServiceUnreachable` if not).

        ``thin``: one command's run on a Unix socket, through
        :class:`~sandbox_core.service.thin.ThinClient` (no HTTP library to import); the REPL
        and the operator commands, which poll and page, keep the full client.
        """
        from sandbox_core.service.thin import ThinClient
        from sandbox_core.service.wire import ServiceUnreachable

        client: ServiceClient | ThinClient
        if target.tcp or not thin:
            from sandbox_core.service.client import ServiceClient

            client = ServiceClient(target.address, token if target.tcp else None, server_uids=target.server_uids)
        else:  # a command's few requests on a Unix socket: no HTTP library to import
            def full() -> ServiceClient:
                from sandbox_core.service.client import ServiceClient

                return ServiceClient(target.address, server_uids=target.server_uids)

            client = ThinClient(Path(target.address.removeprefix("unix:")), server_uids=target.server_uids,
                                full=full)
        try:
            health = await client.health()
        except ServiceUnreachable as exc:
            await client.aclose()
            detail = str(exc.__cause__ or exc) or type(exc.__cause__).__name__
            raise ServiceUnreachable(f"cannot reach the service at {target.address}: {detail}") from None
        except BaseException:
            await client.aclose()
            raise
        pool = cls(client, target, profile=str(health.get("profile", "?")), requested_user=requested_user,
                   warn=warn)
        if not target.tcp:
            pool.learn_identity(unix_identity())
        return pool

    async def __aenter__(self) -> RemotePool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop polling and close the connection (the service keeps running)."""
        if self._poller is not None:
            self._poller.cancel()
            import asyncio

            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        await self.client.aclose()

    def learn_identity(self, user: object) -> None:
        """Record who the service says we are; warn once if an explicit ``--user`` differs."""
        if not isinstance(user, str) or not user or user == self.identity:
            return
        self.identity = user
        if self._requested_user and self._requested_user != user and not self._warned:
            self._warned = True
            if self._warn is not None:
                self._warn(f"the service runs your requests as user {user!r} (from your credentials); "
                           f"--user {self._requested_user} is ignored in client mode")

    # ------------------------------------------------------------------ requests

    def terminal(self, user_id: str, argv: list[str] | tuple[str, ...], *, rows: int = 24, cols: int = 80,
                 term: str | None = None, timeout: float | None = None, stdin: bool = True,
                 network: tuple[str, ...] | None = None) -> Any:
        """A terminal session on the service (``WS /v1/terminal``); ``user_id`` is the service's call."""
        return self.client.terminal(argv, rows=rows, cols=cols, term=term, timeout=timeout, stdin=stdin,
                                    network=network)

    async def execute_stream(self, user_id: str, request: Request) -> AsyncGenerator[Event, None]:
        """Run ``request`` on the service and yield its events (``user_id`` is the service's call).

        If the consumer stops early or is cancelled (Ctrl-C), the run is cancelled on the
        service and this waits (up to :data:`CANCEL_TIMEOUT`) until it has stopped.
        """
        import asyncio

        from sandbox_core.requests import ExecRequest

        kind, body = request_body(request)
        run_id: str | None = None
        stdin = request.stdin if body.get("stdin_stream") and isinstance(request, ExecRequest) else None
        sender: asyncio.Task[Any] | None = None
        stream = self.client.stream(kind, body)
        try:
            async for event in stream:
                if event.type == "started":
                    run_id = str(event.data.get("run_id") or "") or None
                    self.learn_identity(event.data.get("user_id"))
                    if run_id is not None and stdin is not None and not isinstance(stdin, bytes | str):
                        sender = asyncio.create_task(self.client.send_stdin(run_id, stdin))
                yield event
        except SandboxError:
            raise  # the run failed on the service, or the connection is gone
        except BaseException:
            if run_id is not None:
                await self._cancel(run_id)
            raise
        finally:
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(BaseException):
                    await sender
            await stream.aclose()

    async def _cancel(self, run_id: str) -> None:
        import asyncio

        with contextlib.suppress(SandboxError, TimeoutError):
            await asyncio.wait_for(self.client.cancel(run_id), CANCEL_TIMEOUT)

    # ------------------------------------------------------------------ operator control

    @property
    def files(self) -> RemoteFiles:
        """``pool.files`` over the service's ``/v1/files`` routes (the subset ``sandbox cp`` uses)."""
        from sandbox_core.service.client import ServiceClient

        if not isinstance(self.client, ServiceClient):
            raise SandboxError("file transfers need the full service client (not a thin one-shot connection)")
        return RemoteFiles(self.client)

    async def stats(self) -> dict[str, Any]:
        self.last_stats = await self.client.stats()
        self.operator = True
        return self.last_stats

    async def workers(self) -> list[dict[str, Any]]:
        self.last_workers = await self.client.workers()
        return self.last_workers

    async def launch(self, count: int, user_id: str | None = None) -> list[str]:
        return await self.client.launch(count, user_id)

    async def stop_workers(
        self, *, worker_ids: list[str] | None = None, user_id: str | None = None, everything: bool = False
    ) -> int:
        return await self.client.stop_workers(worker_ids=worker_ids, user_id=user_id, everything=everything)

    # ------------------------------------------------------------------ live snapshot (REPL toolbar)

    def start_polling(self, interval: float) -> None:
        """Refresh :attr:`last_stats` and :attr:`last_workers` every ``interval`` s (operators only)."""
        import asyncio

        if self._poller is None:
            self._poller = asyncio.create_task(self._poll(interval), name="sandbox-service-poll")

    async def _poll(self, interval: float) -> None:
        import asyncio

        while True:
            try:
                await self.stats()
                await self.workers()
            except SandboxError as exc:
                if exc.data.get("status") in (401, 403):
                    self.operator = False
                    self.last_stats = self.last_workers = None
                    return
                self.last_stats = None
            await asyncio.sleep(interval)


class RemoteFiles:
    """The service's file routes with ``pool.files``'s names: tar streams, local paths packed and
    unpacked here (what comes back is unpacked as untrusted, as in-process)."""

    def __init__(self, client: ServiceClient) -> None:
        self._client = client

    async def upload_tar(self, user_id: str, dest: str, stream: AsyncIterable[bytes], *,
                         into: bool = True) -> dict[str, Any]:  # fmt: skip
        answer = await self._client.upload_tar(dest, stream, user=user_id, cp=not into)
        summary: dict[str, Any] = answer.get("summary", {})
        return summary

    def download_tar(self, user_id: str, src: str) -> AsyncGenerator[bytes, None]:
        return self._client.download_tar(src, user=user_id)

    async def put(self, user_id: str, dest: str, local: Path) -> dict[str, Any]:
        from sandbox_core.files import pack_local

        return await self.upload_tar(user_id, dest, await pack_local(local), into=False)

    async def get_path(self, user_id: str, src: str, local: Path) -> dict[str, Any]:
        from sandbox_core.files import unpack_local

        return await unpack_local(self.download_tar(user_id, src), local)
