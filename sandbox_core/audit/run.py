"""Run the isolation audit: canaries planted on the host, probes run inside a real worker.

:func:`run_audit` plants, for the duration of one audit:

* random canary secrets (``sbx-canary-`` + 32 hex digits) in a host environment variable
  (:data:`CANARY_VAR`, set in this process's ``os.environ`` and restored afterwards), in a
  decoy host process's environment and command line, in an owner-only 0600 file and a
  world-readable file in a fresh directory under ``/var/tmp`` (a path no profile
  allows), and in a second user's workspace;
* a TCP listener on ``127.0.0.1`` (random port) and Unix socket listeners (a socket file
  outside the allowed paths, one planted inside the audited workspace, and an abstract
  name) that record every connection.

The audited user is a fresh throwaway one (``audit-<nonce>``), never the named user's live
workspace, where a process already in that user's sandbox could race the host's file
operations (see :mod:`sandbox_core.audit.plant`). Then it starts a worker of the configured
profile for that user and asks it what it can reach: a command run through ``exec``
reports what commands inherit, and ``audit.probe`` requests
(:mod:`sandbox_core.inside.probes`) try each path. The canary values never enter the
sandbox: probes get their SHA-256 digests and report matches by label, and the host also
searches everything the sandbox sent back for the raw values.

A fork bomb and a memory hog run last, each as a helper process with its own deadline,
while the host measures its own event-loop latency and how long it takes to spawn a
process of its own. Everything planted is removed afterwards, also on error or cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandbox_core.audit import tenancy
from sandbox_core.audit.judge import MAX_SPAWN, Evidence, classify_variables, judge
from sandbox_core.audit.plant import (
    EGRESS_ALLOWED_ADDRESS,
    EGRESS_NAMES,
    EGRESS_OTHER_ADDRESS,
    egress_policy,
    planted,
)
from sandbox_core.audit.report import CHECK_NAMES, AuditReport
from sandbox_core.config import ProcessSandboxConfig, Secret
from sandbox_core.errors import SandboxError
from sandbox_core.isolation.launch import launch_spec, worker_python
from sandbox_core.names import validate_user_id
from sandbox_core.shared import (
    EGRESS_PROXY_PORT,
    LIMIT_PROBES,
    MEMORY_HOG_SECONDS,
    PROBE_COMMAND_ENTRY,
    STATIC_PROBES,
)

MEMORY_HOG_PHASE = MEMORY_HOG_SECONDS + 30.0
"""The memory probe's request timeout: the hog's budget, the probe's wait past it and a worker start."""


def host_namespaces() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for kind in ("pid", "net", "user", "mnt"):
        try:
            out[kind] = os.readlink(f"/proc/self/ns/{kind}")
        except OSError:
            out[kind] = None
    return out


def _mem_available_mb() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        return None
    return None


def limit_plan(config: ProcessSandboxConfig) -> dict[str, Any]:
    limits = config.limits
    pids = limits.processes or None
    memory = limits.memory_mb or limits.address_space_mb or None
    memory_cap = (memory or 1024) + 256
    available = _mem_available_mb()
    if available is not None:
        memory_cap = min(memory_cap, available // 2)
    return {
        "pids_limit": pids,
        "fork_cap": min((pids or 256) + 32, 1024),
        "memory_limit_mb": memory,
        "memory_cap_mb": max(memory_cap, 16),
        "host_available_mb": available,
    }


# ---------------------------------------------------------------- host monitor


class HostMonitor:
    """Measures the host while the limit probes run: event-loop lag and its own spawns."""

    def __init__(self) -> None:
        self.max_lag = 0.0
        self.spawns = 0
        self.spawn_failures: list[str] = []
        self.max_spawn = 0.0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._true = shutil.which("true") or "/bin/true"

    async def __aenter__(self) -> HostMonitor:
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._lag()), asyncio.create_task(self._spawn())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _lag(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            await asyncio.sleep(0.02)
            self.max_lag = max(self.max_lag, time.monotonic() - began - 0.02)

    async def _spawn(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                proc = await asyncio.create_subprocess_exec(
                    self._true, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
                await asyncio.wait_for(proc.wait(), MAX_SPAWN * 2)
                self.spawns += 1
            except (OSError, TimeoutError) as exc:
                self.spawn_failures.append(f"{type(exc).__name__}: {exc}"[:120])
            self.max_spawn = max(self.max_spawn, time.monotonic() - began)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.2)

    def summary(self) -> dict[str, Any]:
        return {"max_loop_lag_ms": round(self.max_lag * 1000, 1), "host_spawns": self.spawns,
                "spawn_failures": self.spawn_failures, "max_spawn_ms": round(self.max_spawn * 1000, 1)}  # fmt: skip


# ---------------------------------------------------------------- running


def try_launch(config: ProcessSandboxConfig, workspace: Path) -> dict[str, Any]:
    """Build (never start) a worker's launch on ``workspace``: was it refused, and why."""
    try:
        spec = launch_spec(config, "audit-launch-check", workspace)
    except SandboxError as exc:
        return {"refused": True, "reason": exc.data.get("reason"), "error": type(exc).__name__,
                "message": str(exc)[:300]}  # fmt: skip
    if spec.cleanup is not None:
        spec.cleanup()
    return {"refused": False}


async def run_audit(
    config: ProcessSandboxConfig,
    user_id: str,
    *,
    progress: Callable[[str], None] | None = None,
) -> AuditReport:
    """Plant canaries, run every probe in a fresh worker of ``config.profile``, evaluate.

    ``user_id`` names whom the audit stands in for (it is validated and reported); the
    worker runs for a fresh throwaway user with the same configuration.

    Raises :class:`~sandbox_core.errors.SandboxError` when no worker can be started (for
    example IsolationUnavailable in the strict profile: fail closed); a probe that fails
    later turns the checks that depend on it into failures instead.
    """
    from sandbox_core.orchestrator import SandboxOrchestrator
    from sandbox_core.requests import ExecRequest, RawRequest

    def say(msg: str) -> None:
        if progress is not None:
            progress(msg)

    began = time.monotonic()
    quota_config = config
    config = tenancy.without_quota(config.replace(min_idle=0))
    config = config.replace(network=egress_policy(config))
    limits = limit_plan(config)
    say("planting canaries")
    validate_user_id(user_id)
    async with planted(config) as plants:
        audited = plants.audited_user
        # The model endpoint is checked with the offline provider (no call leaves the host) and a
        # canary as the API key: every canary check then also looks for the key.
        model = dataclasses.replace(config.model, provider="offline", api_key=Secret(plants.canaries["api_key"]))
        config = config.replace(model=model)
        spec: dict[str, Any] = {
            "digests": plants.digests(),
            "nonce": plants.nonce,
            "scratch": plants.scratch,
            "paths": {
                "secret_file": str(plants.secret_file), "world_file": str(plants.world_file),
                "canary_dir": str(plants.canary_dir), "peer_user": plants.peer_user,
                "peer_dir": str(plants.peer_dir), "peer_file": str(plants.peer_file),
                "workspace_root": str(config.workspace_root),
            },
            "tcp": {"host": "127.0.0.1", "port": plants.tcp_port},
            "egress": {"proxy": EGRESS_PROXY_PORT, "port": plants.egress_port, **EGRESS_NAMES,
                       "literal": EGRESS_OTHER_ADDRESS, "direct": EGRESS_ALLOWED_ADDRESS},
            "unix": {"path": plants.unix_path, "in_workspace": plants.unix_in_workspace,
                     "abstract": plants.abstract},
            "limits": limits,
            "model": config.model.model,
        }  # fmt: skip
        results: dict[str, Any] = {}
        errors: dict[str, str] = {}
        sent_back: list[str] = []
        worker_id, layers = "", {}
        seen: dict[str, Any] = {}
        monitor = HostMonitor()
        if plants.socket_tree is not None:
            say("launching on a workspace that holds a host socket (the launcher must refuse)")
            plants.launch_check = await asyncio.to_thread(try_launch, config, plants.socket_tree)
        plants.planting["first_request_at"] = time.monotonic()
        async with SandboxOrchestrator(config) as orchestrator:
            say("starting a worker and reading what a command inherits")
            python, package_root = worker_python(config)
            boot = (f"import sys; sys.path.insert(0, {package_root!r}); "
                    f"from {PROBE_COMMAND_ENTRY} import command_main; command_main()")  # fmt: skip
            snapshot = ExecRequest(argv=(python, "-I", "-c", boot, json.dumps({"digests": spec["digests"]})),
                                   timeout=30)  # fmt: skip
            try:
                res = await orchestrator.execute(audited, snapshot)
                worker_id = res.worker_id
                layers = orchestrator.worker_report(worker_id) or {}
                seen = await asyncio.to_thread(tenancy.observe, layers)  # while its cgroups exist
                sent_back += [res.stdout_text, res.stderr_text]
                lines = res.stdout_text.strip().splitlines()
                missing = {"error": f"no output: {res.stderr_text[-300:]}"}
                results["command"] = json.loads(lines[-1]) if lines else missing
            except SandboxError as exc:
                if _cancelling() or (not worker_id and not isinstance(exc, _RECOVERABLE)):
                    raise
                errors["command"] = str(exc)
            except ValueError as exc:
                errors["command"] = f"unparsable snapshot: {exc}"

            for phase, names, timeout in (("static", STATIC_PROBES, 120.0), ("fork_bomb", ("fork_bomb",), 45.0),
                                          ("memory_hog", ("memory_hog",), MEMORY_HOG_PHASE)):  # fmt: skip
                say(f"probing: {', '.join(names) if len(names) < 3 else 'files, /proc, network, privileges'}")
                request = RawRequest("audit.probe", {**spec, "probes": list(names)}, timeout=timeout)
                try:
                    if phase in LIMIT_PROBES:
                        async with monitor:
                            res = await orchestrator.execute(audited, request)
                    else:
                        res = await orchestrator.execute(audited, request)
                except SandboxError as exc:
                    if _cancelling() or (not worker_id and not isinstance(exc, _RECOVERABLE)):
                        raise
                    for name in names:
                        errors[name] = f"{type(exc).__name__}: {exc}"
                    continue
                worker_id = worker_id or res.worker_id
                if not layers:
                    layers = orchestrator.worker_report(res.worker_id) or {}
                    seen = await asyncio.to_thread(tenancy.observe, layers)  # while its cgroups exist
                raw = res.result.get("probes")
                sent_back.append(json.dumps(res.result, default=str))
                if isinstance(raw, dict):
                    results.update(raw)
                if isinstance(res.result.get("workspace"), str):
                    results["_workspace"] = res.result["workspace"]
        if seen:
            if quota_config.limits.workspace_mb or quota_config.limits.workspace_inodes:
                say("writing past the disk quota in a throwaway quota workspace")
            seen["quota_probe"] = await tenancy.quota_probe(quota_config)
        say("evaluating")
        # judged against what the worker ran with (its network policy), with the quota it was asked for
        judged = config.replace(limits=quota_config.limits)
        ctx = Evidence(judged, plants, results, errors, limits, monitor.summary(), host_namespaces(),
                       "\n".join(sent_back), seen)  # fmt: skip
        checks = [judge(ctx, name) for name in CHECK_NAMES]
        variables = classify_variables(ctx)
        profile = str(layers.get("profile", config.profile)) if layers else config.profile
        report = AuditReport(profile, user_id, worker_id, checks, *variables, layers=layers,
                             planted=plants.describe(), duration_s=round(time.monotonic() - began, 3))  # fmt: skip
    return report


def _cancelling() -> bool:
    """True when the audit itself is being cancelled (Ctrl-C): then nothing is recoverable."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _recoverable() -> tuple[type[SandboxError], ...]:
    from sandbox_core.errors import RequestCancelled, RequestTimeout, WorkerCrashed

    return (WorkerCrashed, RequestTimeout, RequestCancelled)


_RECOVERABLE = _recoverable()
"""Errors after which the audit goes on (the affected checks fail); others abort it."""
