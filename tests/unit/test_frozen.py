"""The wire types are immutable values (:mod:`sandbox_core.frozen`), as the frozen dataclasses they replace were."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sandbox_core.events import Event
from sandbox_core.isolation.spec import PACKAGE_ROOT
from sandbox_core.protocol import Malformed, Notification, Request, Response


def test_equal_by_type_and_fields_with_defaults_and_a_readable_repr() -> None:
    assert Request(1, "ping") == Request(1, "ping", {}) == Request(id=1, method="ping", params={})
    assert Request(1, "ping") != Request(2, "ping") and Request(1, "ping") != Notification("ping")
    assert Response(3, result=[1]) != Response(3, error={"code": 1, "message": "x"})
    assert Event("stdout", {"data": "a"}, 2) == Event(type="stdout", data={"data": "a"}, seq=2) != Event("stdout")
    assert Malformed(-32700, "parse error").id is None
    assert repr(Notification("cancel", {"id": 3})) == "Notification(method='cancel', params={'id': 3})"
    assert Request(1, "ping").params is not Request(2, "ping").params  # each its own default dict


@pytest.mark.parametrize("value", [Request(1, "ping"), Response(1, result=2), Event("text", {"text": "hi"})])
def test_no_field_can_be_assigned_or_deleted_and_values_are_not_hashable(value: object) -> None:
    name = type(value).__slots__[0]  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        setattr(value, name, "other")
    with pytest.raises(AttributeError):
        delattr(value, name)
    with pytest.raises(AttributeError):
        value.extra = 1  # type: ignore[attr-defined]  # slots: no other attribute either
    with pytest.raises(TypeError):
        hash(value)


def test_the_wire_types_load_without_dataclasses() -> None:
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import sandbox_core.protocol, sandbox_core.events; "
             "print('dataclasses' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-I", "-S", "-c", probe, str(PACKAGE_ROOT)], capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    assert out.stdout.strip() == "False"
