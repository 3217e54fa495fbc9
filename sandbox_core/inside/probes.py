"""Sandbox side of ``sandbox audit-env``: probes that try to reach what the host planted.

Served as the worker method ``audit.probe`` (loaded on first use) and, for the view a
command gets, run as a child program through ``exec`` (:func:`command_main`). Only the
standard library and ctypes are used.

The canary secrets never enter the sandbox. The host sends the SHA-256 of each canary
and the public shape of a canary (:data:`CANARY_RE`); a probe that reads bytes from
anywhere hashes every canary-shaped token in them and reports the label of any digest
that matches. Probes return metadata only (names, sizes, errno names, labels), never
the content they read.

Every probe is bounded in time (helper processes have deadlines and are killed, with
their process group, when they run over) and returns observations; an unexpected error
becomes ``{"error": ...}`` rather than an exception.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox_core.shared import CANARY_RE, MEMORY_HOG_SECONDS, STATIC_PROBES, sha256_hex, unix_address

if TYPE_CHECKING:
    from sandbox_core.inside.channel import RequestContext


_READ_CAP = 1 << 20
HOG_WAIT = MEMORY_HOG_SECONDS + 10.0
"""How long the memory probe waits for its hog: its budget, plus the alarm it sets itself past it."""
_PROC_SCAN_SECONDS = 8.0
_CHILD_SECONDS = 5.0
_CONNECT_SECONDS = 1.0
_PTRACE_SEIZE = 0x4206

Observation = dict[str, Any]


# ---------------------------------------------------------------- canaries


def find_canaries(data: bytes, digests: Mapping[str, str]) -> list[str]:
    """Labels of the canaries (by digest) whose token occurs in ``data``."""
    labels: list[str] = []
    for match in CANARY_RE.finditer(data):
        label = digests.get(sha256_hex(match.group()))
        if label is not None and label not in labels:
            labels.append(label)
    return labels


def _errname(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return f"{type(exc).__name__}: {exc}"


def _read_capped(path: str | Path, limit: int = _READ_CAP) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(limit)


def _status(path: str = "/proc/self/status") -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        text = _read_capped(path).decode(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _ns(kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return None


# ---------------------------------------------------------------- helper processes


def _run_child(code: str, args: Iterable[str] = (), timeout: float = _CHILD_SECONDS) -> Observation:
    """Run ``code`` in a fresh interpreter in its own process group; always reaps it."""
    argv = [sys.executable, "-I", "-S", "-c", code, *args]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        out, err = b"", b""
    finally:
        _kill_group(proc.pid)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    result: Observation = {"returncode": proc.returncode, "timed_out": timed_out}
    if timed_out:
        return result
    lines = out.decode(errors="replace").strip().splitlines()
    if lines:
        try:
            result["output"] = json.loads(lines[-1])
        except ValueError:
            result["output_tail"] = lines[-1][:200]
        result["lines"] = lines[:-1][-5:]
    if err:
        result["stderr_tail"] = err.decode(errors="replace").strip()[-300:]
    return result


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------- probes

Spec = Mapping[str, Any]


def probe_worker_fds(spec: Spec, workspace: Path) -> Observation:
    """The worker's own descriptors, classified (stdio, protocol pipes, event loop)."""
    fds: list[Observation] = []
    for name in sorted(os.listdir("/proc/self/fd"), key=lambda n: int(n) if n.isdigit() else -1):
        if not name.isdigit():
            continue
        fd = int(name)
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            os.fstat(fd)
        except OSError:
            continue  # the directory listing's own descriptor, already closed
        fds.append({"fd": fd, **_classify_fd(fd, target)})
    return {"fds": fds}


def _classify_fd(fd: int, target: str) -> Observation:
    if target.startswith("pipe:"):
        return {"kind": "pipe"}
    if target == "anon_inode:[eventpoll]":
        return {"kind": "eventpoll"}
    if target.startswith("anon_inode:"):
        return {"kind": target.removeprefix("anon_inode:")}
    if target.startswith("socket:"):
        return _classify_socket(fd)
    if target == "/dev/null":
        return {"kind": "devnull"}
    if target.startswith("/dev/pts/") or target == "/dev/tty":
        return {"kind": "tty"}
    if target.startswith("/memfd:"):
        return {"kind": "memfd", "target": target}
    return {"kind": "file", "target": target}


def _classify_socket(fd: int) -> Observation:
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        return {"kind": "socket", "error": _errname(exc)}
    try:
        family = socket.AddressFamily(sock.family).name
        kind = socket.SocketKind(sock.type).name
        try:
            peer = sock.getpeername()
        except OSError:
            peer = None
        if sock.family == socket.AF_UNIX and kind == "SOCK_STREAM" and peer in ("", b""):
            return {"kind": "socketpair"}
        if sock.family == socket.AF_INET and kind == "SOCK_STREAM" and peer is None:
            host, port = sock.getsockname()[:2]
            return {"kind": "listener", "local": f"{host}:{port}"}
        return {"kind": "socket", "family": family, "type": kind, "peer": str(peer)[:120]}
    finally:
        sock.close()


def probe_worker_env(spec: Spec, workspace: Path) -> Observation:
    """Names and value digests of the worker's environment (current and initial)."""
    digests = spec.get("digests", {})
    current = {name: sha256_hex(value) for name, value in os.environ.items()}
    found: list[str] = []
    for value in os.environ.values():
        for label in find_canaries(value.encode(errors="surrogateescape"), digests):
            if label not in found:
                found.append(label)
    initial_names: list[str] = []
    try:
        raw = _read_capped("/proc/self/environ")
        initial_names = sorted({e.split(b"=", 1)[0].decode(errors="replace") for e in raw.split(b"\0") if e})
        for label in find_canaries(raw, digests):
            if label not in found:
                found.append(label)
    except OSError as exc:
        return {"env": current, "initial_error": _errname(exc), "canaries": found}
    return {"env": current, "initial_names": initial_names, "canaries": found}


def probe_caps(spec: Spec, workspace: Path) -> Observation:
    """The worker's credentials and capability sets (from /proc/self/status)."""
    status = _status()
    keys = ("Uid", "Gid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
    return {key: status.get(key) for key in keys}


def probe_proc_scan(spec: Spec, workspace: Path) -> Observation:
    """Scan every visible /proc/<pid>: environ and cmdline for canaries, and which pids exist."""
    digests = spec.get("digests", {})
    deadline = time.monotonic() + _PROC_SCAN_SECONDS
    me = os.getpid()
    pids = sorted(int(n) for n in os.listdir("/proc") if n.isdigit())
    parents: dict[int, int] = {}
    environ: Observation = {"readable": 0, "unreadable": 0, "matches": []}
    cmdline: Observation = {"readable": 0, "unreadable": 0, "matches": []}
    truncated = False
    for pid in pids:
        if time.monotonic() > deadline:
            truncated = True
            break
        ppid = _ppid(pid)
        if ppid is not None:
            parents[pid] = ppid
        for name, bucket in (("environ", environ), ("cmdline", cmdline)):
            try:
                data = _read_capped(f"/proc/{pid}/{name}")
            except OSError:
                bucket["unreadable"] += 1
                continue
            bucket["readable"] += 1
            for label in find_canaries(data, digests):
                bucket["matches"].append({"pid": pid, "canary": label})
    pid1: Observation
    try:
        data = _read_capped("/proc/1/environ")
        pid1 = {"readable": True, "bytes": len(data), "canaries": find_canaries(data, digests)}
    except OSError as exc:
        pid1 = {"readable": False, "errno": _errname(exc)}
    ancestors: list[int] = []
    current = me
    while current in parents and parents[current] not in ancestors and parents[current] > 0:
        current = parents[current]
        ancestors.append(current)
    descendants: set[int] = set()
    frontier = {me}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier and p not in descendants}
        descendants |= frontier
    mine = {me, *ancestors, *descendants}
    foreign = [p for p in pids if p not in mine]
    return {
        "pid": me,
        "visible": len(pids),
        "ancestors": ancestors,
        "descendants": len(descendants),
        "foreign": len(foreign),
        "foreign_sample": foreign[:10],
        "pid_ns": _ns("pid"),
        "environ": environ,
        "cmdline": cmdline,
        "pid1_environ": pid1,
        "truncated": truncated,
    }


def _ppid(pid: int) -> int | None:
    try:
        raw = _read_capped(f"/proc/{pid}/stat", 4096)
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None


def _try_read(path: str | Path, digests: Mapping[str, str]) -> Observation:
    obs: Observation = {"path": str(path)}
    try:
        os.stat(path)
        obs["visible"] = True
    except OSError as exc:
        obs["visible"] = False
        obs["stat_errno"] = _errname(exc)
    try:
        data = _read_capped(path, 65536)
    except OSError as exc:
        obs.update(readable=False, errno=_errname(exc))
        return obs
    obs.update(readable=True, bytes=len(data), canaries=find_canaries(data, digests))
    return obs


def probe_files(spec: Spec, workspace: Path) -> Observation:
    """Read attempts on the planted canary files and on /etc/shadow and /etc/gshadow."""
    digests = spec.get("digests", {})
    paths = spec.get("paths", {})
    return {
        "secret_file": _try_read(paths["secret_file"], digests),
        "world_file": _try_read(paths["world_file"], digests),
        "shadow": [_try_read(p, digests) for p in ("/etc/shadow", "/etc/gshadow")],
    }


def _try_create(directory: str | Path, name: str) -> Observation:
    """Create (O_EXCL, no symlink follow) then remove ``directory/name``."""
    path = os.path.join(directory, name)
    obs: Observation = {"path": path}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        obs.update(written=False, errno=_errname(exc))
        return obs
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)
    obs["written"] = True
    try:
        os.unlink(path)
    except OSError as exc:
        obs["cleanup_errno"] = _errname(exc)
    return obs


def probe_write_outside(spec: Spec, workspace: Path) -> Observation:
    """Try to create a file in directories outside the workspace."""
    paths = spec.get("paths", {})
    name = f".sandbox-audit-{spec.get('nonce', 'x')}-w"
    targets: list[str] = []
    for directory in (str(workspace.parent), paths.get("workspace_root"), paths.get("peer_dir"),
                      paths.get("canary_dir"), "/etc", "/var/tmp", "/usr", "/"):  # fmt: skip
        if isinstance(directory, str) and directory not in targets:
            targets.append(directory)
    return {"attempts": [_try_create(d, name) for d in targets]}


def probe_symlink_escape(spec: Spec, workspace: Path) -> Observation:
    """Symlinks planted in the workspace that point outside: read and write through them."""
    digests = spec.get("digests", {})
    paths = spec.get("paths", {})
    scratch = workspace / str(spec["scratch"])
    depth = "../" * (len(scratch.parts) + 2)
    links = {
        "world_file": paths["world_file"],
        "secret_file": paths["secret_file"],
        "peer_file": paths["peer_file"],
        "proc1_root": "/proc/1/root" + str(paths["world_file"]),
        "relative": depth + str(paths["world_file"]).lstrip("/"),
    }
    reads: list[Observation] = []
    for name, target in links.items():
        link = scratch / f"l_{name}"
        obs: Observation = {"link": name, "target": target}
        try:
            os.symlink(target, link)
        except OSError as exc:
            obs["symlink_errno"] = _errname(exc)
            reads.append(obs)
            continue
        try:
            data = _read_capped(link, 65536)
            obs.update(readable=True, bytes=len(data), canaries=find_canaries(data, digests))
        except OSError as exc:
            obs.update(readable=False, errno=_errname(exc))
        reads.append(obs)
    writes: list[Observation] = []
    for name, target in (("canary_dir", paths["canary_dir"]), ("peer_dir", paths["peer_dir"])):
        link = scratch / f"d_{name}"
        try:
            os.symlink(target, link)
        except OSError as exc:
            writes.append({"link": name, "symlink_errno": _errname(exc)})
            continue
        writes.append({"link": name, **_try_create(link, f".sandbox-audit-{spec.get('nonce', 'x')}-s")})
    return {"reads": reads, "writes": writes}


def probe_hardlink_escape(spec: Spec, workspace: Path) -> Observation:
    """Hard links from the workspace to files outside it (removed at once if they work)."""
    paths = spec.get("paths", {})
    scratch = workspace / str(spec["scratch"])
    attempts: list[Observation] = []
    for name in ("world_file", "secret_file", "peer_file"):
        source = paths[name]
        link = scratch / f"h_{name}"
        obs: Observation = {"source": name, "path": source}
        try:
            os.link(source, link, follow_symlinks=False)
        except OSError as exc:
            obs.update(linked=False, errno=_errname(exc))
        else:
            obs["linked"] = True
            try:
                os.unlink(link)
            except OSError as exc:
                obs["cleanup_errno"] = _errname(exc)
        attempts.append(obs)
    return {"attempts": attempts}


def _connect(family: int, address: Any, timeout: float) -> Observation:
    target = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
    if family == socket.AF_INET6 and isinstance(address, tuple):
        target = f"[{address[0]}]:{address[1]}"
    obs: Observation = {"target": target[:120]}
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        obs.update(connected=False, stage="socket", errno=_errname(exc))
        return obs
    sock.settimeout(timeout)
    started = time.monotonic()
    try:
        if family == socket.AF_UNIX:
            with unix_address(address) as short:
                sock.connect(short)
        else:
            sock.connect(address)
    except TimeoutError:
        obs.update(connected=False, stage="connect", errno="timeout")
    except OSError as exc:
        obs.update(connected=False, stage="connect", errno=_errname(exc))
    else:
        obs["connected"] = True
    finally:
        sock.close()
    obs["seconds"] = round(time.monotonic() - started, 3)
    return obs


def probe_host_tcp(spec: Spec, workspace: Path) -> Observation:
    """Connect to the host's TCP listener on 127.0.0.1."""
    tcp = spec["tcp"]
    return {"attempts": [_connect(socket.AF_INET, (tcp["host"], int(tcp["port"])), _CONNECT_SECONDS)]}


def _through_proxy(proxy: int, target: str, tag: str) -> Observation:
    """``CONNECT target`` at the sandbox's proxy; on a tunnel, send ``tag`` (the listener records it)."""
    obs: Observation = {"target": target}
    try:
        with socket.create_connection(("127.0.0.1", proxy), timeout=_CONNECT_SECONDS * 4) as sock:
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                part = sock.recv(4096)
                if not part:
                    break
                head += part
            obs["status"] = head.split(b"\r\n", 1)[0].decode(errors="replace")[:300]
            obs["tunnel"] = obs["status"].split(" ")[1:2] == ["200"]
            if obs["tunnel"]:
                sock.sendall(tag.encode() + b"\n")
    except OSError as exc:
        obs.update(status=None, tunnel=False, errno=_errname(exc))
    return obs


def probe_egress(spec: Spec, workspace: Path) -> Observation:
    """Through the proxy: the allowed name, a denied name, an IP literal, a name resolving to a
    non-listed address; and a direct socket to the listener, bypassing the proxy."""
    egress = spec["egress"]
    proxy, port = int(egress["proxy"]), int(egress["port"])
    out: Observation = {"proxy_env": {k: os.environ.get(k) for k in ("HTTPS_PROXY", "NO_PROXY")}}
    for label in ("allowed", "denied", "literal", "private"):
        out[label] = _through_proxy(proxy, f"{egress[label]}:{port}", f"egress-{label}")
    direct = _connect(socket.AF_INET, (str(egress["direct"]), port), _CONNECT_SECONDS)
    out["direct"] = direct
    return out


def probe_host_unix(spec: Spec, workspace: Path) -> Observation:
    """Connect to the host's Unix listeners: a host path, one planted in the workspace, an abstract name."""
    unix = spec["unix"]
    targets: list[Any] = [unix["path"]]
    if unix.get("in_workspace"):
        targets.append(str(workspace / str(unix["in_workspace"])))
    if unix.get("abstract"):
        targets.append("\0" + str(unix["abstract"]))
    attempts = [_connect(socket.AF_UNIX, t, _CONNECT_SECONDS) for t in targets]
    for obs in attempts:
        obs["target"] = obs["target"].replace("\x00", "@")
    return {"attempts": attempts}


ROUTE_TARGETS: tuple[tuple[socket.AddressFamily, str], ...] = (
    (socket.AF_INET, "198.51.100.1"),
    (socket.AF_INET6, "2001:db8::1"),
)
"""Off-machine addresses (documentation ranges) whose route the outbound probe looks up.

Nothing is ever sent to them: on these machines a "documentation" range is the real
network (the default gateway is 192.0.2.1), so no probe may assume one is unrouted."""


def _route(family: socket.AddressFamily, address: str) -> Observation:
    """Whether the kernel would route to ``address``, learnt without sending a packet.

    ``connect()`` on a UDP socket only looks the route up and fixes the peer: ENETUNREACH
    means no route, success means one exists (and names the source address it would use).
    """
    obs: Observation = {"target": f"[{address}]" if family == socket.AF_INET6 else address}
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        obs.update(route=False, stage="socket", errno=_errname(exc))
        return obs
    with sock:
        try:
            sock.connect((address, 9))
        except OSError as exc:
            obs.update(route=False, stage="connect", errno=_errname(exc))
        else:
            obs.update(route=True, source=str(sock.getsockname()[0]))
    return obs


def probe_outbound(spec: Spec, workspace: Path) -> Observation:
    """Is there a way off the machine? Route lookups, the interfaces, the network namespace.

    Decided without sending anything (see :func:`_route`): a probe that connected out would
    itself be traffic off the machine wherever the sandbox has a network.
    """
    try:
        interfaces: list[str] | str = sorted(name for _i, name in socket.if_nameindex())
    except OSError as exc:
        interfaces = _errname(exc)
    routes = [_route(family, address) for family, address in ROUTE_TARGETS]
    return {"routes": routes, "interfaces": interfaces, "net_ns": _ns("net")}


class _IoVec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _readable_address(pid: int) -> int | None:
    try:
        text = _read_capped(f"/proc/{pid}/maps").decode(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 1 and fields[1].startswith("r"):
            return int(fields[0].split("-")[0], 16)
    return None


def _vm_read(pid: int) -> Observation:
    libc = _libc()
    address = _readable_address(pid)
    buf = ctypes.create_string_buffer(16)
    local = _IoVec(ctypes.cast(buf, ctypes.c_void_p), 16)
    remote = _IoVec(address if address is not None else 0x10000, 16)
    fn = libc.process_vm_readv
    fn.restype = ctypes.c_ssize_t
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.POINTER(_IoVec),
                   ctypes.c_ulong, ctypes.c_ulong]  # fmt: skip
    got = fn(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if got >= 0:
        return {"pid": pid, "allowed": True, "bytes": got}
    err = ctypes.get_errno()
    # EFAULT means the call was permitted and only the guessed address was bad.
    return {"pid": pid, "allowed": err == errno.EFAULT, "errno": errno.errorcode.get(err, str(err))}


def probe_ptrace(spec: Spec, workspace: Path) -> Observation:
    """PTRACE_SEIZE and process_vm_readv on a child of ours, process_vm_readv on our parent."""
    child = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", "import time; time.sleep(10)"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0,
    )  # fmt: skip
    try:
        libc = _libc()
        fn = libc.ptrace
        fn.restype = ctypes.c_long
        fn.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        rc = fn(_PTRACE_SEIZE, child.pid, None, None)
        if rc == 0:
            attach: Observation = {"pid": child.pid, "allowed": True}
        else:
            err = ctypes.get_errno()
            attach = {"pid": child.pid, "allowed": False, "errno": errno.errorcode.get(err, str(err))}
        vm_child = _vm_read(child.pid)
    finally:
        _kill_group(child.pid)
        child.kill()
        child.wait()
    return {"attach_child": attach, "vm_read_child": vm_child, "vm_read_parent": _vm_read(os.getppid())}


_USERNS_CODE = """
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
rc = libc.unshare(0x10000000)  # CLONE_NEWUSER
err = ctypes.get_errno()
out = {"unshare": rc == 0, "errno": None if rc == 0 else errno.errorcode.get(err, str(err))}
if rc == 0:
    out["uid_after"] = os.getuid()
print(json.dumps(out))
"""


def probe_userns(spec: Spec, workspace: Path) -> Observation:
    """unshare(CLONE_NEWUSER) in a child process."""
    return _run_child(_USERNS_CODE)


SETUID_CANDIDATES = (
    ("/usr/bin/mount", "--version"), ("/bin/mount", "--version"), ("/usr/bin/umount", "--version"),
    ("/usr/bin/su", "--version"), ("/bin/su", "--version"), ("/usr/bin/passwd", "--help"),
    ("/usr/bin/chfn", "--help"), ("/usr/bin/newgrp", "--help"), ("/usr/bin/gpasswd", "--help"),
)  # fmt: skip
_SETUID_DIRS = ("/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin", "/usr/local/sbin")


def _setuid_root(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return bool(st.st_mode & stat.S_ISUID) and st.st_uid == 0 and stat.S_ISREG(st.st_mode)


def probe_setuid(spec: Spec, workspace: Path) -> Observation:
    """Run a setuid-root program and read its effective uid from /proc before it is reaped."""
    chosen = next(((p, a) for p, a in SETUID_CANDIDATES if _setuid_root(p)), None)
    visible: list[str] = []
    for directory in _SETUID_DIRS:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        visible.extend(os.path.join(directory, n) for n in names[:5000] if _setuid_root(os.path.join(directory, n)))
    obs: Observation = {"uid": os.getuid(), "euid": os.geteuid(), "setuid_root_visible": len(visible)}
    if chosen is None and visible:
        chosen = (visible[0], "--version")
    if chosen is None:
        obs["ran"] = None
        return obs
    path, arg = chosen
    obs["ran"] = path
    proc = subprocess.Popen([path, arg], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, process_group=0)  # fmt: skip
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            # Wait for exit without reaping: a zombie still shows its credentials.
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
            if info is not None:
                break
            time.sleep(0.01)
        status = _status(f"/proc/{proc.pid}/status")
    finally:
        _kill_group(proc.pid)
        proc.kill()
        proc.wait()
    uids = status.get("Uid", "").split()
    obs["child_uid"] = status.get("Uid")
    obs["child_euid"] = int(uids[1]) if len(uids) > 1 else None
    return obs


def probe_other_workspace(spec: Spec, workspace: Path) -> Observation:
    """Look for another user's workspace by its host path, next to ours, and in listings."""
    digests = spec.get("digests", {})
    paths = spec.get("paths", {})
    peer_user = str(paths["peer_user"])
    peer_name = Path(paths["peer_file"]).name
    reads = [
        _try_read(paths["peer_file"], digests),
        _try_read(workspace.parent / peer_user / peer_name, digests),
    ]
    listings: list[Observation] = []
    for directory in {str(workspace.parent), str(paths["workspace_root"])}:
        try:
            names = os.listdir(directory)
        except OSError as exc:
            listings.append({"dir": directory, "listed": False, "errno": _errname(exc)})
            continue
        listings.append({"dir": directory, "listed": True, "entries": len(names), "peer_listed": peer_user in names})
    return {"reads": reads, "listings": listings}


_REFUSALS = frozenset({"EROFS", "EBUSY", "EEXIST", "EXDEV", "EACCES", "EPERM"})


def _undoable(what: str, path: Path, act: Callable[[], None], undo: Callable[[], None]) -> Observation:
    """Try ``act`` on a protected path; undo it at once if it worked."""
    obs: Observation = {"attempt": what, "path": str(path)}
    try:
        act()
    except OSError as exc:
        obs.update(done=False, errno=_errname(exc), refused=_errname(exc) in _REFUSALS)
        return obs
    obs.update(done=True, refused=False)
    try:
        undo()
    except OSError as exc:
        obs["undo_errno"] = _errname(exc)
    return obs


def probe_protected(spec: Spec, workspace: Path) -> Observation:
    """Write, create, rename and symlink attempts on the workspace's default protected paths."""
    moved = workspace / f".sandbox-audit-{spec.get('nonce', 'x')}-moved"
    bashrc, mcp, claude, ripgreprc = (workspace / n for n in (".bashrc", ".mcp.json", ".claude", ".ripgreprc"))
    fresh = {p: not os.path.lexists(p) for p in (bashrc, mcp, ripgreprc)}

    def remove_if_new(path: Path) -> Callable[[], None]:
        return lambda: path.unlink() if fresh[path] else None

    def append() -> None:
        os.close(os.open(bashrc, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644))

    def create() -> None:
        os.close(os.open(mcp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))

    return {"attempts": [
        _undoable("write", bashrc, append, remove_if_new(bashrc)),
        _undoable("create", mcp, create, remove_if_new(mcp)),
        _undoable("rename", claude, lambda: os.rename(claude, moved), lambda: os.rename(moved, claude)),
        _undoable("symlink", ripgreprc, lambda: os.symlink("/nonexistent", ripgreprc), remove_if_new(ripgreprc)),
    ]}  # fmt: skip


def probe_host_paths(spec: Spec, workspace: Path) -> Observation:
    """What /proc tells the sandbox about the host: PID 1's and the worker's command lines, the mount table."""
    out: Observation = {}
    for key, path in (("pid1_cmdline", "/proc/1/cmdline"), ("own_cmdline", "/proc/self/cmdline"),
                      ("mountinfo", "/proc/self/mountinfo")):  # fmt: skip
        try:
            out[key] = _read_capped(path, 256 * 1024).replace(b"\0", b" ").decode(errors="replace")
        except OSError as exc:
            out[key] = ""
            out[f"{key}_errno"] = _errname(exc)
    return out


_BOMB_CODE = """
import json, os, signal, sys, time
cap, seconds = int(sys.argv[1]), float(sys.argv[2])
signal.alarm(int(seconds) + 5)
began = time.monotonic()
forked, err = 0, None
while forked < cap and time.monotonic() - began < seconds:
    try:
        pid = os.fork()
    except OSError as exc:
        err = exc.errno
        break
    if pid == 0:
        try:
            os.closerange(0, 3)
            signal.alarm(int(seconds) + 5)
            os.pause()
        finally:
            os._exit(0)
    forked += 1
print(json.dumps({"forked": forked, "errno": err, "seconds": round(time.monotonic() - began, 3)}), flush=True)
os.killpg(0, signal.SIGKILL)
"""


def probe_fork_bomb(spec: Spec, workspace: Path) -> Observation:
    """Fork until the kernel refuses (or a safety cap), then kill the whole group."""
    limits = spec.get("limits", {})
    cap = int(limits.get("fork_cap", 256))
    result = _run_child(_BOMB_CODE, [str(cap), "10"], timeout=20.0)
    output = result.get("output")
    if isinstance(output, dict) and isinstance(output.get("errno"), int):
        output["errno"] = errno.errorcode.get(output["errno"], str(output["errno"]))
    result["cap"] = cap
    return result


_HOG_CODE = """
import json, signal, sys, time
cap_mb, seconds = int(sys.argv[1]), float(sys.argv[2])
signal.alarm(int(seconds) + 5)
began = time.monotonic()
blocks, got, err = [], 0, None
try:
    while got < cap_mb and time.monotonic() - began < seconds:
        blocks.append(b"\\x01" * (16 << 20))
        got += 16
        print(got, flush=True)
except MemoryError:
    err = "MemoryError"
print(json.dumps({"allocated_mb": got, "error": err, "seconds": round(time.monotonic() - began, 3)}), flush=True)
"""


def probe_memory_hog(spec: Spec, workspace: Path) -> Observation:
    """Allocate and touch memory up to a cap; report how far it got and how it ended."""
    limits = spec.get("limits", {})
    cap = int(limits.get("memory_cap_mb", 1024))
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _HOG_CODE, str(cap), str(MEMORY_HOG_SECONDS)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, process_group=0,
    )  # fmt: skip
    try:
        out, _err = proc.communicate(timeout=HOG_WAIT)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        out = b""
    finally:
        _kill_group(proc.pid)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    lines = out.decode(errors="replace").split()
    reached = max((int(x) for x in lines if x.isdigit()), default=0)
    obs: Observation = {"cap_mb": cap, "reached_mb": reached, "returncode": proc.returncode, "timed_out": timed_out}
    if proc.returncode is not None and proc.returncode < 0:
        obs["signal"] = signal.Signals(-proc.returncode).name
    if lines and lines[-1].startswith("{"):
        try:
            obs["output"] = json.loads(lines[-1])
        except ValueError:
            pass
    return obs


_ENDPOINT_CLIENT = r"""
import json, os, sys, urllib.error, urllib.request
base, key = os.environ.get("ANTHROPIC_BASE_URL"), os.environ.get("ANTHROPIC_API_KEY")
out = {"base_url": base, "key": key}
if base:
    body = {"model": sys.argv[1], "max_tokens": 32, "messages": [{"role": "user", "content": "audit"}]}
    req = urllib.request.Request(base + "/v1/messages", json.dumps(body).encode(),
                                 {"content-type": "application/json", "x-api-key": key or ""})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            out.update(status=resp.status, body=resp.read(1 << 20).decode(errors="replace"))
    except urllib.error.HTTPError as exc:
        out.update(status=exc.code, body=exc.read(1 << 20).decode(errors="replace"))
    except OSError as exc:
        out.update(error=type(exc).__name__ + ": " + str(exc))
print(json.dumps(out))
"""


def probe_model_endpoint(spec: Spec, workspace: Path) -> Observation:
    """A command-like child calls the model endpoint with what its environment gives it (placeholder key)."""
    from sandbox_core.shared import MODEL_ENDPOINT_URL, PLACEHOLDER_API_KEY

    run = _run_child(_ENDPOINT_CLIENT, [str(spec.get("model", "claude-sonnet-5-5"))], timeout=15.0)
    raw = run.get("output")
    out: dict[str, Any] = raw if isinstance(raw, dict) else {}
    body = str(out.get("body", ""))
    kind = None
    try:
        kind = json.loads(body).get("type") if body else None
    except (ValueError, AttributeError):
        kind = None
    found = find_canaries((body + json.dumps(out.get("key")) + str(out.get("error", ""))).encode(), spec["digests"])
    return {
        "returncode": run.get("returncode"), "base_url": out.get("base_url"),
        "base_url_is_endpoint": out.get("base_url") == MODEL_ENDPOINT_URL,
        "key_is_placeholder": out.get("key") == PLACEHOLDER_API_KEY, "key_set": out.get("key") is not None,
        "status": out.get("status"), "reply_type": kind, "client_error": out.get("error"), "canaries": found,
    }  # fmt: skip


PROBES: dict[str, Callable[[Spec, Path], Observation]] = {
    "worker_fds": probe_worker_fds,
    "worker_env": probe_worker_env,
    "caps": probe_caps,
    "proc_scan": probe_proc_scan,
    "files": probe_files,
    "write_outside": probe_write_outside,
    "symlink_escape": probe_symlink_escape,
    "hardlink_escape": probe_hardlink_escape,
    "host_tcp": probe_host_tcp,
    "egress": probe_egress,
    "host_unix": probe_host_unix,
    "outbound": probe_outbound,
    "ptrace": probe_ptrace,
    "userns": probe_userns,
    "setuid": probe_setuid,
    "other_workspace": probe_other_workspace,
    "protected": probe_protected,
    "host_paths": probe_host_paths,
    "model_endpoint": probe_model_endpoint,
    "fork_bomb": probe_fork_bomb,
    "memory_hog": probe_memory_hog,
}
_BUDGET = {"proc_scan": 15.0, "fork_bomb": 30.0, "memory_hog": 35.0}


def run_probe(name: str, spec: Spec, workspace: Path) -> Observation:
    """Run one probe synchronously; any error becomes an observation."""
    fn = PROBES.get(name)
    if fn is None:
        return {"error": f"unknown probe {name!r}"}
    started = time.monotonic()
    try:
        obs = fn(spec, workspace)
    except Exception as exc:  # noqa: BLE001 - a probe reports, it never raises
        obs = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    obs["probe_seconds"] = round(time.monotonic() - started, 3)
    return obs


async def probe(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    """Worker method ``audit.probe``: run the named probes in order, each in a thread with a deadline."""
    names = params.get("probes") or list(STATIC_PROBES)
    workspace = ctx.workspace
    results: dict[str, Observation] = {}
    for raw_name in names:
        name = str(raw_name)
        budget = _BUDGET.get(name, 12.0)
        try:
            results[name] = await asyncio.wait_for(asyncio.to_thread(run_probe, name, params, workspace), budget)
        except TimeoutError:
            results[name] = {"error": f"probe did not finish within {budget:g}s"}
    return {"probes": results, "pid": os.getpid(), "uid": os.getuid(), "workspace": str(workspace)}


# ---------------------------------------------------------------- what a command sees


def command_snapshot(digests: Mapping[str, str]) -> Observation:
    """What a command run through ``exec`` inherits: descriptors, environment, credentials."""
    fds: dict[str, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
            os.fstat(int(name))
        except (OSError, ValueError):
            continue
        fds[name] = target
    env = {name: sha256_hex(value) for name, value in os.environ.items()}
    found: list[str] = []
    for value in os.environ.values():
        for label in find_canaries(value.encode(errors="surrogateescape"), digests):
            if label not in found:
                found.append(label)
    status = _status()
    keys = ("Uid", "Gid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
    return {"fds": fds, "env": env, "canaries": found, "status": {k: status.get(k) for k in keys}}


def command_main() -> None:
    """Entry of the ``exec`` snapshot program: ``argv[1]`` is the JSON spec; prints one JSON line."""
    spec = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    try:
        out = command_snapshot(spec.get("digests", {}))
    except Exception as exc:  # noqa: BLE001 - report, never crash without output
        out = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
