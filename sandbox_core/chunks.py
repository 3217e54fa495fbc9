"""Command output in JSON: one chunk of bytes as ``data`` (UTF-8 text) or ``b64`` (anything else).

An output event (:class:`~sandbox_core.events.Event` of type ``stdout``/``stderr``) holds its
bytes as ``{"bytes": b"..."}`` in memory; in JSON one chunk is exactly one of ``data`` (the
chunk is valid UTF-8: readable JSON for the common case) or ``b64`` (standard base64 of the
raw bytes). :func:`output_bytes` gives the bytes of any of these forms, and joining the chunks
of a stream gives the command's output byte for byte. :class:`OutputEncoder` makes JSON chunks
from a stream without splitting a UTF-8 character between two ``data`` chunks.

A light module (``binascii`` only): the one-shot client of the service and the worker's
runner decode and encode chunks without loading the event model's dataclass and ``typing``.
"""

from __future__ import annotations

import binascii

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any


def output_bytes(data: dict[str, Any]) -> bytes:
    """The bytes one output event's ``data`` carries (``bytes``, ``data`` text or ``b64``)."""
    raw = data.get("bytes")
    if isinstance(raw, bytes):
        return raw
    text = data.get("data")
    if isinstance(text, str):
        return text.encode("utf-8", errors="surrogatepass")
    raw = data.get("b64")
    if isinstance(raw, str):
        try:
            return binascii.a2b_base64(raw, strict_mode=True)
        except (binascii.Error, ValueError):
            return b""
    return b""


_CONTROL = bytes(b for b in range(256) if b < 0x20 and b not in b"\t\n\r")
_NOT_CONTROL = bytes(b for b in range(256) if b not in _CONTROL)


def output_data(chunk: bytes) -> dict[str, Any]:
    """One chunk as JSON event data: ``{"data": text}`` when it is UTF-8 text, else ``{"b64": ...}``.

    Text with many control bytes (NULs, say) goes as base64 too: JSON escapes each as six bytes.
    """
    if len(chunk.translate(None, _NOT_CONTROL)) * 16 <= len(chunk):
        try:
            return {"data": chunk.decode("utf-8")}
        except UnicodeDecodeError:
            pass
    return {"b64": binascii.b2a_base64(chunk, newline=False).decode("ascii")}


class OutputEncoder:
    """Cuts a byte stream into event data without splitting a UTF-8 character.

    An incomplete multi-byte sequence at the end of a chunk (at most 3 bytes) is held back
    and sent with the next chunk, so text output stays text; anything else that is not
    UTF-8 goes as base64. :meth:`flush` sends what is held back at end of stream.
    """

    def __init__(self) -> None:
        self._held = b""

    def encode(self, chunk: bytes) -> dict[str, Any] | None:
        data = self._held + chunk
        self._held = b""
        cut = _incomplete_tail(data)
        if cut:
            data, self._held = data[:-cut], data[-cut:]
        return output_data(data) if data else None

    def flush(self) -> dict[str, Any] | None:
        held, self._held = self._held, b""
        return output_data(held) if held else None


def _incomplete_tail(data: bytes) -> int:
    """How many bytes at the end of ``data`` start a UTF-8 character that is not complete."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): how long should its sequence be?
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
            return back if need > back else 0
    return 0
