"""The strict profile's seccomp filter, compiled on the host with libseccomp and loaded by bwrap.

Default action: allow. Denied calls fail with EPERM (``clone3`` with ENOSYS so that glibc
falls back to ``clone``, whose flags we can inspect), never kill, so tools print a clear
error. ``bwrap --seccomp FD`` installs the program just before it execs the worker, so it
is in force before the first line of worker code runs, in every descendant.

Sockets: only AF_INET, AF_INET6 and AF_NETLINK may be created (all three are confined
by the network namespace); AF_UNIX (host socket files), AF_VSOCK (the hypervisor, on a
VM), AF_PACKET, AF_ALG and the rest fail with EPERM. ``socketpair(AF_UNIX,
SOCK_STREAM)`` stays allowed because asyncio's event loop needs it for its self-pipe:
such a pair is connected at birth, so ``connect``/``sendto`` on it fail with EISCONN
and it can never reach a socket file. Datagram and seqpacket pairs are denied, since a
datagram socket can ``sendto`` any path.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
from dataclasses import dataclass
from typing import Any

from sandbox_core.errors import IsolationUnavailable

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

    def summary(self) -> dict[str, Any]:
        """What the isolation report says about this filter."""
        return {
            "engine": "libseccomp via pyseccomp, loaded by bwrap --seccomp",
            "action": "EPERM",
            "rules": self.rules,
            "bpf_bytes": len(self.bpf),
            "denied": list(self.denied),
            "sockets": "AF_INET/AF_INET6/AF_NETLINK only; socketpair(AF_UNIX, SOCK_STREAM) allowed",
            "clone": "namespace flags EPERM; clone3 ENOSYS (glibc falls back to clone)",
            **({"unknown_to_libseccomp": list(self.unknown)} if self.unknown else {}),
        }


@functools.cache
def program() -> Program:
    """Compile the filter once per process (about a millisecond) and cache its bytes."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as exc:
        raise IsolationUnavailable(
            f"seccomp needs the PyPI package 'pyseccomp' and libseccomp.so.2 ({exc}); "
            "install them with `pip install pyseccomp` and `apt-get install libseccomp2`"
        ) from None
    try:
        return _compile(sc)
    except OSError as exc:
        raise IsolationUnavailable(f"cannot build the seccomp filter: {exc}") from None


def _compile(sc: Any) -> Program:
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
    for family in range(_MAX_FAMILY):
        if family not in ALLOWED_FAMILIES:
            add(eperm, "socket", sc.Arg(0, sc.MASKED_EQ, _LOW32, family))
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
    return Program(bpf=bpf, denied=tuple(denied), unknown=tuple(unknown), rules=rules)


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(mask.bit_length()) if mask >> i & 1]


def _memfd(name: str) -> Any:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    return os.fdopen(fd, "w+b", buffering=0)
