"""Mounts that hold entries of a writable tree in place: protected paths and deny paths.

A workspace bound read-write lets the sandbox write, create, rename and delete anything in
it. Some entries must not change: what a shell, git, an IDE or an agent tool reads and runs
when it opens the workspace (``strict.protected_paths``), and what an operator hides
(``strict.deny_paths``). A :class:`TreeGuard` turns them into mounts on one writable tree:

* **freeze**: the entry is bound read-only onto itself. Writing fails (``EROFS``); being a
  mount point, it cannot be unlinked, renamed, or replaced by a ``rename()`` over it, so no
  symlink can be swapped in (``EBUSY``); ``link()`` to it fails (``EXDEV``).
* **pin**: a directory between the tree's root and a frozen or denied entry is bound
  read-write onto itself. Its contents stay writable, but it cannot be renamed or removed
  (``EBUSY``), so nothing below it can be moved away by moving a parent.
* **placeholder**: a protected path that does not exist is created first, as an empty 0444
  file or 0555 directory owned by the host (at its first missing component), so that it can
  be frozen: the sandbox cannot create it either. Placeholders stay: removing one while
  another worker of the user runs would detach that worker's mount (Linux lazily detaches
  mounts in other namespaces when their dentry is removed).
* **deny**: the caller covers the entry (an empty tmpfs or file); the guard pins its parents.

Everything is opened beneath the tree's root through descriptors, one component at a time,
without following symlinks, and bwrap binds those descriptors (``--bind-fd``), so nothing
here acts on a path the sandbox could have swapped meanwhile. The launch is refused when a
symlink stands where a protected or denied entry (or a directory above one) should be, when
a protected directory holds a symlink, or when a protected or denied file has a hard link
elsewhere: each would let the sandbox change what the protected path shows, or read what the
denied one hides.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import stat
from collections.abc import Iterator

from sandbox_core.errors import ConfigError, IsolationUnavailable
from sandbox_core.valueclass import dataclass

FREEZE, PIN, DENY = "freeze", "pin", "deny"
_STRENGTH = {PIN: 0, FREEZE: 1, DENY: 2}
MAX_CHECKED = 20000
"""Entries of protected and denied directories checked for symlinks and hard links, at most."""
_MAGIC = frozenset("*?[")
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Mount:
    """One mount on the tree: ``rel`` below its root, what kind, the entry's descriptor."""

    rel: str
    kind: str
    fd: int
    is_dir: bool

    @property
    def depth(self) -> int:
        return self.rel.count("/")


def parse_pattern(pattern: str) -> tuple[list[str], bool]:
    """A protected path's components and whether it names a directory (trailing ``/``)."""
    text = pattern.strip()
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts or text.startswith("/") or ".." in parts or "\0" in text:
        raise ConfigError(
            "strict.protected_paths", f"{pattern!r} is not a path relative to the workspace (no '/' first, no '..')"
        )
    return parts, text.endswith("/")


class TreeGuard:
    """The freeze, pin and deny mounts of one writable tree (the workspace, or an rw bind).

    The guard owns every descriptor it opens; :meth:`close` closes all but those the caller
    hands to bwrap. A descriptor of a workspace entry that reached the sandbox would be a way
    around a read-only bind (reopened through ``/proc/self/fd``, it has the host's mount).
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.mounts: dict[str, Mount] = {}
        self._inodes: dict[tuple[int, int], list[int]] = {}
        """(dev, ino) of guarded files: [links, times seen below frozen or denied entries]."""
        self._checked = 0
        try:
            self._root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise IsolationUnavailable(f"cannot open {root}: {exc}") from None
        self._fds: list[int] = [self._root_fd]

    @property
    def root_fd(self) -> int:
        """The tree's root, as the guard opened it (an ``O_PATH`` descriptor the guard owns)."""
        return self._root_fd

    def hand_over(self, mount: Mount) -> int:
        """The descriptor of ``mount``, which the caller now owns (and closes)."""
        self._fds.remove(mount.fd)
        return mount.fd

    def close(self) -> None:
        """Close every descriptor the guard still owns."""
        while self._fds:
            with contextlib.suppress(OSError):
                os.close(self._fds.pop())

    # ------------------------------------------------------------ protected paths

    def protect(self, pattern: str) -> None:
        """Freeze what ``pattern`` names (created as a placeholder if missing) and pin its parents."""
        parts, want_dir = parse_pattern(pattern)
        self._protect(self._root_fd, "", parts, want_dir)

    def _protect(self, dir_fd: int, rel: str, parts: list[str], want_dir: bool) -> None:
        name, rest = parts[0], parts[1:]
        if _MAGIC & set(name):  # a glob: what matches now (a symlink that matches is not the path)
            for entry in self._names(dir_fd):
                st = _lstat(dir_fd, entry)
                if fnmatch.fnmatchcase(entry, name) and st is not None and not stat.S_ISLNK(st.st_mode):
                    self._protect_entry(dir_fd, rel, entry, rest, want_dir, create=False)
        else:
            self._protect_entry(dir_fd, rel, name, rest, want_dir, create=True)

    def _protect_entry(self, dir_fd: int, rel: str, name: str, rest: list[str], want_dir: bool, create: bool) -> None:
        path = f"{rel}/{name}" if rel else name
        if self._covered(path):
            return
        st = _lstat(dir_fd, name)
        if st is None:
            if not create:
                return
            st = self._placeholder(dir_fd, name, path, is_dir=bool(rest) or want_dir)
            rest = []  # a new placeholder directory is empty: frozen whole
        fd = self._open(dir_fd, name, path, st)
        if rest and stat.S_ISDIR(st.st_mode):
            self._add(path, PIN, fd, True)
            self._protect(fd, path, rest, want_dir)
        else:  # the entry itself, or a non-directory where a directory was expected (a worktree's .git file)
            self._add(path, FREEZE, fd, stat.S_ISDIR(st.st_mode))
            self._audit(fd, path, st, protected=True)

    def _placeholder(self, dir_fd: int, name: str, path: str, is_dir: bool) -> os.stat_result:
        try:
            if is_dir:
                os.mkdir(name, 0o555, dir_fd=dir_fd)
                made = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                made = os.open(name, flags, 0o444, dir_fd=dir_fd)
            try:
                os.fchmod(made, 0o555 if is_dir else 0o444)
            finally:
                os.close(made)
        except FileExistsError:
            pass  # created meanwhile: whatever it is, it is checked like any entry
        except OSError as exc:
            raise IsolationUnavailable(f"cannot create the placeholder for protected path {path}: {exc}") from None
        st = _lstat(dir_fd, name)
        if st is None:
            raise IsolationUnavailable(f"protected path {path} vanished while it was being protected")
        return st

    # ------------------------------------------------------------ deny paths

    def deny(self, rel: str) -> bool | None:
        """Pin the parents of ``rel`` and take it to be covered; is it a directory? (None: missing)."""
        parts = [p for p in rel.split("/") if p]
        dir_fd, path = self._root_fd, ""
        for i, name in enumerate(parts):
            path = f"{path}/{name}" if path else name
            st = _lstat(dir_fd, name)
            if st is None or (i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode)):
                return None
            fd = self._open(dir_fd, name, path, st)
            if i < len(parts) - 1:
                self._add(path, PIN, fd, True)
                dir_fd = fd
            else:
                self._add(path, DENY, fd, stat.S_ISDIR(st.st_mode))
                self._audit(fd, path, st, protected=False)
                return stat.S_ISDIR(st.st_mode)
        return None

    # ------------------------------------------------------------ results

    def ordered(self) -> list[Mount]:
        """The mounts, parents first; pins and freezes below a frozen or denied entry dropped."""
        self._check_links()
        out = []
        for mount in sorted(self.mounts.values(), key=lambda m: (m.depth, m.rel)):
            above = [a for a in _ancestors(mount.rel) if a in self.mounts and self.mounts[a].kind != PIN]
            if above and mount.kind != DENY:
                continue
            out.append(mount)
        return out

    # ------------------------------------------------------------ helpers

    def _add(self, rel: str, kind: str, fd: int, is_dir: bool) -> None:
        old = self.mounts.get(rel)
        if old is None or _STRENGTH[kind] > _STRENGTH[old.kind]:
            self.mounts[rel] = Mount(rel, kind, fd if old is None else old.fd, is_dir)

    def _covered(self, path: str) -> bool:
        return any(self.mounts.get(a) is not None and self.mounts[a].kind != PIN for a in (*_ancestors(path), path))

    def _open(self, dir_fd: int, name: str, path: str, st: os.stat_result) -> int:
        """An O_PATH descriptor of ``name`` that is the entry ``st`` describes (never a symlink)."""
        if stat.S_ISLNK(st.st_mode):
            raise _refuse(self.root, path, "is a symlink")
        existing = self.mounts.get(path)
        if existing is not None:
            return existing.fd
        try:
            fd = os.open(name, _O_PATH, dir_fd=dir_fd)
        except OSError as exc:
            raise IsolationUnavailable(f"cannot open {path} in {self.root}: {exc}") from None
        got = os.fstat(fd)
        if (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino) or stat.S_ISLNK(got.st_mode):
            os.close(fd)
            raise _refuse(self.root, path, "changed while it was being protected")
        self._fds.append(fd)
        return fd

    def _names(self, dir_fd: int) -> list[str]:
        try:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            return []
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def _audit(self, fd: int, path: str, st: os.stat_result, *, protected: bool) -> None:
        """Count the links of every file at or below a frozen/denied entry; no symlinks in a protected one."""
        if not stat.S_ISDIR(st.st_mode):
            self._count(st)
            return
        try:
            top = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        except OSError as exc:
            raise IsolationUnavailable(f"cannot read {path} in {self.root}: {exc}") from None
        try:
            for rel, name, entry in _entries(top):
                self._checked += 1
                if self._checked > MAX_CHECKED:
                    raise _refuse(self.root, path, f"holds more than {MAX_CHECKED} entries to check")
                if stat.S_ISLNK(entry.st_mode) and protected:
                    raise _refuse(self.root, f"{path}/{rel}{name}", "is a symlink inside a protected directory")
                if not stat.S_ISDIR(entry.st_mode):
                    self._count(entry)
        finally:
            os.close(top)

    def _count(self, st: os.stat_result) -> None:
        seen = self._inodes.setdefault((st.st_dev, st.st_ino), [st.st_nlink, 0])
        seen[1] += 1

    def _check_links(self) -> None:
        for (_dev, ino), (links, seen) in self._inodes.items():
            if links > seen:
                raise IsolationUnavailable(
                    f"a protected or denied file in {self.root} (inode {ino}) has {links - seen} hard link(s) "
                    "elsewhere, through which it could be read or changed; remove those links"
                )


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _entries(top: int) -> Iterator[tuple[str, str, os.stat_result]]:
    """(directory relative to ``top`` with a trailing '/', name, lstat) of everything below it."""
    for dirpath, dirnames, filenames, dfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
        rel = "" if dirpath == "." else dirpath[2:] + "/"
        for name in (*dirnames, *filenames):
            yield rel, name, os.stat(name, dir_fd=dfd, follow_symlinks=False)


def _ancestors(rel: str) -> list[str]:
    """The directories above ``rel`` (a clean relative path), nearest first: ``a/b/c`` -> ``a/b``, ``a``.

    String slicing, not ``PurePosixPath.parents``: a launch asks this over a thousand times
    (0.45 ms of a strict spawn's host work, through pathlib)."""
    out = []
    end = rel.rfind("/")
    while end > 0:
        out.append(rel[:end])
        end = rel.rfind("/", 0, end)
    return out


def _refuse(root: str, path: str, why: str) -> IsolationUnavailable:
    return IsolationUnavailable(
        f"{path} in {root} {why}; the worker does not start (remove it, or take it out of "
        "strict.protected_paths / strict.deny_paths)"
    )
