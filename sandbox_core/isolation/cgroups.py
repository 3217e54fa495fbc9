"""Per-worker cgroups (v1 or v2): memory with swap and socket buffers, pids, CPU, CPU accounting.

Each worker gets ``<base>/sandbox/<owner>/<worker id>.<random>``, where ``<owner>`` names the
orchestrator process that made it (``o<pid>.<start time>``), so that a later orchestrator can
tell a dead one's leftovers from a live one's and :func:`sweep` them. The host moves the
spawned process tree in from the spawn on (in a thread, while the worker answers its handshake
with only our code running), and verifies and offers the worker only once it is in, so nothing
untrusted ever runs outside it; children inherit it. Cleanup kills whatever is left and removes the groups.

**v1** (this machine): ``memory`` (``memory.limit_in_bytes`` and ``memory.memsw`` = the
limit, so no swap beyond it; ``memory.kmem.tcp.limit_in_bytes`` = ``limits.socket_mb``,
which v1 charges only once it is set), ``pids``, and where CPU is limited ``cpu``
(``cpu.cfs_quota_us``) and ``cpuacct`` (``cpuacct.usage``, the per-request CPU budget). The
base of each is our own cgroup in that hierarchy (read from /proc/self/cgroup, so a host
inside a container's cgroup nests below it).

**v2** (Debian 12, Ubuntu 22.04+, Fedora): one directory in the unified hierarchy with
``memory.max`` (sockets are charged to it), ``memory.swap.max = 0``, ``pids.max``,
``cpu.max`` and ``cpu.stat`` ``usage_usec``. v2 forbids processes in a cgroup whose
controllers are delegated to children, so the base is a sub-tree of our own: as root
``<mount>/sandbox`` at the top level, or ``strict.cgroup_parent`` (a delegated subtree that
holds no processes, for example a systemd ``Delegate=yes`` unit's sub-cgroup); controllers
are enabled down the path through ``cgroup.subtree_control``.

Which one (:func:`plan`): ``strict.cgroup_version`` ``auto`` takes v1 where the controllers
live there, else v2, and **fails closed** when neither works; rlimits alone only when
``strict.cgroups = false`` says so.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Literal

from sandbox_core.config import ResourceLimits
from sandbox_core.errors import IsolationUnavailable
from sandbox_core.valueclass import dataclass

_MB = 1024 * 1024
CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids")
"""The v1 hierarchies every worker needs..."""
CPU_CONTROLLERS = ("cpu", "cpuacct")
"""...and those it needs when CPU is limited or budgeted."""
V2_CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
SUBTREE = "sandbox"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
_OWNER = re.compile(r"^o(\d+)\.(\d+)$")
Version = Literal["auto", "v1", "v2"]


class CounterFiles:
    """Accounting files of one worker's cgroups, opened once and read with ``pread`` at offset 0.

    The host reads a worker's limit counters before and after every command (and its CPU use
    while a budget runs): by path that is an open, a read and a close per file, ~50 us each
    here, against ~6 us for a ``pread`` (a cgroup file is regenerated at every read from
    offset 0). A held descriptor does not keep the cgroup from being removed: reads then fail
    (ENODEV), as a read by path of a removed group fails. The lock keeps a read in one thread
    from using a descriptor that :meth:`close` in another has closed, and maybe reused.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._closed = False

    def read(self, path: Path) -> str:
        with self._lock:
            if self._closed:
                raise FileNotFoundError(f"{path}: the worker's cgroups are being removed")
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                self._fds[path] = fd
            return os.pread(fd, 64 * 1024, 0).decode()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class WorkerCgroup:
    """The cgroups of one worker: ``after_spawn`` moves it in, ``cleanup`` tears them down."""

    paths: dict[str, Path]
    """v1: controller → directory; v2: ``{"unified": directory}``."""
    memory_bytes: int
    pids_max: int
    cpu_quota_us: int = 0
    tcp_bytes: int = 0
    version: int = 1
    root: Path = field(default=CGROUP_ROOT)
    """Where the hierarchies are mounted (a fake tree in tests)."""
    mount: Path | None = None
    """v2: the unified hierarchy's mount point (the paths are below it)."""
    counters: CounterFiles = field(default_factory=CounterFiles, repr=False, compare=False)
    """The accounting files read at every request, held open (see :class:`CounterFiles`)."""

    def describe(self) -> dict[str, object]:
        """The handshake-report entry for these limits."""
        return {
            "version": self.version,
            "memory_mb": self.memory_bytes // _MB if self.memory_bytes else None,
            "pids_max": self.pids_max or None,
            "cpus": self.cpu_quota_us / CPU_PERIOD_US if self.cpu_quota_us else None,
            "socket_mb": (self.tcp_bytes // _MB if self.tcp_bytes else None) if self.version == 1
            else "charged to memory.max",
            "cgroups": {c: self._shown(p) for c, p in self.paths.items()},
        }

    def _shown(self, path: Path) -> str:
        """``CONTROLLER/rel`` (v1) or ``unified/rel`` (v2): the first part is dropped by the verifier."""
        if self.version == 2:
            assert self.mount is not None
            return f"unified/{path.relative_to(self.mount)}"
        return str(path.relative_to(self.root))

    def create(self) -> None:
        """Make the cgroup directories and write the limits (memory before memsw)."""
        if self.version == 2:
            self._create_v2()
            return
        made: set[str] = set()
        for path in self.paths.values():
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            real = os.path.realpath(path.parent) + "/" + path.name  # cpu and cpuacct may share a mount
            if real not in made:
                _make_leaf(path, functools.partial(path.parent.mkdir, mode=0o755, parents=True, exist_ok=True))
                made.add(real)
        mem = self.paths["memory"]
        if self.tcp_bytes:  # before any socket is charged; v1 counts sockets only once this is set
            _write(mem / "memory.kmem.tcp.limit_in_bytes", self.tcp_bytes)
        if self.memory_bytes:
            _write(mem / "memory.limit_in_bytes", self.memory_bytes)
            if (mem / "memory.memsw.limit_in_bytes").exists():
                _write(mem / "memory.memsw.limit_in_bytes", self.memory_bytes)
        with contextlib.suppress(OSError):
            _write(mem / "memory.swappiness", 0)
        if self.pids_max:
            _write(self.paths["pids"] / "pids.max", self.pids_max)
        if self.cpu_quota_us and "cpu" in self.paths:
            _write(self.paths["cpu"] / "cpu.cfs_period_us", CPU_PERIOD_US)
            _write(self.paths["cpu"] / "cpu.cfs_quota_us", self.cpu_quota_us)

    def _create_v2(self) -> None:
        path = self.paths["unified"]
        mount = self.mount
        assert mount is not None
        _make_leaf(path, lambda: enable_v2(mount, path.parent))
        _write(path / "memory.max", self.memory_bytes or "max")
        with contextlib.suppress(FileNotFoundError):  # no swap accounting: nothing to bound
            _write(path / "memory.swap.max", 0)
        _write(path / "pids.max", self.pids_max or "max")
        _write(path / "cpu.max", f"{self.cpu_quota_us} {CPU_PERIOD_US}" if self.cpu_quota_us else "max")

    def after_spawn(self, pid: int) -> None:
        """Create the cgroups, then move ``pid`` and every descendant it already has in."""
        try:
            self.create()
            moved: set[int] = set()
            pending = [pid]
            while pending:
                current = pending.pop()
                if current in moved:
                    continue
                for path in self.paths.values():
                    with contextlib.suppress(ProcessLookupError):
                        (path / "cgroup.procs").write_text(f"{current}\n")
                moved.add(current)
                pending.extend(_children(current))
        except OSError as exc:
            raise IsolationUnavailable(f"cannot put worker {pid} into its cgroups: {exc}") from None

    def limit_events(self) -> dict[str, int]:
        """How often each limit has struck so far: OOM kills and refused forks. (A full socket
        bound is not counted: v1's ``memory.kmem.tcp.failcnt`` stays 0 while sends stall.)"""
        counts: dict[str, int] = {}
        read = self.counters.read
        if self.version == 2:
            path = self.paths["unified"]
            counts.update(_keyed(path / "memory.events", {"oom_kill": "memory"}, read))
            counts.update(_keyed(path / "pids.events", {"max": "processes"}, read))
            return counts
        counts.update(_keyed(self.paths["memory"] / "memory.oom_control", {"oom_kill": "memory"}, read))
        if "pids" in self.paths:
            counts.update(_keyed(self.paths["pids"] / "pids.events", {"max": "processes"}, read))
        return counts

    def cpu_usage_ns(self) -> int | None:
        """CPU time used by everything in the worker so far (None where it is not accounted)."""
        try:
            if self.version == 2:
                for key, value in _pairs(self.paths["unified"] / "cpu.stat", self.counters.read):
                    if key == "usage_usec":
                        return value * 1000
                return None
            if "cpuacct" in self.paths:
                return int(self.counters.read(self.paths["cpuacct"] / "cpuacct.usage"))
        except (OSError, ValueError):
            return None
        return None

    def pids(self) -> set[int]:
        """Every process still in this worker's cgroups."""
        found: set[int] = set()
        for path in self.paths.values():
            with contextlib.suppress(OSError, ValueError):
                found.update(int(x) for x in _read(path / "cgroup.procs").split())
        return found

    def kill(self) -> None:
        """SIGKILL everything in the cgroups (v2: ``cgroup.kill``; v1: forks frozen first via pids.max=0)."""
        if self.version == 2:
            with contextlib.suppress(OSError):
                _write(self.paths["unified"] / "cgroup.kill", 1)
        pids_path = self.paths.get("pids") or self.paths.get("unified")
        if pids_path is not None:
            with contextlib.suppress(OSError):
                _write(pids_path / "pids.max", 0)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def cleanup(self, timeout: float = 5.0) -> None:
        """Kill what remains and remove the cgroup directories (polls until empty)."""
        self.counters.close()
        remove_groups(list(self.paths.values()), self.kill, timeout)
        for path in self.paths.values():  # the owner's directory, once its last worker is gone
            with contextlib.suppress(OSError):
                path.parent.rmdir()


_LEAF_TRIES = 5


def _make_leaf(path: Path, make_parent: Callable[[], None]) -> None:
    """``mkdir path`` once ``make_parent()`` has made its parent, again if the parent went meanwhile.

    The owner's directory above a worker's group is removed by the clean-up of its last worker
    (:meth:`WorkerCgroup.cleanup`); a worker of the same owner created at that moment finds its
    parent made, then gone (ENOENT). The removal only succeeds on an empty directory, so making
    the parent again and retrying is all it takes: nothing else can be lost.
    """
    for attempt in range(_LEAF_TRIES):
        make_parent()
        try:
            path.mkdir(mode=0o755)
            return
        except FileNotFoundError:
            if attempt == _LEAF_TRIES - 1:
                raise


def remove_groups(paths: list[Path], kill: object, timeout: float) -> None:
    """Remove the cgroup directories ``paths``; while any is still busy, ``kill()`` what is in
    them and try again, for up to ``timeout`` seconds.

    The removal is tried first: the kernel removes a cgroup only once no process is left in it,
    so a worker whose processes are all gone (its pid namespace ended with its init) costs one
    ``rmdir`` per directory, not a read of every ``cgroup.procs`` (four files on a v1 host, half
    a millisecond each here) before it.
    """
    deadline = time.monotonic() + timeout
    while not _removed(paths):
        kill()  # type: ignore[operator]
        if _removed(paths) or time.monotonic() > deadline:
            return
        time.sleep(0.005)


def _removed(paths: list[Path]) -> bool:
    """Try to remove each of ``paths``; whether none is left."""
    for path in paths:
        with contextlib.suppress(OSError):  # busy (EBUSY), or gone already
            path.rmdir()
    return not any(p.exists() for p in paths)


# ---------------------------------------------------------------- where, and whether

def own_cgroup(controller: str, proc_cgroup: str | None = None, root: Path = CGROUP_ROOT) -> Path | None:
    """The directory of this process's cgroup in the v1 hierarchy of ``controller``."""
    text = proc_cgroup if proc_cgroup is not None else _read("/proc/self/cgroup")
    for line in text.splitlines():
        _hid, _, rest = line.partition(":")
        names, _, rel = rest.partition(":")
        if controller in names.split(","):
            return root / controller / rel.lstrip("/")
    return None


def v2_mount(mountinfo: str | None = None) -> Path | None:
    """Where the unified (v2) hierarchy is mounted, if it is."""
    text = mountinfo if mountinfo is not None else _read("/proc/self/mountinfo")
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if sep and right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split(" ")[4])
    return None


def v1_controllers(limits: ResourceLimits) -> tuple[str, ...]:
    return CONTROLLERS + (CPU_CONTROLLERS if limits.cpus or limits.cpu_budget_seconds else ())


def available(limits: ResourceLimits | None = None, *, proc_cgroup: str | None = None,
              root: Path = CGROUP_ROOT) -> str | None:  # fmt: skip
    """None when per-worker v1 cgroups for these limits can be made here, else why not."""
    for controller in v1_controllers(limits or ResourceLimits()):
        base = own_cgroup(controller, proc_cgroup, root)
        if base is None or not (base / "cgroup.procs").exists():
            return f"no cgroup v1 '{controller}' hierarchy"
        if not os.access(base, os.W_OK):
            return f"{base} is not writable"
    return None


def v2_base(mount: Path, parent: str = "") -> Path:
    """The v2 sub-tree our workers go in: ``strict.cgroup_parent`` or ``<mount>/sandbox``."""
    return mount / (parent.strip("/") or SUBTREE)


def v2_available(mount: Path | None, parent: str = "", *, euid: int | None = None) -> str | None:
    """None when per-worker v2 cgroups can be made below :func:`v2_base`, else why not."""
    if mount is None:
        return "no cgroup v2 hierarchy is mounted"
    uid = os.geteuid() if euid is None else euid
    if not parent and uid != 0:
        return ("not root: set strict.cgroup_parent to a delegated v2 subtree that holds no processes "
                "(systemd: a unit with Delegate=yes)")
    try:
        offered = set(_read(mount / "cgroup.controllers").split())
    except OSError:
        return f"{mount} has no cgroup.controllers"
    missing = [c for c in V2_CONTROLLERS if c not in offered]
    if missing:
        shown = " ".join(sorted(offered)) or "no controllers"
        return f"the v2 hierarchy at {mount} offers {shown}, not {' '.join(missing)}"
    base = v2_base(mount, parent)
    probe = base if base.exists() else mount
    if not os.access(probe, os.W_OK):
        return f"{probe} is not writable"
    return None


def enable_v2(mount: Path, leaf_parent: Path) -> None:
    """Create ``leaf_parent`` below ``mount`` and enable the controllers at every level above it."""
    wanted = " ".join(f"+{c}" for c in V2_CONTROLLERS)
    current = mount
    for part in leaf_parent.relative_to(mount).parts:
        control = current / "cgroup.subtree_control"
        enabled = set(_read(control).split()) if control.exists() else set()
        if not set(V2_CONTROLLERS) <= enabled:
            _write(control, wanted)
        current = current / part
        current.mkdir(mode=0o755, exist_ok=True)
    control = current / "cgroup.subtree_control"
    enabled = set(_read(control).split()) if control.exists() else set()
    if not set(V2_CONTROLLERS) <= enabled:
        _write(control, wanted)


def owner_name(pid: int | None = None) -> str:
    """``o<pid>.<start time>``: names this orchestrator process (its start time tells a reused pid)."""
    pid = os.getpid() if pid is None else pid
    return f"o{pid}.{_start_ticks(pid)}"


def _start_ticks(pid: int) -> int:
    try:
        raw = _read(f"/proc/{pid}/stat")
    except OSError:
        return -1
    return int(raw.rsplit(")", 1)[1].split()[19])


def plan(worker_id: str, limits: ResourceLimits, version: Version = "auto", *, parent: str = "",
         root: Path = CGROUP_ROOT, proc_cgroup: str | None = None, mountinfo: str | None = None,
         euid: int | None = None) -> WorkerCgroup:  # fmt: skip
    """This worker's cgroups (named, not yet made), or IsolationUnavailable saying why none can be.

    Nothing is created until :meth:`WorkerCgroup.after_spawn`, so a worker that never
    spawns leaves nothing behind.
    """
    name = f"{_SAFE.sub('_', worker_id)[:48] or 'worker'}.{os.urandom(4).hex()}"
    owner = owner_name()
    if proc_cgroup is None and version != "v2":  # read once, not once per controller (~0.4 ms a launch)
        proc_cgroup = _read("/proc/self/cgroup")
    cpu_quota = int(limits.cpus * CPU_PERIOD_US) if limits.cpus else 0
    socket_mb = limits.socket_mb or limits.memory_mb
    why_v1 = available(limits, proc_cgroup=proc_cgroup, root=root) if version != "v2" else "not asked for"
    if why_v1 is None:
        paths: dict[str, Path] = {}
        for controller in v1_controllers(limits):
            base = own_cgroup(controller, proc_cgroup, root)
            assert base is not None
            paths[controller] = base / SUBTREE / owner / name
        return WorkerCgroup(paths, limits.memory_mb * _MB, limits.processes, cpu_quota, socket_mb * _MB, 1, root)
    mount = v2_mount(mountinfo) if version != "v1" else None
    why_v2 = v2_available(mount, parent, euid=euid) if version != "v1" else "not asked for"
    if why_v2 is None:
        assert mount is not None
        path = v2_base(mount, parent) / owner / name
        return WorkerCgroup({"unified": path}, limits.memory_mb * _MB, limits.processes, cpu_quota, 0, 2, root, mount)
    raise IsolationUnavailable(
        f"no cgroups for the worker's limits (v1: {why_v1}; v2: {why_v2}); run as root on a host with "
        "cgroup v1 memory/pids/cpu or v2 (or give strict.cgroup_parent a delegated v2 subtree), or set "
        "strict.cgroups = false to run with rlimits only (weaker: RLIMIT_NPROC is per uid, memory per process)",
        data={"field": "strict.cgroups", "value": True, "reason": "no_cgroups"},
    )


def mode_of(cgroup: WorkerCgroup) -> str:
    return f"cgroup-v{cgroup.version}"


# ---------------------------------------------------------------- leftovers of a dead orchestrator

def sweep_bases(limits: ResourceLimits, parent: str = "", *, root: Path = CGROUP_ROOT,
                proc_cgroup: str | None = None, mountinfo: str | None = None) -> list[Path]:  # fmt: skip
    """The ``sandbox`` directories whose owners :func:`sweep` inspects (v1 and v2)."""
    bases: list[Path] = []
    for controller in (*CONTROLLERS, *CPU_CONTROLLERS):
        with contextlib.suppress(OSError):
            base = own_cgroup(controller, proc_cgroup, root)
            if base is not None and (base / SUBTREE).is_dir():
                bases.append(base / SUBTREE)
    with contextlib.suppress(OSError):
        mount = v2_mount(mountinfo)
        if mount is not None and v2_base(mount, parent).is_dir():
            bases.append(v2_base(mount, parent))
    return bases


def sweep(bases: list[Path], alive: object = None) -> list[str]:
    """Remove the worker cgroups of orchestrators that are gone (killing what is still in them);
    the swept directories, by name. A live owner's, and anything not named by an owner, stay."""
    is_alive = alive if callable(alive) else _owner_alive
    swept: list[str] = []
    for base in bases:
        try:
            owners = [p for p in base.iterdir() if p.is_dir() and _OWNER.match(p.name)]
        except OSError:
            continue
        for owner in owners:
            match = _OWNER.match(owner.name)
            assert match is not None
            if is_alive(int(match.group(1)), int(match.group(2))):
                continue
            groups = [p for p in owner.iterdir() if p.is_dir()]

            def kill(groups: list[Path] = groups) -> None:
                for group in groups:
                    if (group / "cgroup.kill").exists():
                        with contextlib.suppress(OSError):
                            _write(group / "cgroup.kill", 1)
                    with contextlib.suppress(OSError, ValueError):
                        for pid in (int(x) for x in _read(group / "cgroup.procs").split()):
                            with contextlib.suppress(ProcessLookupError, PermissionError):
                                os.kill(pid, signal.SIGKILL)

            remove_groups(groups, kill, 2.0)
            with contextlib.suppress(OSError):
                owner.rmdir()
            swept.append(f"{base}/{owner.name}")
    return swept


def _owner_alive(pid: int, start: int) -> bool:
    return _start_ticks(pid) == start


# ---------------------------------------------------------------- small helpers

def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        with contextlib.suppress(OSError):
            out.extend(int(x) for x in _read(f"/proc/{pid}/task/{tid}/children").split())
    return out


def _read(path: str | Path) -> str:
    with open(path) as fh:
        return fh.read()


def _write(path: Path, value: object) -> None:
    path.write_text(f"{value}\n")


def _pairs(path: Path, read: Callable[[Path], str] = _read) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for line in read(path).splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out.append((key, int(value)))
    return out


def _keyed(path: Path, names: dict[str, str], read: Callable[[Path], str] = _read) -> dict[str, int]:
    with contextlib.suppress(OSError):
        return {names[k]: v for k, v in _pairs(path, read) if k in names}
    return {}
