"""Where the service listens by default (a light module: the CLI checks it on every command)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sandbox_core.config import ProcessSandboxConfig

SYSTEM_SOCKET = Path("/run/sandbox/sandbox.sock")
"""The socket of a system-wide service (root's, or a service account's with ``/run/sandbox``)."""


def default_socket_path(config: ProcessSandboxConfig, environ: Mapping[str, str] | None = None) -> Path:
    """``service.socket_path``, else the user's runtime directory, else :data:`SYSTEM_SOCKET`.

    Never a path under ``/tmp``: there another user can create the directory first and
    listen where the service is expected. The server and the client agree on this path.
    """
    return socket_path_for(config.service.socket_path, environ)


def socket_path_for(configured: Path | None, environ: Mapping[str, str] | None = None) -> Path:
    """:func:`default_socket_path` from the setting alone (``service.socket_path``, None when unset)."""
    if configured is not None:
        return configured
    env = os.environ if environ is None else environ
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "sandbox" / "sandbox.sock"
    return SYSTEM_SOCKET
