"""The audit's tenancy rows: what the host itself reads of a worker's uid, cgroups and disk quota.

The other rows probe from inside; these read the host's side of the same facts (the worker's
cgroup files, the uid the planted workspaces were handed to) and, for the disk quota, run a
real write past the limit in a throwaway quota workspace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
from pathlib import Path
from typing import Any

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import SandboxError
from sandbox_core.isolation import cgroups, quota

NOBODY = 65534


def observe(layers: dict[str, Any]) -> dict[str, Any]:
    """The worker's limits as its cgroup files hold them (read on the host)."""
    detail = layers.get("limits_detail") or {}
    out: dict[str, Any] = {"mode": layers.get("limits"), "uid": layers.get("uid"),
                           "identity": layers.get("identity"), "disk_quota": layers.get("disk_quota")}
    paths = {c: cgroups.CGROUP_ROOT / str(p) for c, p in (detail.get("cgroups") or {}).items()}
    if detail.get("version") == 2 and "unified" in paths:
        mount = cgroups.v2_mount()
        path = (mount / Path(str(detail["cgroups"]["unified"])).relative_to("unified")) if mount else None
        out["cpu_max"] = _read(path / "cpu.max") if path else None
        out["memory_max"] = _read(path / "memory.max") if path else None
    else:
        if "cpu" in paths:
            out["cfs_quota_us"] = _read(paths["cpu"] / "cpu.cfs_quota_us")
            out["cfs_period_us"] = _read(paths["cpu"] / "cpu.cfs_period_us")
        if "memory" in paths:
            out["tcp_limit"] = _read(paths["memory"] / "memory.kmem.tcp.limit_in_bytes")
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


async def quota_probe(config: ProcessSandboxConfig) -> dict[str, Any]:
    """Write past ``limits.workspace_mb`` in a fresh quota workspace; what happened (then it is removed)."""
    from sandbox_core.orchestrator import SandboxOrchestrator
    from sandbox_core.requests import ExecRequest

    if not quota.configured(config):
        return {"configured": False}
    user = f"audit-quota-{secrets.token_hex(4)}"
    mb = config.limits.workspace_mb
    probe_config = config.replace(min_idle=0)
    workspace = config.workspace_for(user)
    script = f"dd if=/dev/zero of=fill bs=1M count={mb + 16} 2>&1; echo exit=$?"
    try:
        async with SandboxOrchestrator(probe_config) as pool:
            result = await pool.execute(user, ExecRequest(shell=script, timeout=120))
            return {"configured": True, "output": result.stdout_text[-400:],
                    "enospc": "No space left on device" in result.stdout_text or "Disk quota" in result.stdout_text,
                    "mechanism": (pool.worker_report(result.worker_id) or {}).get("disk_quota")}
    except SandboxError as exc:
        return {"configured": True, "error": exc.message}
    finally:
        with contextlib.suppress(SandboxError, OSError):
            quota.release(config, workspace)
        with contextlib.suppress(OSError):
            workspace.rmdir()
        with contextlib.suppress(OSError):
            (config.state_dir / "images" / f"{user}.img").unlink()
        with contextlib.suppress(OSError):
            (config.state_dir / "images" / f"{user}.lock").unlink()


def without_quota(config: ProcessSandboxConfig) -> ProcessSandboxConfig:
    """The audit's own workspaces are planted by the host, so they are never quota images."""
    limits = dataclasses.replace(config.limits, workspace_mb=0, workspace_inodes=0)
    return config.replace(limits=limits)


Verdict = tuple[bool, str, dict[str, Any]]


def uid_row(record: dict[str, Any], seen: dict[str, Any]) -> Verdict:
    mine, peer = record.get("handed_to"), record.get("peer_handed_to")
    details = {"audited_uid": mine, "peer_uid": peer, "worker_uid": seen.get("uid"), "identity": seen.get("identity")}
    if mine is None or peer is None:
        return False, f"workspaces stay the host uid's {os.geteuid()} (host not root: every tenant shares it)", details
    if mine[0] == peer[0]:
        return False, f"both users' workspaces belong to uid {mine[0]} (strict.sandbox_user: one shared uid)", details
    bad = [u for u in (mine[0], peer[0], seen.get("uid")) if u in (0, NOBODY)]
    if bad:
        return False, f"a tenant runs as uid {bad[0]}", details
    if seen.get("uid") != mine[0]:
        return False, f"the worker runs as uid {seen.get('uid')}, its workspace belongs to {mine[0]}", details
    observed = f"audited user uid {mine[0]}, peer uid {peer[0]} (each owns its workspace; worker ran as {mine[0]})"
    return True, observed, details


def cgroup_row(seen: dict[str, Any]) -> Verdict:
    mode = seen.get("mode")
    if mode in ("cgroup-v1", "cgroup-v2"):
        return True, f"{mode}: the worker's memory, pids and cpu limits are in cgroups of its own", seen
    return False, f"limits are {mode or 'unknown'} (rlimits only: RLIMIT_NPROC per uid, memory per process)", seen


def cpu_row(config: ProcessSandboxConfig, seen: dict[str, Any]) -> Verdict:
    want = config.limits.cpus
    if not want:
        return False, "no CPU limit (limits.cpus = 0): one user can keep every core busy", seen
    quota_us, period = seen.get("cfs_quota_us"), seen.get("cfs_period_us")
    if quota_us is not None and period is not None:
        got = int(quota_us) / int(period) if int(quota_us) > 0 else 0
        ok = abs(got - want) < 0.01
        observed = f"cgroup v1 cpu.cfs_quota_us/period = {quota_us}/{period} = {got:g} CPU (limits.cpus {want:g})"
        return ok, observed, seen
    cpu_max = seen.get("cpu_max")
    if cpu_max is not None:
        parts = cpu_max.split()
        got = int(parts[0]) / int(parts[1]) if parts[0] != "max" else 0
        return abs(got - want) < 0.01, f"cgroup v2 cpu.max = {cpu_max} = {got:g} CPU (limits.cpus {want:g})", seen
    return False, f"no CPU quota found in the worker's cgroups (limits {seen.get('mode')})", seen


def socket_row(config: ProcessSandboxConfig, seen: dict[str, Any]) -> Verdict:
    if seen.get("mode") == "cgroup-v2":
        return True, f"cgroup v2 charges socket buffers to memory.max ({seen.get('memory_max')})", seen
    limit = seen.get("tcp_limit")
    want = (config.limits.socket_mb or config.limits.memory_mb) * 1024 * 1024
    if limit is None:
        return False, "socket buffers are outside every limit (no cgroup memory.kmem.tcp.limit_in_bytes)", seen
    ok = 0 < int(limit) <= want
    return ok, f"cgroup v1 memory.kmem.tcp.limit_in_bytes = {int(limit) // (1024 * 1024)} MB", seen


def quota_row(probe: dict[str, Any]) -> Verdict:
    if not probe.get("configured"):
        return False, "no disk quota (limits.workspace_mb = 0): a workspace can fill the host's disk", probe
    if "error" in probe:
        return False, f"the quota workspace could not be used: {probe['error']}", probe
    mechanism = probe.get("mechanism") or {}
    if probe.get("enospc"):
        return True, (f"writing past {mechanism.get('workspace_mb')} MB failed with ENOSPC inside "
                      f"({mechanism.get('mechanism')})"), probe
    return False, f"a write past the quota succeeded: {probe.get('output', '')[-200:]}", probe
