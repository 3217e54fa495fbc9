"""Landlock, the kernel's unprivileged file-access sandbox, applied by the worker to itself.

A second layer under bubblewrap's mount view: even if a path were visible and
writable by permission bits, the process can only read below ``read_only`` paths and
write below ``read_write`` paths. The ruleset is built for the kernel's ABI (refer,
truncate and device-ioctl rights appear in ABI 2, 3 and 5; abstract-socket and signal
scoping in ABI 6; connecting to path sockets in ABI 9, granted on no path, so only sockets
made inside the sandbox can be reached). TCP is left to the network namespace (the sandbox has only its own
loopback), so a tool may still run and test a local server.

The syscall numbers 444-446 are the same on every architecture (asm-generic table).
``landlock_restrict_self`` confines the calling thread and its future children, so this
must run before the worker starts any thread; :func:`restrict` refuses otherwise.
"""

from __future__ import annotations

import os
import stat

from sandbox_core import ffi
from sandbox_core.errors import IsolationUnavailable
from sandbox_core.kernel import landlock_abi

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing or pathlib at boot
if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path
    from typing import NoReturn

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
_RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV, RESOLVE_UNIX = 1 << 13, 1 << 14, 1 << 15, 1 << 16
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
"""The rights that apply to a non-directory (a rule on a file may only hold these)."""
READ_RIGHTS = EXECUTE | READ_FILE | READ_DIR


class _RulesetAttr(ffi.Structure):
    _fields_ = (
        ("handled_access_fs", ffi.c_uint64),
        ("handled_access_net", ffi.c_uint64),
        ("scoped", ffi.c_uint64),
    )


class _PathBeneathAttr(ffi.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ffi.c_uint64), ("parent_fd", ffi.c_int32))


def _syscall(*args: object) -> int:
    return int(ffi.libc().syscall(*args))


def abi_version() -> int:
    """The kernel's Landlock ABI version, or 0 when Landlock is absent or disabled."""
    return landlock_abi()


def handled_fs(abi: int) -> int:
    """Every filesystem right this ABI knows about (all of them are restricted)."""
    rights = (MAKE_SYM << 1) - 1
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    if abi >= 9:
        rights |= RESOLVE_UNIX
    return rights


def restrict(read_only: Iterable[str | Path], read_write: Iterable[str | Path]) -> int:
    """Confine this process to the given trees and return the ABI used (0: unsupported).

    ``/`` stays listable (directory names only) so that path walks work; files can be
    read or executed only below ``read_only`` and written only below ``read_write``.
    Paths that do not exist (or that this uid cannot reach) are skipped.
    """
    ruleset = Ruleset.build(read_only, read_write)
    if ruleset is None:
        return 0
    return ruleset.restrict_self()


class Ruleset:
    """A ruleset whose rules are added now and which is put in force later, once.

    A pre-warmed worker builds the rules that do not name its user's workspace while it
    waits, so that its claim adds one rule instead of a dozen (each an open, an fstat and a
    syscall). A rule holds the file it was added for, so one is added only for a path whose
    mount is final: the workspace is attached at the claim, and its rule comes after that.
    """

    def __init__(self, abi: int, fd: int) -> None:
        self.abi = abi
        self._fd: int | None = fd
        self._handled = handled_fs(abi)

    @classmethod
    def build(cls, read_only: Iterable[str | Path], read_write: Iterable[str | Path]) -> Ruleset | None:
        """A ruleset allowing listing ``/``, reading below ``read_only`` and writing below
        ``read_write`` (None: this kernel has no Landlock)."""
        abi = abi_version()
        if abi == 0:
            return None
        attr = _RulesetAttr(handled_access_fs=handled_fs(abi))
        size = 8 if abi < 4 else 16 if abi < 6 else 24
        if abi >= 6:
            attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        fd = _syscall(ffi.c_long(SYS_CREATE_RULESET), ffi.byref(attr), ffi.c_size_t(size), ffi.c_uint32(0))
        if fd < 0:
            _fail("landlock_create_ruleset")
        ruleset = cls(abi, fd)
        try:
            _add(fd, "/", READ_DIR)
            for path in read_only:
                _add(fd, path, READ_RIGHTS & ruleset._handled)
            ruleset.allow_write(read_write)
        except BaseException:
            ruleset.close()
            raise
        return ruleset

    def allow_write(self, paths: Iterable[str | Path]) -> None:
        """Allow reading and writing below each of ``paths`` (RESOLVE_UNIX on none: host sockets stay out of reach)."""
        if self._fd is None:
            raise IsolationUnavailable("this landlock ruleset was put in force or dropped already")
        for path in paths:
            _add(self._fd, path, self._handled & ~RESOLVE_UNIX)

    def restrict_self(self) -> int:
        """Put the ruleset in force on this process (and its future children); returns the ABI.

        Refuses while the process has other threads: Landlock confines only the calling
        thread and what it starts later.
        """
        if self._fd is None:
            raise IsolationUnavailable("this landlock ruleset was put in force or dropped already")
        try:
            if _thread_count() > 1:
                raise IsolationUnavailable("landlock must be applied before the worker starts threads")
            from sandbox_core.inside.identity import set_no_new_privs

            set_no_new_privs()
            if _syscall(ffi.c_long(SYS_RESTRICT_SELF), ffi.c_int(self._fd), ffi.c_uint32(0)) != 0:
                _fail("landlock_restrict_self")
        finally:
            self.close()
        return self.abi

    def close(self) -> None:
        """Drop the ruleset (it is in force, or it never will be)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _add(ruleset: int, path: str | Path, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FILE_RIGHTS
        rule = _PathBeneathAttr(allowed_access=rights, parent_fd=fd)
        if (
            _syscall(
                ffi.c_long(SYS_ADD_RULE),
                ffi.c_int(ruleset),
                ffi.c_int(_RULE_PATH_BENEATH),
                ffi.byref(rule),
                ffi.c_uint32(0),
            )
            != 0
        ):
            _fail(f"landlock_add_rule({path})")
    finally:
        os.close(fd)


def _thread_count() -> int:
    """This process's threads, from ``/proc/self/task``; unreadable means unverifiable (fails closed)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError as exc:
        raise IsolationUnavailable(f"cannot count this worker's threads before landlock: {exc}") from None


def _fail(what: str) -> NoReturn:
    err = ffi.get_errno()
    raise IsolationUnavailable(f"{what} failed: {os.strerror(err)}")
