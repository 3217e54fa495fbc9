"""``@dataclass`` without its compile step, for the classes a command makes before its spawn.

``dataclasses.dataclass`` writes the source of each method it adds (``__init__``,
``__repr__``, ``__eq__``, and for a frozen class ``__hash__``, ``__setattr__`` and
``__delattr__``) and compiles it: about 1 ms a class on these machines, 20 ms for the 18
classes (the config's, the launch spec's, the CLI's state) that a one-shot ``sandbox exec``
makes before it can spawn its worker, which is then 20 ms later. :func:`dataclass` asks the
standard library for the fields only (defaults, factories, ``field()`` options, ``ClassVar``;
``dataclasses.fields``, ``replace``, ``asdict`` and ``is_dataclass`` work as on any
dataclass) and gives the class generic methods that do what the generated ones do, reading
the fields when they are called. Type checkers see ``dataclasses.dataclass`` itself.

:mod:`sandbox_core.frozen` answers the same cost for the wire types, which the worker imports
inside the sandbox: a slotted base class without ``dataclasses`` at all, and so without
defaults, ``fields()`` or ``replace()``, which the config and the launch classes need.

Only what our classes use is offered: ``frozen``; not ``order``, ``kw_only``, ``slots`` or
``InitVar`` (asked for, they raise ``TypeError`` when the class is made), and a class that
defines one of the methods itself is refused rather than half-served. Two differences remain,
neither observable through the methods: ``__dataclass_params__`` describes the fields-only
call (``init``, ``repr`` and ``eq`` false, not frozen), and ``repr`` has no guard against a
class that contains itself.
"""

from __future__ import annotations

import dataclasses

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

_METHODS = ("__init__", "__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__")


def make(cls: type, *, frozen: bool = False) -> type:
    """Turn ``cls`` into a dataclass with the standard library's fields and generic methods."""
    own = [name for name in _METHODS if name in cls.__dict__]
    if own:
        raise TypeError(f"{cls.__qualname__} defines {', '.join(own)}: use dataclasses.dataclass")
    dataclasses.dataclass(init=False, repr=False, eq=False)(cls)  # the fields, and no method
    fields = dataclasses.fields(cls)
    if any(f.kw_only is True for f in fields):
        raise TypeError(f"{cls.__qualname__}: kw_only fields are not offered here")
    declared = cls.__dataclass_fields__.values()  # type: ignore[attr-defined]
    if any(isinstance(f.type, dataclasses.InitVar) or "InitVar" in str(f.type) for f in declared):
        raise TypeError(f"{cls.__qualname__}: InitVar is not offered here")
    methods: dict[str, Any] = {
        "__init__": _init(cls, fields, frozen),
        "__repr__": _repr(fields),
        "__eq__": _eq(fields),
        "__hash__": _hash(fields) if frozen else None,  # eq without frozen: unhashable, as a dataclass is
    }
    if frozen:
        methods["__setattr__"], methods["__delattr__"] = _frozen(cls, fields)
    for name, method in methods.items():
        if method is not None:
            method.__qualname__ = f"{cls.__qualname__}.{name}"
        setattr(cls, name, method)
    return cls


def _init(cls: type, fields: tuple[dataclasses.Field[Any], ...], frozen: bool) -> Callable[..., None]:
    missing = dataclasses.MISSING
    names = tuple(f.name for f in fields if f.init)
    accepted = frozenset(names)
    defaults = {f.name: f.default for f in fields if f.default is not missing}
    factories = {f.name: f.default_factory for f in fields if f.default_factory is not missing}
    fixed = tuple(f.name for f in fields if not f.init and (f.name in defaults or f.name in factories))
    post_init = hasattr(cls, "__post_init__")
    where = f"{cls.__qualname__}.__init__()"
    assign = object.__setattr__ if frozen else setattr

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(names):
            raise TypeError(f"{where} takes {len(names) + 1} positional arguments but {len(args) + 1} were given")
        values = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in accepted:
                raise TypeError(f"{where} got an unexpected keyword argument {key!r}")
            if key in values:
                raise TypeError(f"{where} got multiple values for argument {key!r}")
            values[key] = value
        absent = [name for name in names if name not in values and name not in defaults and name not in factories]
        if absent:
            raise TypeError(f"{where} missing {len(absent)} required argument(s): {', '.join(map(repr, absent))}")
        for name in (*names, *fixed):
            if name in values:
                assign(self, name, values[name])
            elif name in defaults:
                assign(self, name, defaults[name])
            else:
                assign(self, name, factories[name]())
        if post_init:
            self.__post_init__()

    return __init__


def _repr(fields: tuple[dataclasses.Field[Any], ...]) -> Callable[[Any], str]:
    shown = tuple(f.name for f in fields if f.repr)

    def __repr__(self: Any) -> str:
        return f"{type(self).__qualname__}({', '.join(f'{name}={getattr(self, name)!r}' for name in shown)})"

    return __repr__


def _eq(fields: tuple[dataclasses.Field[Any], ...]) -> Callable[[Any, object], Any]:
    compared = tuple(f.name for f in fields if f.compare)

    def __eq__(self: Any, other: object) -> Any:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return tuple(getattr(self, n) for n in compared) == tuple(getattr(other, n) for n in compared)

    return __eq__


def _hash(fields: tuple[dataclasses.Field[Any], ...]) -> Callable[[Any], int]:
    hashed = tuple(f.name for f in fields if (f.compare if f.hash is None else f.hash))

    def __hash__(self: Any) -> int:
        return hash(tuple(getattr(self, n) for n in hashed))

    return __hash__


def _frozen(cls: type, fields: tuple[dataclasses.Field[Any], ...]) -> tuple[Callable[..., None], Callable[..., None]]:
    names = frozenset(f.name for f in fields)
    if any(k is not object and ("__setattr__" in k.__dict__ or "__delattr__" in k.__dict__) for k in cls.__mro__[1:]):
        raise TypeError(f"{cls.__qualname__}: a base sets attributes its own way; use dataclasses.dataclass")

    def __setattr__(self: Any, name: str, value: Any) -> None:
        if type(self) is cls or name in names:
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
        object.__setattr__(self, name, value)  # what super() is here: no base but object sets attributes

    def __delattr__(self: Any, name: str) -> None:
        if type(self) is cls or name in names:
            raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
        object.__delattr__(self, name)

    return __setattr__, __delattr__


def _dataclass(cls: type | None = None, /, *, frozen: bool = False) -> Any:
    if cls is None:
        return lambda c: make(c, frozen=frozen)
    return make(cls, frozen=frozen)


if TYPE_CHECKING:
    from dataclasses import dataclass as dataclass  # noqa: PLC0414 - re-exported: type checkers see the real one
else:
    dataclass = _dataclass
