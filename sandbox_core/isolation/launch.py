"""Host side of isolation: the environment, argv and plan of one worker process."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox_core.config import ProcessSandboxConfig, ResourceLimits

_MB = 1024 * 1024


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to spawn one worker.

    ``env`` is the complete environment of the spawned process (never inherited).
    ``plan`` travels in the ``initialize`` request and tells the worker which
    in-process layers to apply. ``workspace_in_sandbox`` is the path the worker sees
    for the user's workspace; ``bound_at_spawn`` says the workspace is fixed at spawn
    (the worker cannot be pre-warmed unbound).
    """

    argv: list[str]
    env: dict[str, str]
    cwd: str
    plan: dict[str, Any]
    workspace_in_sandbox: str | None = None
    bound_at_spawn: bool = False
    pass_fds: tuple[int, ...] = ()
    after_spawn: Callable[[int], None] | None = None
    """Called on the host with the new process's pid before the handshake (e.g. to
    move it into a cgroup). Raising IsolationUnavailable kills the worker."""
    cleanup: Callable[[], None] | None = None
    """Called on the host after the worker has exited (remove cgroups, temp files)."""


def worker_env(
    config: ProcessSandboxConfig, home: str, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The worker's environment, built from the allowlist: nothing else is inherited."""
    source = os.environ if environ is None else environ
    env: dict[str, str] = {}
    for name in config.env.allow:
        if name.endswith("*"):
            prefix = name[:-1]
            env.update({k: v for k, v in source.items() if k.startswith(prefix)})
        elif name in source:
            env[name] = source[name]
    env.setdefault("PATH", config.env.default_path)
    env.update(config.env.fixed)
    env["HOME"] = home
    return env


def rlimit_plan(limits: ResourceLimits) -> dict[str, int]:
    """rlimits for the plan (``0`` settings are left out, i.e. unlimited)."""
    plan: dict[str, int] = {"core": 0 if not limits.core_dumps else -1}
    if plan["core"] == -1:
        del plan["core"]
    for key, value, scale in (
        ("as", limits.address_space_mb, _MB),
        ("cpu", limits.cpu_seconds, 1),
        ("nofile", limits.open_files, 1),
        ("nproc", limits.processes, 1),
        ("fsize", limits.file_size_mb, _MB),
    ):
        if value:
            plan[key] = value * scale
    return plan


PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
"""The directory holding the ``sandbox_core`` package (put first on the worker's path)."""
_BOOT = "import sys; sys.path.insert(0, {root!r}); from sandbox_core.worker_main import main; main()"


def python_argv(config: ProcessSandboxConfig) -> list[str]:
    """The worker's command: isolated mode (-I ignores PYTHON* variables and the cwd).

    ``-S`` skips ``site`` at start-up (~25 ms of .pth processing); the worker adds
    site-packages itself only when a method needs a third-party package (the agent).
    """
    boot = _BOOT.format(root=PACKAGE_ROOT)
    return [sys.executable, "-I", "-S", "-c", boot, str(config.max_frame_bytes)]


def process_launch(config: ProcessSandboxConfig, workspace: Path | None) -> LaunchSpec:
    """The portable ``process`` profile: env allowlist, new session, closed fds, rlimits."""
    home = str(workspace) if workspace is not None else "/"  # unbound: chdir at bind
    env = worker_env(config, home)
    plan: dict[str, Any] = {
        "profile": "process",
        "rlimits": rlimit_plan(config.limits),
        "umask": 0o077,
        "env_allowlist": True,
    }
    return LaunchSpec(
        argv=python_argv(config),
        env=env,
        cwd=home,
        plan=plan,
        workspace_in_sandbox=str(workspace) if workspace is not None else None,
    )


def launch_spec(config: ProcessSandboxConfig, worker_id: str, workspace: Path | None) -> LaunchSpec:
    """The launch spec of one worker in the configured profile (strict may raise)."""
    if config.profile == "strict":
        from sandbox_core.isolation.strict import strict_launch

        return strict_launch(config, worker_id, workspace)
    return process_launch(config, workspace)


def prepare_workspace(config: ProcessSandboxConfig, user_id: str) -> Path:
    """Create ``user_id``'s workspace (0700) and give it to the sandbox identity if any."""
    path = config.workspace_for(user_id)
    config.workspace_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        from sandbox_core.errors import ConfigError

        raise ConfigError("workspace_root", f"{path} is not a directory")
    if config.profile == "strict":
        from sandbox_core.isolation.strict import sandbox_identity

        ident = sandbox_identity(config)
        if ident is not None:
            uid, gid = ident
            st = path.stat()
            if (st.st_uid, st.st_gid) != (uid, gid):
                os.chown(path, uid, gid)
    return path


def can_prewarm(config: ProcessSandboxConfig) -> bool:
    """Whether workers of this profile can start unbound and be bound to a user later.

    ``strict`` mounts the user's workspace when the sandbox is created, so its workers
    start on a user's first request (and stay warm for that user afterwards).
    """
    return config.profile != "strict"
