"""Directories the audit creates, plants in and removes as root, through descriptors only.

Below a directory descriptor that the audit holds, no path of more than one component is
ever resolved: entries are made with ``mkdirat``/``openat(O_CREAT|O_EXCL|O_NOFOLLOW)``,
entered with ``openat(O_DIRECTORY|O_NOFOLLOW)``, looked at with ``fstatat(AT_SYMLINK_NOFOLLOW)``
and removed with ``unlinkat``/``rmdir`` of one name. Modes and owners are set on held
inodes (``fchmod``/``fchown``; ``/proc/self/fd/N`` of an ``O_PATH|O_NOFOLLOW`` descriptor for
a socket, which cannot be opened otherwise). So a symlink planted anywhere below the
held descriptor is never followed (see :mod:`sandbox_core.audit.plant` for why that is
the whole argument).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_DEPTH = 64
"""How deep the removal walk holds descriptors; deeper directories are moved up to the top."""
_MAX_PASSES = 10_000
"""Removal passes over the top directory (each one removes at least one entry, or it stops)."""
_NOT_A_DIR = (errno.ELOOP, errno.ENOTDIR)


def open_dir(path: str | os.PathLike[str]) -> int:
    """A descriptor of a directory the host owns (``workspace_root``, ``/var/tmp``, ``/etc``).

    Followed by path on purpose: these belong to the operator, never to a sandbox.
    """
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_dir_at(parent_fd: int, name: str) -> int:
    """Open the directory ``name`` in ``parent_fd``; a symlink there fails (ELOOP/ENOTDIR)."""
    return os.open(name, _DIR, dir_fd=parent_fd)


def identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


@dataclass(frozen=True)
class _Entry:
    parent_fd: int
    name: str
    fd: int
    kind: str
    """``dir``, ``file`` or ``socket`` (held ``O_PATH``: mode and owner go through ``/proc/self/fd``)."""


class Tree:
    """A directory the audit makes fresh, plants in while it is root's alone, then hands over.

    Every planted entry stays open until :meth:`close`, so the hand-over sets the owner of
    the very inodes the audit created, whatever names they have by then.
    """

    def __init__(self, parent_fd: int, name: str, mode: int = 0o700) -> None:
        os.mkdir(name, 0o700, dir_fd=parent_fd)  # EEXIST: never adopt a directory someone else made
        self.name = name
        self.parent_fd = parent_fd
        self.entries: list[_Entry] = []
        try:
            self.fd = self._hold(parent_fd, name, _DIR, "dir")
            self.identity = identity(self.fd)
            os.fchmod(self.fd, mode)
        except BaseException:
            self.close()
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=parent_fd)
            raise

    def _hold(self, parent_fd: int, name: str, flags: int, kind: str) -> int:
        fd = os.open(name, flags | os.O_CLOEXEC, dir_fd=parent_fd)
        self.entries.append(_Entry(parent_fd, name, fd, kind))
        return fd

    def mkdir(self, parent_fd: int, name: str, mode: int = 0o700) -> int:
        """A new directory ``name`` in ``parent_fd`` (one of this tree's); its descriptor."""
        os.mkdir(name, 0o700, dir_fd=parent_fd)
        fd = self._hold(parent_fd, name, _DIR, "dir")
        os.fchmod(fd, mode)
        return fd

    def write(self, parent_fd: int, name: str, text: str, mode: int) -> None:
        """A new file ``name`` in ``parent_fd`` holding ``text``."""
        fd = self._hold(parent_fd, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, "file")
        os.fchmod(fd, mode)
        os.write(fd, text.encode())

    def bind(self, parent_fd: int, name: str) -> socket.socket:
        """A Unix stream socket bound to ``name`` in ``parent_fd``, its file mode 0777.

        ``bind`` goes through ``/proc/self/fd/N/`` (the held directory, whatever path leads
        to it); the socket file is then held ``O_PATH|O_NOFOLLOW`` and checked to be a socket
        before its mode is set, so the chmod reaches that inode and no other.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(f"/proc/self/fd/{parent_fd}/{name}")
            fd = self._hold(parent_fd, name, os.O_PATH | os.O_NOFOLLOW, "socket")
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise OSError(errno.EEXIST, f"{name} is not the socket just bound")
            os.chmod(f"/proc/self/fd/{fd}", 0o777)  # only the sandbox should stop a connect, not the mode
        except BaseException:
            sock.close()
            raise
        return sock

    def tampered(self) -> list[str]:
        """Planted names that no longer name the inode planted, or entries nobody planted."""
        problems: list[str] = []
        expected: dict[int, set[str]] = {}
        for entry in self.entries:
            expected.setdefault(entry.parent_fd, set()).add(entry.name)
            try:
                st = os.stat(entry.name, dir_fd=entry.parent_fd, follow_symlinks=False)
            except OSError as exc:
                problems.append(f"{entry.name}: {errno.errorcode.get(exc.errno or 0, exc)}")
                continue
            if (st.st_dev, st.st_ino) != identity(entry.fd) or st.st_uid != os.geteuid():
                problems.append(f"{entry.name}: replaced")
        for entry in self.entries:
            if entry.kind == "dir":
                extra = set(os.listdir(entry.fd)) - expected.get(entry.fd, set())
                problems += [f"{entry.name}/{name}: not planted" for name in sorted(extra)]
        return problems

    def hand_over(self, owner: tuple[int, int] | None) -> None:
        """Give every planted inode to ``owner``: children first, this directory last."""
        if owner is None:
            return
        for entry in reversed(self.entries):
            if entry.kind == "socket":
                os.chown(f"/proc/self/fd/{entry.fd}", *owner)
            else:
                os.fchown(entry.fd, *owner)

    def close(self) -> None:
        for entry in self.entries:
            with contextlib.suppress(OSError):
                os.close(entry.fd)
        self.entries.clear()


# ---------------------------------------------------------------- removal


def remove_tree(parent_fd: int, name: str, expect: tuple[int, int] | None = None) -> bool:
    """Remove directory ``name`` in ``parent_fd`` and all below it; True when it is gone.

    ``expect`` is the (st_dev, st_ino) the directory must have: another one of that name is
    left alone. Never raises for what it finds (cleanup runs on the way out of an audit).
    """
    try:
        top = open_dir_at(parent_fd, name)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        if expect is not None and identity(top) != expect:
            return False
        _empty_top(top)
    finally:
        os.close(top)
    with contextlib.suppress(OSError):
        os.rmdir(name, dir_fd=parent_fd)
    return not _exists(parent_fd, name)


def _empty_top(top: int) -> None:
    """Empty ``top`` in passes: a pass may move too-deep directories up for the next one."""
    dev = os.fstat(top).st_dev
    for _ in range(_MAX_PASSES):
        names = _listdir(top)
        if not names or _empty(top, top, dev, 0, names) == 0:
            return


def _empty(fd: int, top: int, dev: int, depth: int, names: Iterable[str] | None = None) -> int:
    """Remove every entry of directory ``fd``; how many were removed or moved up."""
    return sum(_remove_entry(fd, name, top, dev, depth) for name in (_listdir(fd) if names is None else names))


def _remove_entry(fd: int, name: str, top: int, dev: int, depth: int) -> int:
    """Remove ``name`` in ``fd`` (a directory with what it holds); 1 when something changed."""
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=fd)  # unlink never follows: a link to a host file loses its name only
            return 1
        if st.st_dev != dev:
            return 0  # another filesystem mounted here: not walked, not removed
        if depth >= _MAX_DEPTH:
            os.rename(name, f".rm-{secrets.token_hex(8)}", src_dir_fd=fd, dst_dir_fd=top)
            return 1
        child = _enter(fd, name)
        if child is None:
            return 1
        try:
            if os.fstat(child).st_dev == dev:
                _empty(child, top, dev, depth + 1)
        finally:
            os.close(child)
        os.rmdir(name, dir_fd=fd)
        return 1
    except OSError:
        return 0  # gone already, or changed under the walk: the next pass sees it again


def _enter(fd: int, name: str) -> int | None:
    """Open directory ``name`` in ``fd``; None when it turned out not to be one (then unlinked)."""
    try:
        return open_dir_at(fd, name)
    except PermissionError:
        _let_owner_in(fd, name)  # only without root: a directory made mode 000 by its (our) uid
        return open_dir_at(fd, name)
    except OSError as exc:
        if exc.errno not in _NOT_A_DIR:
            raise
        os.unlink(name, dir_fd=fd)  # swapped for a symlink since the stat: remove the link itself
        return None


def _let_owner_in(fd: int, name: str) -> None:
    path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    try:
        if stat.S_ISDIR(os.fstat(path_fd).st_mode):
            os.chmod(f"/proc/self/fd/{path_fd}", 0o700)
    finally:
        os.close(path_fd)


def _listdir(fd: int) -> list[str]:
    try:
        return os.listdir(fd)
    except OSError:
        return []


def _exists(fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def unlink_files(directory_fd: int, names: Iterable[str]) -> None:
    """Unlink each of ``names`` in ``directory_fd`` that is a regular file (never following)."""
    for name in names:
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.stat(name, dir_fd=directory_fd, follow_symlinks=False).st_mode):
                os.unlink(name, dir_fd=directory_fd)
