"""What spawning one worker takes: its argv, environment and plan (the ``process`` profile here)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox_core.config import ProcessSandboxConfig, ResourceLimits
from sandbox_core.errors import IsolationUnavailable
from sandbox_core.shared import WORKER_ENTRY
from sandbox_core.valueclass import dataclass

if TYPE_CHECKING:
    from sandbox_core.isolation.spares import Spare

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
    """Called on the host with the new process's pid, in a thread from the spawn on
    (:class:`sandbox_core.worker_process.Placement`; e.g. to move it into its cgroups), while
    the worker answers its handshake; the worker is judged, verified and offered only once it
    returned. Raising IsolationUnavailable kills the worker."""
    after_start: Callable[[], None] | None = None
    """Called on the host in the background (a thread) once the worker has started (bwrap
    built the sandbox before the handshake): lets go of what the host held only for that (a workspace
    tree it built for bwrap to bind). A failure is logged; ``cleanup`` tries again after the
    exit, so it must be idempotent with it."""
    cleanup: Callable[[], None] | None = None
    """Called on the host after the worker has exited (remove cgroups, temp files)."""
    sweep_session: bool = True
    """Kill what is left in the worker's session after it exited (a scan of /proc); a
    profile whose processes die with the worker (a pid namespace) turns it off."""
    limit_events: Callable[[], dict[str, int]] | None = None
    """Counters of limits that struck (``memory``: OOM kills, ``processes``: refused forks),
    read before and after a request to say which limit ended it."""
    cpu_usage: Callable[[], int | None] | None = None
    """CPU nanoseconds the worker has used so far (its cgroup's accounting), for CPU budgets."""
    cgroup_pids: Callable[[], set[int]] | None = None
    """Every process in the worker's cgroups (to kill a request's processes)."""
    attach: Callable[[Path, Callable[[], object]], dict[str, Any]] | None = None
    """Unbound strict workers: attaches a user's workspace (host path; the callable creates it
    when it is to be used) at claim and returns what the worker's ``bind`` needs (``uid``,
    ``gid``, ``workspace``, ``expect_mounts``) and the report's entries; None when the worker is
    bound at spawn or binds by itself."""
    spare: Spare | None = None
    """The spare workspace a new user takes at claim (see ``stage``)."""
    stage: Callable[[], None] | None = None
    """Unbound strict workers with per-user uids: makes and attaches a spare workspace for a
    new user after the start, off the request path (:mod:`sandbox_core.isolation.spares`)."""


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


def rlimit_plan(limits: ResourceLimits) -> dict[str, int | tuple[int, int]]:
    """rlimits for the plan (``0`` settings are left out, i.e. unlimited).

    The CPU limit's hard value is one second above its soft one: at the soft limit the
    kernel sends SIGXCPU, which names the reason; with soft == hard it sends SIGKILL,
    which could be anything.
    """
    plan: dict[str, int | tuple[int, int]] = {"core": 0 if not limits.core_dumps else -1}
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
    if limits.cpu_seconds:
        plan["cpu"] = (limits.cpu_seconds, limits.cpu_seconds + 1)
    return plan


PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
"""The directory holding the ``sandbox_core`` package (put first on the worker's path)."""
_BOOT = "import sys; sys.path.insert(0, {root!r}); from {entry} import main; main()"


def python_argv(
    config: ProcessSandboxConfig, *, executable: str = sys.executable, root: str = PACKAGE_ROOT
) -> list[str]:
    """The worker's command: isolated mode (-I ignores PYTHON* variables and the cwd).

    ``-S`` skips ``site`` at start-up (~25 ms of .pth processing); the worker adds
    site-packages itself only when a method needs a third-party package (the agent).
    ``-B``: the worker never writes bytecode into the tree it runs from (the strict stage is
    read-only anyway; a ``process`` worker, umask 077, rewrote an edited module's ``.pyc``
    0600 in the host's tree, which strict workers, another uid, then could not read).
    ``executable`` and ``root`` (the directory holding ``sandbox_core``) are as the worker
    sees them: the host's own for the ``process`` profile.
    """
    boot = _BOOT.format(root=root, entry=WORKER_ENTRY)
    return [executable, "-I", "-S", "-B", "-c", boot, str(config.max_frame_bytes)]


def process_launch(config: ProcessSandboxConfig, workspace: Path | None) -> LaunchSpec:
    """The portable ``process`` profile: env allowlist, new session, closed fds, rlimits.

    As root it refuses unless ``allow_root_process`` says otherwise: it switches no uid, so
    every command would run as root.
    """
    if os.geteuid() == 0 and not config.allow_root_process:
        raise IsolationUnavailable(
            "profile 'process' would run every command as root with full access to this host: use the strict "
            "profile (the default, which drops to an unprivileged uid), run as an unprivileged user, or accept it "
            "explicitly with --allow-root-process (allow_root_process = true)",
            data={"field": "allow_root_process", "reason": "process_as_root"},
        )
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
