"""Where the service listens by default (a light module: the CLI checks it on every command)."""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: a one-shot client starts faster
if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from sandbox_core.config import ProcessSandboxConfig

SYSTEM_SOCKET = "/run/sandbox/sandbox.sock"
"""The socket of a system-wide service (root's, or a service account's with ``/run/sandbox``)."""


def default_socket_path(config: ProcessSandboxConfig, environ: Mapping[str, str] | None = None) -> Path:
    """``service.socket_path``, else the user's runtime directory, else :data:`SYSTEM_SOCKET`.

    Never a path under ``/tmp``: there another user can create the directory first and
    listen where the service is expected. The server and the client agree on this path.
    """
    from pathlib import Path

    return Path(socket_file(config.service.socket_path, environ))


def socket_file(configured: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> str:
    """:func:`default_socket_path` from the setting alone (``service.socket_path``, None when unset)."""
    if configured is not None:
        return os.fspath(configured)
    env = os.environ if environ is None else environ
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "sandbox", "sandbox.sock")
    return SYSTEM_SOCKET


def normalize_address(text: str) -> str:
    """``unix:/abs/path`` or an ``http(s)://`` URL from what a user may type.

    Accepted: ``unix:PATH``, a socket path (relative ones are made absolute),
    ``http(s)://HOST:PORT`` and a bare ``HOST:PORT`` (TCP) when no such file exists.
    """
    from sandbox_core.errors import ConfigError

    text = text.strip()
    if text.startswith(("http://", "https://")):
        return text.rstrip("/")
    if "://" in text:
        raise ConfigError("--connect", f"unsupported address {text!r}: use unix:PATH, a socket path or "
                                       "http(s)://HOST:PORT")
    if text.startswith("unix:"):
        path = text[len("unix:"):]
    elif _is_host_port(text) and not os.path.exists(text):
        return f"http://{text}"
    else:
        path = text
    if not path:
        raise ConfigError("--connect", "empty socket path")
    path = os.path.expanduser(path)
    return "unix:" + (path if path.startswith("/") else os.path.join(os.getcwd(), path))


_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-")
_ADDRESS_CHARS = frozenset("0123456789abcdefABCDEF:.")


def _is_host_port(text: str) -> bool:
    """``HOST:PORT``: a name or IPv4 address (letters, digits, ``.``, ``-``) or ``[IPv6]``, then 1-5 digits."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isascii() or not port.isdigit() or len(port) > 5 or not host:
        return False
    if host.startswith("[") and host.endswith("]"):
        return len(host) > 2 and set(host[1:-1]) <= _ADDRESS_CHARS
    return set(host) <= _HOST_CHARS
