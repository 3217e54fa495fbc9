"""The host's own read of one worker process in /proc, pinned so that a reused pid cannot fool it.

:func:`locate` finds the worker below the process the host spawned (under bwrap the worker is
a grandchild: bwrap forks its init inside the new pid namespace, which forks the worker) by
the pid the worker gave in its handshake, matched against the innermost entry of each
candidate's ``NSpid``. It then opens ``/proc/PID`` as a directory descriptor and, through it,
checks that the process is alive, started no earlier than the spawned one and descends from
it. Every later read goes through that descriptor: a /proc directory descriptor stays bound to
its process, so once the process is gone reads fail instead of reading whichever process got
the pid number next. A pidfd taken at the same time lets the host kill exactly that process.

All of this is procfs, maintained by the kernel: nothing here reads the sandbox's writable
tree or anything the sandboxed process can forge. Only variable *names* are read from the
environment, never values, so nothing secret can travel from here into a report or an error.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from dataclasses import dataclass
from types import TracebackType

from sandbox_core.errors import IsolationUnavailable
from sandbox_core.process_tree import descendants, parse_stat

NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "user", "cgroup")
"""The namespace kinds a plan can unshare, as named under /proc/PID/ns."""
MAX_DEPTH = 8
"""Ancestors walked from the worker up to the spawned process (bwrap needs two)."""
_LIMIT_ROW = re.compile(r"^(Max [a-z ]+?)\s{2,}(\S+)\s+(\S+)")


@dataclass(frozen=True)
class Snapshot:
    """What the kernel says about the worker process, read once through the pinned descriptor."""

    pid: int
    """The worker's pid in the host's pid namespace."""
    status: dict[str, str]
    """/proc/PID/status, key → value (``Seccomp``, ``NoNewPrivs``, ``CapEff``, ``Uid``, ...)."""
    stat: list[str]
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, tty_nr, ..."""
    limits: dict[str, tuple[int | None, int | None]]
    """/proc/PID/limits by row name (``Max open files``): (soft, hard), None = unlimited."""
    namespaces: dict[str, int | None]
    """Namespace ids (nsfs inode numbers) by kind; None where unreadable."""
    environ_names: frozenset[str] | None
    """Names of the variables the process was started with (None where unreadable)."""
    cgroups: dict[str, str]
    """cgroup v1 controller → path, from /proc/PID/cgroup."""


class WorkerProcess:
    """A located worker process: its pinned /proc directory and a pidfd (close when done)."""

    def __init__(self, pid: int, dirfd: int, pidfd: int | None) -> None:
        self.pid = pid
        self._dirfd = dirfd
        self._pidfd = pidfd

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for fd in (self._dirfd, self._pidfd):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._dirfd, self._pidfd = -1, None

    def read(self, name: str) -> bytes:
        """A file below the pinned /proc/PID (fails once the process is gone)."""
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._dirfd)
        try:
            chunks: list[bytes] = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def snapshot(self) -> Snapshot:
        """Read status, stat, limits, namespaces, environment names and cgroups, or fail closed."""
        try:
            status = parse_status(self.read("status"))
            stat = parse_stat(self.read("stat"))
            limits = parse_limits(self.read("limits"))
            cgroups = parse_cgroups(self.read("cgroup"))
        except OSError as exc:
            raise IsolationUnavailable(f"cannot read /proc/{self.pid} of the worker: {exc.strerror}") from None
        namespaces = {kind: self._namespace(kind) for kind in NAMESPACES}
        try:
            environ: frozenset[str] | None = environ_names(self.read("environ"))
        except OSError:
            environ = None
        if stat[0] in ("Z", "X"):
            raise IsolationUnavailable(f"the worker process {self.pid} has exited")
        return Snapshot(self.pid, status, stat, limits, namespaces, environ, cgroups)

    def _namespace(self, kind: str) -> int | None:
        try:
            return os.stat(f"ns/{kind}", dir_fd=self._dirfd).st_ino
        except OSError:
            return None

    def kill(self) -> None:
        """SIGKILL exactly this process (by pidfd: a reused pid is never hit)."""
        with contextlib.suppress(OSError):
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            else:
                self.read("stat")  # still ours: the pinned directory still resolves
                os.kill(self.pid, signal.SIGKILL)


def locate(spawned: int, pid_inside: int) -> WorkerProcess:
    """The worker process below ``spawned`` whose own pid namespace calls it ``pid_inside``.

    ``spawned`` must be this process's child. Exactly one live process in its tree, started
    no earlier than it, may match; anything else fails closed.
    """
    top = _stat_of(f"/proc/{spawned}")
    if top is None or int(top[1]) != os.getpid():
        raise IsolationUnavailable(f"the spawned worker process {spawned} is gone or no longer this host's child")
    since = int(top[19])
    matches = [p for p in [spawned, *descendants(spawned, since)] if _innermost_pid(p) == pid_inside]
    if len(matches) != 1:
        raise IsolationUnavailable(
            f"cannot tell which process is the worker: {len(matches)} processes below pid {spawned} "
            f"have pid {pid_inside} in their own namespace (the handshake's pid)"
        )
    pid = matches[0]
    try:
        dirfd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise IsolationUnavailable(f"the worker process {pid} vanished while it was located: {exc.strerror}") from None
    proc = WorkerProcess(pid, dirfd, _pidfd(pid))
    try:
        _confirm(proc, spawned, since, pid_inside)
    except BaseException:
        proc.close()
        raise
    return proc


def _confirm(proc: WorkerProcess, spawned: int, since: int, pid_inside: int) -> None:
    """Re-check, through the pinned descriptor, that it is the process the walk found."""
    try:
        stat = parse_stat(proc.read("stat"))
        status = parse_status(proc.read("status"))
    except OSError:
        raise IsolationUnavailable(f"the worker process {proc.pid} exited while it was located") from None
    if _nspid_last(status) != pid_inside or int(stat[19]) < since:
        raise IsolationUnavailable(f"pid {proc.pid} was reused while the worker was located")
    parent, depth = int(stat[1]), 0
    chain = proc.pid
    while chain != spawned:
        if depth > MAX_DEPTH or parent <= 1:
            raise IsolationUnavailable(f"the worker process {proc.pid} does not descend from {spawned}")
        chain = parent
        up = _stat_of(f"/proc/{parent}")
        parent = int(up[1]) if up is not None else 0
        depth += 1


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):  # kernels before 5.3: kill() re-checks the pinned directory instead
        return None


def _stat_of(path: str) -> list[str] | None:
    try:
        with open(f"{path}/stat", "rb") as fh:
            return parse_stat(fh.read())
    except (OSError, IndexError):
        return None


def _innermost_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            return _nspid_last(parse_status(fh.read()))
    except OSError:
        return None


def _nspid_last(status: dict[str, str]) -> int | None:
    ids = status.get("NSpid", "").split()
    return int(ids[-1]) if ids and ids[-1].isdigit() else None


def host_namespaces() -> dict[str, int | None]:
    """This (host) process's namespace ids by kind; None where the kernel lacks the kind."""
    out: dict[str, int | None] = {}
    for kind in NAMESPACES:
        try:
            out[kind] = os.stat(f"/proc/self/ns/{kind}").st_ino
        except OSError:
            out[kind] = None
    return out


def parse_status(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in raw.decode(errors="replace").splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def parse_limits(raw: bytes) -> dict[str, tuple[int | None, int | None]]:
    out: dict[str, tuple[int | None, int | None]] = {}
    for line in raw.decode(errors="replace").splitlines()[1:]:
        match = _LIMIT_ROW.match(line)
        if match:
            name, soft, hard = match.groups()
            out[name] = (_limit_value(soft), _limit_value(hard))
    return out


def _limit_value(text: str) -> int | None:
    return None if text == "unlimited" else int(text)


def parse_cgroups(raw: bytes) -> dict[str, str]:
    """controller → path for each v1 hierarchy (``4:memory:/a/b``; ``cpu,cpuacct`` split)."""
    out: dict[str, str] = {}
    for line in raw.decode(errors="replace").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[1]:
            for controller in parts[1].split(","):
                out[controller] = parts[2]
        elif len(parts) == 3 and parts[0] == "0":  # the unified (v2) hierarchy
            out["unified"] = parts[2]
    return out


def environ_names(raw: bytes) -> frozenset[str]:
    """The variable names of a NUL-separated environment block (values are dropped here)."""
    return frozenset(entry.split(b"=", 1)[0].decode(errors="replace") for entry in raw.split(b"\0") if entry)
