"""Small immutable value classes without ``dataclasses``: what the wire types need, made cheaply.

``@dataclass(frozen=True, slots=True)`` writes and compiles five methods per class and then
builds the class a second time for its slots: 0.8 ms a class on these machines, paid at
import by every host process and every worker (whose serving loop imports the wire types
before its first command). :class:`Frozen` gives a class with ``__slots__`` the parts of a
frozen dataclass the wire types use: equality by type and fields, a ``repr`` naming them,
no assignment after ``__init__`` (:class:`AttributeError`, as a frozen dataclass raises
its subclass ``FrozenInstanceError``) and no hash (their fields hold dicts).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the worker's serving loop imports this)
if TYPE_CHECKING:
    from typing import Any


init_field = object.__setattr__
"""How a value class's ``__init__`` sets a field: ``init_field(self, "name", value)`` (plain
assignment raises), as a frozen dataclass's generated ``__init__`` does."""


class Frozen:
    """Base of a value class: list its fields in ``__slots__`` and set each in ``__init__``
    with :data:`init_field`."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]  # equal by value, and the values are dicts

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a {type(self).__name__}")

    def _fields(self) -> tuple[str, ...]:
        fields: tuple[str, ...] = type(self).__slots__  # a subclass's own
        return fields

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields())

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Frozen)
        return self._values() == other._values()

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields())
        return f"{type(self).__name__}({fields})"
