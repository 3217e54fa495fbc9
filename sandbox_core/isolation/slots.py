"""Slots: where a pre-warmed, unbound strict worker gets its user's workspace at claim.

A strict worker normally binds the user's workspace when bwrap builds the sandbox, so no
worker can be started before the user is known. On a root host a worker can instead start
*unbound*: fully confined (namespaces, seccomp, rlimits, cgroups, no network) except for the
per-user parts. Each such worker owns a host-side slot directory::

    <state_dir>/slots/            root, 0700: no sandbox can reach or write any of it
    <state_dir>/slots/<pid>-<id>/ one per worker (<pid>: the orchestrator that made it)
        ws/       a mount point of its own, shared propagation; bwrap binds it at /workspace,
                  where the sandbox sees it as a slave: what the host mounts here later
                  appears inside, nothing the sandbox does comes back
        passwd    bound read-only at /etc/passwd, group at /etc/group: rewritten in place
        group     (same inode) for the user's uid at claim
        void      an empty 0000 file and directory, bound read-only over deny paths
        voiddir

At claim (:meth:`Slot.attach`) the host clones the user's workspace by descriptor
(``open_tree(OPEN_TREE_CLONE|AT_RECURSIVE)``), marks the clone nosuid,nodev
(``mount_setattr``), mounts the workspace's protected, pinned and denied entries onto the
detached clone (each from a descriptor the :class:`~sandbox_core.isolation.protect.TreeGuard`
opened without following symlinks, onto a target opened beneath the clone one component at a
time and checked to be the same inode), and only then moves the finished tree onto ``ws``
(``move_mount``): the sandbox sees the workspace appear at once, with its protections in
place. No step resolves a path inside a tree the sandbox can write: the only paths used are
the slot's own, below a root-only 0700 directory.

:meth:`Slot.release` lazily unmounts everything at ``ws`` (by the slot's host-only path) and
removes the slot; it runs after the worker has exited, whatever happened. :func:`sweep`
removes the slots of orchestrators that are gone.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path

from sandbox_core import ffi
from sandbox_core.errors import IsolationUnavailable
from sandbox_core.valueclass import dataclass

SLOTS_DIR = "slots"
WS, PASSWD, GROUP, VOID, VOID_DIR = "ws", "passwd", "group", "void", "voiddir"

# x86_64 syscall numbers (the same on every architecture that has the new mount API
# through the unified table, which is all of them since 5.2: 428, 429, 442).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
AT_SYMLINK_NOFOLLOW = 0x100
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
AT_FDCWD = -100


class _MountAttr(ffi.Structure):
    """``struct mount_attr`` of ``mount_setattr(2)``."""

    _fields_ = (("attr_set", ffi.c_uint64), ("attr_clr", ffi.c_uint64),
                ("propagation", ffi.c_uint64), ("userns_fd", ffi.c_uint64))  # fmt: skip


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ffi.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def open_tree(dfd: int, path: str, flags: int) -> int:
    return _check(ffi.libc().syscall(ffi.c_long(SYS_OPEN_TREE), ffi.c_int(dfd), path.encode(),
                                     ffi.c_uint32(flags)), "open_tree")  # fmt: skip


def move_mount(from_dfd: int, from_path: str, to_dfd: int, to_path: str, flags: int) -> None:
    _check(ffi.libc().syscall(ffi.c_long(SYS_MOVE_MOUNT), ffi.c_int(from_dfd), from_path.encode(),
                              ffi.c_int(to_dfd), to_path.encode(), ffi.c_uint32(flags)), "move_mount")  # fmt: skip


def mount_setattr(dfd: int, flags: int, attr_set: int, propagation: int = 0) -> None:
    attr = _MountAttr(attr_set, 0, propagation, 0)
    _check(ffi.libc().syscall(ffi.c_long(SYS_MOUNT_SETATTR), ffi.c_int(dfd), b"", ffi.c_uint32(flags | AT_EMPTY_PATH),
                              ffi.byref(attr), ffi.c_size_t(ffi.sizeof(attr))), "mount_setattr")  # fmt: skip


def _mount(source: str | None, target: str, flags: int) -> None:
    src = source.encode() if source is not None else None
    _check(ffi.libc().mount(src, target.encode(), None, ffi.c_ulong(flags), None), f"mount {target}")


def _umount(target: str) -> bool:
    """Lazily unmount the top mount at ``target`` (never following a symlink); False when none is left."""
    if ffi.libc().umount2(target.encode(), ffi.c_int(MNT_DETACH | UMOUNT_NOFOLLOW)) == 0:
        return True
    err = ffi.get_errno()
    if err in (22, 2):  # EINVAL: not a mount point (any more); ENOENT: gone
        return False
    raise OSError(err, f"umount {target}: {os.strerror(err)}")


def unavailable() -> str | None:
    """Why unbound strict workers cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "the host is not root (slots need mount(2) on the host)"
    machine = os.uname().machine  # what platform.machine() answers, without importing platform (~3 ms)
    if machine not in ("x86_64", "aarch64"):
        return f"no verified mount-API syscall numbers for {machine}"
    return None


def slots_root(state_dir: Path) -> Path:
    """``state_dir/slots``, made root-owned 0700 and checked (a symlink or another owner fails closed)."""
    root = state_dir / SLOTS_DIR
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o700:
        raise IsolationUnavailable(f"{root} must be a directory owned by uid {os.geteuid()}, mode 0700",
                                   data={"field": "state_dir", "value": str(state_dir)})
    return root


@dataclass(frozen=True)
class GuardMount:
    """One protected, pinned or denied entry to mount onto the workspace clone."""

    rel: str
    kind: str
    """``freeze`` (read-only onto itself), ``pin`` (read-write onto itself) or ``deny`` (covered)."""
    fd: int
    """An O_PATH descriptor of the entry (opened beneath the workspace, never following a symlink)."""
    is_dir: bool


class Slot:
    """The host side of one unbound worker's attach point."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ws = str(path / WS)
        self.attached = False
        self._released = False
        self._removed = False
        self._releasing = threading.Lock()  # the release after the start and the exit's clean-up may meet

    @classmethod
    def create(cls, state_dir: Path, worker_id: str, *, shared: bool = True) -> Slot:
        """A fresh slot for ``worker_id``: directories, files, and ``ws`` a mount of its own,
        shared (an unbound worker's attach point) or private (a tree built for bwrap to bind,
        :func:`~sandbox_core.isolation.strict.builds_workspace`: unmounting it never reaches
        the sandbox)."""
        if "/" in worker_id or worker_id in ("", ".", ".."):
            raise IsolationUnavailable(f"bad worker id for a slot: {worker_id!r}")
        path = slots_root(state_dir) / f"{os.getpid()}-{worker_id}"
        os.mkdir(path, 0o700)
        slot = cls(path)
        try:
            os.mkdir(slot.ws, 0o555)  # covered at claim; before that nobody writes in it, not even root
            os.chmod(slot.ws, 0o555)
            os.mkdir(path / VOID_DIR, 0o000)
            for name, mode in ((PASSWD, 0o644), (GROUP, 0o644), (VOID, 0o000)):
                fd = os.open(path / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
                os.fchmod(fd, mode)
                os.close(fd)
            # Its own peer group: private first, so it never joins the parent mount's group.
            _mount(slot.ws, slot.ws, MS_BIND)
            _mount(None, slot.ws, MS_PRIVATE)
            if shared:
                _mount(None, slot.ws, MS_SHARED)
        except BaseException:
            slot.release()
            raise
        return slot

    def write_identity(self, passwd: bytes, group: bytes) -> None:
        """Rewrite passwd and group in place (the sandbox's bind holds these inodes)."""
        for name, data in ((PASSWD, passwd), (GROUP, group)):
            fd = os.open(self.path / name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
            finally:
                os.close(fd)

    def attach(self, workspace_fd: int, guards: list[GuardMount]) -> None:
        """Mount the workspace (descriptor ``workspace_fd``) with ``guards`` on it at ``ws``, all or nothing."""
        if self.attached or self._released:
            raise IsolationUnavailable(f"slot {self.path.name} was attached before; a slot serves one user")
        tree = open_tree(workspace_fd, "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH | AT_RECURSIVE)
        try:
            for guard in guards:
                self._mount_guard(tree, guard)
            # Once over the finished tree (its guards' clones carry their source mount's flags).
            mount_setattr(tree, AT_RECURSIVE, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, MS_PRIVATE)
            self.attached = True  # from here on release() has something to undo
            move_mount(tree, "", AT_FDCWD, self.ws, MOVE_MOUNT_F_EMPTY_PATH)
        finally:
            os.close(tree)

    def detach(self) -> None:
        """Take the attached tree (a spare, :mod:`spares`: nobody's) off ``ws`` again, so that a
        user's workspace can be attached; the slot's own mount stays."""
        if not self.attached or self._released:
            return
        if not _umount(self.ws):
            raise IsolationUnavailable(f"slot {self.path.name} had nothing attached to detach")
        self.attached = False

    def _mount_guard(self, tree: int, guard: GuardMount) -> None:
        if guard.kind == "deny":
            void = str(self.path / (VOID_DIR if guard.is_dir else VOID))
            source = open_tree(AT_FDCWD, void, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_SYMLINK_NOFOLLOW)
        else:
            source = open_tree(guard.fd, "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH)
        try:
            if guard.kind != "pin":  # nosuid,nodev: once over the whole tree (attach)
                mount_setattr(source, 0, MOUNT_ATTR_RDONLY)
            target = _beneath(tree, guard.rel)
            try:
                want, got = os.fstat(guard.fd), os.fstat(target)
                if (want.st_dev, want.st_ino) != (got.st_dev, got.st_ino):
                    raise IsolationUnavailable(f"{guard.rel} in the workspace changed while it was being attached")
                move_mount(source, "", target, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)
            finally:
                os.close(target)
        finally:
            os.close(source)

    def release(self) -> None:
        """Detach whatever is mounted at ``ws`` and remove the slot (idempotent; a release that
        failed is tried again by the next call). An unbound worker's slot is released after the
        worker exited; a private one also once its worker has started."""
        with self._releasing:
            self._released = True  # nothing is attached from here on
            if not self._removed:
                release_path(self.path)
                self._removed = True


def _beneath(dir_fd: int, rel: str) -> int:
    """An O_PATH descriptor of ``rel`` below ``dir_fd``, one component at a time, no symlinks."""
    fd = os.dup(dir_fd)
    try:
        for name in (p for p in rel.split("/") if p):
            if name in (".", ".."):
                raise IsolationUnavailable(f"bad workspace entry {rel!r}")
            nxt = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise IsolationUnavailable(f"{rel} in the workspace is a symlink")
    except BaseException:
        os.close(fd)
        raise
    return fd


def release_path(path: Path) -> None:
    """Unmount every layer at ``path/ws`` and remove the slot directory (its own entries only)."""
    ws = str(path / WS)
    for _ in range(64):  # the attached tree, then the slot's own bind; each lazily
        if not _umount(ws):
            break
    for name in (PASSWD, GROUP, VOID):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path / name)
    for name in (WS, VOID_DIR):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(path / name)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


def sweep(state_dir: Path) -> list[str]:
    """Release the slots of orchestrators that no longer run (a crash, SIGKILL); their names."""
    root = state_dir / SLOTS_DIR
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    slots_root(state_dir)  # refuses a root that is not ours
    swept = []
    for name in sorted(names):
        pid, _, _rest = name.partition("-")
        if pid.isdigit() and int(pid) != os.getpid() and os.path.exists(f"/proc/{pid}"):
            continue  # a live orchestrator's
        if pid.isdigit() and int(pid) == os.getpid():
            continue
        release_path(root / name)
        swept.append(name)
    return swept


def mounted_slots() -> list[str]:
    """Mount points below any ``slots/`` directory (for tests: none may be left behind)."""
    with open("/proc/self/mountinfo") as fh:
        return [line.split(" ")[4] for line in fh if f"/{SLOTS_DIR}/" in line.split(" ")[4]]
