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
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sid:
            members.append(int(name))
    return members


def kill_session(sid: int) -> int:
    """SIGKILL every process in session ``sid``; returns how many were signalled."""
    killed = 0
    for pid in session_members(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed
