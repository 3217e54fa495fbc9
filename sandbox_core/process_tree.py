"""Finding and killing what a worker left behind, by session id (Linux /proc).

A worker is a session leader; commands it runs get process groups of their own but stay
in its session, so "every process whose session is the worker's pid" is the worker's
tree, even after the worker itself died and its children were re-parented.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time


def session_members(sid: int) -> list[int]:
    """Pids whose session id is ``sid`` (empty where /proc is unavailable)."""
    members: list[int] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return members
    for name in names:
        fields = _stat_fields(name) if name.isdigit() else None
        if fields is not None and len(fields) > 3 and int(fields[3]) == sid:
            members.append(int(name))
    return members


def parse_stat(raw: bytes) -> list[str]:
    """The fields of a /proc/PID/stat after ``(comm)``: state, ppid, pgrp, session, ...

    The name may hold spaces and parentheses, so the split is at the last ``)``.
    """
    text = raw.decode(errors="replace")
    return text[text.rfind(")") + 2 :].split()


def _stat_fields(pid: str | int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return parse_stat(fh.read())
    except OSError:
        return None


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and bool(fields) and fields[0] != "Z"


def parent(pid: int) -> int:
    """The parent pid of ``pid`` (0 when it is gone)."""
    fields = _stat_fields(pid)
    return int(fields[1]) if fields is not None and len(fields) > 1 else 0


def boot_ticks() -> int:
    """Now, in the clock ticks since boot that /proc/PID/stat uses for start times."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def _children(pid: int) -> list[int] | None:
    """Direct children of ``pid`` from /proc/PID/task/*/children (None if unsupported)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out.extend(int(c) for c in fh.read().split())
        except FileNotFoundError:
            return None if tid == tasks[0] and not out else out
        except OSError:
            continue
    return out


def _start_time(pid: int) -> int:
    fields = _stat_fields(str(pid))
    return int(fields[19]) if fields is not None and len(fields) > 19 else 0


def descendants(root: int, started_since: int | None = None, *, pruned: frozenset[int] = frozenset()) -> list[int]:
    """Pids below ``root`` in the process tree, optionally only those started at or after
    ``started_since`` (boot ticks, see :func:`boot_ticks`). The processes in ``pruned`` and
    everything below them are left out (the walk does not go down there).

    Walks /proc/PID/task/*/children (cost grows with the tree, not with the host's process
    count); falls back to scanning all of /proc where the kernel lacks those files.
    """
    out: list[int] = []
    stack = [root]
    while stack:
        kids = _children(stack.pop())
        if kids is None:
            return _descendants_by_scan(root, started_since, pruned)
        for child in kids:
            if child in pruned:
                continue
            if started_since is None or _start_time(child) >= started_since:
                out.append(child)
            stack.append(child)
    return out


def _descendants_by_scan(root: int, started_since: int | None, pruned: frozenset[int] = frozenset()) -> list[int]:
    children: dict[int, list[int]] = {}
    started: dict[int, int] = {}
    for name in os.listdir("/proc"):
        fields = _stat_fields(name) if name.isdigit() else None
        if fields is not None and len(fields) > 19:
            children.setdefault(int(fields[1]), []).append(int(name))
            started[int(name)] = int(fields[19])
    out: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child in pruned:
                continue
            if started_since is None or started.get(child, 0) >= started_since:
                out.append(child)
            stack.append(child)
    return out


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (a scan of /proc where the kernel lacks the children files)."""
    kids = _children(pid)
    if kids is not None:
        return kids
    out: list[int] = []
    for name in os.listdir("/proc"):
        fields = _stat_fields(name) if name.isdigit() else None
        if fields is not None and len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(name))
    return out


def kill_group_and_children(leader: int) -> None:
    """SIGKILL the process group ``leader`` leads, and its direct children outside that group.

    The children matter for bwrap: its sandbox's init runs in a session of its own and is
    bound to die with bwrap only once it has armed ``PR_SET_PDEATHSIG``, a moment after the
    ``clone()``; bwrap killed in that moment leaves the whole sandbox running, re-parented to
    init (seen: a start cancelled at spawn). So the leader is stopped first: a stopped process
    cannot fork (the kernel restarts a ``clone()`` that a pending signal interrupts, and adds a
    child to the parent's list under the lock that signal delivery takes), so the children read
    after the stop are all it will ever have, and they stay its children (zombies, at worst: a
    stopped parent reaps nothing), so their pids cannot be reused meanwhile. Killing the init
    of a pid namespace takes everything in the namespace with it.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(leader, signal.SIGSTOP)
        for child in children(leader):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader, signal.SIGKILL)


def kill_session(sid: int) -> int:
    """SIGKILL every process in session ``sid``; returns how many were signalled."""
    killed = 0
    for pid in session_members(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed
