"""JSON-RPC 2.0 messages over NDJSON: one UTF-8 JSON object per line.

Batches (JSON arrays) are rejected with ``INVALID_REQUEST``: every message on this
channel is a single object, which keeps ordering and cancellation simple.

:class:`FrameReader` never raises for bad input: a malformed or oversized line
becomes a :class:`Malformed` value on the message stream, and reading goes on at
the next line. Only end of stream ends it.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sandbox_core import codes

PROTOCOL_VERSION = "1"
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
_CHUNK = 64 * 1024

RequestId = int | str


@dataclass(frozen=True, slots=True)
class Request:
    """A call that expects exactly one response with the same ``id``."""

    id: RequestId
    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": self.id, "method": self.method, "params": self.params}


@dataclass(frozen=True, slots=True)
class Notification:
    """A one-way message (events, ``cancel``, gateway chunks)."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "method": self.method, "params": self.params}


@dataclass(frozen=True, slots=True)
class Response:
    """The answer to a request: exactly one of ``result`` and ``error`` is meaningful."""

    id: RequestId | None
    result: Any = None
    error: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        if self.error is not None:
            return {"jsonrpc": "2.0", "id": self.id, "error": self.error}
        return {"jsonrpc": "2.0", "id": self.id, "result": self.result}


@dataclass(frozen=True, slots=True)
class Malformed:
    """A frame that could not be understood; ``code`` says why, ``id`` if one was readable."""

    code: int
    message: str
    id: RequestId | None = None

    def error_object(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


Message = Request | Notification | Response | Malformed


def encode(msg: Request | Notification | Response) -> bytes:
    """One NDJSON frame for ``msg`` (compact JSON, newline-terminated)."""
    return json.dumps(msg.to_wire(), separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _valid_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def decode(line: bytes) -> Message:
    """Parse one frame (without or with its newline) into a message or a :class:`Malformed`."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        return Malformed(codes.PARSE_ERROR, f"parse error: {exc}")
    if isinstance(obj, list):
        return Malformed(codes.INVALID_REQUEST, "batch requests are not supported")
    if not isinstance(obj, dict):
        return Malformed(codes.INVALID_REQUEST, "a frame must be a JSON object")
    raw_id = obj.get("id")
    msg_id = raw_id if _valid_id(raw_id) else None
    if obj.get("jsonrpc") != "2.0":
        return Malformed(codes.INVALID_REQUEST, 'missing "jsonrpc": "2.0"', msg_id)
    if "method" in obj:
        method = obj["method"]
        params = obj.get("params", {})
        if not isinstance(method, str) or not method:
            return Malformed(codes.INVALID_REQUEST, "method must be a non-empty string", msg_id)
        if not isinstance(params, dict):
            return Malformed(codes.INVALID_PARAMS, "params must be an object", msg_id)
        if "id" not in obj:
            return Notification(method, params)
        if msg_id is None:
            return Malformed(codes.INVALID_REQUEST, "id must be a string or an integer")
        return Request(msg_id, method, params)
    has_result, has_error = "result" in obj, "error" in obj
    if has_result == has_error:
        return Malformed(codes.INVALID_REQUEST, "a response needs exactly one of result/error", msg_id)
    if has_error:
        error = obj["error"]
        if (
            not isinstance(error, dict)
            or not isinstance(error.get("code"), int)
            or not isinstance(error.get("message"), str)
        ):
            return Malformed(codes.INVALID_REQUEST, "malformed error object", msg_id)
        return Response(msg_id, error=error)
    if msg_id is None:
        return Malformed(codes.INVALID_REQUEST, "a response needs an id")
    return Response(msg_id, result=obj["result"])


class FrameSplitter:
    """Push side of framing: feed bytes, get the complete messages they finish."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._max = max_frame
        self._buf = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[Message]:
        """Messages completed by ``data`` (malformed or oversized ones as :class:`Malformed`)."""
        out: list[Message] = []
        self._buf += data
        start = 0
        while (nl := self._buf.find(b"\n", start)) >= 0:
            if self._discarding:
                self._discarding = False
                out.append(self._oversized())
            elif nl - start > self._max:
                out.append(self._oversized())
            elif self._buf[start:nl].strip():
                out.append(decode(bytes(self._buf[start:nl])))
            start = nl + 1
        del self._buf[:start]
        if len(self._buf) > self._max:
            self._buf.clear()
            self._discarding = True
        return out

    def close(self) -> list[Message]:
        """Whatever an unterminated last frame holds, at end of stream."""
        if self._discarding:
            self._discarding = False
            return [self._oversized()]
        rest, self._buf = bytes(self._buf), bytearray()
        return [decode(rest)] if rest.strip() else []

    def _oversized(self) -> Malformed:
        return Malformed(codes.FRAME_TOO_LARGE, f"frame larger than {self._max} bytes dropped")


class FrameReader:
    """Pull side of framing over an async ``read(n)``; bad frames become :class:`Malformed`."""

    def __init__(self, read: Callable[[int], Awaitable[bytes]], max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._read = read
        self._splitter = FrameSplitter(max_frame)
        self._ready: collections.deque[Message] = collections.deque()
        self._eof = False

    async def next(self) -> Message | None:
        """The next message, or ``None`` at end of stream."""
        while not self._ready:
            if self._eof:
                return None
            chunk = await self._read(_CHUNK)
            if chunk:
                self._ready.extend(self._splitter.feed(chunk))
            else:
                self._eof = True
                self._ready.extend(self._splitter.close())
        return self._ready.popleft()
