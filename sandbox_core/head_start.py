"""A head start for a one-shot pool: its one worker spawned before the host has loaded the pool.

A command run once in-process (``sandbox exec -- true``) needs one worker for one user, and
both sides of it spend most of their time importing: the host the event loop and the pool,
the worker its own serving loop. Done one after the other that is most of the command's
time. :func:`begin` builds the worker's launch spec and spawns it as soon as the config is
known, with nothing but what that needs loaded (no asyncio, no orchestrator); the worker,
finding no ``initialize`` waiting, imports its serving loop meanwhile
(:func:`sandbox_core.inside.boot.main`). The orchestrator given the head start adopts the
process as the first worker of that user (:meth:`HeadStart.take`) and runs the usual
handshake and host-side verification on it: the worker is checked as any other, only
spawned earlier.

A head start that is not adopted (the command failed first, or asked for something else)
is killed and its spec released by :meth:`HeadStart.discard`, which the orchestrator's
shutdown and the command's own clean-up both call (once is enough; more do nothing).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox_core.isolation.launch import launch_spec, prepare_workspace
from sandbox_core.names import validate_user_id
from sandbox_core.process_tree import kill_group_and_children
from sandbox_core.worker_process import Spawned, spawn

if TYPE_CHECKING:
    from sandbox_core.config import ProcessSandboxConfig
    from sandbox_core.isolation.launch import LaunchSpec

    Launcher = Callable[[ProcessSandboxConfig, str, "Path | None"], LaunchSpec]

DISCARD_WAIT = 5.0
"""Seconds a discarded head start's process is waited for after SIGKILL (it cannot ignore it)."""


class HeadStart:
    """One worker process spawned early for ``user_id``, waiting to be adopted."""

    def __init__(self, config: ProcessSandboxConfig, user_id: str, tag: str, workspace: Path,
                 spec: LaunchSpec, spawned: Spawned) -> None:  # fmt: skip
        self.config = config
        self.user_id = user_id
        self.tag = tag
        """The orchestrator's worker-id tag; it takes this one, so ids stay unique in the pool."""
        self.worker_id = f"w0-{tag}"
        self.workspace = workspace
        self._spec: LaunchSpec | None = spec
        self._spawned: Spawned | None = spawned

    @property
    def pid(self) -> int | None:
        """The process's pid while it waits (None once taken or discarded)."""
        return self._spawned.process.pid if self._spawned is not None else None

    @property
    def pending(self) -> bool:
        """Not yet adopted nor discarded."""
        return self._spawned is not None

    def take(self) -> tuple[LaunchSpec, Spawned]:
        """The spec and the process, for the worker that adopts them (once)."""
        if self._spec is None or self._spawned is None:
            raise RuntimeError(f"head start {self.worker_id} was already taken or discarded")
        spec, spawned = self._spec, self._spawned
        self._spec = self._spawned = None
        return spec, spawned

    def discard(self) -> None:
        """Kill the process if nobody adopted it and release what its spec prepared (blocking)."""
        if self._spawned is None or self._spec is None:
            return
        spec, spawned = self._spec, self._spawned
        self._spec = self._spawned = None
        try:
            kill_group_and_children(spawned.process.pid)
            spawned.process.wait_unattached(DISCARD_WAIT)
            spawned.process.close()
            spawned.close()
            if spawned.placement is not None:  # done before its cgroups are removed (bounded: a hung kernel)
                with contextlib.suppress(Exception):
                    spawned.placement.wait(DISCARD_WAIT)
        finally:
            if spec.cleanup is not None:
                spec.cleanup()


def begin(config: ProcessSandboxConfig, user_id: str, *, launcher: Launcher = launch_spec) -> HeadStart:
    """Prepare ``user_id``'s workspace, build the worker's launch spec and spawn it now.

    Raises what the spawn would raise in the pool (``ConfigError``, ``IsolationUnavailable``,
    ``OSError``), with nothing left behind; the caller may then let the pool start the worker
    itself, where the same error is reported as usual. ``launcher`` is the pool's (the seam for
    other launchers): a head start is the worker the pool would have spawned.
    """
    validate_user_id(user_id)  # before it names a directory
    tag = os.urandom(2).hex()  # secrets.token_hex's bytes: secrets would load hashlib and OpenSSL (~8 ms)
    workspace = prepare_workspace(config, user_id)
    spec = launcher(config, f"w0-{tag}", workspace)
    try:
        spawned = spawn(spec)
    except BaseException:
        if spec.cleanup is not None:
            spec.cleanup()
        raise
    return HeadStart(config, user_id, tag, workspace, spec, spawned)

