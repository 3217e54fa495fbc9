""":mod:`sandbox_core.valueclass`: the same class as ``dataclasses.dataclass`` makes, without compiling.

Each behaviour is checked on two classes with one body, one made by the standard library and
one by ours: what the standard one does is the specification.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from sandbox_core import valueclass
from sandbox_core.isolation.spec import PACKAGE_ROOT

Maker = Callable[..., Any]
MAKERS = [pytest.param(dataclasses.dataclass, id="stdlib"), pytest.param(valueclass.dataclass, id="ours")]


def _limits(make: Maker, frozen: bool) -> Any:
    @make(frozen=frozen)
    class Limits:
        """A config section."""

        memory_mb: int
        cpus: float = 1.0
        names: list[str] = dataclasses.field(default_factory=list)
        cache: dict[str, int] = dataclasses.field(default_factory=dict, repr=False, compare=False)
        kind: ClassVar[str] = "limits"

        def __post_init__(self) -> None:
            if self.memory_mb < 0:
                raise ValueError("memory_mb must be >= 0")

    return Limits


def _both(frozen: bool) -> tuple[Any, Any]:
    return _limits(dataclasses.dataclass, frozen), _limits(valueclass.dataclass, frozen)


@pytest.mark.parametrize("frozen", [True, False])
def test_construction_and_its_errors_match_the_standard_library(frozen: bool) -> None:
    theirs, ours = _both(frozen)
    for cls in (theirs, ours):
        a, b = cls(64), cls(64, 2.0, ["x"])
        assert (a.memory_mb, a.cpus, a.names, b.cpus, b.names) == (64, 1.0, [], 2.0, ["x"])
        assert cls(64).names is not cls(64).names  # a factory per instance
        assert cls(memory_mb=1, cpus=3.0).cpus == 3.0
        with pytest.raises(ValueError, match="memory_mb"):
            cls(-1)  # __post_init__ runs
        for args, kwargs in (((), {}), ((1, 2.0, [], {}, 5), {}), ((1,), {"nope": 1}), ((1,), {"memory_mb": 2})):
            with pytest.raises(TypeError):
                cls(*args, **kwargs)
    assert dataclasses.fields(ours) == dataclasses.fields(ours) and [f.name for f in dataclasses.fields(ours)] == [
        f.name for f in dataclasses.fields(theirs)
    ]
    assert "kind" not in {f.name for f in dataclasses.fields(ours)} and ours.kind == "limits"


@pytest.mark.parametrize("frozen", [True, False])
def test_repr_equality_and_hash_match_the_standard_library(frozen: bool) -> None:
    theirs, ours = _both(frozen)
    assert repr(ours(64, 2.0, ["x"], {"k": 1})) == repr(theirs(64, 2.0, ["x"], {"k": 1})).replace(
        theirs.__qualname__, ours.__qualname__
    )
    assert "cache" not in repr(ours(1))  # repr=False
    assert ours(1, names=["a"]) == ours(1, names=["a"], cache={"ignored": 1})  # compare=False
    assert ours(1) != ours(2) and ours(1) != theirs(1)  # another class is never equal
    assert ours(1).__eq__(object()) is NotImplemented
    if frozen:  # hashed over the compared fields, as the standard library does (a list among them: unhashable)
        with pytest.raises(TypeError, match="list"):
            hash(ours(1))
        with pytest.raises(TypeError, match="list"):
            hash(theirs(1))
        body = {"__annotations__": {"x": "int", "y": "int"}, "__doc__": "A point."}
        points: list[Any] = [make(frozen=True)(type("Point", (), dict(body)))
                             for make in (dataclasses.dataclass, valueclass.dataclass)]  # fmt: skip
        assert {hash(cls(1, 2)) for cls in points} == {hash((1, 2))}
    else:
        assert ours.__hash__ is None and theirs.__hash__ is None
        with pytest.raises(TypeError):
            hash(ours(1))


def test_a_frozen_instance_refuses_assignment_and_deletion_as_a_frozen_dataclass_does() -> None:
    theirs, ours = _both(frozen=True)
    for cls in (theirs, ours):
        item = cls(1)
        with pytest.raises(dataclasses.FrozenInstanceError):
            item.cpus = 2.0
        with pytest.raises(dataclasses.FrozenInstanceError):
            item.other = 1  # not a field either: the class is frozen
        with pytest.raises(dataclasses.FrozenInstanceError):
            del item.cpus
    mutable = _both(frozen=False)[1](1)
    mutable.cpus = 4.0
    assert mutable.cpus == 4.0


def test_the_module_functions_of_dataclasses_work_on_our_classes() -> None:
    _, ours = _both(frozen=True)
    item = ours(8, names=["a"])
    assert dataclasses.is_dataclass(ours(1)) and dataclasses.is_dataclass(_both(frozen=False)[1])
    assert dataclasses.asdict(item) == {"memory_mb": 8, "cpus": 1.0, "names": ["a"], "cache": {}}
    changed = dataclasses.replace(item, cpus=0.5)
    assert (changed.memory_mb, changed.cpus, changed.names) == (8, 0.5, ["a"]) and item.cpus == 1.0
    with pytest.raises(ValueError, match="memory_mb"):
        dataclasses.replace(item, memory_mb=-3)  # through __init__, so through __post_init__


def test_what_is_not_offered_is_refused_when_the_class_is_made() -> None:
    with pytest.raises(TypeError, match="__repr__"):

        @valueclass.dataclass
        class OwnRepr:
            """Defines a method the decorator would add."""

            a: int

            def __repr__(self) -> str:
                return "mine"

    with pytest.raises(TypeError, match="kw_only"):

        @valueclass.dataclass
        class KeywordOnly:
            """A field the generic __init__ does not place."""

            a: int = dataclasses.field(kw_only=True)


_NO_COMPILE = """
import builtins, sys
sys.path.insert(0, sys.argv[1])
import dataclasses
compiled = []
real_exec = builtins.exec
builtins.exec = lambda *a, **k: (isinstance(a[0], str) and compiled.append(a[0]), real_exec(*a, **k))[1]
import sandbox_core.config
builtins.exec = real_exec
print(len(compiled), sandbox_core.config.ProcessSandboxConfig().max_workers > 0)
"""


def test_the_config_classes_are_made_without_compiling_a_method() -> None:
    """What the module is for: ``dataclasses`` compiles each generated method with ``exec``."""
    out = subprocess.run([sys.executable, "-I", "-c", _NO_COMPILE, str(PACKAGE_ROOT)], capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    assert out.stdout.split() == ["0", "True"], out.stdout + out.stderr
