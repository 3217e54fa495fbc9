"""How the worker's event loop learns that a command it started has exited.

asyncio on 3.11 defaults to a ``ThreadedChildWatcher``: every command gets a new thread that
blocks in ``waitpid`` and then wakes the loop from outside. Starting that thread is the larger
part of a worker's first few ``exec`` calls (measured in a strict sandbox: 1.2-2.7 ms per spawn
for the first ones, against 0.4-0.8 ms with a pidfd), which is what a freshly claimed worker
runs. With a pidfd (Linux 5.3+) the exit is one more readable descriptor on the loop: no
thread, no hop. Where ``pidfd_open`` is refused, asyncio's default stays.
"""

from __future__ import annotations

import asyncio
import os


def watch_with_pidfds() -> bool:
    """Make asyncio watch child processes through pidfds, when this kernel (and seccomp) allows.

    Call before the loop starts its first subprocess. Returns whether pidfds are used.
    """
    try:
        probe = os.pidfd_open(os.getpid())
    except (AttributeError, OSError):
        return False
    os.close(probe)
    asyncio.set_child_watcher(asyncio.PidfdChildWatcher())
    global _pidfds
    _pidfds = True
    return True


_pidfds = False


def pidfds_in_use() -> bool:
    """Whether :func:`watch_with_pidfds` found pidfds usable (commands may then be watched by one)."""
    return _pidfds
