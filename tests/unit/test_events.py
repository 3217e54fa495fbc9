"""Output events carry bytes exactly: text when it is UTF-8, base64 otherwise."""

from __future__ import annotations

import os

import pytest

from sandbox_core.chunks import OutputEncoder, output_bytes, output_data
from sandbox_core.events import Event


def _through(encoder: OutputEncoder, data: bytes, size: int) -> list[dict[str, object]]:
    out = [encoder.encode(data[i : i + size]) for i in range(0, len(data), size)]
    out.append(encoder.flush())
    return [d for d in out if d]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 4096])
def test_utf8_text_stays_text_at_any_chunk_size(size: int) -> None:
    text = "héllo wörld € 𝄞 日本語\n" * 50
    chunks = _through(OutputEncoder(), text.encode(), size)
    assert all("data" in c for c in chunks)  # never base64 for valid text, however it is cut
    assert "".join(str(c["data"]) for c in chunks) == text


@pytest.mark.parametrize("size", [1, 5, 4096, 65536])
def test_random_bytes_arrive_byte_for_byte(size: int) -> None:
    data = os.urandom(200_000)
    chunks = _through(OutputEncoder(), data, size)
    assert b"".join(output_bytes(c) for c in chunks) == data
    assert any("b64" in c for c in chunks)


def test_a_truncated_character_at_the_end_is_flushed_as_bytes() -> None:
    enc = OutputEncoder()
    assert enc.encode(b"ok\xe2\x82") == {"data": "ok"}
    assert enc.flush() == output_data(b"\xe2\x82")
    assert output_bytes(output_data(b"\xe2\x82")) == b"\xe2\x82"


def test_event_chunk_and_hostile_event_dicts() -> None:
    assert Event("stdout", {"b64": "AAE="}).chunk() == b"\x00\x01"
    assert Event("stdout", {"b64": "not base64!"}).chunk() == b""
    assert Event("stdout", {"data": "\ud800"}).chunk() == "\ud800".encode("utf-8", "surrogatepass")
    bad: list[object] = [{"type": ["stdout"]}, {"type": {"a": 1}}, {"type": None}, {"type": "nope"}, []]
    for obj in bad:
        with pytest.raises(ValueError):
            Event.from_dict(obj)  # type: ignore[arg-type]
