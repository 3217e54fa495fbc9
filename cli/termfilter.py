"""What ``sandbox exec`` lets through to a terminal: text, colours and cursor movement only.

A terminal acts on what a command prints: an OSC string sets the window title or the
clipboard, a DCS string talks to the terminal itself (DECRQSS asks for its settings), and
query sequences (``ESC[6n`` cursor position, ``ESC[c`` device attributes, ENQ) make the
terminal *type its answer* into the operator's input, after the command has ended too. So
output bound for a terminal goes through :class:`TerminalFilter` (pipes and files get the
bytes unchanged). The rules, as tables below:

* kept: text, byte for byte (UTF-8, and bytes that are not UTF-8 except 0x80 to 0x9F,
  the 8-bit controls); the controls in :data:`KEPT_C0`; the CSI sequences in
  :data:`KEPT_CSI` with plain numeric parameters (colours, cursor movement, erasing; not
  ``ESC[3J``, which erases the scrollback); the ESC sequences in :data:`KEPT_ESC`.
* dropped: OSC, DCS, SOS, PM and APC strings up to their end (BEL for OSC, ST, CAN or SUB,
  or the next ESC); every other CSI (queries, modes such as mouse reporting, window
  operations); every other ESC sequence (``ESC c`` reset, ``ESC Z`` identify, charsets);
  other C0 controls; C1 controls, as UTF-8 (U+0080 to U+009F: the 8-bit forms of CSI,
  OSC, DCS and ST start the same sequences as their ESC forms) or as raw bytes.

Cursor movement and erasing stay because progress output (``\r``, ``ESC[K``, ``ESC[A``)
uses them and they make the terminal send nothing; they can redraw the screen, which
``\r`` and spaces can too.

The filter keeps its state between chunks, so a sequence split anywhere is recognised; a
sequence still open at :meth:`TerminalFilter.flush` is dropped.
"""

from __future__ import annotations

import codecs
import re

KEPT_C0 = "\a\b\t\n\v\f\r"
"""Controls passed: bell, backspace, tab, line feeds, carriage return."""
KEPT_CSI: dict[str, str] = {
    "m": "SGR: colours and text attributes",
    "A": "cursor up", "B": "cursor down", "C": "cursor forward", "D": "cursor back",
    "E": "cursor to next line", "F": "cursor to previous line", "G": "cursor to column",
    "H": "cursor position", "f": "cursor position", "d": "cursor to row",
    "K": "erase in line", "J": "erase in display (not 3: the scrollback)",
}
"""CSI finals passed, when the parameters are only digits, ``;`` and ``:``."""
KEPT_ESC: dict[str, str] = {"7": "save cursor", "8": "restore cursor", "(B": "ASCII character set"}
"""ESC sequences passed (what follows ESC)."""
MAX_SEQUENCE = 128
"""Characters of a CSI or ESC sequence held while it is incomplete; a longer one is dropped."""

_ESC = "\x1b"
_STRING_STARTS = {"]": True, "P": False, "X": False, "^": False, "_": False}
"""What follows ESC to open a string, and whether it is an OSC (which BEL also ends)."""
_C1 = {"\x9b": "[", "\x9d": "]", "\x90": "P", "\x98": "X", "\x9e": "^", "\x9f": "_"}
"""C1 controls that open a sequence, and their ESC form."""
_PLAIN = re.compile("[^\x00-\x06\x0e-\x1f\x80-\x9f\udc80-\udc9f]+")
"""A run of text that needs no decision (everything but controls and raw C1 bytes)."""
_OSC_END = re.compile("[\x07\x1b\x18\x1a\x9c\udc9c]")
_STRING_END = re.compile("[\x1b\x18\x1a\x9c\udc9c]")
_PARAMS = re.compile("[0-9;:]*")
_SIMPLE_CSI = re.compile("\x1b\\[([0-9;:]{0," + str(MAX_SEQUENCE - 2) + "})([\x40-\x7e])")
"""A whole CSI sequence with plain parameters (most colour codes): decided without the states."""

_GROUND, _ESCAPE, _INTERMEDIATE, _CSI, _STRING, _STRING_ESCAPE = range(6)


class TerminalFilter:
    """A byte stream with terminal strings and queries removed (see the module's rules)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._state = _GROUND
        self._seq = ""
        """The pending CSI or ESC sequence (at most :data:`MAX_SEQUENCE` characters)."""
        self._overlong = False
        self._osc = False
        self._out: list[str] = []

    def feed(self, data: bytes) -> bytes:
        """The part of ``data`` (following what came before) that may reach the terminal now."""
        return self._run(self._decoder.decode(data))

    def flush(self) -> bytes:
        """The rest, at the end of the stream (an unfinished sequence is dropped)."""
        out = self._run(self._decoder.decode(b"", final=True))
        self._end("")
        return out

    def _run(self, text: str) -> bytes:
        """Filter ``text`` (bytes that are not UTF-8 arrive as surrogate escapes, and leave as bytes)."""
        i = 0
        while i < len(text):
            if self._state == _GROUND:
                i = self._ground(text, i)
            elif self._state in (_STRING, _STRING_ESCAPE):
                i = self._string(text, i)
            elif self._sequence(text[i]):
                i += 1
        out, self._out = "".join(self._out), []
        return out.encode("utf-8", "surrogateescape")

    def _ground(self, text: str, i: int) -> int:
        """Text up to the next control, or one control; the index to go on from."""
        plain = _PLAIN.match(text, i)
        if plain is not None:
            self._out.append(plain.group())
            return plain.end()
        char = text[i]
        if char in KEPT_C0:
            self._out.append(char)
        elif char == _ESC:
            simple = _SIMPLE_CSI.match(text, i)
            if simple is not None:
                self._end(simple.group() if _kept_csi(simple.group(1), simple.group(2)) else "")
                return simple.end()
            self._begin(_ESCAPE, _ESC)
        elif char in _C1:
            self._escape(_C1[char])
        return i + 1

    def _sequence(self, char: str) -> bool:
        """One character of a pending ESC or CSI sequence; False if it is not part of it."""
        if char == _ESC:  # a new sequence cuts this one off
            self._begin(_ESCAPE, _ESC)
            return True
        if self._state == _ESCAPE:
            return self._escape(char)
        if self._state == _INTERMEDIATE:
            return self._intermediate(char)
        return self._csi(char)

    def _escape(self, char: str) -> bool:
        """The character after ESC."""
        if char == "[":
            self._begin(_CSI, _ESC + "[")
        elif char in _STRING_STARTS:
            self._begin(_STRING, "")
            self._osc = _STRING_STARTS[char]
        elif "\x20" <= char <= "\x2f":
            self._begin(_INTERMEDIATE, _ESC + char)
        elif "\x30" <= char <= "\x7e":
            self._end(_ESC + char if char in KEPT_ESC else "")
        else:
            return self._end("")
        return True

    def _intermediate(self, char: str) -> bool:
        """A character after ESC and one or more intermediates (as in ``ESC ( B``)."""
        if "\x20" <= char <= "\x2f":
            self._hold(char)
        elif "\x30" <= char <= "\x7e":
            sequence = self._seq + char
            self._end(sequence if not self._overlong and sequence[1:] in KEPT_ESC else "")
        else:
            return self._end("")
        return True

    def _csi(self, char: str) -> bool:
        """A character of a CSI sequence: a parameter, an intermediate or the final."""
        if "\x20" <= char <= "\x3f":
            self._hold(char)
        elif "\x40" <= char <= "\x7e":
            params = self._seq[2:]
            kept = not self._overlong and _PARAMS.fullmatch(params) is not None and _kept_csi(params, char)
            self._end(self._seq + char if kept else "")
        else:
            return self._end("")
        return True

    def _string(self, text: str, i: int) -> int:
        """Drop the body of an OSC, DCS, SOS, PM or APC string up to its end."""
        if self._state == _STRING_ESCAPE:
            if text[i] == "\\":  # ESC \ is the string terminator
                self._end("")
                return i + 1
            self._begin(_ESCAPE, _ESC)  # any other ESC starts a new sequence
            return i
        end = (_OSC_END if self._osc else _STRING_END).search(text, i)
        if end is None:
            return len(text)
        if end.group() == _ESC:
            self._state = _STRING_ESCAPE
        else:
            self._end("")
        return end.end()

    def _begin(self, state: int, seq: str) -> None:
        self._state, self._seq, self._overlong = state, seq, False

    def _hold(self, char: str) -> None:
        """Add ``char`` to the pending sequence; past :data:`MAX_SEQUENCE` it is only marked too long."""
        if len(self._seq) < MAX_SEQUENCE:
            self._seq += char
        else:
            self._overlong = True

    def _end(self, kept: str) -> bool:
        """The sequence is over: pass ``kept`` (empty: drop it); False, for a character it did not take."""
        if kept:
            self._out.append(kept)
        self._begin(_GROUND, "")
        return False


def _kept_csi(params: str, final: str) -> bool:
    """Whether CSI ``params`` ``final`` (plain numeric parameters) passes: see :data:`KEPT_CSI`."""
    return final in KEPT_CSI and not (final == "J" and "3" in params.split(";"))
