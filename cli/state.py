"""The application object shared by every command (global options, config loading)."""

from __future__ import annotations

import getpass
import os
import re
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox_core.valueclass import dataclass

if TYPE_CHECKING:
    from sandbox_core.client_config import ClientSettings
    from sandbox_core.config import LoadedConfig, ProcessSandboxConfig


@dataclass
class AppState:
    """Global options, and the config they produce (loaded once, on first use)."""

    config_path: Path | None = None
    profile: str | None = None
    user: str | None = None
    verbose: bool = False
    json: bool = False
    connect: str | None = None
    """``--connect`` / ``SANDBOX_URL``: the service to use instead of an in-process pool."""
    local: bool = False
    """``--local``: in-process even when the default socket of ``sandbox serve`` exists."""
    overrides: dict[str, Any] = field(default_factory=dict)
    _loaded: LoadedConfig | None = None

    def loaded(self) -> LoadedConfig:
        if self._loaded is None:
            from sandbox_core.config import load_config

            self._loaded = load_config(self.config_path, overrides=self._overrides())
        return self._loaded

    def client_settings(self) -> ClientSettings:
        """What a client of the service reads from the config, without building the config when it can.

        The same values as :meth:`loaded` gives; where the light reader is unsure, the full
        config decides, and its ConfigError is the one :meth:`loaded` raises.
        """
        from sandbox_core.client_config import ClientSettings, read_client_settings

        if self._loaded is None:
            settings = read_client_settings(self.config_path, overrides=self._overrides())
            if settings is not None:
                return settings
        config = self.loaded().config
        socket_path = config.service.socket_path
        return ClientSettings(config.service.server_uids, None if socket_path is None else str(socket_path),
                              config.limits.processes)

    def _overrides(self) -> dict[str, Any]:
        overrides = dict(self.overrides)
        if self.profile is not None:
            overrides["profile"] = self.profile
        return overrides

    def set_override(self, key: str, value: Any) -> None:
        """Set a dotted config key as a flag (``model.provider``); the config reloads on next use."""
        if value is None:
            self.overrides.pop(key, None)
        else:
            self.overrides[key] = value
        self.reload()

    def reload(self) -> None:
        """Forget the loaded config (after a change of flags)."""
        self._loaded = None

    def json_output(self, flag: bool = False) -> bool:
        """A command's ``--json`` or the global one."""
        return flag or self.json

    def user_id(self, explicit: str | None = None) -> str:
        """``--user``, else the config's default user, else the login name."""
        if explicit:
            return explicit
        if self.user:
            return self.user
        default = self.loaded().config.default_user
        if default:
            return default
        try:
            name = getpass.getuser()
        except (KeyError, OSError):
            name = f"uid{os.getuid()}"
        return re.sub(r"[^A-Za-z0-9_.@-]", "_", name) or "default"


def effective_provider(config: ProcessSandboxConfig) -> str:
    """The provider ``auto`` resolves to: ``anthropic`` with an API key, else ``offline``."""
    return config.model.effective_provider
