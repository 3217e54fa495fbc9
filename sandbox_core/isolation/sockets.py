"""The launch check that no tree mounted into a strict sandbox exposes a host Unix socket.

The sandbox may create AF_UNIX sockets (``strict.unix_sockets``) because every way to a
host socket is closed by something else: abstract names live in the network namespace
(the sandbox has its own; Landlock ABI 6 scopes them too) and a socket pair is connected
at birth. What remains is a *path* socket: ``connect()`` reaches any listening socket file
the process can see and write, across namespaces. Landlock ABI 9
(``LANDLOCK_ACCESS_FS_RESOLVE_UNIX``) refuses every socket that was not created inside the
sandbox; on older kernels the launcher walks the trees it mounts from the host and refuses
to start while one holds a socket file the sandbox identity could connect to.

Walked: the workspace, every ``strict.ro_binds``/``rw_binds`` source and the bound ``/etc``
entries. Not walked: ``/usr`` and ``/lib*``, the system trees (about 140,000 entries here;
no program keeps a socket there, runtime sockets live in ``/run``, ``/tmp`` and ``/var``,
none of which is mounted) and the staged runtime (ours). A socket file counts when the
sandbox identity may write it (``connect()`` needs that) and a socket of the host's network
namespace is bound to it: the kernel's ``sock_diag`` names the file (device and inode) of
every bound Unix socket (``ss -x``'s source). The owner of the file says nothing (a host
daemon's socket may have been chowned with its tree); a file with no host socket behind it
is the sandbox's own, or a stale leftover (git's fsmonitor), and is left alone. When the
host's sockets cannot be listed, every writable socket file counts (fail closed).

What this check cannot see: a host process that creates a socket in a mounted tree *after*
the sandbox started. Only Landlock ABI 9 closes that; the handshake report says which of
the two is in force.

The walk never follows a symlink and opens every directory by descriptor below its parent
(``O_NOFOLLOW``): a sandbox that swaps a directory for a link cannot steer it elsewhere.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from collections.abc import Iterable, Iterator

from sandbox_core.errors import IsolationUnavailable
from sandbox_core.valueclass import dataclass

MAX_DEPTH = 256
"""Directory nesting the walk follows; deeper trees are refused (cannot be checked)."""
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Identity:
    """Who the sandbox runs as, for "could it connect to this socket"."""

    uid: int
    gids: frozenset[int]

    def may_connect(self, st: os.stat_result) -> bool:
        """Whether the permission bits let this identity connect to a socket file with ``st``."""
        if st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IWUSR)
        if st.st_gid in self.gids:
            return bool(st.st_mode & stat.S_IWGRP)
        return bool(st.st_mode & stat.S_IWOTH)


Bound = frozenset[tuple[int, int, int]]
"""(major, minor, inode & 0xffffffff) of the files the host's Unix sockets are bound to."""


def exposed(trees: Iterable[tuple[str, str]], who: Identity, host: Bound | None = None) -> list[str]:
    """Sandbox paths of host sockets ``who`` could connect to, for (host path, sandbox path) trees.

    ``host`` is the set of files host sockets are bound to (default: asked of the kernel
    when the walk finds a candidate; None from the kernel means every candidate counts).
    """
    candidates: list[tuple[str, os.stat_result]] = []
    for root, inside in trees:
        candidates.extend(_walk(root, inside, who))
    if not candidates:
        return []
    bound = host if host is not None else host_bound_files()
    return [path for path, st in candidates if bound is None or _key(st) in bound]


def _key(st: os.stat_result) -> tuple[int, int, int]:
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino & 0xFFFFFFFF


_SOCK_DIAG_BY_FAMILY, _NLMSG_DONE, _NLMSG_ERROR = 20, 3, 2
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_UDIAG_SHOW_VFS, _UNIX_DIAG_VFS = 0x2, 1
_NETLINK_SOCK_DIAG = 4


def host_bound_files() -> Bound | None:
    """The files every Unix socket of this network namespace is bound to, or None if unknown.

    One ``SOCK_DIAG_BY_FAMILY`` dump over netlink (all states, ``UDIAG_SHOW_VFS``). The kernel
    reports the device as its internal ``MAJOR << 20 | MINOR``.
    """
    request = struct.pack("=BBHIII8x", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, _UDIAG_SHOW_VFS)
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, 1, 0)
    found: set[tuple[int, int, int]] = set()
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(5)
            nl.sendall(header + request)
            while True:
                data = nl.recv(1 << 16)
                offset = 0
                while offset + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, offset)
                    if kind == _NLMSG_DONE:
                        return frozenset(found)
                    if kind == _NLMSG_ERROR or length < 16:
                        return None
                    _parse(data[offset + 16 : offset + length], found)
                    offset += (length + 3) & ~3
                if not data:
                    return None
    except OSError:
        return None


def _parse(message: bytes, found: set[tuple[int, int, int]]) -> None:
    """One ``unix_diag_msg`` (16 bytes) and its attributes: keep the UNIX_DIAG_VFS one."""
    offset = 16
    while offset + 4 <= len(message):
        length, kind = struct.unpack_from("=HH", message, offset)
        if length < 4:
            return
        if kind == _UNIX_DIAG_VFS and length >= 12:
            ino, dev = struct.unpack_from("=II", message, offset + 4)
            found.add((dev >> 20, dev & 0xFFFFF, ino))
        offset += (length + 3) & ~3


def refuse_exposed(trees: Iterable[tuple[str, str]], who: Identity) -> None:
    """Raise :class:`IsolationUnavailable` naming the first host sockets a bound tree exposes."""
    found = exposed(trees, who)
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise IsolationUnavailable(
            f"a tree mounted into the sandbox holds a host Unix socket the sandbox could connect to: "
            f"{shown}; remove it (or chmod o-w), or set strict.unix_sockets = false (this kernel has "
            "no Landlock ABI 9 to refuse it)",
            data={"field": "strict.unix_sockets", "reason": "host_socket", "paths": found[:20]},
        )


def _walk(host: str, inside: str, who: Identity) -> Iterator[tuple[str, os.stat_result]]:
    try:
        st = os.lstat(host)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise IsolationUnavailable(f"cannot check {inside} for host sockets: {exc.strerror}") from None
    if stat.S_ISSOCK(st.st_mode):
        if who.may_connect(st):
            yield inside, st
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    try:
        fd = os.open(host, _DIR_FLAGS)
    except OSError as exc:
        raise IsolationUnavailable(f"cannot check {inside} for host sockets: {exc.strerror}") from None
    # one open descriptor per level: (fd, sandbox path, names of its subdirectories still to visit)
    stack: list[tuple[int, str, list[str]]] = []
    try:
        stack.append((fd, inside, []))
        yield from _list(stack, who)
        while stack:
            parent_fd, path, pending = stack[-1]
            if not pending:
                os.close(stack.pop()[0])
                continue
            name = pending.pop()
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            except FileNotFoundError:
                continue  # gone since the listing
            except OSError as exc:
                raise IsolationUnavailable(
                    f"cannot check {path}/{name} for host sockets: {exc.strerror}"
                ) from None
            if len(stack) >= MAX_DEPTH:
                os.close(child)
                raise IsolationUnavailable(
                    f"{inside} nests directories more than {MAX_DEPTH} deep below {path}: it cannot be "
                    "checked for host sockets",
                    data={"field": "strict.unix_sockets", "reason": "too_deep"},
                )
            stack.append((child, f"{path}/{name}", []))
            yield from _list(stack, who)
    finally:
        for entry in stack:
            os.close(entry[0])


def _list(stack: list[tuple[int, str, list[str]]], who: Identity) -> Iterator[tuple[str, os.stat_result]]:
    """Record the subdirectories of the top of ``stack`` and yield the sockets in it."""
    fd, path, pending = stack[-1]
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.name)
            elif not (entry.is_file(follow_symlinks=False) or entry.is_symlink()):
                try:  # a socket, fifo or device (DirEntry knows no sockets; the type is cached)
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISSOCK(st.st_mode) and who.may_connect(st):
                    yield f"{path}/{entry.name}", st
