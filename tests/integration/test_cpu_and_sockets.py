"""CPU (a CFS quota and a per-request CPU budget) and socket memory, enforced by the worker's cgroups."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from sandbox_core.config import ProcessSandboxConfig, ResourceLimits
from sandbox_core.isolation import cgroups
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.requests import ExecRequest
from tests.helpers import process_config

_CPU_LIMITS = ResourceLimits(cpus=0.5)
needs_cgroups = pytest.mark.skipif(
    shutil.which("bwrap") is None or cgroups.available(_CPU_LIMITS) is not None,
    reason=f"strict profile with v1 memory, pids, cpu, cpuacct cgroups unavailable: {cgroups.available(_CPU_LIMITS)}",
)
BUSY = "for i in 1 2 3 4; do (while :; do :; done) & done; sleep {seconds}; kill $(jobs -p)"


def _strict(root: Path, **limits: float) -> ProcessSandboxConfig:
    return process_config(root).replace(profile="strict", limits=ResourceLimits(**limits))  # type: ignore[arg-type]


def _cpuacct(pool: SandboxOrchestrator, worker_id: str) -> int:
    report = pool.worker_report(worker_id) or {}
    rel = report["limits_detail"]["cgroups"]["cpuacct"]
    return int((cgroups.CGROUP_ROOT / rel / "cpuacct.usage").read_text())


@needs_cgroups
async def test_four_busy_processes_get_half_a_cpu(workspace_root: Path) -> None:
    async with SandboxOrchestrator(_strict(workspace_root, cpus=0.5)) as pool:
        warm = await pool.execute("u", ExecRequest(shell="true"))
        report = pool.worker_report(warm.worker_id) or {}
        assert report["limits"] == "cgroup-v1" and report["limits_detail"]["cpus"] == 0.5
        before, began = _cpuacct(pool, warm.worker_id), time.monotonic()
        busy = await pool.execute("u", ExecRequest(shell=BUSY.format(seconds=2)))
        used, wall = (_cpuacct(pool, warm.worker_id) - before) / 1e9, time.monotonic() - began
        assert busy.worker_id == warm.worker_id
    assert used / wall <= 0.6, f"{used:.2f} CPU-s in {wall:.2f} s"
    assert used / wall >= 0.2  # it did run (the machine is shared, so only a loose floor)


@needs_cgroups
async def test_a_request_past_its_cpu_budget_is_killed_and_says_so(workspace_root: Path) -> None:
    async with SandboxOrchestrator(_strict(workspace_root, cpus=2, cpu_budget_seconds=0.5)) as pool:
        began = time.monotonic()
        result = await pool.execute("u", ExecRequest(shell=BUSY.format(seconds=30), timeout=20))
        assert time.monotonic() - began < 15
        assert result.kill_reason == "CPU budget 0.5 s" and "cpu_budget" in result.result["limits_hit"]
        again = await pool.execute("u", ExecRequest(shell="echo alive"))  # the worker survives
        assert again.stdout == b"alive\n" and again.worker_id == result.worker_id and again.kill_reason is None


FILL = r"""
import socket, errno
queued, refused = 0, 0
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(64)
pairs = []
for _ in range(48):
    c = socket.create_connection(server.getsockname()); s, _ = server.accept()
    c.setblocking(False); pairs.append((c, s))
    while True:
        try:
            queued += c.send(b"x" * 65536)
        except BlockingIOError:
            break
        except OSError as exc:
            refused += 1; break
print(queued // (1024 * 1024), refused)
"""


async def _queued_mb(root: Path, socket_mb: int) -> int:
    async with SandboxOrchestrator(_strict(root, memory_mb=256, socket_mb=socket_mb)) as pool:
        result = await pool.execute("u", ExecRequest(argv=("python3", "-c", FILL), timeout=60))
        report = pool.worker_report(result.worker_id) or {}
    assert report["limits_detail"]["socket_mb"] == socket_mb
    return int(result.stdout_text.split()[0])


@needs_cgroups
async def test_socket_buffers_are_bounded_by_the_cgroup(workspace_root: Path) -> None:
    bounded = await _queued_mb(workspace_root, 32)
    assert bounded <= 40, f"{bounded} MB parked in loopback TCP queues past socket_mb = 32"
    control = await _queued_mb(workspace_root, 1024)  # the same fill where the bound is far away
    assert control > 64, f"the fill only reached {control} MB: it proves nothing about the bound"
