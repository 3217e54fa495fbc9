"""Who the worker runs as: dropping to an unprivileged uid/gid, and no_new_privs."""

from __future__ import annotations

import os

from sandbox_core.errors import IsolationUnavailable
from sandbox_core.ffi import Structure, byref, c_int, c_uint32, get_errno, libc

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


def switch_user(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` with no supplementary groups and no capabilities, for good.

    First the bounding set is emptied (so nothing exec'd later can ever regain a
    capability), then the ids change, then the remaining sets are cleared (fails closed).
    """
    drop_bounding_set()
    become_user(uid, gid)


def become_user(uid: int, gid: int) -> None:
    """The uid switch itself (the bounding set is already empty), then no capabilities at all."""
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise IsolationUnavailable(f"cannot switch to uid {uid} gid {gid}: {exc}") from None
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
        raise IsolationUnavailable(f"uid switch to {uid} did not take effect")
    clear_capabilities()


CAP_SETGID, CAP_SETUID = 6, 7


def await_user() -> None:
    """An unbound worker: empty the bounding set now, keep only CAP_SETUID/CAP_SETGID (effective
    and permitted) for the one switch to the user's uid at ``bind`` (:func:`become_user`)."""
    drop_bounding_set()
    keep = (1 << CAP_SETUID) | (1 << CAP_SETGID)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = keep
    if libc().capset(byref(header), data) != 0:
        err = get_errno()
        raise IsolationUnavailable(f"capset (keeping only CAP_SETUID/CAP_SETGID) failed: {os.strerror(err)}")


_PR_CAPBSET_DROP = 24
_CAP_LAST_FALLBACK = 63


def drop_bounding_set() -> None:
    """Drop every capability from the bounding set (needs CAP_SETPCAP; bwrap leaves it to us).

    Only the capabilities still in the set are dropped (bwrap's ``--cap-drop ALL`` leaves the
    three the worker spends: three calls instead of one per capability the kernel knows), and
    the set is read again afterwards: a capability left in it fails closed. Without a
    readable ``/proc/self/status`` every capability up to ``cap_last_cap`` is dropped, unchecked.
    """
    held = _bounding_set()
    if held is None:
        try:
            with open("/proc/sys/kernel/cap_last_cap") as fh:
                last = int(fh.read())
        except (OSError, ValueError):
            last = _CAP_LAST_FALLBACK
        held = (1 << (last + 1)) - 1
    for cap in range(held.bit_length()):
        if held >> cap & 1 and libc().prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = get_errno()
            raise IsolationUnavailable(f"cannot drop capability {cap} from the bounding set: {os.strerror(err)}")
    left = _bounding_set()
    if left:
        raise IsolationUnavailable(f"capabilities remain in the bounding set after dropping it: {left:#x}")


def _bounding_set() -> int | None:
    """CapBnd of ``/proc/self/status`` (None when it cannot be read)."""
    try:
        with open("/proc/self/status", "rb") as fh:
            status = fh.read()
        start = status.index(b"\nCapBnd:") + 8
        return int(status[start : status.index(b"\n", start)].strip(), 16)
    except (OSError, ValueError):
        return None


class _CapHeader(Structure):
    _fields_ = (("version", c_uint32), ("pid", c_int))


class _CapData(Structure):
    _fields_ = (("effective", c_uint32), ("permitted", c_uint32), ("inheritable", c_uint32))


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def clear_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets (lowering needs no privilege)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc().capset(byref(header), data) != 0:
        err = get_errno()
        raise IsolationUnavailable(f"capset (clearing capabilities) failed: {os.strerror(err)}")


def set_no_new_privs() -> None:
    """Set PR_SET_NO_NEW_PRIVS so exec can never gain privileges (setuid bits, caps)."""
    if libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = get_errno()
        raise IsolationUnavailable(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(err)}")


def become_subreaper() -> None:
    """Orphans of our descendants are re-parented to us (not to init), so the worker can
    find and kill what a command left behind after ``setsid`` or a double fork."""
    if libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = get_errno()
        raise IsolationUnavailable(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(err)}")


def is_subreaper() -> bool:
    """Whether this process is a child subreaper (true in a worker after initialize)."""
    flag = c_int(0)
    return libc().prctl(_PR_GET_CHILD_SUBREAPER, byref(flag), 0, 0, 0) == 0 and bool(flag.value)
