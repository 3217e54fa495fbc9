"""A command ended by a limit says which one (``kill_reason``), and so does the CLI."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import pytest

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import RequestTimeout
from sandbox_core.isolation import cgroups
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.requests import ExecRequest
from tests.helpers import process_config


def _limits(root: Path, **limits: int) -> ProcessSandboxConfig:
    config = process_config(root)
    return config.replace(limits=dataclasses.replace(config.limits, **limits))  # type: ignore[arg-type]


async def test_cpu_limit(workspace_root: Path) -> None:
    async with SandboxOrchestrator(_limits(workspace_root, cpu_seconds=1)) as pool:
        result = await pool.execute("u", ExecRequest(argv=(sys.executable, "-c", "while True: pass")))
    assert result.kill_reason == "cpu limit 1 s" and result.result["signal"] == 24  # SIGXCPU


async def test_file_size_limit(workspace_root: Path) -> None:
    async with SandboxOrchestrator(_limits(workspace_root, file_size_mb=1)) as pool:
        dd = ("dd", "if=/dev/zero", "of=big", "bs=65536", "count=64")
        result = await pool.execute("u", ExecRequest(argv=dd))
    assert result.kill_reason == "file size limit 1 MB" and result.result["signal"] == 25  # SIGXFSZ


async def test_output_limit_ends_a_flood_exactly_at_the_limit(workspace_root: Path) -> None:
    async with SandboxOrchestrator(_limits(workspace_root, output_mb=1)) as pool:
        result = await pool.execute("u", ExecRequest(argv=("yes",)))
        assert result.kill_reason == "output limit 1 MB" and len(result.stdout) == 1024 * 1024
        assert (await pool.execute("u", ExecRequest(shell="echo fine"))).stdout == b"fine\n"


async def test_timeout_names_itself(workspace_root: Path) -> None:
    async with SandboxOrchestrator(process_config(workspace_root)) as pool:
        with pytest.raises(RequestTimeout) as info:
            await pool.execute("u", ExecRequest(argv=("sleep", "30"), timeout=0.3))
    assert info.value.data["kill_reason"] == "timeout 0.3 s"


needs_cgroups = pytest.mark.skipif(
    shutil.which("bwrap") is None or cgroups.available() is not None,
    reason=f"strict profile with v1 memory+pids cgroups unavailable: {cgroups.available()}",
)


def _strict(root: Path, **limits: int) -> ProcessSandboxConfig:
    return _limits(root, **limits).replace(profile="strict")


@needs_cgroups
async def test_memory_limit_from_the_cgroup_oom_counter(workspace_root: Path) -> None:
    hog = ("python3", "-c", "b = b'x' * (400 * 1024 * 1024)")
    async with SandboxOrchestrator(_strict(workspace_root, memory_mb=96)) as pool:
        result = await pool.execute("u", ExecRequest(argv=hog))
        assert result.kill_reason == "memory limit 96 MB" and result.exit_code == 137
        assert (await pool.execute("u", ExecRequest(shell="echo alive"))).stdout == b"alive\n"


@needs_cgroups
async def test_process_limit_is_reported_when_forks_are_refused(workspace_root: Path) -> None:
    script = "for i in $(seq 60); do sleep 2 & done 2>/dev/null; kill $(jobs -p) 2>/dev/null; true"
    async with SandboxOrchestrator(_strict(workspace_root, processes=16)) as pool:
        result = await pool.execute("u", ExecRequest(shell=script))
    assert result.result.get("limits_hit") == ["processes"]
