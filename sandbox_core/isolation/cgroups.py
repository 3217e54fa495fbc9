"""Per-worker cgroup v1 memory and pids limits, so a fork bomb or memory hog stays inside one worker.

Each worker gets ``<our cgroup>/sandbox/<worker id>.<random>`` in the v1 ``memory`` and
``pids`` hierarchies (our cgroup is read from /proc/self/cgroup, so a host that itself
runs inside a container's cgroup nests below it). The host moves the spawned process
tree into it right after spawn, before the handshake, so nothing untrusted ever runs
outside it; children inherit it. Cleanup kills whatever is left and removes the groups.

Where the hierarchy is missing or not writable (cgroup v2 without delegation, no root)
:func:`plan` returns None and the worker is limited by rlimits alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox_core.config import ResourceLimits
from sandbox_core.errors import IsolationUnavailable

_MB = 1024 * 1024
CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass
class WorkerCgroup:
    """The cgroups of one worker: ``after_spawn`` moves it in, ``cleanup`` tears them down."""

    paths: dict[str, Path]
    memory_bytes: int
    pids_max: int

    def describe(self) -> dict[str, object]:
        """The handshake-report entry for these limits."""
        return {
            "memory_mb": self.memory_bytes // _MB if self.memory_bytes else None,
            "pids_max": self.pids_max or None,
            "cgroups": {c: str(p.relative_to(CGROUP_ROOT)) for c, p in self.paths.items()},
        }

    def create(self) -> None:
        """Make the cgroup directories and write the limits (memory before memsw)."""
        for path in self.paths.values():
            path.parent.mkdir(mode=0o755, exist_ok=True)
            path.mkdir(mode=0o755)
        mem = self.paths["memory"]
        if self.memory_bytes:
            (mem / "memory.limit_in_bytes").write_text(f"{self.memory_bytes}\n")
            if (mem / "memory.memsw.limit_in_bytes").exists():
                (mem / "memory.memsw.limit_in_bytes").write_text(f"{self.memory_bytes}\n")
        with contextlib.suppress(OSError):
            (mem / "memory.swappiness").write_text("0\n")
        if self.pids_max:
            (self.paths["pids"] / "pids.max").write_text(f"{self.pids_max}\n")

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
        """How often each limit has struck so far: OOM kills (memory) and refused forks (pids)."""
        counts: dict[str, int] = {}
        with contextlib.suppress(OSError, ValueError):
            for line in (self.paths["memory"] / "memory.oom_control").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    counts["memory"] = int(value)
        with contextlib.suppress(OSError, ValueError, KeyError):
            for line in (self.paths["pids"] / "pids.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "max":
                    counts["processes"] = int(value)
        return counts

    def pids(self) -> set[int]:
        """Every process still in this worker's cgroups."""
        found: set[int] = set()
        for path in self.paths.values():
            with contextlib.suppress(OSError):
                found.update(int(x) for x in (path / "cgroup.procs").read_text().split())
        return found

    def kill(self) -> None:
        """SIGKILL everything in the cgroups (forks are frozen first via pids.max=0)."""
        pids_path = self.paths.get("pids")
        if pids_path is not None:
            with contextlib.suppress(OSError):
                (pids_path / "pids.max").write_text("0\n")
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def cleanup(self, timeout: float = 5.0) -> None:
        """Kill what remains and remove the cgroup directories (polls until empty)."""
        deadline = time.monotonic() + timeout
        while True:
            self.kill()
            for path in list(self.paths.values()):
                try:
                    path.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    continue
            if not any(p.exists() for p in self.paths.values()) or time.monotonic() > deadline:
                return
            time.sleep(0.005)


def own_cgroup(controller: str, proc_cgroup: str | None = None) -> Path | None:
    """The directory of this process's cgroup in the v1 hierarchy of ``controller``."""
    text = proc_cgroup if proc_cgroup is not None else _read("/proc/self/cgroup")
    for line in text.splitlines():
        _hid, _, rest = line.partition(":")
        names, _, rel = rest.partition(":")
        if controller in names.split(","):
            return CGROUP_ROOT / controller / rel.lstrip("/")
    return None


def available() -> str | None:
    """None when per-worker v1 memory+pids cgroups can be made here, else why not."""
    for controller in CONTROLLERS:
        base = own_cgroup(controller)
        if base is None or not (base / "cgroup.procs").exists():
            return f"no cgroup v1 '{controller}' hierarchy"
        if not os.access(base, os.W_OK):
            return f"{base} is not writable"
    return None


def plan(worker_id: str, limits: ResourceLimits) -> WorkerCgroup | None:
    """This worker's cgroups (named, not yet made), or None if cgroups are unavailable.

    Nothing is created until :meth:`WorkerCgroup.after_spawn`, so a worker that never
    spawns leaves nothing behind.
    """
    if available() is not None:
        return None
    name = f"{_SAFE.sub('_', worker_id)[:48] or 'worker'}.{secrets.token_hex(4)}"
    paths: dict[str, Path] = {}
    for controller in CONTROLLERS:
        base = own_cgroup(controller)
        assert base is not None
        paths[controller] = base / "sandbox" / name
    return WorkerCgroup(paths, limits.memory_mb * _MB, limits.processes)


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


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()
