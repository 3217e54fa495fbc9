"""The wire's JSON (:mod:`sandbox_core.wirejson`): what ``json`` reads and writes, without it."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from sandbox_core.wirejson import json_text, json_value

VALUES: list[Any] = [
    None, True, False, 0, -7, 2**70, 1.5, -0.0, 1e300, "", "plain", "quote \" and \\ and /",
    "\x00\x1f\x7f control", "é ünïcode ✓ 😀", "\udcff lone surrogate (an argv byte that is not UTF-8)",
    [], [1, "two", [3.0, None]], {}, {"argv": ["sh", "-c", "echo hi"], "timeout": 2.5, "network": {"mode": "none"}},
    {"nested": {"deeper": [{"k": False}]}, "": "empty key"},
]


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_what_it_writes_json_reads_back_and_what_json_writes_it_reads(value: Any) -> None:
    assert json.loads(json_text(value)) == value
    assert json_value(json.dumps(value)) == value
    assert json_value(json.dumps(value, indent=2)) == value
    assert json_text(value).isascii()  # as json.dumps with ensure_ascii: any byte-safe transport takes it


def test_it_reads_the_constants_json_reads() -> None:
    assert math.isnan(json_value("NaN")) and json_value(" -Infinity ") == float("-inf")


@pytest.mark.parametrize("text", ["", "   ", "{", '{"a": 1', '{"a" 1}', "[1,]", "tru", '"open', '{"a": 1} {"b": 2}',
                                  "[1] x", "'single'"])
def test_anything_but_one_json_document_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):  # the one error callers catch, whatever the cause
        json_value(text)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {1: "int key"}, {"set": {1}}, b"bytes", object()])
def test_what_json_cannot_hold_is_refused(value: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        json_text(value)
