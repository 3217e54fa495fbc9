from __future__ import annotations

import asyncio
import json

import pytest

from sandbox_core import codes
from sandbox_core.protocol import (
    FrameReader,
    FrameSplitter,
    Malformed,
    Notification,
    Request,
    Response,
    decode,
    encode,
)


def test_request_round_trip() -> None:
    frame = encode(Request(7, "exec", {"argv": ["ls"]}))
    assert frame.endswith(b"\n") and frame.count(b"\n") == 1
    assert decode(frame) == Request(7, "exec", {"argv": ["ls"]})


def test_notification_and_response_round_trip() -> None:
    assert decode(encode(Notification("cancel", {"id": 3}))) == Notification("cancel", {"id": 3})
    assert decode(encode(Response("a", result={"x": 1}))) == Response("a", result={"x": 1})
    err = {"code": codes.TIMEOUT, "message": "late"}
    assert decode(encode(Response(2, error=err))) == Response(2, error=err)


def test_unicode_survives_framing() -> None:
    msg = Request(1, "exec", {"shell": "echo 'héllo\nwörld'"})
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json", codes.PARSE_ERROR),
        (b"\xff\xfe", codes.PARSE_ERROR),
        (b"[1, 2]", codes.INVALID_REQUEST),
        (b"42", codes.INVALID_REQUEST),
        (b'{"id": 1, "method": "x"}', codes.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1, "method": ""}', codes.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "x", "params": [1]}', codes.INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "id": 1.5, "method": "x"}', codes.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1, "result": 1, "error": {}}', codes.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1, "error": {"code": "x"}}', codes.INVALID_REQUEST),
    ],
)
def test_malformed_frames_become_values(line: bytes, code: int) -> None:
    msg = decode(line)
    assert isinstance(msg, Malformed)
    assert msg.code == code


def test_malformed_keeps_readable_id() -> None:
    msg = decode(b'{"jsonrpc": "2.0", "id": 9, "method": "x", "params": 3}')
    assert isinstance(msg, Malformed) and msg.id == 9


def test_codes_are_unique_named_constants() -> None:
    values = [v for k, v in vars(codes).items() if k.isupper()]
    assert len(values) == len(set(values))
    for name in ("CANCELLED", "TIMEOUT", "WORKER_CRASHED", "POOL_EXHAUSTED", "ISOLATION_UNAVAILABLE"):
        assert -32099 <= getattr(codes, name) <= -32000


def _reader(data: bytes, max_frame: int = 1024, chunk: int = 7) -> FrameReader:
    view = memoryview(data)
    pos = 0

    async def read(n: int) -> bytes:
        nonlocal pos
        piece = bytes(view[pos : pos + min(n, chunk)])
        pos += len(piece)
        return piece

    return FrameReader(read, max_frame)


async def _all(reader: FrameReader) -> list[object]:
    out: list[object] = []
    while (msg := await reader.next()) is not None:
        out.append(msg)
    return out


def test_reader_survives_garbage_and_oversized_frames() -> None:
    big = json.dumps({"jsonrpc": "2.0", "method": "x", "params": {"pad": "y" * 5000}}).encode()
    data = (
        encode(Request(1, "ping"))
        + b"garbage line\n"
        + big + b"\n"
        + b"\n"
        + encode(Notification("cancel", {"id": 1}))
        + big  # oversized, unterminated at end of stream
    )
    msgs = asyncio.run(_all(_reader(data)))
    assert msgs[0] == Request(1, "ping")
    assert isinstance(msgs[1], Malformed) and msgs[1].code == codes.PARSE_ERROR
    assert isinstance(msgs[2], Malformed) and msgs[2].code == codes.FRAME_TOO_LARGE
    assert msgs[3] == Notification("cancel", {"id": 1})
    assert isinstance(msgs[4], Malformed) and msgs[4].code == codes.FRAME_TOO_LARGE
    assert len(msgs) == 5


def test_reader_handles_frame_exactly_at_limit() -> None:
    frame = encode(Request(1, "ping", {"p": "x" * 100}))
    msgs = asyncio.run(_all(_reader(frame, max_frame=len(frame) - 1)))
    assert msgs == [Request(1, "ping", {"p": "x" * 100})]
    msgs = asyncio.run(_all(_reader(frame, max_frame=len(frame) - 2)))
    assert isinstance(msgs[0], Malformed) and msgs[0].code == codes.FRAME_TOO_LARGE


# ----------------------------------------------------------------- hostile frames


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 1500,
        b'{"jsonrpc":"2.0","id":3,"method":"x","params":{"a":' + b"[" * 1500 + b"]" * 1500 + b"}}",
        b"{" * 100_000,
        b'{"jsonrpc":"2.0","id":1,"result":' + b'{"a":' * 200 + b"1" + b"}" * 200 + b"}",
    ],
)
def test_deep_nesting_is_refused_before_parsing(line: bytes) -> None:
    msg = decode(line)
    assert isinstance(msg, Malformed) and msg.code == codes.PARSE_ERROR


def test_refused_nesting_keeps_the_id_of_the_call() -> None:
    msg = decode(b'{"jsonrpc":"2.0","id":3,"method":"x","params":{"a":' + b"[" * 1500 + b"]" * 1500 + b"}}")
    assert isinstance(msg, Malformed) and msg.id == 3


def test_brackets_inside_strings_and_ordinary_depth_pass() -> None:
    msg = Request(4, "x", {"s": "[[[[{{{{" * 1000, "l": [[[[[{"a": [1]}]]]]]})
    assert decode(encode(msg)) == msg


def test_decode_never_raises_on_random_bytes() -> None:
    import random

    rng = random.Random(7)
    for _ in range(2000):
        line = bytes(rng.choice(b'{}[]":,0123456789abc\\ \x00\xff') for _ in range(rng.randrange(1, 60)))
        assert isinstance(decode(line), Request | Response | Notification | Malformed)


def test_splitter_consumes_a_bad_line_once_and_goes_on() -> None:
    splitter = FrameSplitter(1024 * 1024)
    out = splitter.feed(b"[" * 1500 + b"\n")
    assert len(out) == 1 and isinstance(out[0], Malformed)
    assert splitter.feed(b"") == []  # nothing left to re-parse
    assert splitter.feed(encode(Request(1, "ping"))) == [Request(1, "ping")]


def test_oversized_frame_keeps_its_id_from_the_head() -> None:
    splitter = FrameSplitter(1024)
    head = b'{"jsonrpc":"2.0","id":"w7","method":"gateway.request","params":{"pad":"'
    assert splitter.feed(head + b"y" * 5000) == []  # dropped as it arrives, not buffered
    out = splitter.feed(b"y" * 5000 + b'"}}\n' + encode(Request(2, "ping")))
    assert isinstance(out[0], Malformed) and out[0].code == codes.FRAME_TOO_LARGE and out[0].id == "w7"
    assert out[1] == Request(2, "ping")
    big = encode(Request(9, "exec", {"pad": "z" * 4000}))
    (only,) = FrameSplitter(1024).feed(big)
    assert isinstance(only, Malformed) and only.id == 9


def test_splitter_holds_at_most_one_frame_limit() -> None:
    splitter = FrameSplitter(4096)
    for _ in range(1000):
        splitter.feed(b"x" * 4096)  # one endless line
        assert len(splitter._buf) <= 4096
    (msg,) = splitter.feed(b"\n")
    assert isinstance(msg, Malformed) and msg.code == codes.FRAME_TOO_LARGE


def test_hundred_thousand_frames_in_one_chunk() -> None:
    frames = b"".join(encode(Notification("event", {"n": i})) for i in range(100_000))
    out = FrameSplitter().feed(frames)
    assert len(out) == 100_000 and out[-1] == Notification("event", {"n": 99_999})
