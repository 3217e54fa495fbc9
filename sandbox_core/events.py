"""The one typed event model shared by the library, the CLI, JSON output and web streams.

A long request streams events as ``event`` notifications tagged with its request id
and a sequence number; the final response follows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args

EventType = Literal[
    "started", "text", "tool_use", "tool_result", "stdout", "stderr", "usage", "error", "done"
]
EVENT_TYPES: frozenset[str] = frozenset(get_args(EventType))
EVENT_METHOD = "event"


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened during a request.

    ``data`` by type: ``text`` {text}; ``stdout``/``stderr`` {data}; ``tool_use``
    {id, name, input}; ``tool_result`` {id, output, is_error, truncated};
    ``usage`` {input_tokens, output_tokens}; ``error`` {code, message};
    ``started`` {worker_id, user_id, method, profile}; ``done`` {exit_code | stop_reason,
    duration_s, worker_id, ...}.
    """

    type: EventType
    data: dict[str, Any] = field(default_factory=dict)
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "seq": self.seq, "data": self.data}

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Event:
        kind = obj.get("type")
        if kind not in EVENT_TYPES:
            raise ValueError(f"unknown event type: {kind!r}")
        data = obj.get("data")
        seq = obj.get("seq", 0)
        return cls(
            cast(EventType, kind),
            data if isinstance(data, dict) else {},
            seq if isinstance(seq, int) else 0,
        )
