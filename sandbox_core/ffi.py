"""libc calls (``prctl``, ``capset``, ``syscall``) through ``_ctypes``, without the ``ctypes`` package.

The worker makes a handful of C calls before it answers its handshake: it empties its
capability bounding set, switches uid, sets no_new_privs and applies Landlock, none of which
``os`` offers. ``import ctypes`` costs 3.7 ms on this kind of machine (its package builds some
forty classes, function-type caches and the loaders at import), ``import _ctypes``, the C
extension underneath that does the calling, 0.5 ms; the difference was a tenth of a strict
worker's spawn-to-ready. This module is the small part of ``ctypes`` those calls need, built
on the same extension: the fixed-size integer types, ``Structure`` and arrays of it (the
extension's own), ``byref``, ``sizeof``, ``get_errno``, and :func:`libc`, whose functions
are called as ``ctypes.CDLL(None, use_errno=True)``'s are (cdecl, errno saved, an ``int``
result unless told otherwise).

Shared by both sides: the worker's modules, :mod:`sandbox_core.kernel` and the host's mount calls
(:mod:`sandbox_core.isolation.slots`) use it; it
imports nothing of ours.
"""

from __future__ import annotations

import _ctypes
from _ctypes import Structure, byref, get_errno, sizeof

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the worker's boot has not yet)
if TYPE_CHECKING:
    _Int = _ctypes._SimpleCData[int]
else:
    _Int = _ctypes._SimpleCData

__all__ = ["Library", "Structure", "byref", "c_int", "c_int32", "c_long", "c_size_t", "c_uint32", "c_uint64",
           "c_ulong", "get_errno", "libc", "sizeof"]  # fmt: skip


# ctypes' own names, so that a call reads as it would with ctypes
class c_int(_Int):
    _type_ = "i"


class c_uint32(_Int):
    _type_ = "I"


class c_long(_Int):
    _type_ = "l"


class c_size_t(_Int):  # unsigned long on the Linux ABIs this runs on
    _type_ = "L"


class c_uint64(_Int):
    _type_ = "Q"


c_int32 = c_int
c_ulong = c_size_t


class _Function(_ctypes.CFuncPtr):
    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = c_int


class Library:
    """A loaded shared object (the process itself for :func:`libc`); ``lib.name`` is its function."""

    def __init__(self, handle: int) -> None:
        self._handle = handle  # the attribute the extension reads a function's address through

    def __getattr__(self, name: str) -> _ctypes.CFuncPtr:
        if name.startswith("_"):
            raise AttributeError(name)
        function = _Function((name, self))  # type: ignore[arg-type]  # any object with a _handle will do
        setattr(self, name, function)
        return function


_loaded: list[Library] = []


def libc() -> Library:
    """libc (the symbols the interpreter itself links), loaded once; ``syscall`` returns a ``long``."""
    if not _loaded:
        lib = Library(_ctypes.dlopen(None, _ctypes.RTLD_LOCAL))  # type: ignore[arg-type]  # NULL: the program itself
        lib.syscall.restype = c_long
        _loaded.append(lib)
    return _loaded[0]
