"""The terminal filter of ``sandbox exec``: what reaches a terminal, whatever the chunking."""

from __future__ import annotations

import random

import pytest

from cli.termfilter import TerminalFilter

CSI, OSC = "\x1b[", "\x1b]"


def filtered(data: bytes, chunks: list[int] | None = None) -> bytes:
    """``data`` through one filter, fed whole or in pieces of the given sizes."""
    tf = TerminalFilter()
    if chunks is None:
        return tf.feed(data) + tf.flush()
    out, at = b"", 0
    for size in chunks:
        out += tf.feed(data[at:at + size])
        at += size
    return out + tf.feed(data[at:]) + tf.flush()


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (b"\x1b]0;pwned\x07\x1b[6n hi", b" hi"),  # title, cursor position query
        (b"\x1b]52;c;aGk=\x1b\\after", b"after"),  # clipboard write, ended by ST
        (b"a\x1bP$qm\x1b\\b", b"ab"),  # DECRQSS (a DCS string)
        (b"\x1bXsos\x1b\\\x1b^pm\x1b\\\x1b_apc\x07more\x1b\\z", b"z"),  # BEL does not end a non-OSC string
        (b"\x1b[c\x1b[>c\x1b[=c\x1b[5n\x1b[?6n\x1b[>q\x1b[?u\x1b[21t\x1b[?2$p.", b"."),  # queries
        (b"\x1b[?1000h\x1b[?1049h\x1b[4l\x1b[1;5r\x1b[8;1;1t.", b"."),  # modes, scroll region, window
        (b"\x1bc\x1bZ\x1b(0\x1b#8\x1b=\x05\x00\x0e.", b"."),  # reset, identify, charsets, ENQ, NUL, SO
        (b"\xc2\x9b6n\xc2\x9d0;t\x07\xc2\x900;x\xc2\x9c.", b"."),  # 8-bit CSI, OSC, DCS, ST as UTF-8
        (b"\x9b6n\x9d.\xed\xa0\x80", b"6n.\xed\xa0"),  # raw 8-bit controls (not UTF-8) are dropped
        (b"\x1b]0;x\x1b[31mz", b"\x1b[31mz"),  # an ESC ends an unterminated string
        (b"\x1b[1\n2m", b"\n2m"),  # a control breaks a sequence off
        (b"\x1b[" + b"1;" * 200 + b"m.", b"."),  # an overlong sequence is dropped
        (b"\x1b[2J\x1b[3J\x1b[0;3J\x1b[H", b"\x1b[2J\x1b[H"),  # erase, but not the scrollback
        (b"\x1b]0;open", b""),  # unfinished at the end of the stream
    ],
)
def test_strings_queries_and_other_sequences_are_dropped(raw: bytes, shown: bytes) -> None:
    assert filtered(raw) == shown


KEPT = (
    "plain \t text\r\n\a\b\v\f\x7f"
    f"{CSI}31mred{CSI}0m {CSI}1;38;2;255;0;0m{CSI}38:5:208m{CSI}m"  # SGR colours
    f"{CSI}A{CSI}2B{CSI}10C{CSI}D{CSI}E{CSI}F{CSI}5G{CSI}3;4H{CSI}1;1f{CSI}7d{CSI}K{CSI}2K{CSI}J{CSI}2J"
    "\x1b7\x1b8\x1b(B"
    "€ ě ‛ 日本 😀 \u2028"  # UTF-8 whose continuation bytes are 0x80-0x9F (ě = C4 9B, ‛ = E2 80 9B)
).encode() + b"\xff\xfe\xc3 \xed\xa0\xa0"  # bytes that are not UTF-8 stay (but 0x80-0x9F)


def test_text_colours_and_cursor_movement_pass_byte_for_byte() -> None:
    assert filtered(KEPT) == KEPT


def test_any_split_gives_the_same_bytes() -> None:
    """A sequence or a UTF-8 character split across chunks is handled as if whole."""
    mixed = KEPT + b"\x1b]0;pwned\x07\x1b[6n\xc2\x9b6n\x1bP$q\x1b\\\x1b[31mok" + KEPT
    whole = filtered(mixed)
    assert b"pwned" not in whole and b"6n" not in whole and whole.count(b"\x1b[31m") == 3
    for at in range(len(mixed) + 1):
        assert filtered(mixed, [at]) == whole, at
    assert filtered(mixed, [1] * len(mixed)) == whole


def test_random_chunking_of_random_bytes_is_consistent() -> None:
    rng = random.Random(14)
    alphabet = [b"\x1b", b"[", b"]", b"P", b"\\", b"\x07", b"6n", b"31m", b";", b"\xc2", b"\x9b", b"\x9c",
                b"\xe2\x82\xac", b"\xc4", b"a", b"\n", b"\x18"]
    for _ in range(200):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))
        whole = filtered(data)
        cuts = [rng.randrange(0, 5) for _ in range(rng.randrange(1, 20))]
        assert filtered(data, cuts) == whole, (data, cuts)
        assert b"\x1b]" not in whole and b"\x1bP" not in whole and b"\x1b[6n" not in whole
