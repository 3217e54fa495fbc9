"""How the worker's event loop learns that a command it started has exited.

asyncio on 3.11 defaults to a ``ThreadedChildWatcher``: every command gets a new thread that
blocks in ``waitpid`` and then wakes the loop from outside. Starting that thread is the larger
part of a worker's first few ``exec`` calls (measured in a strict sandbox: 1.2-2.7 ms per spawn
for the first ones, against 0.4-0.8 ms with a pidfd), which is what a freshly claimed worker
runs. With a pidfd (Linux 5.3+) the exit is one more readable descriptor on the loop: no
thread, no hop. Where ``pidfd_open`` is refused, asyncio's default stays.

It also keeps the list of children someone is waiting for (:func:`waited`), which the
clean-up after a request leaves alone.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TypeVarTuple

_Ts = TypeVarTuple("_Ts")


def watch_with_pidfds() -> bool:
    """Make asyncio watch child processes through pidfds, when this kernel (and seccomp) allows.

    Call before the loop starts its first subprocess. Returns whether pidfds are used.
    """
    try:
        probe = os.pidfd_open(os.getpid())
    except (AttributeError, OSError):
        return False
    os.close(probe)
    asyncio.set_child_watcher(_Watcher())
    global _pidfds
    _pidfds = True
    return True


_pidfds = False

_waited: set[int] = set()
"""Children whose exit someone is waiting for (asyncio's watcher, or a request's own pidfd reader)."""


def waited() -> frozenset[int]:
    """The children a clean-up must neither kill nor reap (:func:`sandbox_core.inside.runner.kill_strays`).

    Reaping one of them would take its exit status from whoever waits for it: the command of
    a request still running beside the one that cleans up would report 255. Only children
    watched through pidfds are known here (:func:`watch_with_pidfds`).
    """
    return frozenset(_waited)


def waiting_for(pid: int) -> None:
    _waited.add(pid)


def reaped(pid: int) -> None:
    _waited.discard(pid)


class _Watcher(asyncio.PidfdChildWatcher):
    """asyncio's pidfd watcher, telling :func:`waited` which children it waits for."""

    def add_child_handler(self, pid: int, callback: Callable[[int, int, *_Ts], object],
                          *args: *_Ts) -> None:  # fmt: skip
        def done(pid: int, returncode: int, *more: *_Ts) -> None:
            reaped(pid)
            callback(pid, returncode, *more)

        waiting_for(pid)
        try:
            super().add_child_handler(pid, done, *args)
        except BaseException:
            reaped(pid)
            raise


def pidfds_in_use() -> bool:
    """Whether :func:`watch_with_pidfds` found pidfds usable (commands may then be watched by one)."""
    return _pidfds
