"""The data pipes' frame format (:mod:`sandbox_core.datapipe`): the header's layout, and the
check both readers make of every header (the output pipe's :class:`FrameReader`, the input
pipe's :class:`InputPipe`; each is tested end to end on real pipes in its own module)."""

from __future__ import annotations

import pytest

from sandbox_core import datapipe


def test_the_header_is_id_kind_length_big_endian() -> None:
    assert datapipe.frame(0x0102030405060708, datapipe.KIND_STDIN, b"abc") == (
        bytes.fromhex("0102030405060708") + bytes([datapipe.KIND_STDIN]) + (3).to_bytes(4, "big")
    )
    assert datapipe.HEADER.size == 13


@pytest.mark.parametrize("kinds", [datapipe.OUTPUT_KINDS, datapipe.INPUT_KINDS])
def test_a_pipe_takes_its_own_kinds_up_to_the_payload_limit(kinds: frozenset[int]) -> None:
    for kind in kinds:
        datapipe.check_frame(kind, 0, kinds)
        if kind != datapipe.KIND_END:
            datapipe.check_frame(kind, datapipe.MAX_PAYLOAD, kinds)


@pytest.mark.parametrize(("kind", "length", "kinds"), [
    (9, 0, datapipe.OUTPUT_KINDS),  # no such kind
    (datapipe.KIND_STDIN, 1, datapipe.OUTPUT_KINDS),  # stdin on the output pipe
    (datapipe.KIND_STDOUT, 1, datapipe.INPUT_KINDS),  # output on the input pipe
    (datapipe.KIND_STDOUT, datapipe.MAX_PAYLOAD + 1, datapipe.OUTPUT_KINDS),  # too long
    (datapipe.KIND_END, 5, datapipe.INPUT_KINDS),  # an end frame with a payload
])
def test_headers_that_are_not_frames_of_the_pipe_are_refused(kind: int, length: int, kinds: frozenset[int]) -> None:
    with pytest.raises(datapipe.FrameError):
        datapipe.check_frame(kind, length, kinds)
