"""The strict profile's seccomp filter, compiled on the host with libseccomp and loaded by bwrap.

Default action: allow. Denied calls fail with EPERM (``clone3`` with ENOSYS so that glibc
falls back to ``clone``, whose flags we can inspect), never kill, so tools print a clear
error. ``bwrap --seccomp FD`` installs the program just before it execs the worker, so it
is in force before the first line of worker code runs, in every descendant.

Sockets: AF_INET and AF_INET6 (confined by the network namespace, which has only its own
loopback), AF_UNIX (see below) and AF_NETLINK with the NETLINK_ROUTE protocol only, which
``getifaddrs()`` needs (Node's ``os.networkInterfaces()``, ``ip addr``, glibc's
``AI_ADDRCONFIG``) and which answers about the sandbox's own namespace. Every other netlink
protocol (audit, uevents, sock_diag, netfilter, generic...), AF_VSOCK (the hypervisor, on
a VM), AF_PACKET, AF_ALG and the rest fail with EPERM.

AF_UNIX (``unix_sockets``, the default): sandbox-internal sockets work
(``multiprocessing.Manager``, the ``forkserver`` start method, git's fsmonitor, an
ssh-agent inside). Host sockets stay unreachable by other means: abstract names are per
network namespace (and Landlock ABI 6 scopes them), a path socket is reachable only if it
lies in a tree mounted into the sandbox, which Landlock ABI 9 refuses
(``LANDLOCK_ACCESS_FS_RESOLVE_UNIX``) and the launcher checks on older kernels
(:mod:`sandbox_core.isolation.sockets`). With ``unix_sockets`` off, the old rule holds:
AF_UNIX fails with EPERM except ``socketpair(AF_UNIX, SOCK_STREAM)``, which asyncio's
self-pipe needs (connected at birth, so it can never reach a socket file); datagram and
seqpacket pairs are denied, since a datagram socket can ``sendto`` any path.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sandbox_core.errors import IsolationUnavailable
from sandbox_core.isolation import probes
from sandbox_core.isolation.probes import sha256
from sandbox_core.valueclass import dataclass

# fmt: off
DENY: tuple[str, ...] = (
    # another process's memory, and kernel attack surface that no tool needs
    "ptrace", "process_vm_readv", "process_vm_writev",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # namespaces and mounts
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "mount_setattr",
    "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
    # kernel keyrings, eBPF, perf, modules, kexec, userfaultfd, file handles
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "userfaultfd", "open_by_handle_at",
    # privileged knobs (already refused without capabilities; denied again for depth)
    "acct", "swapon", "swapoff", "reboot", "syslog", "quotactl", "iopl", "ioperm",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "vhangup",
)
# fmt: on

ALLOWED_FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK})
"""Families always allowed (AF_NETLINK with :data:`NETLINK_PROTOCOLS` only); AF_UNIX per config."""
NETLINK_PROTOCOLS = frozenset({0})
"""NETLINK_ROUTE: interface and address lists of the sandbox's own network namespace."""
_NETLINK_MAX_PROTOCOL = 32
_MAX_FAMILY = 64
_ALL_NS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
"""CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET."""
_LOW32 = 0xFFFFFFFF
_SOCK_TYPE_MASK = 0xF
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C
_PERSONALITY_BAD = (0x0040000, 0x0100000, 0x0400000)
"""ADDR_NO_RANDOMIZE, MMAP_PAGE_ZERO, READ_IMPLIES_EXEC."""


@dataclass(frozen=True)
class Program:
    """A compiled BPF program and a summary of its rules for the handshake report."""

    bpf: bytes
    denied: tuple[str, ...]
    unknown: tuple[str, ...] = ()
    rules: int = 0
    sockets: str = ""

    def summary(self) -> dict[str, Any]:
        """What the isolation report says about this filter."""
        return {
            "engine": "libseccomp via pyseccomp, loaded by bwrap --seccomp",
            "action": "EPERM",
            "rules": self.rules,
            "bpf_bytes": len(self.bpf),
            "denied": list(self.denied),
            "sockets": self.sockets,
            "clone": "namespace flags EPERM; clone3 ENOSYS (glibc falls back to clone)",
            **({"unknown_to_libseccomp": list(self.unknown)} if self.unknown else {}),
        }


@functools.cache
def program(unix_sockets: bool = True, cache: Path | None = None) -> Program:
    """The filter for this setting, compiled once per process, and kept in ``cache`` (a
    :func:`probes.cache_dir`) for the next one.

    Compiling means loading pyseccomp, ctypes and libseccomp first: 8-15 ms of every fresh host
    process before its first strict spawn (a one-shot ``sandbox exec`` pays them before its
    worker can start). A kept program is believed only from a file :func:`probes.read_record`
    trusts, made from this very module's source (its digest), for the same setting and machine,
    by the same pyseccomp and libseccomp files (their identities, checked again on every read:
    an upgraded library compiles anew).
    """
    source = _source_digest()
    path = cache / f"seccomp-{source[:24]}-{int(unix_sockets)}.json" if cache is not None else None
    if cache is not None and path is not None:
        kept = _kept(cache, path, source, unix_sockets)
        if kept is not None:
            return kept
    try:
        with _loader_sonames():
            import pyseccomp as sc
    except (ImportError, OSError) as exc:
        raise IsolationUnavailable(
            f"seccomp needs the PyPI package 'pyseccomp' and libseccomp.so.2 ({exc}); "
            "install them with `pip install pyseccomp` and `apt-get install libseccomp2`"
        ) from None
    try:
        compiled = _compile(sc, unix_sockets)
    except OSError as exc:
        raise IsolationUnavailable(f"cannot build the seccomp filter: {exc}") from None
    if path is not None:
        _keep(path, source, unix_sockets, [str(sc.__file__), *_loaded("libseccomp.so")], compiled)
    return compiled


def _source_digest() -> str:
    with open(__file__, "rb") as fh:
        return sha256(fh.read()).hexdigest()


def _loaded(name: str) -> list[str]:
    """The files of this process's mapped shared objects whose name starts with ``name``."""
    found: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            path = line.rstrip("\n").partition("/")[2]
            if path and os.path.basename("/" + path).startswith(name):
                found.add("/" + path)
    return sorted(found)


def _key(source: str, unix_sockets: bool) -> dict[str, object]:
    return {"kind": "seccomp", "source": source, "unix_sockets": unix_sockets, "machine": os.uname().machine}


def _keep(path: Path, source: str, unix_sockets: bool, files: list[str], compiled: Program) -> None:
    if len(files) < 2:  # no libseccomp among the mappings: nothing to tie the program to
        return
    try:
        identities = {name: probes.identity_of(name) for name in files}
    except OSError:
        return
    probes.write_record(path, {**_key(source, unix_sockets), "files": identities, "bpf": compiled.bpf.hex(),
                               "denied": list(compiled.denied), "unknown": list(compiled.unknown),
                               "rules": compiled.rules, "sockets": compiled.sockets})  # fmt: skip


def _kept(directory: Path, path: Path, source: str, unix_sockets: bool) -> Program | None:
    record = probes.read_record(directory, path)
    if record is None or {k: record.get(k) for k in _key(source, unix_sockets)} != _key(source, unix_sockets):
        return None
    files, bpf, denied, unknown = record.get("files"), record.get("bpf"), record.get("denied"), record.get("unknown")
    rules, sockets = record.get("rules"), record.get("sockets")
    if not (isinstance(files, dict) and len(files) >= 2 and isinstance(bpf, str) and isinstance(denied, list)
            and isinstance(unknown, list) and isinstance(rules, int) and isinstance(sockets, str)):  # fmt: skip
        return None
    try:
        if any(probes.identity_of(str(name)) != identity for name, identity in files.items()):
            return None
        program = bytes.fromhex(bpf)
    except (OSError, ValueError):
        return None
    if not program or len(program) % 8:  # whole sock_filter instructions, or it was not ours
        return None
    return Program(bpf=program, denied=tuple(map(str, denied)), unknown=tuple(map(str, unknown)), rules=rules,
                   sockets=sockets)  # fmt: skip


_SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}
"""What ``ctypes.util.find_library`` answers for the libraries pyseccomp loads, on glibc."""


@contextlib.contextmanager
def _loader_sonames() -> Iterator[None]:
    """While pyseccomp is imported, ``find_library("c")`` and ``find_library("seccomp")`` answer
    with the soname when the dynamic loader itself resolves it (the same answer, from the same
    ``ld.so.cache``) instead of running ``/sbin/ldconfig -p`` twice: two fork+execs that every
    host process paid before its first strict worker. Any other name, or a soname that does not
    load, goes to the real lookup."""
    import ctypes
    import ctypes.util

    real = ctypes.util.find_library

    def find_library(name: str) -> str | None:
        soname = _SONAMES.get(name)
        if soname is not None:
            try:
                ctypes.CDLL(soname)
            except OSError:
                pass
            else:
                return soname
        return real(name)

    ctypes.util.find_library = find_library
    try:
        yield
    finally:
        ctypes.util.find_library = real


def _compile(sc: Any, unix_sockets: bool) -> Program:
    flt = sc.SyscallFilter(sc.ALLOW)
    flt.set_attr(sc.Attr.ACT_BADARCH, sc.ERRNO(errno.ENOSYS))
    with contextlib.suppress(OSError):  # libseccomp >= 2.5: a binary tree, O(log n) per syscall
        flt.set_attr(sc.Attr.CTL_OPTIMIZE, 2)
    eperm = sc.ERRNO(errno.EPERM)
    rules = 0
    denied: list[str] = []
    unknown: list[str] = []

    def add(action: int, name: str, *args: Any) -> None:
        nonlocal rules
        if sc.resolve_syscall(sc.Arch.NATIVE, name) < 0:
            if name not in unknown:
                unknown.append(name)
            return
        flt.add_rule(action, name, *args)
        rules += 1
        if name not in denied:
            denied.append(name)

    for name in DENY:
        add(eperm, name)
    add(sc.ERRNO(errno.ENOSYS), "clone3")
    for bit in _bits(_ALL_NS):
        add(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, bit, bit))
    # The kernel reads these arguments as 32-bit ints: compare the low 32 bits only,
    # or a value with junk in the upper half would slip past an exact match.
    families = ALLOWED_FAMILIES | ({socket.AF_UNIX} if unix_sockets else set())
    for family in range(_MAX_FAMILY):
        if family not in families:
            add(eperm, "socket", sc.Arg(0, sc.MASKED_EQ, _LOW32, family))
    for protocol in range(_NETLINK_MAX_PROTOCOL):
        if protocol not in NETLINK_PROTOCOLS:
            add(eperm, "socket", sc.Arg(0, sc.MASKED_EQ, _LOW32, socket.AF_NETLINK),
                sc.Arg(2, sc.MASKED_EQ, _LOW32, protocol))  # fmt: skip
    # a protocol number beyond the table: refused too (the kernel knows none there today)
    add(eperm, "socket", sc.Arg(0, sc.MASKED_EQ, _LOW32, socket.AF_NETLINK),
        sc.Arg(2, sc.GE, _NETLINK_MAX_PROTOCOL))  # fmt: skip
    if not unix_sockets:
        for sock_type in (socket.SOCK_DGRAM, socket.SOCK_SEQPACKET, socket.SOCK_RAW, socket.SOCK_RDM):
            add(
                eperm,
                "socketpair",
                sc.Arg(0, sc.MASKED_EQ, _LOW32, socket.AF_UNIX),
                sc.Arg(1, sc.MASKED_EQ, _SOCK_TYPE_MASK, int(sock_type)),
            )
    for request in (_TIOCSTI, _TIOCLINUX):
        add(eperm, "ioctl", sc.Arg(1, sc.MASKED_EQ, _LOW32, request))
    # personality(): refuse ASLR-off / exec-implies-read / page-zero, but keep the query
    # personality(0xffffffff): a value with bit b set and any other bit clear is denied.
    for bad in _PERSONALITY_BAD:
        for other in range(32):
            if (1 << other) != bad:
                add(eperm, "personality", sc.Arg(0, sc.MASKED_EQ, bad | (1 << other), bad))
    with _memfd("sandbox-seccomp-build") as fh:
        flt.export_bpf(fh)
        fh.seek(0)
        bpf = fh.read()
    sockets = "AF_INET/AF_INET6, AF_NETLINK (NETLINK_ROUTE only), " + (
        "AF_UNIX (host sockets unreachable: own network namespace, Landlock, launch check)"
        if unix_sockets
        else "socketpair(AF_UNIX, SOCK_STREAM) only"
    )
    return Program(bpf=bpf, denied=tuple(denied), unknown=tuple(unknown), rules=rules, sockets=sockets)


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(mask.bit_length()) if mask >> i & 1]


def _memfd(name: str) -> Any:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    return os.fdopen(fd, "w+b", buffering=0)
