"""Kernel facts both sides of the boundary ask about, with no side effects.

The host reads them to plan a sandbox; the worker reads them to apply its own layers.
"""

from __future__ import annotations

import ctypes
import functools

SYS_LANDLOCK_CREATE_RULESET = 444
"""The same number on every architecture (asm-generic table)."""
_LANDLOCK_CREATE_RULESET_VERSION = 1


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


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
