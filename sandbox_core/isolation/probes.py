"""What host tools said when probed (``bwrap --version``, ``bwrap --help``), kept across processes.

Every fresh host process used to run both probes before its first strict launch: two
fork+execs that a one-shot ``sandbox exec`` pays on every call. Their answers are kept in
``<state_dir>/probes/``, one file per probe, named by a digest of the binary's resolved path,
its identity (device, inode, size, mtime and ctime) and the arguments. A binary that is
upgraded, replaced or touched gets a new identity and is probed again.

A cache file is only a hint, so it is trusted only when nobody else could have written it:
the directory is owned by this uid and writable by nobody else, the file is a regular file
(opened without following symlinks) owned by this uid with mode 0600, and it names the same
binary, identity and arguments. Anything else is ignored and replaced, never believed. A
probe that fails is never cached: it runs (and fails closed) again next time.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hashlib import _Hash
    from hashlib import sha256 as _sha256
else:
    try:  # CPython's own SHA-256: hashlib would load OpenSSL for it (~8 ms of a one-shot CLI before its spawn)
        from _sha256 import sha256 as _sha256
    except ImportError:  # pragma: no cover - an interpreter without it
        from hashlib import sha256 as _sha256


def sha256(data: bytes = b"") -> _Hash:
    """``hashlib.sha256(data)``, the same digest, without loading OpenSSL."""
    return _sha256(data)


MAX_BYTES = 256 * 1024
"""A cache file larger than this is not read (``bwrap --help`` is about 4 KiB)."""


def cache_dir(state_dir: Path) -> Path | None:
    """``<state_dir>/probes``, created 0700; None when it is not ours alone (then nothing is cached)."""
    path = state_dir / "probes"
    with contextlib.suppress(OSError):
        path.mkdir(mode=0o700, exist_ok=True)
    return path if _private_dir(path) else None


def probe_output(directory: Path | None, argv: Sequence[str], run: Callable[[], str]) -> str:
    """``run()``'s answer for ``argv`` (``argv[0]`` a binary's path), from ``directory`` when it holds
    a trusted one for the same binary, else run and kept there."""
    if directory is None:
        return run()
    try:
        binary = os.path.realpath(argv[0])
        identity = identity_of(binary)
    except OSError:
        return run()
    record = {"binary": binary, "identity": identity, "argv": list(argv[1:])}
    name = sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]
    path = directory / f"{name}.json"
    cached = read_record(directory, path)
    if cached is not None and {k: cached.get(k) for k in record} == record and isinstance(cached.get("output"), str):
        return str(cached["output"])
    output = run()
    write_record(path, {**record, "output": output})
    return output


def identity_of(path: str) -> str:
    """A file's device, inode, size, mtime and ctime: changed by any upgrade, replacement or touch."""
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _private_dir(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def read_record(directory: Path, path: Path) -> dict[str, object] | None:
    """The record in ``path`` when it can be trusted (see the module's docstring), else None."""
    if not _private_dir(directory):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o600
                or st.st_size > MAX_BYTES):
            return None
        data = json.loads(os.read(fd, MAX_BYTES + 1))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return data if isinstance(data, dict) else None


def write_record(path: Path, record: dict[str, object]) -> None:
    """Write ``record`` to ``path`` atomically (a new 0600 file renamed over whatever was there)."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o600)
            json.dump(record, out)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
