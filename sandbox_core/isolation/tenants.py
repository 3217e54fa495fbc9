"""A host uid per tenant: each user id gets its own unprivileged uid/gid from ``strict.uid_range``.

The map lives in ``<state_dir>/uids.json`` and only grows: a uid once given to a user is that
user's for good (files it owns may outlive every worker), so a later user can never inherit
them. Two orchestrators on one host share the file: an assignment takes an exclusive
``flock`` on ``uids.lock``, re-reads the map, and writes it back atomically (a temporary file,
``fsync``, ``rename``, ``fsync`` of the directory), so a crash leaves the old map or the new
one, never half of one, and no uid is ever handed out twice.

A *spare* (:mod:`spares`) holds a uid under a key no user id can be (``.spare-...``), assigned
durably before any user asks for it. Claiming it for a new user (:func:`rename`) moves the uid
to the user's key without waiting for the disk: the uid was already durably reserved under the
spare's key, so either map a crash leaves holds it under one key only (the old map: the
spare's, never given to anyone else; the new one: the user's), and the durable write follows
off the request path (:func:`flush`). Removing a spare's key (:func:`forget`) is allowed only
once its tree is gone and no process ever ran as its uid (and needs no flush either: a crash
that loses it leaves the uid reserved for good).

A uid is never 0, never ``nobody`` (65534), never one the host's passwd or group database
knows (an account's processes could otherwise read the tenant's workspace), and the range
must not overlap ``/etc/subuid`` or ``/etc/subgid`` (a user's rootless containers run as
those). The gid is the uid (each tenant its own group). Checked again on every lookup: an
account created later with a tenant's uid makes that tenant's workers fail closed.

Only meaningful when the host is root; otherwise every worker runs as the caller's uid
through a user namespace (see the README's "Tenancy" section for what to configure).
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import pwd
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sandbox_core.config import ProcessSandboxConfig, parse_uid_range
from sandbox_core.errors import IsolationUnavailable

NOBODY = 65534
MAP_NAME = "uids.json"
LOCK_NAME = "uids.lock"
SPARE_PREFIX = ".spare-"
"""The map keys (and workspace names) of spares: a user id never starts with a dot."""
UNBOUND = "-"
"""The map key of workers with no workspace (not a valid user id, so never a user's)."""
SUBID_FILES = ("/etc/subuid", "/etc/subgid")

_cache: dict[tuple[str, str], int] = {}
_cache_lock = threading.Lock()
_snapshots: dict[str, tuple[tuple[int, ...], dict[str, int]]] = {}
"""The map as this process last wrote or read it, by path, with the file's identity then: for
:func:`assigned` only (a hint; every change of the map reads the file under its lock)."""


@dataclass(frozen=True)
class Tenant:
    """One tenant's host identity."""

    key: str
    uid: int
    gid: int


def tenant_key(config: ProcessSandboxConfig, workspace: Path | None) -> str:
    """The map key of the worker serving ``workspace``: its user id when it is one of the
    workspace root's entries, else its absolute path (one uid per workspace either way)."""
    if workspace is None:
        return UNBOUND
    resolved = workspace.resolve()
    if resolved.parent == config.workspace_root.resolve():
        return resolved.name
    return f"path:{resolved}"


def identity_for(config: ProcessSandboxConfig, key: str) -> Tenant:
    """The tenant ``key``'s uid/gid, assigned now if it has none yet (fails closed)."""
    lo, hi = parse_uid_range(config.strict.uid_range)
    check_range(lo, hi)
    state = state_dir(config)
    cache_key = (str(state), key)
    with _cache_lock:
        uid = _cache.get(cache_key)
        if uid is None:
            uid = _assign(state, key, lo, hi)
            _cache[cache_key] = uid
    _check_uid(uid, lo, hi, key)
    return Tenant(key, uid, uid)


def assigned(config: ProcessSandboxConfig) -> dict[str, int]:
    """Every assignment so far (for ``audit-env``, diagnostics and a claim's quick check); {} when
    there is no map.

    Not under the map's lock, so already a snapshot: it is answered from the last one this process
    read or wrote while the file is the same (its inode, size, mtime and ctime), without parsing
    the whole map again (a claim asked on the event loop: 0.7 ms for 830 users, growing with them).
    Nothing that assigns a uid trusts it: those read the file under the lock.
    """
    path = state_dir(config, create=False) / MAP_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    with os.fdopen(fd) as fh:
        identity = _identity(os.fstat(fd))
        known = _snapshots.get(str(path))
        if known is not None and known[0] == identity:
            return dict(known[1])
        users = _parse(fh.read(), path)
    _snapshots[str(path)] = (identity, users)
    return dict(users)


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def state_dir(config: ProcessSandboxConfig, *, create: bool = True) -> Path:
    """The state directory, made 0700 and checked: ours, not writable by anyone else."""
    path = config.state_dir
    if create:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise IsolationUnavailable(f"cannot create the state directory {path}: {exc}",
                                       data={"field": "state_dir", "value": str(path)}) from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            return path
        raise
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise IsolationUnavailable(
            f"the state directory {path} must be a directory owned by uid {os.geteuid()} that nobody else "
            f"can write (it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"
            f"{', a symlink' if stat.S_ISLNK(st.st_mode) else ''})",
            data={"field": "state_dir", "value": str(path)},
        )
    return path


def check_range(lo: int, hi: int, subid_files: tuple[str, ...] = SUBID_FILES) -> None:
    """Fail closed when the range overlaps a subordinate id range of a host user."""
    for name in subid_files:
        for owner, start, count in _subids(name):
            if start <= hi and lo <= start + count - 1:
                raise IsolationUnavailable(
                    f"strict.uid_range {lo}-{hi} overlaps {owner}'s range {start}-{start + count - 1} in {name}: "
                    "that user's containers could run as a tenant's uid; choose a range outside every "
                    "/etc/subuid and /etc/subgid entry",
                    data={"field": "strict.uid_range", "value": f"{lo}-{hi}"},
                )


def _subids(path: str) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def host_knows(uid: int) -> str | None:
    """What of the host's accounts uses ``uid`` as a uid or gid, or None."""
    with contextlib.suppress(KeyError):
        return f"user {pwd.getpwuid(uid).pw_name!r}"
    with contextlib.suppress(KeyError):
        return f"group {grp.getgrgid(uid).gr_name!r}"
    return None


def _check_uid(uid: int, lo: int, hi: int, key: str) -> None:
    if uid in (0, NOBODY) or not lo <= uid <= hi:
        raise IsolationUnavailable(
            f"tenant {key!r} has uid {uid} in the uid map, outside strict.uid_range {lo}-{hi}: the range was "
            "changed after uids were assigned; restore it (assignments are permanent)",
            data={"field": "strict.uid_range", "value": f"{lo}-{hi}"},
        )
    known = host_knows(uid)
    if known is not None:
        raise IsolationUnavailable(
            f"tenant {key!r}'s uid {uid} is now used by the host's {known}: its processes could read the "
            "tenant's workspace; remove that account or give it another id",
            data={"field": "strict.uid_range", "value": f"{lo}-{hi}"},
        )


def _assign(state: Path, key: str, lo: int, hi: int) -> int:
    """Under the lock: the key's uid from the map, or the lowest free one written to it."""
    with _locked(state):
        path = state / MAP_NAME
        try:
            users = _load(path)
        except FileNotFoundError:
            users = {}
        if key in users:
            return users[key]
        taken = set(users.values())
        uid = next((u for u in range(lo, hi + 1) if u not in taken and u not in (0, NOBODY)
                    and host_knows(u) is None), None)
        if uid is None:
            raise IsolationUnavailable(
                f"strict.uid_range {lo}-{hi} is used up ({len(users)} tenants); widen it",
                data={"field": "strict.uid_range", "value": f"{lo}-{hi}"},
            )
        users[key] = uid
        _store(path, users)
        return uid


def rename(config: ProcessSandboxConfig, old: str, new: str) -> Tenant | None:
    """Move ``old``'s uid (a spare's) to ``new``, which has none yet; None (nothing changed) when
    ``new`` already has a uid. Not flushed to disk: see the module docstring and :func:`flush`."""
    lo, hi = parse_uid_range(config.strict.uid_range)
    state = state_dir(config)
    with _cache_lock, _locked(state):
        path = state / MAP_NAME
        users = _load(path)
        if new in users:
            return None
        if old not in users:
            raise IsolationUnavailable(f"the spare {old!r} has no uid in the uid map any more")
        uid = users.pop(old)
        users[new] = uid
        _store(path, users, durable=False)
        _cache.pop((str(state), old), None)
        _cache[(str(state), new)] = uid
    _check_uid(uid, lo, hi, new)
    return Tenant(new, uid, uid)


def flush(config: ProcessSandboxConfig) -> None:
    """Make the map's last write durable (``fsync`` of the map and of its directory)."""
    state = state_dir(config)
    fd = os.open(state / MAP_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(state)


def forget(config: ProcessSandboxConfig, key: str) -> None:
    """Remove a spare's key from the map: only for a spare whose tree is gone and whose uid
    never ran a process, so nothing of it can outlive the assignment. Not flushed: a crash that
    loses it leaves the uid reserved for good, which is safe."""
    if not key.startswith(SPARE_PREFIX):
        raise IsolationUnavailable(f"only a spare's uid can be given back, not {key!r}'s")
    state = state_dir(config)
    with _cache_lock, _locked(state):
        path = state / MAP_NAME
        users = _load(path)
        if users.pop(key, None) is not None:
            _store(path, users, durable=False)
        _cache.pop((str(state), key), None)


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    lock = os.open(state / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)


def _load(path: Path) -> dict[str, int]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd) as fh:
        return _parse(fh.read(), path)


def _parse(text: str, path: Path) -> dict[str, int]:
    try:
        data = json.loads(text)
        users = data["users"]
        if not isinstance(users, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in users.items()
        ):
            raise ValueError("users must map names to uids")
        if len(set(users.values())) != len(users):
            raise ValueError("a uid is assigned twice")
    except (ValueError, KeyError, TypeError) as exc:
        raise IsolationUnavailable(f"the uid map {path} is corrupt ({exc}); restore it from a backup",
                                   data={"field": "state_dir", "value": str(path.parent)}) from None
    return dict(users)


def _store(path: Path, users: dict[str, int], *, durable: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # One line: ``indent`` would take json's pure-Python encoder, ~4x slower on a large map, and
    # a claim rewrites the map while its worker switches uid (see rename()).
    data = json.dumps({"version": 1, "users": users}, sort_keys=True, separators=(",", ":")).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    _snapshots[str(path)] = (_identity(os.lstat(path)), dict(users))  # under the map's lock: ours
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
