"""A host uid per tenant: each user id gets its own unprivileged uid/gid from ``strict.uid_range``.

The map lives in ``<state_dir>/uids.sqlite3`` (a SQLite database in WAL mode, one table:
``tenants(key PRIMARY KEY, uid UNIQUE)``) and only grows: a uid once given to a user is that
user's for good (files it owns may outlive every worker), so a later user can never inherit
them. Two orchestrators on one host share the file: an assignment is one ``BEGIN IMMEDIATE``
transaction (SQLite's write lock, waited for) that reads the key, picks the lowest free uid and
inserts it, committed with ``synchronous=FULL`` (the WAL ``fsync``'d), so a crash leaves the
map with or without the whole assignment, and the schema itself refuses a uid given twice.
Each change touches its own row: a claim no longer rewrites the whole map (it did while the map
was a JSON file, ~1.2 ms at 1,400 users and growing with them).

A *spare* (:mod:`spares`) holds a uid under a key no user id can be (``.spare-...``), assigned
durably before any user asks for it. Claiming it for a new user (:func:`rename`) moves the uid
to the user's key without waiting for the disk (``synchronous=NORMAL``: the commit is in the
WAL, ``fsync``'d later): the uid was already durably reserved under the spare's key, and a
crash that loses the rename leaves it under the spare's key, never given to anyone else (WAL
commits survive in order, so no later change survives without it); the durable write follows
off the request path (:func:`flush`). Removing a spare's key (:func:`forget`) is allowed only
once its tree is gone and no process ever ran as its uid (and needs no flush either: a crash
that loses it leaves the uid reserved for good).

A map of an earlier version (``uids.json``) is imported on first use, in the same transaction
as nothing else, and replaced by a note that has no ``users``: a process of the earlier version
still running then fails closed on it ("corrupt") instead of handing out uids from a stale map.

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
import grp
import json
import os
import pwd
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from sandbox_core.config import ProcessSandboxConfig, parse_uid_range
from sandbox_core.errors import IsolationUnavailable
from sandbox_core.valueclass import dataclass

NOBODY = 65534
MAP_NAME = "uids.sqlite3"
LEGACY_MAP_NAME = "uids.json"
"""The map of earlier versions: imported once, then a note that fails their readers closed."""
SPARE_PREFIX = ".spare-"
"""The map keys (and workspace names) of spares: a user id never starts with a dot."""
UNBOUND = "-"
"""The map key of workers with no workspace (not a valid user id, so never a user's)."""
SUBID_FILES = ("/etc/subuid", "/etc/subgid")
BUSY_TIMEOUT = 30.0
"""Seconds a change waits for another process's write to the map before it fails."""
_OPEN_MAPS = 4
"""Connections kept open per process (one per state directory in use; the oldest is closed)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    key TEXT PRIMARY KEY NOT NULL CHECK (typeof(key) = 'text' AND key <> ''),
    uid INTEGER NOT NULL UNIQUE CHECK (typeof(uid) = 'integer' AND uid > 0)
) WITHOUT ROWID
"""

_lock = threading.Lock()
"""Serializes this process's use of its connections and of the uid cache."""
_cache: dict[tuple[str, str], int] = {}
_maps: dict[str, _Map] = {}
"""Open maps by path, the most recently opened last."""


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
    with _lock:
        found = _open(state)  # first: a map replaced behind us (a restored backup) drops what we cached of it
        uid = _cache.get(cache_key)
        if uid is None:
            uid = _assign(found, key, lo, hi)
            _cache[cache_key] = uid
    _check_uid(uid, lo, hi, key)
    return Tenant(key, uid, uid)


def assigned(config: ProcessSandboxConfig) -> dict[str, int]:
    """Every assignment so far (for ``audit-env`` and diagnostics); {} when there is no map."""
    with _lock:
        found = _existing(state_dir(config, create=False))
        if found is None:
            return {}
        with _failing_closed(found.path):
            return dict(found.db.execute("SELECT key, uid FROM tenants"))


def has_uid(config: ProcessSandboxConfig, key: str) -> bool:
    """Whether ``key`` has a uid (one indexed read: quick enough for a claim on the event loop)."""
    with _lock:
        found = _existing(state_dir(config, create=False))
        if found is None:
            return False
        with _failing_closed(found.path):
            return found.db.execute("SELECT 1 FROM tenants WHERE key = ?", (key,)).fetchone() is not None


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


def _assign(found: _Map, key: str, lo: int, hi: int) -> int:
    """In one write transaction: the key's uid from the map, or the lowest free one, inserted."""
    with _writing(found, durable=True) as db:
        row = db.execute("SELECT uid FROM tenants WHERE key = ?", (key,)).fetchone()
        if row is not None:
            return int(row[0])
        taken = {u for (u,) in db.execute("SELECT uid FROM tenants WHERE uid BETWEEN ? AND ?", (lo, hi))}
        uid = next((u for u in range(lo, hi + 1) if u not in taken and u not in (0, NOBODY)
                    and host_knows(u) is None), None)
        if uid is None:
            raise IsolationUnavailable(
                f"strict.uid_range {lo}-{hi} is used up ({len(taken)} tenants); widen it",
                data={"field": "strict.uid_range", "value": f"{lo}-{hi}"},
            )
        db.execute("INSERT INTO tenants (key, uid) VALUES (?, ?)", (key, uid))
        return uid


def rename(config: ProcessSandboxConfig, old: str, new: str) -> Tenant | None:
    """Move ``old``'s uid (a spare's) to ``new``, which has none yet; None (nothing changed) when
    ``new`` already has a uid. Not flushed to disk: see the module docstring and :func:`flush`."""
    lo, hi = parse_uid_range(config.strict.uid_range)
    state = state_dir(config)
    with _lock:
        with _writing(_open(state), durable=False) as db:
            if db.execute("SELECT 1 FROM tenants WHERE key = ?", (new,)).fetchone() is not None:
                return None
            row = db.execute("SELECT uid FROM tenants WHERE key = ?", (old,)).fetchone()
            if row is None:
                raise IsolationUnavailable(f"the spare {old!r} has no uid in the uid map any more")
            uid = int(row[0])
            db.execute("UPDATE tenants SET key = ? WHERE key = ?", (new, old))
        _cache.pop((str(state), old), None)
        _cache[(str(state), new)] = uid
    _check_uid(uid, lo, hi, new)
    return Tenant(new, uid, uid)


def flush(config: ProcessSandboxConfig) -> None:
    """Make the map's last changes durable: ``fsync`` of its write-ahead log (where a change
    not yet checkpointed is) and of the database file (where a checkpoint put the rest)."""
    state = state_dir(config)
    for name in (MAP_NAME, f"{MAP_NAME}-wal"):
        try:
            fd = os.open(state / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def forget(config: ProcessSandboxConfig, key: str) -> None:
    """Remove a spare's key from the map: only for a spare whose tree is gone and whose uid
    never ran a process, so nothing of it can outlive the assignment. Not flushed: a crash that
    loses it leaves the uid reserved for good, which is safe."""
    if not key.startswith(SPARE_PREFIX):
        raise IsolationUnavailable(f"only a spare's uid can be given back, not {key!r}'s")
    state = state_dir(config)
    with _lock:
        with _writing(_open(state), durable=False) as db:
            db.execute("DELETE FROM tenants WHERE key = ?", (key,))
        _cache.pop((str(state), key), None)


def close_maps() -> None:
    """Close this process's connections to uid maps (the next use opens them again)."""
    with _lock:
        for found in _maps.values():
            if found.pid == os.getpid():
                found.db.close()
        _maps.clear()
        _cache.clear()


# ---------------------------------------------------------------- the database


class _Map:
    """One open uid map: its path, and the pid and file identity it was opened with."""

    def __init__(self, path: Path, db: sqlite3.Connection, ident: tuple[int, int]) -> None:
        self.path, self.db, self.ident, self.pid = path, db, ident, os.getpid()

    def current(self, st: os.stat_result | None) -> bool:
        """Still the file at its path (not replaced or removed), in the process that opened it."""
        return st is not None and self.pid == os.getpid() and self.ident == (st.st_dev, st.st_ino)


def _existing(state: Path) -> _Map | None:
    """The map in ``state``, or None when there is neither it nor an earlier version's (caller holds :data:`_lock`)."""
    if not os.path.lexists(state / MAP_NAME) and not os.path.lexists(state / LEGACY_MAP_NAME):
        return None
    return _open(state)


def _open(state: Path) -> _Map:
    """The map in ``state``, made (0600) and opened on first use (caller holds :data:`_lock`)."""
    path = state / MAP_NAME
    try:
        st: os.stat_result | None = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    known = _maps.pop(str(path), None)
    if known is not None:
        if known.current(st):
            _maps[str(path)] = known
            return known
        if known.pid == os.getpid():  # replaced or removed behind our back (never use a fork's)
            known.db.close()
        for cached in [k for k in _cache if k[0] == str(state)]:  # uids read from the file that is gone
            del _cache[cached]
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise IsolationUnavailable(f"cannot open the uid map {path}: {exc}",
                                   data={"field": "state_dir", "value": str(state)}) from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise IsolationUnavailable(
            f"the uid map {path} must be a file owned by uid {os.geteuid()} that only it can read "
            f"(it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})",
            data={"field": "state_dir", "value": str(state)})
    found = _Map(path, sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                       check_same_thread=False), (st.st_dev, st.st_ino))  # fmt: skip
    try:
        with _failing_closed(path):
            found.db.execute("PRAGMA journal_mode = WAL")
            found.db.execute(SCHEMA)
        _import_legacy(found, state / LEGACY_MAP_NAME)
    except BaseException:
        found.db.close()
        raise
    while len(_maps) >= _OPEN_MAPS:
        _maps.pop(next(iter(_maps))).db.close()
    _maps[str(path)] = found
    return found


@contextlib.contextmanager
def _failing_closed(path: Path) -> Iterator[None]:
    """SQLite's errors as the fail-closed errors of the uid map."""
    try:
        yield
    except sqlite3.IntegrityError as exc:  # a uid given twice, a key or uid the schema refuses
        raise IsolationUnavailable(f"the uid map {path} refused a change ({exc}): nothing was changed",
                                   data={"field": "state_dir", "value": str(path.parent)}) from None
    except sqlite3.OperationalError as exc:
        raise IsolationUnavailable(f"cannot use the uid map {path} ({exc}; another process may hold it "
                                   f"for more than {BUSY_TIMEOUT:.0f} s)",
                                   data={"field": "state_dir", "value": str(path.parent)}) from None
    except sqlite3.DatabaseError as exc:
        raise IsolationUnavailable(f"the uid map {path} is corrupt ({exc}); restore it from a backup",
                                   data={"field": "state_dir", "value": str(path.parent)}) from None


@contextlib.contextmanager
def _writing(found: _Map, *, durable: bool) -> Iterator[sqlite3.Connection]:
    """One write transaction (``BEGIN IMMEDIATE``: the write lock first, so a read inside it is
    never of a map another process changes before the commit); rolled back on any error.
    ``durable``: the commit waits for the disk (``synchronous=FULL``), else it is in the WAL only."""
    db = found.db
    with _failing_closed(found.path):
        db.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def _import_legacy(found: _Map, legacy: Path) -> None:
    """Import an earlier version's ``uids.json`` (its every entry, checked against the map), then
    replace it by a note without ``users``, which that version's readers refuse (fail closed)."""
    try:
        fd = os.open(legacy, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    with os.fdopen(fd) as fh:
        text = fh.read()
    users = _parse_legacy(text, legacy)
    if users:
        with _writing(found, durable=True) as db:
            for key, uid in users.items():
                held = db.execute("SELECT key, uid FROM tenants WHERE key = ? OR uid = ?", (key, uid)).fetchall()
                for other_key, other_uid in held:
                    if (other_key, other_uid) != (key, uid):
                        raise IsolationUnavailable(
                            f"{legacy} gives uid {uid} to {key!r}, the uid map {found.path} gives uid {other_uid} "
                            f"to {other_key!r}: resolve it by hand (a uid serves one user, a user's files "
                            "belong to one uid)", data={"field": "state_dir", "value": str(legacy.parent)})
                if not held:
                    db.execute("INSERT INTO tenants (key, uid) VALUES (?, ?)", (key, uid))
    if users is not None:
        note = {"version": 2, "moved_to": MAP_NAME, "note": "the uid map is a SQLite database now: no users here"}
        _replace(legacy, (json.dumps(note) + "\n").encode())


def _parse_legacy(text: str, path: Path) -> dict[str, int] | None:
    """``uids.json``'s users; None for the note :func:`_import_legacy` leaves."""
    try:
        data = json.loads(text)
        if isinstance(data, dict) and "moved_to" in data and "users" not in data:
            return None
        users = data["users"]
        if not isinstance(users, dict) or not all(
            isinstance(k, str) and k and isinstance(v, int) and not isinstance(v, bool) and v > 0
            for k, v in users.items()
        ):
            raise ValueError("users must map names to uids")
        if len(set(users.values())) != len(users):
            raise ValueError("a uid is assigned twice")
    except (ValueError, KeyError, TypeError) as exc:
        raise IsolationUnavailable(f"the uid map {path} is corrupt ({exc}); restore it from a backup",
                                   data={"field": "state_dir", "value": str(path.parent)}) from None
    return dict(users)


def _replace(path: Path, data: bytes) -> None:
    """Write ``path`` atomically and durably: a temporary file, ``fsync``, ``rename``, ``fsync`` of the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
