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


def _stat_fields(pid: str) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def boot_ticks() -> int:
    """Now, in the clock ticks since boot that /proc/PID/stat uses for start times."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def descendants(root: int, started_since: int | None = None) -> list[int]:
    """Pids below ``root`` in the process tree, optionally only those started at or after
    ``started_since`` (boot ticks, see :func:`boot_ticks`)."""
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
            if started_since is None or started.get(child, 0) >= started_since:
                out.append(child)
            stack.append(child)
    return out


def kill_session(sid: int) -> int:
    """SIGKILL every process in session ``sid``; returns how many were signalled."""
    killed = 0
    for pid in session_members(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed
