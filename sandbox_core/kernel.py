"""Kernel facts both sides of the boundary ask about, with no side effects.

The host reads them to plan a sandbox; the worker reads them to apply its own layers.
"""

from __future__ import annotations

import ctypes

SYS_LANDLOCK_CREATE_RULESET = 444
"""The same number on every architecture (asm-generic table)."""
_LANDLOCK_CREATE_RULESET_VERSION = 1
_loaded: list[ctypes.CDLL] = []


def _libc() -> ctypes.CDLL:
    """libc, loaded once (a list, not ``functools.cache``: functools and the collections it
    imports are ~5 ms of a worker's bind, which asks this before its first command)."""
    if not _loaded:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        _loaded.append(libc)
    return _loaded[0]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 when Landlock is absent or disabled."""
    res = int(
        _libc().syscall(
            ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET),
            None,
            ctypes.c_size_t(0),
            ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION),
        )
    )
    return max(res, 0)
