"""What every client of the service reads and writes on the wire: JSON, SSE lines, error statuses.

Shared by the asyncio thin client (:mod:`sandbox_core.service.thin`), the full one
(:mod:`sandbox_core.service.client`) and the blocking one-shot client
(:mod:`sandbox_core.service.blocking`). It imports nothing a one-shot ``sandbox exec``
would not otherwise load: on these machines ``import json`` (with the ``re`` and ``enum``
it brings) costs a fresh process ~15 ms, three times what the service takes to run
``true`` in a warm worker. So JSON goes through :mod:`sandbox_core.wirejson`.
"""

from __future__ import annotations

from sandbox_core.errors import BodyTooLarge, LimitExceeded, PoolClosed, SandboxError, TooManyRuns
from sandbox_core.wirejson import json_value

MAX_LINE = 64 * 1024 * 1024
"""Longest line (status, header or SSE) a client takes from the service."""
MAX_BODY = 16 * 1024 * 1024
"""Largest JSON answer it reads."""


class ServiceError(SandboxError):
    """The service answered with an error status, or the connection to it broke."""


class ServiceUnreachable(ServiceError):
    """No service answered at the target (nothing listening, wrong address, refused)."""


# ---------------------------------------------------------------- statuses

_LIMITS: dict[int, type[LimitExceeded]] = {413: BodyTooLarge, 429: TooManyRuns}


def _limit_error(cls: type[LimitExceeded], text: str, status: int) -> LimitExceeded:
    """The typed error of a bound's refusal (413, 429) from its JSON body."""
    try:
        body = json_value(text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return cls(f"service error {status}: {text[:200]}", data={"status": status})
    data = {"status": status, "setting": body.get("setting"), "limit": body.get("limit")}
    return cls(str(body.get("error", f"service error {status}")), data=data)


def check_status(status: int, text: str) -> None:
    """Raise the typed error of an error status (``text`` is the answer's body)."""
    data = {"status": status}
    if status == 401:
        raise ServiceError("the service refused the credentials (401); set SANDBOX_TOKEN", data=data)
    if status == 403:
        raise ServiceError("this needs the operator role (403)", data=data)
    if status == 503:
        raise PoolClosed("the service is draining", data=data)
    if status in _LIMITS:
        raise _limit_error(_LIMITS[status], text, status)
    if status >= 400:
        raise ServiceError(f"service error {status}: {text[:200]}", data=data)


# ---------------------------------------------------------------- SSE lines


class LineSplitter:
    """Text lines from a body that comes in chunks; a line over :data:`MAX_LINE` is an error."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[str]:
        self._pending += data
        *complete, rest = self._pending.split(b"\n")
        if len(rest) > MAX_LINE:
            raise ServiceError(f"a line from the service is over {MAX_LINE} bytes")
        self._pending = bytearray(rest)
        return [line.decode("utf-8", errors="replace") for line in complete]

    def end(self) -> list[str]:
        """What is left after the last newline (a last line without one)."""
        return [self._pending.decode("utf-8", errors="replace")] if self._pending else []


class SseReader:
    """Server-sent events from their lines, one line at a time: :meth:`feed` answers
    ``(id, event, data)`` at the blank line that ends an event (comments skipped)."""

    def __init__(self) -> None:
        self._id: int | None = None
        self._kind = "message"
        self._data: list[str] = []

    def feed(self, raw: str) -> tuple[int | None, str, str] | None:
        line = raw.rstrip("\r")
        if not line:
            done = (self._id, self._kind, "\n".join(self._data)) if self._data else None
            self._id, self._kind, self._data = None, "message", []
            return done
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "id" and value.isdigit():
            self._id = int(value)
        elif field == "event":
            self._kind = value
        elif field == "data":
            self._data.append(value)
        return None
