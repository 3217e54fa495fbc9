"""Tar streams of a tree, packed and unpacked through descriptors, never following a symlink.

The files crossing (``sandbox cp``, ``pool.files``, the service's file routes) moves trees as
POSIX tar streams. Both ends use this module: inside the sandbox (as the user's uid, packing
or unpacking in the workspace) and on the host (packing what the caller names, unpacking what
a sandbox sent). A stream from the other side is untrusted, so unpacking:

* walks every path from a directory descriptor, one component at a time, with
  ``O_NOFOLLOW``: a symlink on the way is an error, never a detour (a symlink planted where a
  directory is expected cannot redirect a write);
* replaces an entry by writing a temporary file beside it and renaming it over, so an existing
  symlink or hard link at the destination is replaced, never written through;
* takes names that stay below the destination only (no absolute path, no ``..``), regular
  files, directories and symlinks only (kept as they are, never followed), modes without
  setuid, setgid or sticky bits; ownership is whoever unpacks;
* counts bytes and entries against the caller's limits, and turns a full disk or quota
  (``ENOSPC``/``EDQUOT``) into a :class:`TransferError` that says so.

Packing opens each entry the same way (``O_NOFOLLOW``, ``fstat`` of what was opened) and stores
symlinks as symlinks.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
STREAM_BUFFER = 64 * 1024
"""Bytes tarfile moves per read or write of the stream, and the size of every read of a
member's data (:data:`_CHUNK`). tarfile's default, 10 KiB, costs a system call per 10 KiB on
the worker's pipes; but bigger is not better: a stream-mode read joins tarfile's read-ahead
with what it reads and slices both apart again, so a read size other than this buffer copies
the read-ahead over and over, and a buffer above malloc's mmap threshold (128 KiB) is fresh
memory on every copy, paid in page faults. Measured on 256 MiB through the inside helper:
put 0.73 s with 256 KiB reads of a 1 MiB buffer, 0.23 s at 64 KiB for both; get 0.69 s with
a 1 MiB buffer, 0.20 s at 64 KiB (``cat`` through a pipe: 0.36 s)."""
_CHUNK = STREAM_BUFFER
QUOTA_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class TransferError(Exception):
    """A transfer that cannot be done as asked; ``reason`` is a short machine word."""

    def __init__(self, message: str, reason: str = "refused", path: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.path = path


@dataclass
class Summary:
    """What an unpack or a pack did."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"files": self.files, "dirs": self.dirs, "symlinks": self.symlinks, "bytes": self.bytes,
                "skipped": self.skipped[:20]}


def split_path(path: str) -> list[str]:
    """The components of a relative path below a root (``.`` and empty parts dropped), or
    TransferError for an absolute path, ``..`` or a NUL."""
    if "\0" in path:
        raise TransferError(f"{path!r}: a name holds a NUL byte", "bad_name", path)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if path.startswith("/") or ".." in parts:
        raise TransferError(f"{path!r}: names must stay below the destination (no leading / or ..)",
                            "bad_name", path)
    return parts


def open_dir(root_fd: int, parts: list[str], *, create: bool = False) -> int:
    """A descriptor of the directory ``parts`` below ``root_fd``, walked without following
    symlinks (and made, 0700, where missing when ``create``)."""
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise TransferError(f"{'/'.join(parts[: i + 1])}: no such directory", "not_found",
                                        "/".join(parts[: i + 1])) from None
                _mkdir(part, fd, "/".join(parts[: i + 1]))
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise TransferError(f"{'/'.join(parts[: i + 1])}: not a directory (symlinks are never "
                                        "followed)", "not_a_directory", "/".join(parts[: i + 1])) from None
                raise _os_error(exc, "/".join(parts[: i + 1])) from None
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _mkdir(name: str, dir_fd: int, shown: str) -> None:
    try:
        os.mkdir(name, 0o700, dir_fd=dir_fd)
    except FileExistsError:
        pass
    except OSError as exc:
        raise _os_error(exc, shown) from None


def _os_error(exc: OSError, path: str) -> TransferError:
    code = errno.errorcode.get(exc.errno or 0, "EIO")
    if exc.errno in QUOTA_ERRNOS:
        return TransferError(f"{path}: disk quota exceeded ({code}: {os.strerror(exc.errno or 0)})", "quota", path)
    return TransferError(f"{path}: {os.strerror(exc.errno or 0)} ({code})", code.lower(), path)


def lstat_at(root_fd: int, path: str) -> os.stat_result:
    """``lstat`` of ``path`` below ``root_fd`` (parents walked without following symlinks)."""
    parts = split_path(path)
    if not parts:
        return os.fstat(root_fd)
    parent = open_dir(root_fd, parts[:-1])
    try:
        return os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        raise TransferError(f"{path}: no such file or directory", "not_found", path) from None
    finally:
        os.close(parent)


# ---------------------------------------------------------------- unpacking


@dataclass
class Limits:
    max_bytes: int = 0
    """File bytes one stream may write (0 = no limit)."""
    max_entries: int = 0
    """Entries one stream may hold (0 = no limit)."""


def unpack(stream: IO[bytes], root_fd: int, into: list[str], *, rename: str | None = None,
           limits: Limits | None = None) -> Summary:  # fmt: skip
    """Unpack the tar ``stream`` into directory ``into`` below ``root_fd`` (made if missing).

    With ``rename`` the first component of every name becomes ``rename`` (copying ``src`` to a
    destination that does not exist yet names it so, as ``cp -r`` and ``docker cp`` do).
    """
    limits = limits or Limits()
    summary = Summary()
    dirs: list[tuple[list[str], int, int]] = []
    base = open_dir(root_fd, into, create=True)
    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=STREAM_BUFFER) as archive:
            for member in archive:
                parts = split_path(member.name)
                if not parts:
                    continue
                if rename is not None:
                    parts[0] = rename
                count = summary.files + summary.dirs + summary.symlinks + 1
                if limits.max_entries and count > limits.max_entries:
                    raise TransferError(f"more than {limits.max_entries} entries", "too_many_entries")
                shown = "/".join(parts)
                if member.isdir():
                    parent = open_dir(base, parts[:-1], create=True)
                    try:
                        _mkdir(parts[-1], parent, shown)
                        try:
                            fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
                        except OSError:
                            raise TransferError(f"{shown}: exists and is not a directory", "exists", shown) from None
                        os.fchmod(fd, 0o700)  # writable while we fill it; its own mode at the end
                        os.close(fd)
                    finally:
                        os.close(parent)
                    dirs.append((parts, member.mode & 0o777, int(member.mtime)))
                    summary.dirs += 1
                elif member.isreg():
                    if limits.max_bytes and summary.bytes + member.size > limits.max_bytes:
                        raise TransferError(f"{shown}: the transfer is larger than {limits.max_bytes} bytes",
                                            "too_large", shown)
                    source = archive.extractfile(member)
                    assert source is not None
                    _write_file(base, parts, source, member)
                    summary.files += 1
                    summary.bytes += member.size
                elif member.issym():
                    _place(base, parts, lambda name, fd, link=member.linkname: os.symlink(link, name, dir_fd=fd))
                    summary.symlinks += 1
                else:
                    kind = "hard link" if member.islnk() else "device, fifo or other special file"
                    raise TransferError(f"{shown}: a {kind} is not transferred", "unsupported", shown)
        for parts, mode, mtime in reversed(dirs):  # deepest first: a read-only dir last
            fd = open_dir(base, parts)
            try:
                os.utime(fd, (mtime, mtime))
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
    except tarfile.TarError as exc:
        raise TransferError(f"not a tar stream ({exc})", "bad_archive") from None
    finally:
        os.close(base)
    return summary


def _temp_name(name: str) -> str:
    return f".{name[:40]}.sbx-{secrets.token_hex(4)}"


def _place(base: int, parts: list[str], make: object) -> None:
    """Make an entry under a temporary name with ``make(name, dir_fd)``, then rename it over
    ``parts`` (an existing file or symlink is replaced, never followed)."""
    parent = open_dir(base, parts[:-1], create=True)
    tmp = _temp_name(parts[-1])
    try:
        try:
            make(tmp, parent)  # type: ignore[operator]
            _rename_over(tmp, parts[-1], parent, "/".join(parts))
        except OSError as exc:
            raise _os_error(exc, "/".join(parts)) from None
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=parent)
        except OSError:
            pass
        raise
    finally:
        os.close(parent)


def _rename_over(tmp: str, name: str, parent: int, shown: str) -> None:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise TransferError(f"{shown}: exists and is a directory", "exists", shown)
    os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)


def _write_file(base: int, parts: list[str], source: IO[bytes], member: tarfile.TarInfo) -> None:
    def make(name: str, parent: int) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
        try:
            while chunk := source.read(_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fchmod(fd, member.mode & 0o777)
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)

    _place(base, parts, make)


# ---------------------------------------------------------------- packing


class _Exact:
    """A file object that yields exactly ``size`` bytes of ``fd`` (zeros if it shrank)."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd, self._left = fd, size

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if n < 0 else min(n, self._left)
        data = os.read(self._fd, want) or bytes(want)
        self._left -= len(data)
        return data


def pack(out: IO[bytes], root_fd: int, path: str, *, arcname: str | None = None,
         limits: Limits | None = None) -> Summary:  # fmt: skip
    """Write a tar stream of ``path`` below ``root_fd`` (recursively; symlinks as symlinks) to ``out``.

    Entries are named ``arcname`` (default: the last component of ``path``, or ``.`` for the
    root itself) and what is below it. Sockets, fifos and devices are skipped and listed.
    """
    limits = limits or Limits()
    parts = split_path(path)
    summary = Summary()
    name = arcname if arcname is not None else (parts[-1] if parts else ".")
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=STREAM_BUFFER) as archive:
        archive.copybufsize = STREAM_BUFFER  # type: ignore[attr-defined]  # (typeshed lacks it; TarFile has it)
        if not parts:
            _pack_dir(archive, os.dup(root_fd), name, summary, limits)
            return summary
        parent = open_dir(root_fd, parts[:-1])
        try:
            _pack_entry(archive, parent, parts[-1], name, summary, limits)
        finally:
            os.close(parent)
    return summary


def _pack_entry(archive: tarfile.TarFile, parent: int, entry: str, name: str, summary: Summary,
                limits: Limits) -> None:  # fmt: skip
    try:
        st = os.stat(entry, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        raise TransferError(f"{name}: no such file or directory", "not_found", name) from None
    if stat.S_ISLNK(st.st_mode):
        info = _info(name, st, tarfile.SYMTYPE)
        info.linkname = os.readlink(entry, dir_fd=parent)
        archive.addfile(info)
        summary.symlinks += 1
    elif stat.S_ISDIR(st.st_mode):
        try:
            fd = os.open(entry, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise _os_error(exc, name) from None
        _pack_dir(archive, fd, name, summary, limits)
    elif stat.S_ISREG(st.st_mode):
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=parent)
        except OSError as exc:
            raise _os_error(exc, name) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # swapped since the stat
                summary.skipped.append(name)
                return
            if limits.max_bytes and summary.bytes + st.st_size > limits.max_bytes:
                raise TransferError(f"{name}: the transfer is larger than {limits.max_bytes} bytes", "too_large", name)
            archive.addfile(_info(name, st, tarfile.REGTYPE), _Exact(fd, st.st_size))
            summary.files += 1
            summary.bytes += st.st_size
        finally:
            os.close(fd)
    else:
        summary.skipped.append(name)


def _pack_dir(archive: tarfile.TarFile, fd: int, name: str, summary: Summary, limits: Limits) -> None:
    try:
        st = os.fstat(fd)
        archive.addfile(_info(name, st, tarfile.DIRTYPE))
        summary.dirs += 1
        with os.scandir(fd) as it:
            entries = sorted(e.name for e in it)
        for entry in entries:
            _pack_entry(archive, fd, entry, f"{name}/{entry}" if name != "." else entry, summary, limits)
    finally:
        os.close(fd)


def _info(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode) & 0o777
    info.mtime = int(st.st_mtime)
    info.size = st.st_size if kind == tarfile.REGTYPE else 0
    return info


def entry_info(st: os.stat_result, name: str) -> dict[str, object]:
    """One row of a listing or a stat."""
    kind = ("dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
            else "symlink" if stat.S_ISLNK(st.st_mode) else "other")  # fmt: skip
    return {"name": name, "type": kind, "size": st.st_size, "mode": f"{stat.S_IMODE(st.st_mode):04o}",
            "mtime": int(st.st_mtime)}


def chunks_of(read: IO[bytes]) -> Iterator[bytes]:
    while chunk := read.read(_CHUNK):
        yield chunk
