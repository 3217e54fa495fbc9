"""The byte crossings: command stdin and output as raw bytes on pipes of their own.

JSON-RPC over NDJSON is the control channel; bytes that only have to arrive as they were
sent do not belong in it (base64 in JSON costs ~4 copies and ~1.4× the bytes). Beside the
control pipe the host gives each worker two more: the **output pipe** (worker → host) and
the **input pipe** (host → worker). Every chunk on them is one binary frame:

    request id   u64, big-endian (the id of the ``exec`` request)
    kind         u8: 1 stdout, 2 stderr (output pipe), 3 stdin (input pipe),
                 0 end (no more output, or end of stdin, for this request)
    length       u32, big-endian, at most :data:`MAX_PAYLOAD`
    payload      ``length`` bytes

A terminal request (an ``exec`` with ``tty``) uses the same frames: its keys are ``stdin``
frames, and everything its pseudo-terminal writes comes back as ``stdout`` frames.

On the output pipe the ``end`` frame comes before the request's final response on the
control pipe; the host holds a successful response until it has read ``end``, so the
caller sees all output before ``done``. Each side reads a pipe only as fast as the bytes
are taken (the caller takes output, the command reads stdin), so a slow reader blocks the
writer instead of growing anyone's memory.
"""

from __future__ import annotations

import os
import struct
from typing import Literal

HEADER = struct.Struct(">QBI")
MAX_PAYLOAD = 1024 * 1024
"""Largest payload of one frame; a longer one means the worker is not speaking this format."""
KIND_END, KIND_STDOUT, KIND_STDERR, KIND_STDIN = 0, 1, 2, 3
STREAMS: dict[int, Literal["stdout", "stderr"]] = {KIND_STDOUT: "stdout", KIND_STDERR: "stderr"}
OUTPUT_KINDS = frozenset({KIND_END, KIND_STDOUT, KIND_STDERR})
"""What the output pipe carries."""
INPUT_KINDS = frozenset({KIND_END, KIND_STDIN})
"""What the input pipe carries."""
PIPE_BYTES = 1024 * 1024
"""Capacity asked of the data pipe (F_SETPIPE_SZ): fewer, larger reads and writes."""
F_SETPIPE_SZ = 1031


def frame(request_id: int, kind: int, payload: bytes = b"") -> bytes:
    """The header of one frame (the payload is written after it)."""
    return HEADER.pack(request_id, kind, len(payload))


class FrameError(ValueError):
    """The bytes on the data pipe are not frames of this format."""


def check_frame(kind: int, length: int, kinds: frozenset[int]) -> None:
    """FrameError unless a header of ``kind`` and ``length`` is one of a pipe carrying ``kinds``."""
    if kind not in kinds or length > MAX_PAYLOAD or (kind == KIND_END and length):
        raise FrameError(f"not a frame of this pipe (kind {kind}, length {length})")


def read_header(fd: int, head: bytes, kinds: frozenset[int]) -> tuple[bytes, tuple[int, int, int] | None]:
    """Read on at a frame header from the pipe ``fd`` (``head``: what has been read of it).

    Returns what is held of it then, and once it is whole and a frame of a pipe carrying
    ``kinds`` (else FrameError), its ``(request id, kind, length)``. EOFError at the pipe's end,
    BlockingIOError while a nonblocking pipe is empty."""
    data = os.read(fd, HEADER.size - len(head))
    if not data:
        raise EOFError
    head += data
    if len(head) < HEADER.size:
        return head, None
    request_id, kind, length = HEADER.unpack(head)
    check_frame(kind, length, kinds)
    return b"", (request_id, kind, length)
