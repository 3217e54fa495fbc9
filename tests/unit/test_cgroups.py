"""cgroup selection, v2 on a fake tree (v2 here has hugetlb only, so it cannot run for real), and the sweep."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sandbox_core.config import ResourceLimits
from sandbox_core.errors import IsolationUnavailable
from sandbox_core.isolation import cgroups

V1_ONLY = "4:memory:/a\n8:pids:/a\n1:cpu:/\n2:cpuacct:/\n0::/\n"


def _v2_tree(tmp_path: Path, controllers: str = "cpuset cpu io memory hugetlb pids") -> tuple[Path, str]:
    mount = tmp_path / "unified"
    mount.mkdir(parents=True)
    (mount / "cgroup.controllers").write_text(controllers + "\n")
    (mount / "cgroup.subtree_control").write_text("")
    return mount, f"41 31 0:38 / {mount} rw,relatime - cgroup2 cgroup2 rw\n"


def test_v2_plan_creates_limits_and_enables_controllers_down_the_path(tmp_path: Path) -> None:
    mount, mountinfo = _v2_tree(tmp_path)
    limits = ResourceLimits(memory_mb=64, processes=32, cpus=1.5)
    group = cgroups.plan("w1", limits, "auto", root=tmp_path / "nov1", proc_cgroup="0::/\n", mountinfo=mountinfo,
                         euid=0)  # fmt: skip
    assert group.version == 2 and cgroups.mode_of(group) == "cgroup-v2"
    path = group.paths["unified"]
    assert path.parent.parent == mount / "sandbox" and path.parent.name == cgroups.owner_name()
    child = subprocess.Popen(["sleep", "30"])  # a process without children of its own
    try:
        group.after_spawn(child.pid)
    finally:
        child.kill()
        child.wait()
    assert (path / "memory.max").read_text() == f"{64 * 1024 * 1024}\n"
    assert (path / "memory.swap.max").read_text() == "0\n"
    assert (path / "pids.max").read_text() == "32\n"
    assert (path / "cpu.max").read_text() == "150000 100000\n"
    assert (path / "cgroup.procs").read_text() == f"{child.pid}\n"
    for level in (mount, mount / "sandbox", path.parent):
        assert (level / "cgroup.subtree_control").read_text() == "+memory +pids +cpu\n"
    described = group.describe()
    assert described["socket_mb"] == "charged to memory.max" and described["cpus"] == 1.5
    assert described["cgroups"] == {"unified": str(path.relative_to(tmp_path))}
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (path / "pids.events").write_text("max 7\n")
    (path / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    assert group.limit_events() == {"memory": 1, "processes": 7}
    assert group.cpu_usage_ns() == 2_500_000_000


def test_a_group_is_made_even_when_the_owner_directory_goes_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker's clean-up removes the (then empty) owner directory between the making of
    this worker's parent and of its own group: the group is made all the same."""
    _, mountinfo = _v2_tree(tmp_path)
    group = cgroups.plan("w1", ResourceLimits(processes=8), "auto", root=tmp_path / "nov1", proc_cgroup="0::/\n",
                         mountinfo=mountinfo, euid=0)  # fmt: skip
    path = group.paths["unified"]
    original = cgroups.enable_v2
    calls: list[Path] = []

    def enable_then_lose_it(mount: Path, leaf_parent: Path) -> None:
        original(mount, leaf_parent)
        calls.append(leaf_parent)
        if len(calls) == 1:  # what the other worker's cleanup does: rmdir of the owner's directory
            for name in os.listdir(leaf_parent):
                os.unlink(leaf_parent / name)
            leaf_parent.rmdir()

    monkeypatch.setattr(cgroups, "enable_v2", enable_then_lose_it)
    group.create()
    assert len(calls) == 2 and path.is_dir()
    assert (path / "pids.max").read_text() == "8\n"


def test_counters_are_read_from_held_descriptors_and_fresh_each_time(tmp_path: Path) -> None:
    _, mountinfo = _v2_tree(tmp_path)
    group = cgroups.plan("w1", ResourceLimits(), "auto", root=tmp_path / "nov1", proc_cgroup="0::/\n",
                         mountinfo=mountinfo, euid=0)  # fmt: skip
    group.create()
    path = group.paths["unified"]
    (path / "memory.events").write_text("oom_kill 0\n")
    (path / "pids.events").write_text("max 0\n")
    (path / "cpu.stat").write_text("usage_usec 1\n")
    assert group.limit_events() == {"memory": 0, "processes": 0} and group.cpu_usage_ns() == 1000
    fds = len(os.listdir("/proc/self/fd"))
    (path / "memory.events").write_text("oom_kill 2\n")  # the same file, rewritten in place
    (path / "cpu.stat").write_text("usage_usec 5\n")
    for _ in range(50):
        assert group.limit_events() == {"memory": 2, "processes": 0} and group.cpu_usage_ns() == 5000
    assert len(os.listdir("/proc/self/fd")) == fds  # held, not opened per read
    group.counters.close()  # what cleanup does first: nothing reads a closed descriptor after
    assert group.limit_events() == {} and group.cpu_usage_ns() is None
    assert len(os.listdir("/proc/self/fd")) == fds - 3


def test_v2_needs_the_controllers_root_or_a_delegated_parent(tmp_path: Path) -> None:
    _, mountinfo = _v2_tree(tmp_path, "hugetlb")  # this machine's v2 hierarchy
    with pytest.raises(IsolationUnavailable, match="offers hugetlb, not memory pids cpu") as refused:
        cgroups.plan("w", ResourceLimits(), "v2", proc_cgroup="0::/\n", mountinfo=mountinfo, euid=0)
    assert "strict.cgroups = false" in refused.value.message and refused.value.data["reason"] == "no_cgroups"
    full, info = _v2_tree(tmp_path / "b")
    assert "not root" in str(cgroups.v2_available(full, euid=1000))
    delegated = full / "user.slice" / "sandbox.scope"
    delegated.mkdir(parents=True)
    group = cgroups.plan("w", ResourceLimits(), "v2", parent="user.slice/sandbox.scope", proc_cgroup="0::/\n",
                         mountinfo=info, euid=1000)  # fmt: skip
    assert group.paths["unified"].parent.parent == delegated


def test_v1_is_preferred_where_its_controllers_live(tmp_path: Path) -> None:
    root = tmp_path / "v1"
    for controller, rel in (("memory", "a"), ("pids", "a"), ("cpu", ""), ("cpuacct", "")):
        (root / controller / rel).mkdir(parents=True, exist_ok=True)
        (root / controller / rel / "cgroup.procs").write_text("")
    _, mountinfo = _v2_tree(tmp_path)
    group = cgroups.plan("w", ResourceLimits(cpus=0.5, socket_mb=16), proc_cgroup=V1_ONLY, root=root,
                         mountinfo=mountinfo)  # fmt: skip
    assert group.version == 1 and set(group.paths) == {"memory", "pids", "cpu", "cpuacct"}
    group.create()
    mem, cpu = group.paths["memory"], group.paths["cpu"]
    assert mem.parent.parent == root / "memory" / "a" / "sandbox"
    assert (mem / "memory.kmem.tcp.limit_in_bytes").read_text() == f"{16 * 1024 * 1024}\n"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "50000\n" and (cpu / "cpu.cfs_period_us").read_text() == "100000\n"
    no_cpu = cgroups.plan("w", ResourceLimits(cpus=0), proc_cgroup=V1_ONLY, root=root, mountinfo=mountinfo)
    assert set(no_cpu.paths) == {"memory", "pids"}


def test_cpu_and_cpuacct_mounted_together(tmp_path: Path) -> None:
    root = tmp_path / "v1"
    (root / "memory").mkdir(parents=True)
    (root / "pids").mkdir()
    (root / "cpu,cpuacct").mkdir()
    (root / "cpu").symlink_to("cpu,cpuacct")
    (root / "cpuacct").symlink_to("cpu,cpuacct")
    for d in ("memory", "pids", "cpu,cpuacct"):
        (root / d / "cgroup.procs").write_text("")
    group = cgroups.plan("w", ResourceLimits(cpus=1), proc_cgroup="4:memory:/\n8:pids:/\n1:cpu,cpuacct:/\n", root=root,
                         mountinfo="")  # fmt: skip
    group.create()
    made = root / "cpu,cpuacct" / "sandbox" / cgroups.owner_name() / group.paths["cpu"].name
    assert (made / "cpu.cfs_quota_us").read_text() == "100000\n"


def test_no_cgroups_at_all_fails_closed(tmp_path: Path) -> None:
    with pytest.raises(IsolationUnavailable, match=r"v1: no cgroup v1 'memory' hierarchy; v2: no cgroup v2"):
        cgroups.plan("w", ResourceLimits(), proc_cgroup="0::/\n", root=tmp_path, mountinfo="")


def test_sweep_removes_only_what_dead_orchestrators_left(tmp_path: Path) -> None:
    base = tmp_path / "memory" / "sandbox"
    dead, live = base / "o999999.12345", base / f"o{os.getpid()}.1"
    for owner in (dead, live):
        for worker in ("w1-ab.0011", "w2-ab.0022"):
            (owner / worker).mkdir(parents=True)
    stranger = base / "w9-old.ffff"  # the layout of an older version: not ours to judge
    stranger.mkdir()
    swept = cgroups.sweep([base], alive=lambda pid, start: pid == os.getpid())
    assert swept == [f"{base}/o999999.12345"]
    assert not dead.exists() and len(list(live.iterdir())) == 2 and stranger.exists()


def test_owner_name_tells_a_reused_pid(tmp_path: Path) -> None:
    name = cgroups.owner_name()
    pid, start = name[1:].split(".")
    assert int(pid) == os.getpid() and cgroups._owner_alive(int(pid), int(start))
    assert not cgroups._owner_alive(int(pid), int(start) + 1)


def test_removal_is_tried_first_and_what_is_still_busy_is_killed_then_removed(tmp_path: Path) -> None:
    """remove_groups: empty groups go without a kill (no cgroup.procs read); a busy one (here a
    directory that is not empty, as a cgroup with a process in it refuses rmdir) gets kill(),
    then goes."""
    from sandbox_core.isolation.cgroups import remove_groups

    empty = [tmp_path / "pids", tmp_path / "memory"]
    for path in empty:
        path.mkdir()
    kills: list[int] = []
    remove_groups(empty, lambda: kills.append(1), 1.0)
    assert kills == [] and not any(p.exists() for p in empty)

    busy = tmp_path / "cpu"
    (busy / "task").mkdir(parents=True)

    def kill() -> None:
        kills.append(1)
        (busy / "task").rmdir()  # the process is gone: the group can be removed

    remove_groups([busy], kill, 1.0)
    assert kills == [1] and not busy.exists()
