"""Helpers shared by commands: the effective config with command-level flags applied."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from cli import output
from cli.state import AppState

if TYPE_CHECKING:
    from sandbox_core.config import ProcessSandboxConfig


def state_of(ctx: typer.Context) -> AppState:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, AppState) else AppState()


def effective_config(state: AppState, profile: str | None = None, **changes: object) -> ProcessSandboxConfig:
    """Load the config (global flags), apply command flags; warn loudly for ``process``."""
    from sandbox_core.errors import ConfigError

    if profile is not None:
        state.profile = profile
    try:
        config = state.loaded().config
        if changes:
            config = config.replace(**changes)
    except ConfigError as exc:
        output.fail(str(exc), hint="check your config file, SANDBOX_* variables and flags", code=output.EXIT_USAGE)
    if config.profile == "process":
        output.warn(
            "profile 'process' is weaker than 'strict': no namespaces, seccomp or landlock; "
            "the agent can read any file this user can and reach the network"
        )
    return config
