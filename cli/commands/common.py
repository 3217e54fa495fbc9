"""Helpers shared by commands: the app state, the effective config with command flags applied."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from cli import output
from cli.state import AppState

if TYPE_CHECKING:
    import typer

    from cli.remote import Target
    from sandbox_core.client_config import ClientSettings
    from sandbox_core.config import ProcessSandboxConfig

PROCESS_WARNING = (
    "profile 'process' is weaker than 'strict': no namespaces, seccomp or landlock; "
    "the agent can read any file this user can and reach the network"
)


class ProfileName(enum.StrEnum):
    strict = "strict"
    process = "process"


class NetworkName(enum.StrEnum):
    none = "none"


def network_flags(network: NetworkName | str | None, allow: list[str] | None) -> tuple[str, ...] | None:
    """``--network none`` / ``--allow HOST[:PORT]`` (repeatable) as a request's narrowing of the
    network policy: ``()`` for none, the entries for ``--allow``, None when neither was given."""
    from sandbox_core.names import parse_host_entry

    if network is not None and allow:
        output.fail("--network none and --allow contradict each other", code=output.EXIT_USAGE)
    if network is not None:
        return ()
    if not allow:
        return None
    for entry in allow:
        try:
            parse_host_entry(entry)
        except ValueError as exc:
            output.fail(f"--allow {entry}: {exc}", hint="HOST, *.SUFFIX or HOST:PORT", code=output.EXIT_USAGE)
    return tuple(allow)


NETWORK_HELP = "'none': no network for this request (it narrows the configured policy, never widens it)."
ALLOW_HELP = ("Reach only HOST[:PORT] (repeatable); each must be within the configured network.allow "
              "(it narrows the policy, never widens it).")


class ProviderName(enum.StrEnum):
    auto = "auto"
    anthropic = "anthropic"
    offline = "offline"


def state_of(ctx: typer.Context) -> AppState:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, AppState) else AppState()


RLIMITS_ONLY_WARNING = (
    "strict.cgroups = false: limits are rlimits only (RLIMIT_NPROC counts every process of the uid, "
    "memory is RLIMIT_AS per process, no CPU limit, socket buffers unbounded)"
)


def effective_config(
    state: AppState, profile: str | None = None, *, warn: bool = True, **changes: object
) -> ProcessSandboxConfig:
    """Load the config (global flags), apply command flags; warn loudly for ``process``."""
    from sandbox_core.errors import ConfigError

    if profile is not None and str(profile) != state.profile:
        state.profile = str(profile)
        state.reload()
    try:
        config = state.loaded().config
        if changes:
            config = config.replace(**changes)
    except ConfigError as exc:
        output.fail(str(exc), hint="check your config file, SANDBOX_* variables and flags", code=output.EXIT_USAGE)
    if warn and config.profile == "process":
        output.warn(PROCESS_WARNING)
    if warn and config.profile == "strict" and not config.strict.cgroups:
        output.warn(RLIMITS_ONLY_WARNING)
    return config


def client_settings(state: AppState) -> ClientSettings:
    """What a client of the service reads from the config (:meth:`~cli.state.AppState.client_settings`);
    a bad config fails the command as :func:`effective_config` does."""
    from sandbox_core.errors import ConfigError

    try:
        return state.client_settings()
    except ConfigError as exc:
        output.fail(str(exc), hint="check your config file, SANDBOX_* variables and flags", code=output.EXIT_USAGE)


def agent_preload(config: ProcessSandboxConfig) -> ProcessSandboxConfig:
    """``sandbox run`` and ``repl`` serve agents: ``preload = "auto"`` means ``agent`` for them."""
    return config.replace(preload="agent") if config.preload == "auto" else config


def require_model_key(config: ProcessSandboxConfig) -> None:
    """Fail early, with the fix, when the ``anthropic`` provider has no API key on the host."""
    if config.model.provider == "anthropic" and not config.model.api_key:
        output.fail(
            "provider 'anthropic' needs an API key on the host",
            hint="set ANTHROPIC_API_KEY (or model.api_key in the config file), or use --provider offline",
            code=output.EXIT_USAGE,
        )


def apply_model_flags(
    state: AppState, target: Target | None, provider: ProviderName | None, model: str | None,
    profile: ProfileName | None,
) -> None:
    """``--provider``/``--model`` become config overrides (warned about when a service decides)."""
    from cli.runtime import warn_ignored

    warn_ignored(target, provider=provider, profile=profile)
    if provider is not None:
        state.set_override("model.provider", provider.value)
    if model is not None:
        state.set_override("model.model", model)
