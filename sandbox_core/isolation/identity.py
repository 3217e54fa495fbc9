"""Who the worker runs as: dropping to an unprivileged uid/gid, and no_new_privs."""

from __future__ import annotations

import ctypes
import os

from sandbox_core.errors import IsolationUnavailable

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


def switch_user(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` with no supplementary groups, for good (fails closed)."""
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise IsolationUnavailable(f"cannot switch to uid {uid} gid {gid}: {exc}") from None
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
        raise IsolationUnavailable(f"uid switch to {uid} did not take effect")


def set_no_new_privs() -> None:
    """Set PR_SET_NO_NEW_PRIVS so exec can never gain privileges (setuid bits, caps)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise IsolationUnavailable(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(err)}")


def become_subreaper() -> None:
    """Orphans of our descendants are re-parented to us (not to init), so the worker can
    find and kill what a command left behind after ``setsid`` or a double fork."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise IsolationUnavailable(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(err)}")


def is_subreaper() -> bool:
    """Whether this process is a child subreaper (true in a worker after initialize)."""
    libc = ctypes.CDLL(None, use_errno=True)
    flag = ctypes.c_int(0)
    return libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0 and flag.value != 0
