"""Host side of isolation: the launch spec of one worker in the configured profile.

:mod:`spec` holds the parts every profile shares and the portable ``process`` profile;
:mod:`strict` builds the bubblewrap sandbox. This module picks between them and prepares
a user's workspace; it is the only one that imports both.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from pathlib import Path

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import ConfigError
from sandbox_core.isolation import cgroups, quota, runtime, slots, spares, tenants
from sandbox_core.isolation.spec import PACKAGE_ROOT, LaunchSpec, process_launch
from sandbox_core.isolation.strict import can_attach, host_sockets_checked_at_launch, sandbox_identity, strict_launch

__all__ = [
    "PACKAGE_ROOT", "LaunchSpec", "can_prewarm", "host_sockets_checked_at_launch", "launch_spec",
    "prepare_workspace", "sweep_leftovers", "worker_python", "workspace_owner",
]


def launch_spec(config: ProcessSandboxConfig, worker_id: str, workspace: Path | None) -> LaunchSpec:
    """The launch spec of one worker in the configured profile (strict may raise)."""
    if config.profile == "strict":
        return strict_launch(config, worker_id, workspace, unbound=workspace is None and can_prewarm(config))
    return process_launch(config, workspace)


def worker_python(config: ProcessSandboxConfig) -> tuple[str, str]:
    """(interpreter, directory holding ``sandbox_core``) as a command inside a worker sees them.

    A command that runs the worker's own code (the audit's probe command) needs these: in the
    strict profile they are the staged runtime's neutral paths, not the host's.
    """
    if config.profile == "strict":
        return runtime.inside_executable(), runtime.app_dir()
    return sys.executable, PACKAGE_ROOT


def prepare_workspace(config: ProcessSandboxConfig, user_id: str) -> Path:
    """Create ``user_id``'s workspace and give it to the user's sandbox uid, mode 0700.

    The workspace root is the host's (0700, never writable by a sandbox), so its entries are
    not sandbox-controlled; even so the workspace is opened without following a symlink and
    changed through that descriptor, never by path.
    """
    path = config.workspace_for(user_id)
    config.workspace_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    ident = workspace_owner(config, user_id)
    if quota.configured(config):
        if ident is None:
            quota.ensure(config, user_id, path, (os.getuid(), os.getgid()))  # refuses: not enforceable here
        else:
            quota.ensure(config, user_id, path, ident)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise ConfigError("workspace_root", f"{path} is not a directory") from None
    try:
        st = os.fstat(fd)
        if ident is not None and (st.st_uid, st.st_gid) != ident:
            os.fchown(fd, *ident)
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def workspace_owner(config: ProcessSandboxConfig, user_id: str) -> tuple[int, int] | None:
    """The (uid, gid) ``user_id``'s workspace is given to: the user's sandbox uid (strict, host
    root), else None.

    None means the workspace stays the host user's: the sandbox then runs as that same uid.
    """
    return sandbox_identity(config, user_id) if config.profile == "strict" else None


def sweep_leftovers(config: ProcessSandboxConfig) -> list[str]:
    """Remove the worker cgroups, slots and spare workspaces orchestrators that died (SIGKILL, a
    crash) left behind."""
    if config.profile != "strict":
        return []
    swept: list[str] = []
    if slots.unavailable() is None and (config.state_dir / slots.SLOTS_DIR).is_dir():  # even if no longer used
        swept += [f"slot {name}" for name in slots.sweep(tenants.state_dir(config))]
    if os.geteuid() == 0:
        swept += [f"spare {name}" for name in spares.sweep(config)]
    if config.strict.cgroups:
        swept += cgroups.sweep(cgroups.sweep_bases(config.limits, config.strict.cgroup_parent))
    return swept


def can_prewarm(config: ProcessSandboxConfig) -> bool:
    """Whether workers of this profile can start unbound and be bound to a user later.

    ``strict`` can on a root host: the worker starts unbound and the user's workspace is
    attached to the running sandbox at claim (:mod:`slots`). Without root (a user namespace
    maps the caller's uid and the host cannot mount), or where the attach cannot express the
    configuration (:func:`strict.can_attach`), strict workers start on a user's first request
    with the workspace bound at spawn (and stay warm for that user afterwards).
    """
    return config.profile != "strict" or can_attach(config) is None


def can_switch_ahead(config: ProcessSandboxConfig) -> bool:
    """Whether pre-warmed workers can switch to a new user's uid before the claim
    (``new_user_spares``): strict workers that start unbound (:func:`can_prewarm`) with a uid
    per user, the only ones a spare workspace (and so its uid) is staged for."""
    return config.profile == "strict" and not config.strict.sandbox_user and can_prewarm(config)
