"""Which Unix socket a client trusts as the service, checked before a single byte is sent.

A socket path names whoever managed to bind it first: on a shared machine another user can
listen where the service is expected and read a client's argv and stdin, or send back forged
output. So a client (:func:`open_checked` for the path, :func:`check_peer` for the
connection) accepts a socket only if

* no component of its path is a symbolic link;
* every directory on the way is owned by a trusted uid and not writable by group or others
  (unless sticky, like ``/tmp``), and the socket's own directory is not writable by them even
  if sticky;
* the socket is owned by a trusted uid;
* the process listening on it (``SO_PEERCRED`` of the very connection that will carry the
  request) runs as a trusted uid.

Trusted uids are root, the client's own uid and ``service.server_uids``. The directory is
held open while the client connects, and the connect names it as ``/proc/self/fd/N/NAME``,
so the checked directory is the one connected through; the peer check is the final word.
"""

from __future__ import annotations

import _socket  # the C type ``socket.socket`` wraps: the module's enum constants cost ~15 ms at import
import errno
import os
import pwd
import stat
import sys

from sandbox_core.errors import UntrustedService

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: a one-shot client starts faster
if TYPE_CHECKING:
    import socket
    from collections.abc import Iterable
    from typing import TypeVar

    StrPath = str | os.PathLike[str]
    _S = TypeVar("_S", bound=_socket.socket)

_SERVER_UIDS = "service.server_uids"
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def trusted_uids(server_uids: Iterable[str | int] = ()) -> frozenset[int]:
    """Root, this process's uid and the configured ``service.server_uids``."""
    return frozenset({0, os.getuid(), *(int(uid) for uid in server_uids)})


def _who(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _refuse(path: str, what: str, fix: str) -> UntrustedService:
    return UntrustedService(f"refusing the service socket {path}: {what}; nothing was sent",
                            data={"path": path, "fix": fix})


def _trust_fix(uid: int) -> str:
    return (f"if {_who(uid)} really runs your service, add {uid} to {_SERVER_UIDS} in the config; "
            "else remove it, or use --local to run in-process")


def _check_dir(path: str, st: os.stat_result, trusted: frozenset[int], *, parent: bool) -> str | None:
    """Why the directory ``path`` (its ``fstat`` is ``st``) cannot be trusted, or None."""
    if st.st_uid not in trusted:
        return f"{path} is owned by {_who(st.st_uid)}, not by root or you"
    writable = st.st_mode & 0o022
    if writable and (parent or not st.st_mode & stat.S_ISVTX):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _open_dir(at: int, name: str, where: str, socket_path: str) -> int:
    """``name`` below the directory ``at``, opened without following a symlink."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=at)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        if stat.S_ISLNK(os.stat(name, dir_fd=at, follow_symlinks=False).st_mode):
            real = os.path.realpath(socket_path)
            raise _refuse(socket_path, f"{where} is a symbolic link",
                          f"name the socket by its real path ({real}) in --connect, "
                          "SANDBOX_URL, XDG_RUNTIME_DIR or service.socket_path") from None
        raise


class CheckedPath:
    """A socket path that passed the checks, its directory held open: ``with`` it, connect to the address.

    Raises :class:`UntrustedService` for a path that is not safe to trust, and
    ``FileNotFoundError`` (an ``OSError``) when there is no socket to connect to. The
    address names the socket through the held directory (``/proc/self/fd/N/NAME``).
    """

    def __init__(self, path: StrPath, trusted: frozenset[int]) -> None:
        self.path = os.path.normpath(os.fspath(path))
        name = os.path.basename(self.path)
        if not self.path.startswith("/") or name in ("", "..", "."):
            raise _refuse(self.path, "not an absolute path of a socket", "name the socket by its absolute path")
        self._fd = os.open("/", _DIR_FLAGS)
        try:
            self.address = self._check(name, trusted)
        except BaseException:
            os.close(self._fd)
            raise

    def _check(self, name: str, trusted: frozenset[int]) -> str:
        where = "/"
        for part in os.path.dirname(self.path).split("/")[1:]:
            if not part:
                continue
            why = _check_dir(where, os.fstat(self._fd), trusted, parent=False)
            if why is not None:
                raise _refuse(self.path, why, "use a socket in a directory only root or you can write")
            where = os.path.join(where, part)
            inner = _open_dir(self._fd, part, where, self.path)
            os.close(self._fd)
            self._fd = inner
        st = os.fstat(self._fd)
        why = _check_dir(where, st, trusted, parent=True)
        if why is not None:
            fix = _trust_fix(st.st_uid) if st.st_uid not in trusted else f"chmod go-w {where}"
            raise _refuse(self.path, why, fix)
        entry = os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        if stat.S_ISLNK(entry.st_mode):
            raise _refuse(self.path, "it is a symbolic link",
                          f"name the socket by its real path ({os.path.realpath(self.path)})")
        if not stat.S_ISSOCK(entry.st_mode):
            raise _refuse(self.path, "it is not a socket", "point --connect or service.socket_path at the socket")
        if entry.st_uid not in trusted:
            raise _refuse(self.path, f"it is owned by {_who(entry.st_uid)}, not by root or you",
                          _trust_fix(entry.st_uid))
        pinned = f"/proc/self/fd/{self._fd}/{name}"
        return pinned if os.path.isdir(f"/proc/self/fd/{self._fd}") else self.path

    def __enter__(self) -> str:
        return self.address

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


def open_checked(path: StrPath, trusted: frozenset[int]) -> CheckedPath:
    """Check ``path``; ``with`` the answer, connect to the address it gives (see :class:`CheckedPath`)."""
    return CheckedPath(path, trusted)


def peer_uid(sock: _socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (Linux ``SO_PEERCRED``)."""
    if sock.family != _socket.AF_UNIX or not hasattr(_socket, "SO_PEERCRED"):
        return None
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)  # struct ucred: pid, uid, gid
    return int.from_bytes(creds[4:8], sys.byteorder, signed=True)


def check_peer(sock: _socket.socket, path: StrPath, trusted: frozenset[int]) -> None:
    """Raise :class:`UntrustedService` unless the process listening on ``sock`` runs as a trusted uid."""
    uid = peer_uid(sock)
    if uid is None:
        raise _refuse(os.fspath(path), "the peer's uid cannot be read (SO_PEERCRED)", "run the CLI on Linux")
    if uid not in trusted:
        raise _refuse(os.fspath(path), f"the process listening on it runs as {_who(uid)}, not as root or you",
                      _trust_fix(uid))


def _connect(sock: _S, path: StrPath, trusted: frozenset[int], timeout: float | None) -> _S:
    try:
        with open_checked(path, trusted) as address:
            sock.settimeout(timeout)
            sock.connect(address)
            check_peer(sock, path, trusted)
    except BaseException:
        sock.close()
        raise
    return sock


def connect_unix(path: StrPath, trusted: frozenset[int], timeout: float | None) -> _socket.socket:
    """A C-level socket (no ``makefile``) connected to the service at ``path`` after every check (blocking).

    The one-shot client's connection; :func:`connect_checked` gives a ``socket.socket``.
    """
    return _connect(_socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM), path, trusted, timeout)


def connect_checked(path: StrPath, trusted: frozenset[int], timeout: float = 1.0) -> socket.socket:
    """A ``socket.socket`` connected to the service at ``path`` after every check (blocking; for a probe)."""
    import socket

    return _connect(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), path, trusted, timeout)
