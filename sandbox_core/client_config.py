"""The few settings a client of a running service needs, read without building the whole config.

``sandbox exec`` against a service needs three settings: the uids it trusts as the server
(``service.server_uids``), the default socket (``service.socket_path``) and
``limits.processes`` (for a note on a run that hit it). Building the whole
:class:`~sandbox_core.config.ProcessSandboxConfig` costs such a client more than the run
itself (the dataclasses of :mod:`sandbox_core.config` generate their methods at import).
This module reads the same layers with the same precedence (defaults < TOML file <
environment < overrides) for those keys only. It never decides an error: whenever a value
it reads is bad, a key is unknown, or the file cannot be read, it answers None, and the
caller loads the full config, which raises the very error it always did. Settings it does
not read are not validated here (a client of the service does not use them).

It belongs to :mod:`sandbox_core.config`'s area: the two are the only modules that read
environment variables and config files, and the full one takes its shared parts from here.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: a one-shot client starts faster
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

DEFAULT_PROCESSES = 128
"""The default of ``limits.processes`` (:class:`~sandbox_core.config.ResourceLimits` uses it)."""

SECTIONS = frozenset({"env", "limits", "strict", "model", "service", "record", "network"})
"""The ``[section]`` tables of the config (a test checks them against :mod:`sandbox_core.config`)."""

ALL_KEYS = frozenset({
    "acquire_timeout", "allow_root_process", "cancel_grace", "circuit_reset", "cleanup_interval",
    "default_user", "env.allow", "env.default_path", "env.fixed", "head_start", "limits.address_space_mb",
    "limits.core_dumps", "limits.cpu_budget_seconds", "limits.cpu_seconds", "limits.cpus",
    "limits.file_size_mb", "limits.memory_mb", "limits.open_files", "limits.output_mb", "limits.processes",
    "limits.socket_mb", "limits.transfer_mb", "limits.workspace_inodes", "limits.workspace_mb",
    "max_frame_bytes", "max_requests_per_worker", "max_workers", "max_workers_per_user", "min_idle",
    "model.allow_container", "model.allow_mcp_servers", "model.allow_remote_sources",
    "model.allow_server_tools", "model.allowed_betas", "model.allowed_models", "model.api_key",
    "model.base_url", "model.extra_body_fields", "model.max_body_bytes", "model.max_tokens",
    "model.max_tokens_limit", "model.max_turns", "model.max_user_calls", "model.model", "model.provider",
    "model.request_timeout", "model.request_token_budget", "model.user_token_budget", "network.allow",
    "network.allow_private", "network.connect_timeout", "network.deny", "network.hosts",
    "network.log_refusals", "network.max_connections", "network.max_mb", "network.mode", "network.users",
    "new_user_spares", "preload", "profile", "record.enabled", "record.max_mb", "record.preview_bytes",
    "record.retention_days", "request_timeout", "service.cancel_on_disconnect", "service.drain_grace",
    "service.keepalive_seconds", "service.log_level", "service.max_body_mb", "service.max_buffered_events",
    "service.max_runs_per_user", "service.operator_uids", "service.run_buffer_mb", "service.run_ttl",
    "service.server_uids", "service.slow_client_seconds", "service.socket_group", "service.socket_path",
    "service.tokens_file", "shutdown_grace", "start_failure_threshold", "startup_timeout", "state_dir",
    "stderr_lines", "strict.bwrap", "strict.cgroup_parent", "strict.cgroup_version", "strict.cgroups",
    "strict.deny_paths", "strict.landlock", "strict.protected_paths", "strict.ro_binds", "strict.rw_binds",
    "strict.sandbox_user", "strict.seccomp", "strict.uid_range", "strict.unix_sockets", "terminal_timeout",
    "worker_timeout", "workspace_root",
})  # fmt: skip
"""Every dotted key of the config (a test checks it against :func:`sandbox_core.config.field_types`)."""

CLIENT_VARIABLES = frozenset({"SANDBOX_CONFIG", "SANDBOX_URL", "SANDBOX_TOKEN", "SANDBOX_TOKEN_FILE",
                              "SANDBOX_AUDIT_CANARY"})  # fmt: skip
"""``SANDBOX_*`` names that are not settings: the config file, the CLI's service client, and
the canary ``sandbox audit-env`` plants in its own environment while it runs."""

ENV_ALIASES = {"ANTHROPIC_API_KEY": "model.api_key", "ANTHROPIC_BASE_URL": "model.base_url"}
"""Variables that set a setting under another name than ``SANDBOX_*``."""


class ClientSettings:
    """What a client of the service reads from the config (a plain class: no ``typing`` to import)."""

    __slots__ = ("processes", "server_uids", "socket_path")

    def __init__(self, server_uids: tuple[str, ...] = (), socket_path: str | None = None,
                 processes: int = DEFAULT_PROCESSES) -> None:  # fmt: skip
        self.server_uids = server_uids
        self.socket_path = socket_path
        """``service.socket_path`` (None: the default place, see :mod:`sandbox_core.service.paths`)."""
        self.processes = processes

    def _values(self) -> tuple[tuple[str, ...], str | None, int]:
        return self.server_uids, self.socket_path, self.processes

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClientSettings) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return f"ClientSettings{self._values()!r}"


class _Doubt(Exception):
    """A value this reader does not vouch for: the full config decides (and names the error)."""


def path_problem(path: str) -> str | None:
    """Why ``path`` cannot name one fixed place on the host, or None (absolute and plain)."""
    if path == "":
        return "is empty (it would mean whatever the current directory is)"
    if "\0" in path:
        return "holds a NUL byte"
    if not path.startswith("/"):
        return "is relative (it would depend on the current directory): write an absolute path"
    if ".." in path.split("/"):
        return "has a '..' component: write the path it means"
    return None


def default_config_path(environ: Mapping[str, str]) -> str:
    """``$SANDBOX_CONFIG``, else ``$XDG_CONFIG_HOME/sandbox/config.toml`` (``~/.config`` without it)."""
    if environ.get("SANDBOX_CONFIG"):
        return environ["SANDBOX_CONFIG"]
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "sandbox", "config.toml")


def _uids(value: Any, from_text: bool) -> tuple[str, ...]:
    if from_text and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v.isdigit() for v in value):
        raise _Doubt
    return tuple(value)


def _socket_path(value: Any, from_text: bool) -> str | None:
    if value is None or (from_text and value in ("", "none", "None")):
        return None
    if not isinstance(value, str | os.PathLike) or os.fspath(value) == "":
        raise _Doubt
    path = os.path.expanduser(os.fspath(value))
    if path_problem(path) is not None:
        raise _Doubt
    return os.path.normpath(path)


def _processes(value: Any, from_text: bool) -> int:
    if isinstance(value, bool) or not (from_text or isinstance(value, int)):
        raise _Doubt
    try:
        number = int(value)
    except ValueError:
        raise _Doubt from None
    if number < 0:
        raise _Doubt
    return number


_READ = {"service.server_uids": _uids, "service.socket_path": _socket_path, "limits.processes": _processes}
_FIELD = {"service.server_uids": "server_uids", "service.socket_path": "socket_path",
          "limits.processes": "processes"}  # fmt: skip


def _file_layer(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> dict[str, Any]:
    """The flattened settings of the config file (none without one), or :class:`_Doubt`."""
    file_path = os.fspath(path) if path is not None else default_config_path(environ)
    if path is None and not os.path.isfile(file_path):
        return {}
    import tomllib

    try:
        with open(file_path) as file:  # as the full config reads it
            data = tomllib.loads(file.read())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise _Doubt from None
    return flatten_toml(data)


def flatten_toml(data: Mapping[str, Any]) -> dict[str, Any]:
    """A config file's tables as dotted keys (``[limits] processes`` → ``limits.processes``)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub, subval in value.items():
                flat[f"{key}.{sub}"] = subval
        else:
            flat[key] = value
    return flat


def _env_layer(environ: Mapping[str, str]) -> dict[str, str]:
    out = {key: environ[var] for var, key in ENV_ALIASES.items() if environ.get(var)}
    for var, value in environ.items():
        if var.startswith("SANDBOX_") and var not in CLIENT_VARIABLES:
            out[var[len("SANDBOX_") :].lower().replace("__", ".")] = value
    return out


def read_client_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ClientSettings | None:
    """The client's settings as :func:`~sandbox_core.config.load_config` would give them, or None
    when this reader is unsure (a bad value of a key it reads, an unknown key, an unreadable file).

    ``path``, ``environ`` and ``overrides`` mean what they mean for ``load_config``.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    try:
        layers = [
            (_file_layer(path, env), False),
            (_env_layer(env), True),
            ({k: v for k, v in (overrides or {}).items() if v is not None}, False),
        ]
        for layer, from_text in layers:
            for key, raw in layer.items():
                if key not in ALL_KEYS:
                    raise _Doubt
                if key in _READ:
                    values[_FIELD[key]] = _READ[key](raw, from_text)
    except _Doubt:
        return None
    return ClientSettings(**values)
