"""Kernel facts both sides of the boundary ask about, with no side effects.

The host reads them to plan a sandbox; the worker reads them to apply its own layers.
"""

from __future__ import annotations

from sandbox_core.ffi import c_long, c_size_t, c_uint32, libc

SYS_LANDLOCK_CREATE_RULESET = 444
"""The same number on every architecture (asm-generic table)."""
_LANDLOCK_CREATE_RULESET_VERSION = 1


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 when Landlock is absent or disabled."""
    res = int(libc().syscall(c_long(SYS_LANDLOCK_CREATE_RULESET), None, c_size_t(0),
                             c_uint32(_LANDLOCK_CREATE_RULESET_VERSION)))  # fmt: skip
    return max(res, 0)
