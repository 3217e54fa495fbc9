"""The one error tree of sandbox_core, and its mapping to and from JSON-RPC error objects.

    SandboxError                  root: every error this library raises on purpose
    ├── ConfigError               a configuration value is invalid (names the field)
    ├── ProtocolError             a frame could not be parsed or broke JSON-RPC rules
    ├── IsolationUnavailable      the configured profile cannot be applied (fail closed)
    ├── WorkerStartError          a worker did not start or finish its handshake
    │   └── CircuitOpen           too many start failures in a row; spawning is paused
    ├── WorkerCrashed             the worker process died while a call was pending
    ├── RequestTimeout            a request ran past its deadline and was killed
    ├── RequestCancelled          the caller (or a client) cancelled the request
    ├── PoolExhausted             no worker slot became free within the wait limit
    ├── PoolClosed                the orchestrator is shutting down or has shut down
    │   └── ServerShuttingDown    the service's drain ended before the run did; the run was stopped
    ├── GatewayError              a model call from the sandbox was refused or failed
    ├── LimitExceeded             a configured bound refused the request
    │   ├── TooManyRuns           the user already keeps as many runs as allowed, all running
    │   └── BodyTooLarge          a request body is over the configured limit
    ├── FileTransferError         a file transfer failed inside the sandbox (quota, no such path)
    ├── UntrustedService          a client refused a service socket it cannot trust (sent nothing)
    └── RemoteError               the worker answered a request with an error

Errors that cross the pipe keep ``code``, ``message`` and ``data``.
"""

from __future__ import annotations

from sandbox_core import codes

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (a worker boots faster)
if TYPE_CHECKING:
    from typing import Any, ClassVar


class SandboxError(Exception):
    """Root of every error raised on purpose by sandbox_core."""

    code: ClassVar[int] = codes.INTERNAL_ERROR

    def __init__(self, message: str, *, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data: dict[str, Any] = dict(data or {})

    def to_wire(self) -> dict[str, Any]:
        """The JSON-RPC error object for this error."""
        obj: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data:
            obj["data"] = self.data
        return obj

    def __str__(self) -> str:
        return self.message


class ConfigError(SandboxError):
    """A configuration value is invalid; ``field`` names it."""

    code = codes.INVALID_PARAMS

    def __init__(self, field: str, message: str, *, source: str | None = None) -> None:
        where = f" (set {source})" if source else ""
        super().__init__(f"{field}: {message}{where}", data={"field": field, **({"source": source} if source else {})})
        self.field = field
        self.detail = message
        """The message without the field name and source."""
        self.source = source
        """Where the value came from: ``in FILE line N``, ``by SANDBOX_X``, ``by a flag``."""


class ProtocolError(SandboxError):
    """A frame was malformed, oversized, or broke JSON-RPC 2.0 rules."""

    code = codes.INVALID_REQUEST


class IsolationUnavailable(SandboxError):
    """The configured isolation profile cannot be applied; the worker must not start."""

    code = codes.ISOLATION_UNAVAILABLE


class WorkerStartError(SandboxError):
    """A worker process failed to start or to finish the ``initialize`` handshake."""

    code = codes.WORKER_START_FAILED


class CircuitOpen(WorkerStartError):
    """Workers failed to start too many times in a row; spawning is paused."""


class WorkerCrashed(SandboxError):
    """The worker process died while a call was pending."""

    code = codes.WORKER_CRASHED


class RequestTimeout(SandboxError):
    """A request ran past its deadline; everything it started was killed."""

    code = codes.TIMEOUT


class RequestCancelled(SandboxError):
    """The request was cancelled before it finished."""

    code = codes.CANCELLED


class PoolExhausted(SandboxError):
    """No worker became available within the wait limit."""

    code = codes.POOL_EXHAUSTED


class PoolClosed(SandboxError):
    """The orchestrator no longer accepts requests."""

    code = codes.POOL_CLOSED


class ServerShuttingDown(PoolClosed):
    """``sandbox serve`` is shutting down and its drain ended before the run did: the run was stopped."""

    code = codes.SERVER_SHUTTING_DOWN


class GatewayError(SandboxError):
    """A model call made from inside the sandbox was refused or failed on the host."""

    code = codes.GATEWAY_ERROR


class LimitExceeded(SandboxError):
    """A configured bound refused the request; ``data`` names the setting and its value."""

    code = codes.LIMIT_EXCEEDED

    def __init__(self, message: str, *, data: dict[str, Any] | None = None) -> None:
        super().__init__(message, data=data)
        self.setting = str(self.data.get("setting", ""))
        self.limit = self.data.get("limit")


class FileTransferError(SandboxError):
    """A file transfer failed; ``data.reason`` is ``quota``, ``not_found``, ``not_a_directory``..."""

    code = codes.FILE_TRANSFER


class TooManyRuns(LimitExceeded):
    """The user keeps ``service.max_runs_per_user`` runs and none has finished to make room."""


class BodyTooLarge(LimitExceeded):
    """A request body is larger than ``service.max_body_mb``."""


class UntrustedService(SandboxError):
    """The socket named as the service, or the process behind it, is not one the client trusts.

    Raised before anything is sent; ``data["path"]`` is the socket, ``data["fix"]`` says how
    to make it trusted (or what to use instead).
    """


class RemoteError(SandboxError):
    """The worker answered with a JSON-RPC error that maps to no more specific class."""

    def __init__(self, code: int, message: str, *, data: dict[str, Any] | None = None) -> None:
        super().__init__(message, data=data)
        self.remote_code = code

    def to_wire(self) -> dict[str, Any]:
        obj = super().to_wire()
        obj["code"] = self.remote_code
        return obj


_BY_CODE: dict[int, type[SandboxError]] = {
    codes.ISOLATION_UNAVAILABLE: IsolationUnavailable,
    codes.WORKER_START_FAILED: WorkerStartError,
    codes.WORKER_CRASHED: WorkerCrashed,
    codes.TIMEOUT: RequestTimeout,
    codes.CANCELLED: RequestCancelled,
    codes.POOL_EXHAUSTED: PoolExhausted,
    codes.POOL_CLOSED: PoolClosed,
    codes.SERVER_SHUTTING_DOWN: ServerShuttingDown,
    codes.GATEWAY_ERROR: GatewayError,
    codes.LIMIT_EXCEEDED: LimitExceeded,
    codes.FILE_TRANSFER: FileTransferError,
}


_FROM_A_WORKER = frozenset({codes.ISOLATION_UNAVAILABLE, codes.CANCELLED, codes.GATEWAY_ERROR})
"""The codes a worker may legitimately answer with; the rest are the host's to say."""


def from_worker(obj: Any) -> SandboxError:
    """Like :func:`from_wire` for an answer from a worker, which is not trusted to speak for the
    host: a code it has no business sending (``POOL_CLOSED``, ``WORKER_CRASHED``, ...) is a
    :class:`RemoteError`, so a compromised worker cannot make a caller believe the pool closed."""
    error = from_wire(obj)
    if type(error) in (RemoteError, ProtocolError) or error.code in _FROM_A_WORKER:
        return error
    code = obj.get("code") if isinstance(obj, dict) else None
    return RemoteError(code if isinstance(code, int) else codes.INTERNAL_ERROR, error.message, data=error.data)


def from_wire(obj: Any) -> SandboxError:
    """Turn a JSON-RPC error object into the matching SandboxError (never raises)."""
    if not isinstance(obj, dict):
        return ProtocolError(f"malformed error object: {obj!r:.200}")
    code = obj.get("code")
    message = obj.get("message")
    data = obj.get("data")
    if not isinstance(code, int) or not isinstance(message, str):
        return ProtocolError(f"malformed error object: {obj!r:.200}")
    data_dict = data if isinstance(data, dict) else ({"detail": data} if data is not None else None)
    cls = _BY_CODE.get(code)
    if cls is None:
        return RemoteError(code, message, data=data_dict)
    return cls(message, data=data_dict)
