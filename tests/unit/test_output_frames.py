"""The output pipe end to end on real pipes: the worker's writer (:class:`OutputPipe`, with
``splice`` from a command's pipe) and the host's reader (:class:`FrameReader`).

Frames arrive whole and in order, byte for byte, also when the host's end is full and the
writer has to wait; a sender cancelled mid-frame still finishes its frame (else every later
frame would be lost); the reader refuses bytes that are not frames and closes at the end."""

from __future__ import annotations

import asyncio
import os

import pytest

from sandbox_core import datapipe
from sandbox_core.framereader import FrameReader
from sandbox_core.inside.channel import OutputPipe
from sandbox_core.inside.pipestream import PipeStream
from tests.helpers import wait_for

Frame = tuple[int, int, bytes]


def _never(exc: Exception) -> None:
    pytest.fail(f"the reader broke: {exc!r}")


async def _pipes() -> tuple[OutputPipe, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    return await OutputPipe.open(w), r


async def test_spliced_and_written_frames_arrive_whole_and_in_order_behind_a_full_pipe() -> None:
    out, host_end = await _pipes()
    got: list[Frame] = []
    reader = FrameReader(host_end, lambda *f: got.append(f), _never)
    reader.pause_reading()  # the host is behind: the writer must wait for it
    src_r, src_w = os.pipe2(os.O_CLOEXEC)
    source = PipeStream(src_r)
    chunks = [os.urandom(60_000) for _ in range(40)]  # 2.4 MB: more than both pipes hold

    async def command() -> None:
        for i, chunk in enumerate(chunks):
            os.write(src_w, chunk)  # what the command wrote, spliced on without being read
            left = len(chunk)
            while left:
                waiting = await source.ready(left)
                await out.splice(7, datapipe.KIND_STDOUT, source, waiting)
                left -= waiting
            await out.send(8, datapipe.KIND_STDERR, b"line %d\n" % i)
        await out.send(7, datapipe.KIND_END)

    sending = asyncio.create_task(command())
    await wait_for(out.waiting, 10, "a frame waiting for the host's end")
    assert not sending.done() and _in(host_end) > 0
    reader.resume_reading()
    await asyncio.wait_for(sending, 30)
    await wait_for(lambda: bool(got) and got[-1][1] == datapipe.KIND_END, 10, "the end frame")
    assert b"".join(p for _, kind, p in got if kind == datapipe.KIND_STDOUT) == b"".join(chunks)
    assert [p for rid, _, p in got if rid == 8] == [b"line %d\n" % i for i in range(len(chunks))]
    positions = [kind for _, kind, _ in got]  # each stderr line after its chunk, before the next
    assert positions.count(datapipe.KIND_STDERR) == len(chunks) and positions[-1] == datapipe.KIND_END
    os.close(src_w)
    source.close()
    reader.close()


def _in(fd: int) -> int:
    from sandbox_core.inside.pipestream import in_pipe

    return in_pipe(fd)


async def test_a_sender_cancelled_mid_frame_still_finishes_it() -> None:
    out, host_end = await _pipes()
    big = os.urandom(datapipe.MAX_PAYLOAD)
    sending = asyncio.create_task(out.send(1, datapipe.KIND_STDOUT, big))
    await wait_for(lambda: out.waiting() and _in(host_end) > 0, 10, "the pipe full mid-frame")
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    after = asyncio.create_task(out.send(2, datapipe.KIND_STDOUT, b"after"))
    got: list[Frame] = []
    reader = FrameReader(host_end, lambda *f: got.append(f), _never)
    await asyncio.wait_for(after, 10)
    await wait_for(lambda: len(got) == 2, 10, "both frames")
    assert got == [(1, datapipe.KIND_STDOUT, big), (2, datapipe.KIND_STDOUT, b"after")]
    reader.close()


async def test_the_reader_takes_frames_in_any_pieces_and_closes_at_the_end() -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    got: list[Frame] = []
    reader = FrameReader(r, lambda *f: got.append(f), _never)
    wire = datapipe.frame(3, datapipe.KIND_STDOUT, b"hello") + b"hello" + datapipe.frame(3, datapipe.KIND_END)
    for byte in wire:  # a byte at a time: header and payload split everywhere
        os.write(w, bytes([byte]))
        await asyncio.sleep(0)
    await wait_for(lambda: len(got) == 2, 10, "the frames")
    assert got == [(3, datapipe.KIND_STDOUT, b"hello"), (3, datapipe.KIND_END, b"")]
    os.close(w)
    await wait_for(reader.is_closing, 10, "closed at the end")


@pytest.mark.parametrize("header", [
    datapipe.HEADER.pack(1, datapipe.KIND_STDIN, 1),  # the input pipe's kind
    datapipe.HEADER.pack(1, 9, 0),
    datapipe.HEADER.pack(1, datapipe.KIND_STDOUT, datapipe.MAX_PAYLOAD + 1),
    datapipe.HEADER.pack(1, datapipe.KIND_END, 5),
])  # fmt: skip
async def test_bytes_that_are_not_output_frames_break_the_reader(header: bytes) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    broken: list[Exception] = []
    reader = FrameReader(r, lambda *f: pytest.fail("delivered garbage"), broken.append)
    os.write(w, header + b"xxxxx")
    await wait_for(lambda: bool(broken), 10, "the reader broken")
    assert isinstance(broken[0], datapipe.FrameError)
    assert reader.is_closing()
    os.close(w)
