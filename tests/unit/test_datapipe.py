"""The data pipe's framing (:mod:`sandbox_core.datapipe`): frames come out whole and in order
however the reads cut them, and bytes that are not frames are refused."""

from __future__ import annotations

import random

import pytest

from sandbox_core import datapipe


def _frames(rng: random.Random, count: int) -> list[tuple[int, int, bytes]]:
    sizes = [0, 1, datapipe.HEADER.size - 1, datapipe.HEADER.size, 4096, 65536, datapipe.MAX_PAYLOAD]
    out = []
    for i in range(count):
        kind = rng.choice([datapipe.KIND_STDOUT, datapipe.KIND_STDERR])
        size = rng.choice(sizes) if rng.random() < 0.5 else rng.randrange(0, 300_000)
        out.append((i + 1, kind, rng.randbytes(size)))
        if rng.random() < 0.2:
            out.append((i + 1, datapipe.KIND_END, b""))
    return out


def _wire(frames: list[tuple[int, int, bytes]]) -> bytes:
    return b"".join(datapipe.frame(rid, kind, payload) + payload for rid, kind, payload in frames)


@pytest.mark.parametrize("seed", range(6))
def test_frames_come_out_whole_whatever_the_reads(seed: int) -> None:
    rng = random.Random(seed)
    frames = _frames(rng, 40)
    wire = _wire(frames)
    got: list[tuple[int, int, bytes]] = []
    splitter = datapipe.DataSplitter(lambda rid, kind, payload: got.append((rid, kind, payload)))
    at = 0
    while at < len(wire):  # reads of every size: one byte, a header's worth, a pipe's, a megabyte
        n = rng.choice([1, 7, datapipe.HEADER.size, 4096, 65536, 262144, 1 << 20])
        splitter.feed(wire[at : at + n])
        at += n
    assert got == frames
    assert all(type(payload) is bytes for _, _, payload in got)


def test_one_read_of_many_frames_and_a_byte_at_a_time_agree() -> None:
    frames = _frames(random.Random(99), 12)
    wire = _wire(frames)
    whole: list[tuple[int, int, bytes]] = []
    datapipe.DataSplitter(lambda *f: whole.append(f)).feed(wire)
    trickle: list[tuple[int, int, bytes]] = []
    splitter = datapipe.DataSplitter(lambda *f: trickle.append(f))
    for i in range(len(wire)):
        splitter.feed(wire[i : i + 1])
    assert whole == trickle == frames


@pytest.mark.parametrize("header", [
    datapipe.HEADER.pack(1, 9, 0),  # no such kind
    datapipe.HEADER.pack(1, datapipe.KIND_STDOUT, datapipe.MAX_PAYLOAD + 1),  # too long
    datapipe.HEADER.pack(1, datapipe.KIND_END, 5),  # an end frame with a payload
])
def test_bytes_that_are_not_frames_are_refused(header: bytes) -> None:
    splitter = datapipe.DataSplitter(lambda *f: None)
    splitter.feed(header[:3])  # a header split between reads is judged once it is whole
    with pytest.raises(datapipe.FrameError):
        splitter.feed(header[3:] + b"xxxxx")


def test_a_kind_the_pipe_does_not_carry_is_refused() -> None:
    splitter = datapipe.DataSplitter(lambda *f: None, kinds=frozenset({datapipe.KIND_STDIN, datapipe.KIND_END}))
    with pytest.raises(datapipe.FrameError):
        splitter.feed(datapipe.frame(1, datapipe.KIND_STDOUT, b"x") + b"x")
