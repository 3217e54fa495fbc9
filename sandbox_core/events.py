"""The one typed event model shared by the library, the CLI, JSON output and web streams.

A long request streams events as ``event`` notifications tagged with its request id
and a sequence number; the final response follows them.

Command output is bytes. In memory a ``stdout``/``stderr`` event from a command holds them as
``bytes`` (``{"bytes": b"..."}``); in JSON (:meth:`Event.to_dict`: the CLI's ``--json``, the
service's SSE, the control pipe) one chunk is exactly one of ``data`` (the chunk is valid
UTF-8: readable JSON for the common case) or ``b64`` (standard base64 of the raw bytes).
:meth:`Event.chunk` gives the bytes of any of these forms, and joining the chunks of a stream
gives the command's output byte for byte. :class:`OutputEncoder` makes JSON chunks from a
stream without splitting a UTF-8 character between two ``data`` chunks.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args

EventType = Literal[
    "started", "text", "tool_use", "tool_result", "stdout", "stderr", "usage", "error", "gap", "done"
]
EVENT_TYPES: frozenset[str] = frozenset(get_args(EventType))
EVENT_METHOD = "event"


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened during a request.

    ``data`` by type: ``text`` {text}; ``stdout``/``stderr`` {data | b64, tool_use_id?}; ``tool_use``
    {id, name, input}; ``tool_result`` {id, output, is_error, truncated};
    ``usage`` {input_tokens, output_tokens}; ``error`` {code, message};
    ``gap`` {dropped_events, dropped_bytes} (a stored stream lost its oldest output);
    ``started`` {worker_id, user_id, method, profile}; ``done`` {exit_code | stop_reason,
    duration_s, worker_id, ...}.
    """

    type: EventType
    data: dict[str, Any] = field(default_factory=dict)
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (output bytes become ``data`` text or ``b64``)."""
        return {"type": self.type, "seq": self.seq, "data": self.json_data()}

    def json_data(self) -> dict[str, Any]:
        """``data`` with nothing JSON cannot hold (output bytes become ``data`` or ``b64``)."""
        raw = self.data.get("bytes")
        if not isinstance(raw, bytes):
            return self.data
        rest = {k: v for k, v in self.data.items() if k != "bytes"}
        return {**rest, **output_data(raw)}

    def chunk(self) -> bytes:
        """The bytes of a ``stdout``/``stderr`` event (empty for other types or bad base64)."""
        return output_bytes(self.data)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Event:
        """The event in ``obj``; ValueError for anything that is not one (never another error)."""
        if not isinstance(obj, dict):
            raise ValueError("an event must be an object")
        kind = obj.get("type")
        if not isinstance(kind, str) or kind not in EVENT_TYPES:
            raise ValueError(f"unknown event type: {kind!r:.80}")
        data = obj.get("data")
        seq = obj.get("seq", 0)
        return cls(
            cast(EventType, kind),
            data if isinstance(data, dict) else {},
            seq if isinstance(seq, int) else 0,
        )


def output_bytes(data: dict[str, Any]) -> bytes:
    """The bytes one output event's ``data`` carries (``bytes``, ``data`` text or ``b64``)."""
    raw = data.get("bytes")
    if isinstance(raw, bytes):
        return raw
    text = data.get("data")
    if isinstance(text, str):
        return text.encode("utf-8", errors="surrogatepass")
    raw = data.get("b64")
    if isinstance(raw, str):
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            return b""
    return b""


_CONTROL = bytes(b for b in range(256) if b < 0x20 and b not in b"\t\n\r")
_NOT_CONTROL = bytes(b for b in range(256) if b not in _CONTROL)


def output_data(chunk: bytes) -> dict[str, Any]:
    """One chunk as JSON event data: ``{"data": text}`` when it is UTF-8 text, else ``{"b64": ...}``.

    Text with many control bytes (NULs, say) goes as base64 too: JSON escapes each as six bytes.
    """
    if len(chunk.translate(None, _NOT_CONTROL)) * 16 <= len(chunk):
        try:
            return {"data": chunk.decode("utf-8")}
        except UnicodeDecodeError:
            pass
    return {"b64": base64.b64encode(chunk).decode("ascii")}


class OutputEncoder:
    """Cuts a byte stream into event data without splitting a UTF-8 character.

    An incomplete multi-byte sequence at the end of a chunk (at most 3 bytes) is held back
    and sent with the next chunk, so text output stays text; anything else that is not
    UTF-8 goes as base64. :meth:`flush` sends what is held back at end of stream.
    """

    def __init__(self) -> None:
        self._held = b""

    def encode(self, chunk: bytes) -> dict[str, Any] | None:
        data = self._held + chunk
        self._held = b""
        cut = _incomplete_tail(data)
        if cut:
            data, self._held = data[:-cut], data[-cut:]
        return output_data(data) if data else None

    def flush(self) -> dict[str, Any] | None:
        held, self._held = self._held, b""
        return output_data(held) if held else None


def _incomplete_tail(data: bytes) -> int:
    """How many bytes at the end of ``data`` start a UTF-8 character that is not complete."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): how long should its sequence be?
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
            return back if need > back else 0
    return 0
