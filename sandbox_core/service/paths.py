"""Where the service listens by default (a light module: the CLI checks it on every command)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from sandbox_core.config import ProcessSandboxConfig


def default_socket_path(config: ProcessSandboxConfig, environ: Mapping[str, str] | None = None) -> Path:
    """``service.socket_path``, else the user's runtime directory."""
    if config.service.socket_path is not None:
        return config.service.socket_path
    env = os.environ if environ is None else environ
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "sandbox" / "sandbox.sock"
    if os.getuid() == 0:
        return Path("/run/sandbox/sandbox.sock")
    return Path(f"/tmp/sandbox-{os.getuid()}/sandbox.sock")
