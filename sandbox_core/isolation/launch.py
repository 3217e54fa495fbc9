"""Host side of isolation: the launch spec of one worker in the configured profile.

:mod:`spec` holds the parts every profile shares and the portable ``process`` profile;
:mod:`strict` builds the bubblewrap sandbox. This module picks between them and prepares
a user's workspace; it is the only one that imports both.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import ConfigError
from sandbox_core.isolation import runtime
from sandbox_core.isolation.spec import PACKAGE_ROOT, LaunchSpec, process_launch
from sandbox_core.isolation.strict import host_sockets_checked_at_launch, sandbox_identity, strict_launch

__all__ = [
    "PACKAGE_ROOT", "LaunchSpec", "can_prewarm", "host_sockets_checked_at_launch", "launch_spec",
    "prepare_workspace", "worker_python", "workspace_owner",
]


def launch_spec(config: ProcessSandboxConfig, worker_id: str, workspace: Path | None) -> LaunchSpec:
    """The launch spec of one worker in the configured profile (strict may raise)."""
    if config.profile == "strict":
        return strict_launch(config, worker_id, workspace)
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
    """Create ``user_id``'s workspace (0700) and give it to the sandbox identity if any."""
    path = config.workspace_for(user_id)
    config.workspace_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise ConfigError("workspace_root", f"{path} is not a directory")
    ident = workspace_owner(config)
    if ident is not None:
        uid, gid = ident
        st = path.stat()
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(path, uid, gid)
    return path


def workspace_owner(config: ProcessSandboxConfig) -> tuple[int, int] | None:
    """The (uid, gid) a workspace is given to: the sandbox identity (strict, host root), else None.

    None means the workspace stays the host user's: the sandbox then runs as that same uid.
    """
    return sandbox_identity(config) if config.profile == "strict" else None


def can_prewarm(config: ProcessSandboxConfig) -> bool:
    """Whether workers of this profile can start unbound and be bound to a user later.

    ``strict`` mounts the user's workspace when the sandbox is created, so its workers
    start on a user's first request (and stay warm for that user afterwards).
    """
    return config.profile != "strict"
