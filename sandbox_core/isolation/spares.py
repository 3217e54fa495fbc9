"""Spare workspaces: a brand-new user's workspace made and attached before the user is known.

A claim by a user who has no workspace yet would create one (a durable uid assignment, the
directory, its protected-path placeholders) and attach it, all on the request's clock. An
unbound strict worker instead gets a *spare* right after its start, off the clock::

    <workspace_root>/.spare-<pid>-<worker id>/   a fresh workspace for a tenant uid reserved
                                                  durably under the key ``.spare-<pid>-<id>``

It is made like any new workspace (0700, owned by that uid) and attached to the worker's slot
with the same descriptor-walking guard as a user's (:func:`strict.attach_user`). No user id can
name it (a user id never starts with a dot), and the worker, still uid 0 with nothing but
CAP_SETUID/CAP_SETGID and running nothing but our own code, cannot read or write in it.

At a claim by a user with no workspace and no uid (:meth:`Spare.claim`) the spare's uid becomes
the user's (:func:`tenants.rename`) and the directory is renamed to the user's workspace
(``renameat2(RENAME_NOREPLACE)`` below the host-only ``workspace_root``): the sandbox already
sees it at ``/workspace``, protections in place. Any other claim (the user has a workspace or a
uid) first detaches the spare from the slot (:meth:`Spare.detach`) and attaches the user's own
workspace as before. A spare that no user took is removed after its worker exited
(:meth:`Spare.close`), by descriptor, and its uid given back: no process ever ran as it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import IsolationUnavailable
from sandbox_core.ffi import get_errno, libc
from sandbox_core.isolation import slots, tenants

RENAME_NOREPLACE = 1
_MAX_DEPTH = 16


class Spare:
    """The spare workspace of one unbound worker (host side; all but :meth:`promise` run off the
    event loop, and one at a time: a worker stopped while its spare is being staged has it
    removed once the staging is done, never half-way)."""

    def __init__(self, config: ProcessSandboxConfig, slot: slots.Slot, worker_id: str) -> None:
        self.config, self.slot = config, slot
        self.name = f"{tenants.SPARE_PREFIX}{os.getpid()}-{worker_id}"
        self.root = config.workspace_root
        self.staged = False
        """Attached to the slot and waiting for a new user."""
        self.taken = False
        """A user took it (its uid and directory are the user's now)."""
        self.promised = False
        """The worker was told to switch to its uid (:meth:`promise`): the uid is never given back."""
        self._attached: dict[str, Any] | None = None
        self._made = False
        self._closed = False
        self._lock = threading.Lock()

    def stage(self, attach: Callable[[Path], dict[str, Any]]) -> None:
        """Make the spare (its uid durably reserved, 0700) and ``attach`` it to the slot."""
        with self._lock:
            if self._closed:
                raise IsolationUnavailable("the worker stopped before its spare workspace was made")
            self._stage(attach)

    def _stage(self, attach: Callable[[Path], dict[str, Any]]) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        ident = tenants.identity_for(self.config, self.name)  # durable: fsync'd before any claim
        root_fd = _open_dir(self.root)
        try:
            os.mkdir(self.name, 0o700, dir_fd=root_fd)
            self._made = True
            fd = os.open(self.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
            try:
                os.fchown(fd, ident.uid, ident.gid)
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
        finally:
            os.close(root_fd)
        self._attached = attach(self.root / self.name)
        self.staged = True

    @property
    def ids(self) -> tuple[int, int] | None:
        """The staged spare's uid and gid (a new user's claim switches the worker to them)."""
        attached = self._attached
        return (int(attached["uid"]), int(attached["gid"])) if self.staged and attached is not None else None

    def pledge(self) -> dict[str, Any] | None:
        """What the worker's ``assume`` needs to switch to the staged spare's uid before any claim
        (None when no spare is staged); the uid is never given back from here on."""
        if not self.staged or self._attached is None:
            return None
        self.promised = True
        return {**self._attached, "spare": True}

    def promise(self, workspace: Path) -> dict[str, Any] | None:
        """What the worker's ``bind`` needs when ``workspace`` is a new user's (it does not exist
        and the user has no uid), so that the worker can switch to the spare's uid while
        :meth:`claim` hands the spare over; None otherwise. Quick enough for the event loop (a
        ``stat`` and a read of the uid map); :meth:`claim` re-checks under the map's lock."""
        if not self.staged or self._attached is None or workspace.parent != self.root:
            return None
        if not is_new_user(self.config, workspace.name):
            return None
        return self.pledge()

    def claim(self, workspace: Path) -> dict[str, Any] | None:
        """Make the staged spare ``workspace`` (a user's that does not exist yet) and return what
        the worker's ``bind`` needs; None when it cannot be (then :meth:`detach` and attach as usual)."""
        with self._lock:
            return self._claim(workspace) if not self._closed else None

    def _claim(self, workspace: Path) -> dict[str, Any] | None:
        if not self.staged or self._attached is None or workspace.parent != self.root:
            return None
        user = workspace.name
        if os.path.lexists(workspace):
            return None
        if tenants.rename(self.config, self.name, user) is None:
            return None  # the user has a uid (and so, maybe, files): their own workspace is attached
        self.taken = True  # the uid is the user's from here on, whatever follows
        root_fd = _open_dir(self.root)
        try:
            if libc().renameat2(root_fd, self.name.encode(), root_fd, user.encode(), RENAME_NOREPLACE) != 0:
                err = get_errno()
                raise IsolationUnavailable(f"cannot make the spare workspace {user!r}'s: {os.strerror(err)}",
                                           data={"claim": "attach"})  # fmt: skip
        finally:
            os.close(root_fd)
        self.staged = False
        return self._attached

    def detach(self) -> None:
        """Take the spare off the slot (before another workspace is attached there)."""
        with self._lock:
            if self.staged:
                self.slot.detach()
                self.staged = False

    def close(self, release_slot: Callable[[], None]) -> None:
        """After the worker exited: ``release_slot``, then remove a spare no user took and give its
        uid back (unless the worker was told to switch to it)."""
        with self._lock:
            self._closed = True
            try:
                release_slot()
            finally:
                self._discard()

    def _discard(self) -> None:
        if not self._made or self.taken:
            return
        self._made = False
        root_fd = _open_dir(self.root)
        try:
            gone = remove_tree(root_fd, self.name)
        finally:
            os.close(root_fd)
        if gone and not self.promised:
            tenants.forget(self.config, self.name)


def is_new_user(config: ProcessSandboxConfig, user_id: str) -> bool:
    """Whether ``user_id`` has neither a workspace nor a uid yet (a spare can become theirs).
    Quick enough for the event loop: a ``stat`` and a read of the uid map; a claim checks
    again under the map's lock (:meth:`Spare.claim`)."""
    return not os.path.lexists(config.workspace_for(user_id)) and not tenants.has_uid(config, user_id)


def sweep(config: ProcessSandboxConfig) -> list[str]:
    """Remove the spares of orchestrators that no longer run, giving back their uids; their names.

    A spare whose directory still has its spare name was never a user's (the claim renames the
    map key first, then the directory), so nothing of a user's ever ran as its uid: at most our
    own worker code did, between a ``bind`` and a hand-over that failed, in a sandbox that died
    with its orchestrator (a live worker's spare keeps its uid for good, see :meth:`Spare.close`).
    """
    try:
        names = [n for n in os.listdir(config.workspace_root) if n.startswith(tenants.SPARE_PREFIX)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    swept = []
    root_fd = _open_dir(config.workspace_root)
    try:
        for name in sorted(names):
            pid = name[len(tenants.SPARE_PREFIX):].partition("-")[0]
            if not pid.isdigit() or int(pid) == os.getpid() or os.path.exists(f"/proc/{pid}"):
                continue
            if remove_tree(root_fd, name):
                with contextlib.suppress(IsolationUnavailable, OSError):
                    tenants.forget(config, name)
                swept.append(name)
    finally:
        os.close(root_fd)
    return swept


def _open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def remove_tree(parent_fd: int, name: str, depth: int = 0) -> bool:
    """Remove directory ``name`` of ``parent_fd`` and what it holds, by descriptor (never following
    a symlink, never leaving its filesystem); True when it is gone."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    except FileNotFoundError:
        return True
    try:
        dev = os.fstat(fd).st_dev
        for entry in os.listdir(fd):
            st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(entry, dir_fd=fd)
            elif st.st_dev == dev and depth < _MAX_DEPTH:
                remove_tree(fd, entry, depth + 1)
    except OSError:
        return False
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=parent_fd)
    except OSError as exc:
        return exc.errno == errno.ENOENT
    return True
