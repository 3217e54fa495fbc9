"""Finding and killing what a worker left behind, by session id (Linux /proc).

A worker is a session leader; commands it runs get process groups of their own but stay
in its session, so "every process whose session is the worker's pid" is the worker's
tree, even after the worker itself died and its children were re-parented.
"""

from __future__ import annotations

import contextlib
import os
import signal


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


def descendants(root: int) -> list[int]:
    """Pids below ``root`` in the process tree (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := _stat_fields(name)) is not None and len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(name))
    out: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
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
