"""JSON for the wire without the ``json`` module: CPython's C accelerator, driven directly.

``import json`` brings ``re``, ``enum``, ``functools`` and ``collections`` with it: on these
machines ~14 ms of a fresh interpreter's start, which is what a one-shot client
(:mod:`sandbox_core.service.blocking`) and a worker's handshake
(:mod:`sandbox_core.inside.handshake`) would otherwise spend before their first frame. The
scanner and string quoting here are the ones ``json`` itself uses (``_json``), so what is read
is read exactly as ``json.loads`` reads it; what is written is compact JSON that ``json``
reads back (tests check both ways).
"""

from __future__ import annotations

from _json import encode_basestring as _quote_utf8
from _json import encode_basestring_ascii as _quote_ascii
from _json import make_scanner as _make_scanner

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: its users start faster
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class _Strict:
    """The settings of ``json.loads`` with no hooks, as the C scanner reads them."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity, -Infinity, as json.loads takes them


_scan: Callable[[str, int], tuple[Any, int]] = _make_scanner(_Strict())  # type: ignore[arg-type]  # duck-typed
_SPACE = " \t\n\r"
_INF = float("inf")


def json_value(text: str) -> Any:
    """``json.loads(text)``: ValueError for anything that is not one JSON document."""
    text = text.strip(_SPACE)
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError(f"not JSON: {text[:80]!r}") from None
    if end != len(text):
        raise ValueError(f"extra data after JSON: {text[end:end + 80]!r}")
    return value


def json_text(value: Any, *, ascii: bool = True) -> str:
    """Compact JSON of dicts (str keys), lists, tuples, str, int, finite float, bool and None.

    ``ascii`` escapes every non-ASCII character (``json.dumps``' default); without it the text
    is what ``json.dumps(value, separators=(",", ":"), ensure_ascii=False)`` writes.
    """
    return _text(value, _quote_ascii if ascii else _quote_utf8)


def _text(value: Any, quote: Callable[[str], str]) -> str:
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, str):
        return str(quote(value))
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if not -_INF < value < _INF:  # NaN and the infinities
            raise ValueError(f"{value!r} is not JSON")
        return float.__repr__(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_text(item, quote) for item in value) + "]"
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("JSON object keys must be str")
        return "{" + ",".join(f"{quote(key)}:{_text(item, quote)}" for key, item in value.items()) + "}"
    raise TypeError(f"{type(value).__name__} is not JSON")
