"""EventBuffer in memory: the byte and count bounds, what goes first, and the one gap marker."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sandbox_core.service.buffer import EventBuffer, event_size


def out(text: str, kind: str = "stdout") -> dict[str, Any]:
    return {"type": kind, "data": {"data": text}}


def walk(buffer: EventBuffer, after: int = 0) -> list[tuple[int, dict[str, Any]]]:
    """Every item a reader at ``after`` is given, in order."""
    items = []
    while (item := buffer.next_after(after)) is not None:
        items.append(item)
        after = item[0]
    return items


def test_output_over_the_byte_bound_is_replaced_by_one_gap() -> None:
    chunk = out("x" * 1000)
    size = event_size(chunk)
    buffer = EventBuffer(max_events=10_000, max_bytes=10 * size)
    buffer.append({"type": "started", "data": {}})
    for _ in range(100):
        buffer.append(chunk)
    assert buffer.bytes <= 10 * size
    items = walk(buffer)
    gap = [(seq, e) for seq, e in items if e["type"] == "gap"]
    assert len(gap) == 1
    kept = [seq for seq, e in items if e["type"] != "gap"]
    dropped = set(range(1, 102)) - set(kept)
    assert gap[0][1]["data"] == {"dropped_events": len(dropped), "dropped_bytes": len(dropped) * size}
    assert gap[0][0] == max(dropped)
    assert items[0][1]["type"] == "started"  # output goes first; the rest stays
    assert [seq for seq, _ in items] == sorted(seq for seq, _ in items)


def test_output_goes_first_then_text_then_the_rest() -> None:
    buffer = EventBuffer(max_events=4, max_bytes=1 << 30)
    for event in ({"type": "started", "data": {}}, {"type": "tool_use", "data": {"id": "t"}},
                  out("a", "text"), out("b"), out("c", "stderr"), out("d", "text")):
        buffer.append(event)
    # six events, four kept: stdout (4) and stderr (5) went, text and the rest stayed
    assert [seq for seq, e in walk(buffer) if e["type"] != "gap"] == [1, 2, 3, 6]
    buffer.append({"type": "usage", "data": {}})
    assert [seq for seq, e in walk(buffer) if e["type"] != "gap"] == [1, 2, 6, 7]  # then the oldest text
    buffer.append({"type": "done", "data": {}})
    assert [seq for seq, e in walk(buffer) if e["type"] != "gap"] == [1, 2, 7, 8]
    buffer.append({"type": "done", "data": {}})
    assert [seq for seq, e in walk(buffer) if e["type"] != "gap"] == [2, 7, 8, 9]  # then anything, oldest first
    assert buffer.dropped_events == 5


def test_the_gap_stands_where_the_loss_ends_and_readers_see_ids_in_order() -> None:
    buffer = EventBuffer(max_events=3, max_bytes=1 << 30)
    buffer.append({"type": "started", "data": {}})  # 1, kept
    buffer.append(out("a"))  # 2, dropped
    buffer.append({"type": "tool_use", "data": {}})  # 3, kept
    buffer.append(out("b"))  # 4, dropped
    buffer.append(out("c"))  # 5, kept
    assert [(seq, e["type"]) for seq, e in walk(buffer)] == [(1, "started"), (3, "tool_use"), (4, "gap"),
                                                             (5, "stdout")]
    # re-attaching at a dropped id: the gap, then what follows; at the gap's id: what follows
    assert [seq for seq, _ in walk(buffer, after=2)] == [3, 4, 5]
    assert [seq for seq, _ in walk(buffer, after=4)] == [5]
    # a reader that has the gap is given it again only once more is dropped after it
    buffer.append(out("d"))  # 6: drops 5
    assert [(seq, e["type"]) for seq, e in walk(buffer, after=4)] == [(5, "gap"), (6, "stdout")]
    assert walk(buffer, after=6) == []


def test_the_newest_event_is_kept_even_when_it_alone_is_over_the_bound() -> None:
    buffer = EventBuffer(max_events=100, max_bytes=100)
    buffer.append(out("small"))
    buffer.append(out("y" * 500))
    assert len(buffer) == 1 and buffer.last_seq == 2 and buffer.dropped_events == 1
    assert [e["type"] for _, e in walk(buffer)] == ["gap", "stdout"]


def test_would_drop_names_the_newest_id_an_append_drops() -> None:
    chunk = out("z" * 100)
    size = event_size(chunk)
    buffer = EventBuffer(max_events=100, max_bytes=3 * size)
    for _ in range(3):
        buffer.append(chunk)
    assert buffer.would_drop(0) == 0
    assert buffer.would_drop(size) == 1
    assert buffer.would_drop(2 * size) == 2
    buffer.append(chunk, size)
    assert buffer.gap_seq == 1 and buffer.bytes == 3 * size


def test_an_event_is_encoded_once_for_its_size_and_every_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's chunk is measured for the buffer and written to each reader's SSE: one encoding."""
    from sandbox_core.service import buffer as module
    from sandbox_core.service.app import sse

    data = {"b64": "QUJD" * 1000, "tool_use_id": "t\u00e9\"1"}
    plain = {"type": "stdout", "data": data}
    event = module.encoded("stdout", data)
    assert event_size(event) == event_size(plain) == len(json.dumps(plain, separators=(",", ":")))
    calls: list[object] = []
    real = json.dumps

    def counting(obj: object, **kw: Any) -> str:
        calls.append(obj)
        return real(obj, **kw)

    monkeypatch.setattr(json, "dumps", counting)  # the json module the buffer and sse() use
    buffer = EventBuffer(max_events=10, max_bytes=1 << 20)
    seq = buffer.append(event, event_size(event))
    frames = [sse(*item) for item in walk(buffer)] * 3  # three readers
    assert calls == [] or all(obj == "stdout" for obj in calls)  # only the type name, never the data again
    assert frames[0] == f"id: {seq}\nevent: stdout\ndata: {real(data, separators=(',', ':'))}\n\n".encode()
