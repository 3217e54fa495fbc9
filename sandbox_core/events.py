"""The one typed event model shared by the library, the CLI, JSON output and web streams.

A long request streams events as ``event`` notifications tagged with its request id
and a sequence number; the final response follows them.

Command output is bytes. In memory a ``stdout``/``stderr`` event from a command holds them as
``bytes`` (``{"bytes": b"..."}``); in JSON (:meth:`Event.to_dict`: the CLI's ``--json``, the
service's SSE, the control pipe) one chunk is exactly one of ``data`` (the chunk is valid
UTF-8: readable JSON for the common case) or ``b64`` (standard base64 of the raw bytes).
:meth:`Event.chunk` gives the bytes of any of these forms, and joining the chunks of a stream
gives the command's output byte for byte (the forms themselves are :mod:`sandbox_core.chunks`).
"""

from __future__ import annotations

from typing import Any, Literal, cast, get_args

from sandbox_core.chunks import output_bytes, output_data
from sandbox_core.frozen import Frozen, init_field

EventType = Literal[
    "started", "text", "tool_use", "tool_result", "stdout", "stderr", "usage", "error", "gap", "done"
]
EVENT_TYPES: frozenset[str] = frozenset(get_args(EventType))
EVENT_METHOD = "event"


class Event(Frozen):
    """One thing that happened during a request.

    ``data`` by type: ``text`` {text}; ``stdout``/``stderr`` {data | b64, tool_use_id?}; ``tool_use``
    {id, name, input}; ``tool_result`` {id, output, is_error, truncated};
    ``usage`` {input_tokens, output_tokens}; ``error`` {code, message};
    ``gap`` {dropped_events, dropped_bytes} (a stored stream lost its oldest output);
    ``started`` {worker_id, user_id, method, profile}; ``done`` {exit_code | stop_reason,
    duration_s, worker_id, ...}.
    """

    __slots__ = ("data", "seq", "type")
    type: EventType
    data: dict[str, Any]
    seq: int

    def __init__(self, type: EventType, data: dict[str, Any] | None = None, seq: int = 0) -> None:
        init_field(self, "type", type)
        init_field(self, "data", {} if data is None else data)
        init_field(self, "seq", seq)

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
