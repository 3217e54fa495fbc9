"""The application object shared by every command (global options, config loading)."""

from __future__ import annotations

import getpass
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandbox_core.config import LoadedConfig


@dataclass
class AppState:
    """Global options, and the config they produce (loaded once, on first use)."""

    config_path: Path | None = None
    profile: str | None = None
    user: str | None = None
    verbose: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    _loaded: LoadedConfig | None = None

    def loaded(self) -> LoadedConfig:
        if self._loaded is None:
            from sandbox_core.config import load_config

            overrides = dict(self.overrides)
            if self.profile is not None:
                overrides["profile"] = self.profile
            self._loaded = load_config(self.config_path, overrides=overrides)
        return self._loaded

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
