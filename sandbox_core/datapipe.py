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

import struct
from collections.abc import Callable
from typing import Literal

HEADER = struct.Struct(">QBI")
MAX_PAYLOAD = 1024 * 1024
"""Largest payload of one frame; a longer one means the worker is not speaking this format."""
KIND_END, KIND_STDOUT, KIND_STDERR, KIND_STDIN = 0, 1, 2, 3
STREAMS: dict[int, Literal["stdout", "stderr"]] = {KIND_STDOUT: "stdout", KIND_STDERR: "stderr"}
_KINDS = frozenset({KIND_END, KIND_STDOUT, KIND_STDERR, KIND_STDIN})
OUTPUT_KINDS = frozenset({KIND_END, KIND_STDOUT, KIND_STDERR})
"""What the output pipe carries."""
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
        raise FrameError(f"not an output frame (kind {kind}, length {length})")


class DataSplitter:
    """Feed bytes from the data pipe; each complete frame goes to ``deliver`` as it is found.

    Reads and frames do not line up (a read ends inside a payload): a payload is kept as
    views of the reads it spans and joined once it is complete, so its bytes are copied once
    on their way to ``deliver``, whether it came in one read or several. What is held is at
    most one payload (:data:`MAX_PAYLOAD`) and one read.
    """

    def __init__(self, deliver: Callable[[int, int, bytes], None], kinds: frozenset[int] = _KINDS) -> None:
        self._deliver = deliver
        self._kinds = kinds
        self._head = bytearray()
        """A header split between reads."""
        self._frame: tuple[int, int, int] | None = None
        """(request id, kind, length) of the payload being read."""
        self._parts: list[memoryview] = []
        self._have = 0

    def feed(self, data: bytes) -> None:
        """Deliver the frames ``data`` completes; FrameError for bytes that are not frames."""
        view = memoryview(data)
        at, end = 0, len(view)
        while at < end:
            if self._frame is None:
                if not self._head and end - at >= HEADER.size:
                    request_id, kind, length = HEADER.unpack_from(view, at)
                    at += HEADER.size
                else:
                    take = min(HEADER.size - len(self._head), end - at)
                    self._head += view[at : at + take]
                    at += take
                    if len(self._head) < HEADER.size:
                        return
                    request_id, kind, length = HEADER.unpack(self._head)
                    self._head.clear()
                check_frame(kind, length, self._kinds)
                if end - at >= length:  # the whole payload is in this read: one copy
                    self._deliver(request_id, kind, bytes(view[at : at + length]))
                    at += length
                    continue
                self._frame = (request_id, kind, length)
            request_id, kind, length = self._frame
            take = min(length - self._have, end - at)
            self._parts.append(view[at : at + take])
            self._have += take
            at += take
            if self._have == length:
                payload = b"".join(self._parts)
                self._frame, self._parts, self._have = None, [], 0
                self._deliver(request_id, kind, payload)
