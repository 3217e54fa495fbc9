"""Stand-ins for modules a process imports but may never use: the real one loads at its first use.

``inspect`` is the case in point. ``dataclasses`` imports it to write a docstring for a class
that has none (ours all have one), asyncio to ask whether a function is a coroutine
function (debug checks, its public ``iscoroutinefunction``) and to name callbacks in reprs.
With the ``ast`` and ``dis`` it loads, that is 4-7 ms of a fresh process on these machines,
on the critical path of a one-shot ``sandbox exec`` twice: in the CLI before it can spawn
its worker, and in the worker before it can serve. :func:`defer` puts a :class:`Deferred`
in ``sys.modules``: every attribute asked of it (``inspect.signature``, or ``from inspect
import signature``) imports the real module, which then replaces the stand-in in
``sys.modules``, and answers from it. Modules that imported the stand-in keep it as their
name for the module and go on getting the real module's attributes through it.

A shared leaf: the worker's boot and the CLI's entry use it; it imports nothing.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from types import ModuleType


class Deferred(type(sys)):  # type: ignore[misc]  # a module object, without importing types
    """A module's stand-in: anything asked of it comes from the real module, imported then."""

    def __getattr__(self, attr: str) -> object:
        return getattr(real(str(self.__name__)), attr)


_CO_COROUTINE = 0x80
"""``inspect.CO_COROUTINE``: the code flag of an ``async def`` function."""
_FUNCTION = type(lambda: None)
"""``types.FunctionType``, without importing ``types``."""


class Inspect(Deferred):
    """``inspect`` with the one answer asyncio asks of it on every run, without loading it.

    ``loop.add_signal_handler`` refuses a coroutine function as the handler, and asks
    ``inspect.iscoroutinefunction`` about it: the CLI, which stops its job on SIGTERM and
    SIGHUP (:func:`cli.runtime.run_job`), would load ``inspect`` for that question alone.
    For a plain function the answer is its code's coroutine flag, which is what ``inspect``
    itself reads for one; anything else (a method, a partial, a callable object, a function
    marked as a coroutine function) is asked of the real module.
    """

    @staticmethod
    def iscoroutinefunction(obj: object) -> bool:
        if type(obj) is _FUNCTION and not hasattr(obj, "_is_coroutine_marker"):
            return bool(obj.__code__.co_flags & _CO_COROUTINE)
        result: bool = real("inspect").iscoroutinefunction(obj)
        return result


def defer(name: str, stand_in: Deferred | None = None) -> Deferred | None:
    """Put ``stand_in`` (a plain :class:`Deferred` by default) in place of the top-level module
    ``name`` unless it is loaded already; the stand-in, or None when nothing was done."""
    if name in sys.modules:
        return None
    module = stand_in if stand_in is not None else Deferred(name)
    sys.modules[name] = module
    return module


def deferred(name: str) -> bool:
    """Whether ``name`` is still a stand-in (the real module was never asked for)."""
    return isinstance(sys.modules.get(name), Deferred)


def real(name: str) -> ModuleType:
    """The real top-level module ``name``, its stand-in taken out of ``sys.modules`` first."""
    if isinstance(sys.modules.get(name), Deferred):
        del sys.modules[name]
    __import__(name)
    return sys.modules[name]
