"""JSON-RPC 2.0 messages over NDJSON: one UTF-8 JSON object per line.

Batches (JSON arrays) are rejected with ``INVALID_REQUEST``: every message on this
channel is a single object, which keeps ordering and cancellation simple.

:func:`decode` never raises: any bad frame (not JSON, not UTF-8, nested deeper than
:data:`MAX_NESTING`, wrong types) becomes a :class:`Malformed` value, and the framers
consume a line before decoding it, so a bad line is read once and reading goes on at the
next one. An oversized frame is dropped, but the ``id`` at its head (our encoder writes
``{"jsonrpc":"2.0","id":...`` first) is kept on the :class:`Malformed`, so the receiver
can answer or fail that one call at once instead of letting it wait for a timeout.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from sandbox_core import codes
from sandbox_core.frozen import Frozen, init_field

PROTOCOL_VERSION = "1"
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
MAX_NESTING = 64
"""Deepest JSON nesting a frame may have; checked before parsing (the parser recurses)."""
_CHUNK = 64 * 1024
_HEAD = 256
"""Bytes of an oversized frame kept to read its id from."""
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_INNERMOST = re.compile(rb"\[[^\[\]{}]*\]|\{[^\[\]{}]*\}")
_HEAD_ID = re.compile(rb'\A\s*\{\s*"jsonrpc"\s*:\s*"2\.0"\s*,\s*"id"\s*:\s*(-?\d{1,18}|"[A-Za-z0-9_.:-]{1,64}")\s*[,}]')

RequestId = int | str


class Request(Frozen):
    """A call that expects exactly one response with the same ``id``."""

    __slots__ = ("id", "method", "params")
    id: RequestId
    method: str
    params: dict[str, Any]

    def __init__(self, id: RequestId, method: str, params: dict[str, Any] | None = None) -> None:
        init_field(self, "id", id)
        init_field(self, "method", method)
        init_field(self, "params", {} if params is None else params)

    def to_wire(self) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": self.id, "method": self.method, "params": self.params}


class Notification(Frozen):
    """A one-way message (events, ``cancel``, gateway chunks)."""

    __slots__ = ("method", "params")
    method: str
    params: dict[str, Any]

    def __init__(self, method: str, params: dict[str, Any] | None = None) -> None:
        init_field(self, "method", method)
        init_field(self, "params", {} if params is None else params)

    def to_wire(self) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "method": self.method, "params": self.params}


class Response(Frozen):
    """The answer to a request: exactly one of ``result`` and ``error`` is meaningful."""

    __slots__ = ("error", "id", "result")
    id: RequestId | None
    result: Any
    error: dict[str, Any] | None

    def __init__(self, id: RequestId | None, result: Any = None, error: dict[str, Any] | None = None) -> None:
        init_field(self, "id", id)
        init_field(self, "result", result)
        init_field(self, "error", error)

    def to_wire(self) -> dict[str, Any]:
        if self.error is not None:
            return {"jsonrpc": "2.0", "id": self.id, "error": self.error}
        return {"jsonrpc": "2.0", "id": self.id, "result": self.result}


class Malformed(Frozen):
    """A frame that could not be understood; ``code`` says why, ``id`` if one was readable."""

    __slots__ = ("code", "id", "message")
    code: int
    message: str
    id: RequestId | None

    def __init__(self, code: int, message: str, id: RequestId | None = None) -> None:
        init_field(self, "code", code)
        init_field(self, "message", message)
        init_field(self, "id", id)

    def error_object(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


Message = Request | Notification | Response | Malformed


_DECODER = json.JSONDecoder()
"""Frames are UTF-8 (never UTF-16/32, which ``json.loads`` of bytes would guess): decoded as such."""
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
"""One encoder for every frame: ``json.dumps`` with options builds a new one per call."""


def encode(msg: Request | Notification | Response) -> bytes:
    """One NDJSON frame for ``msg`` (compact JSON, newline-terminated)."""
    return (_ENCODER.encode(msg.to_wire()) + "\n").encode()


def _valid_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def too_deep(line: bytes, limit: int = MAX_NESTING) -> bool:
    """Whether the JSON in ``line`` nests deeper than ``limit`` (or its brackets do not pair).

    Cheap for ordinary frames: only a frame with more than ``limit`` brackets is looked at,
    and then strings are cut out and innermost pairs removed level by level (all in C).
    """
    if line.count(b"[") + line.count(b"{") <= limit:
        return False
    rest = _STRING.sub(b"", line)
    for _ in range(limit):
        reduced = _INNERMOST.sub(b"", rest)
        if reduced == rest:
            break
        rest = reduced
    return any(ch in rest for ch in b"[]{}")


def head_id(head: bytes) -> RequestId | None:
    """The id at the head of a frame written by :func:`encode` (None if not readable)."""
    match = _HEAD_ID.match(head)
    if match is None:
        return None
    raw = match.group(1)
    return raw[1:-1].decode() if raw.startswith(b'"') else int(raw)


def decode(line: bytes) -> Message:
    """Parse one frame (without or with its newline) into a message or a :class:`Malformed`.

    Never raises: whatever goes wrong becomes a :class:`Malformed` value.
    """
    try:
        return _decode(line)
    except Exception as exc:  # noqa: BLE001 - a frame must never break its reader
        return Malformed(codes.PARSE_ERROR, f"undecodable frame: {type(exc).__name__}", head_id(line[:_HEAD]))


def _decode(line: bytes) -> Message:
    if too_deep(line):
        return Malformed(codes.PARSE_ERROR, f"frame nests deeper than {MAX_NESTING}", head_id(line[:_HEAD]))
    try:
        obj = _DECODER.decode(line.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        return Malformed(codes.PARSE_ERROR, f"parse error: {str(exc)[:200]}")
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
    """Push side of framing: feed bytes, get the complete messages they finish.

    Holds at most ``max_frame`` bytes of an unfinished frame; past that the frame is
    dropped as it arrives (its head is kept for the id) and reported when its newline
    comes. Each line is cut out of the buffer before it is decoded.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._max = max_frame
        self._buf = bytearray()
        self._scanned = 0
        self._discarding: bytes | None = None
        """The head of the oversized frame being dropped, while one is."""

    def feed(self, data: bytes) -> list[Message]:
        """Messages completed by ``data`` (malformed or oversized ones as :class:`Malformed`)."""
        return [self.decode(frame) for frame in self.frames(data)]

    def frames(self, data: bytes) -> list[bytes | Malformed]:
        """The frames ``data`` completes, not decoded yet (an oversized one already as
        :class:`Malformed`): a reader can stop decoding part way, a worker it stopped trusting."""
        if not self._buf and self._discarding is None and data.find(b"\n") == len(data) - 1 and len(data) <= self._max:
            return [data[:-1]] if data.strip() else []  # the usual read: one whole frame
        out: list[bytes | Malformed] = []
        if self._discarding is not None:
            nl = data.find(b"\n")
            if nl < 0:
                return out
            out.append(self._oversized(self._discarding))
            self._discarding = None
            data = data[nl + 1 :]
        self._buf += data
        lines: list[bytes] = []
        start = 0
        while (nl := self._buf.find(b"\n", max(start, self._scanned))) >= 0:
            lines.append(bytes(self._buf[start:nl]))
            start = nl + 1
            self._scanned = 0
        del self._buf[:start]
        self._scanned = len(self._buf)
        if len(self._buf) > self._max:
            self._discarding = bytes(self._buf[:_HEAD])
            self._buf.clear()
            self._scanned = 0
        for line in lines:
            if len(line) > self._max:
                out.append(self._oversized(line[:_HEAD]))
            elif line.strip():
                out.append(line)
        return out

    @staticmethod
    def decode(frame: bytes | Malformed) -> Message:
        """One frame from :meth:`frames` as a message."""
        return frame if isinstance(frame, Malformed) else decode(frame)

    def close(self) -> list[Message]:
        """Whatever an unterminated last frame holds, at end of stream."""
        if self._discarding is not None:
            head, self._discarding = self._discarding, None
            return [self._oversized(head)]
        rest, self._buf = bytes(self._buf), bytearray()
        self._scanned = 0
        return [decode(rest)] if rest.strip() else []

    def _oversized(self, head: bytes) -> Malformed:
        return Malformed(codes.FRAME_TOO_LARGE, f"frame larger than {self._max} bytes dropped", head_id(head))


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
