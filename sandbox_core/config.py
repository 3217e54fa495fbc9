"""ProcessSandboxConfig and its parts, loaded from TOML, ``SANDBOX_*`` variables and overrides.

Precedence, lowest to highest: built-in defaults, the TOML file (``--config`` or the
default path), environment variables, explicit overrides (CLI flags). Only this module
reads environment variables and config files; everything else receives a config object.

Keys are dotted: top-level fields are plain (``max_workers``), section fields carry
their section (``limits.cpu_seconds``). In TOML a section is a table (``[limits]``);
in the environment the dot becomes a double underscore (``SANDBOX_LIMITS__CPU_SECONDS``).
``ANTHROPIC_API_KEY`` and ``ANTHROPIC_BASE_URL`` are honoured for the model section.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

from sandbox_core.client_config import (
    CLIENT_VARIABLES,
    DEFAULT_PROCESSES,
    ENV_ALIASES,
    default_config_path,
    flatten_toml,
    path_problem,
)
from sandbox_core.errors import ConfigError
from sandbox_core.names import is_ip_literal, parse_host_entry, validate_user_id
from sandbox_core.valueclass import dataclass

Profile = Literal["strict", "process"]
NetworkMode = Literal["none", "allowlist"]
Provider = Literal["auto", "anthropic", "offline"]
Source = Literal["default", "file", "env", "flag"]
CgroupVersion = Literal["auto", "v1", "v2"]
Preload = Literal["auto", "agent", "none"]

DEFAULT_ENV_ALLOW = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TERM", "TZ")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_MODEL = "claude-sonnet-5-5"
DEFAULT_UID_RANGE = "200000-299999"
DEFAULT_PROTECTED_PATHS = (
    ".bashrc", ".bash_profile", ".bash_login", ".bash_logout", ".profile",
    ".zshrc", ".zshenv", ".zprofile", ".zlogin",
    ".gitconfig", ".gitmodules", ".git/config", ".git/hooks/",
    ".mcp.json", ".claude/", ".vscode/", ".idea/", ".ripgreprc",
)  # fmt: skip
"""Workspace paths that run code when a shell, git, an IDE or an agent tool opens the workspace."""
DEFAULT_ALLOWED_BETAS = (
    "prompt-caching-2024-07-31", "token-efficient-tools-2025-02-19", "interleaved-thinking-2025-05-14",
    "fine-grained-tool-streaming-2025-05-14", "output-128k-2025-02-19", "context-1m-2025-08-07",
    "context-management-2025-06-27", "structured-outputs-2025-11-13", "effort-2025-11-24",
)  # fmt: skip
"""``anthropic-beta`` values a call from the sandbox may carry by default: none of them lets
the provider reach anything (no MCP connector, code execution, files or skills)."""
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\*?$")


class Secret(str):
    """A string that never shows itself in ``repr`` or ``str`` formatting of a config."""

    def __repr__(self) -> str:
        return "Secret('***')"


@dataclass(frozen=True)
class EnvPolicy:
    """Which host environment variables a worker sees.

    ``allow`` holds exact names; an entry ending in ``*`` (``LC_*``) is a prefix pattern
    and is honoured only when an operator writes one. Everything else is withheld.
    ``fixed`` variables are set as given; ``HOME`` always points at the workspace.
    """

    allow: tuple[str, ...] = DEFAULT_ENV_ALLOW
    fixed: Mapping[str, str] = field(default_factory=dict)
    default_path: str = DEFAULT_PATH
    """PATH used when the host has none to pass."""


@dataclass(frozen=True)
class ResourceLimits:
    """Per-worker limits (rlimits, plus cgroups in the strict profile where writable).

    A value of 0 means "no limit" except for ``core_dumps`` (always off unless True).
    """

    address_space_mb: int = 4096
    """RLIMIT_AS: virtual memory of each process in the worker."""
    memory_mb: int = 1024
    """Memory of the whole worker (cgroup memory.limit_in_bytes, strict profile)."""
    cpu_seconds: int = 600
    """RLIMIT_CPU per process."""
    open_files: int = 256
    """RLIMIT_NOFILE."""
    processes: int = DEFAULT_PROCESSES
    """RLIMIT_NPROC (per uid) and the cgroup pids limit."""
    file_size_mb: int = 1024
    """RLIMIT_FSIZE: largest file a process may write."""
    core_dumps: bool = False
    """RLIMIT_CORE is 0 unless this is True."""
    output_mb: int = 0
    """Output (stdout + stderr) one command may produce before it is killed (0 = no limit)."""
    cpus: float = 1.0
    """CPUs the whole worker may use, like ``docker run --cpus`` (a CFS quota: v1
    ``cpu.cfs_quota_us``, v2 ``cpu.max``); 0 = no limit."""
    cpu_budget_seconds: float = 0.0
    """CPU seconds one request may use in all its processes together, read from the worker's
    cgroup accounting; past it the request's processes are killed (``kill_reason`` "CPU
    budget"). 0 = no budget."""
    socket_mb: int = 0
    """Socket buffer memory of the worker (v1 ``memory.kmem.tcp.limit_in_bytes``; v2 charges
    sockets to ``memory_mb``); 0 = the same as ``memory_mb``."""
    workspace_mb: int = 0
    """Disk quota of each workspace in MiB, enforced by the kernel (the workspace is an ext4 image
    of this size, loop-mounted; strict profile, host root); 0 = none."""
    workspace_inodes: int = 0
    """Files and directories a workspace may hold (the image's inode count); 0 = mkfs's default."""
    transfer_mb: int = 1024
    """Bytes one file transfer (``sandbox cp``, ``pool.files``) may move, in MiB (0 = no limit)."""


@dataclass(frozen=True)
class StrictIsolation:
    """Settings of the ``strict`` profile (bubblewrap + seccomp + landlock)."""

    bwrap: str = "bwrap"
    """The bubblewrap executable (looked up on PATH)."""
    uid_range: str = DEFAULT_UID_RANGE
    """Host uids (``LO-HI``, also each tenant's gid) given one per user when the host is root:
    well above regular accounts, outside every /etc/subuid and /etc/subgid range."""
    sandbox_user: str = ""
    """Opt-out of per-user uids: every worker runs as this one account (a name or uid). Empty
    (the default) gives each user their own uid from ``uid_range``."""
    ro_binds: tuple[str, ...] = ()
    """Extra host paths visible read-only (``SRC`` or ``SRC:DEST``)."""
    rw_binds: tuple[str, ...] = ()
    """Extra host paths visible read-write (``SRC`` or ``SRC:DEST``)."""
    deny_paths: tuple[str, ...] = ()
    """Paths hidden inside the sandbox; they win over any allow."""
    protected_paths: tuple[str, ...] = DEFAULT_PROTECTED_PATHS
    """Workspace-relative paths (``*?[]`` globs per component; a trailing ``/`` names a
    directory) the sandbox can read but never write, create, rename, delete or replace.
    ``[]`` lifts the protection."""
    seccomp: bool = True
    unix_sockets: bool = True
    """AF_UNIX sockets between the sandbox's own processes (``multiprocessing``, ``forkserver``,
    git's fsmonitor). Host sockets stay unreachable either way (a bound tree that exposes
    one is refused at launch on kernels without Landlock ABI 9); ``false`` denies AF_UNIX in
    seccomp as before."""
    landlock: bool = True
    """Use landlock as a second layer when the kernel has it."""
    cgroups: bool = True
    """Per-worker cgroups (memory incl. swap and sockets, pids, CPU): required, the worker does
    not start without them. ``false`` is the rlimits-only mode, asked for by name and warned
    about (RLIMIT_NPROC per uid, memory per process, no CPU limit)."""
    cgroup_version: CgroupVersion = "auto"
    """``auto`` (v1 where the controllers live there, else v2), ``v1`` or ``v2``."""
    cgroup_parent: str = ""
    """v2: the delegated subtree (below the v2 mount) to make worker cgroups in; empty = the
    top-level ``sandbox`` subtree, as root."""


@dataclass(frozen=True)
class ModelConfig:
    """How the agent reaches a model (through the host's gateway)."""

    provider: Provider = "auto"
    """``auto`` = ``anthropic`` when an API key is configured, else ``offline``."""
    model: str = DEFAULT_MODEL
    api_key: Secret | None = None
    base_url: str = "https://api.anthropic.com"
    max_tokens: int = 4096
    max_turns: int = 20
    request_token_budget: int = 0
    """Tokens one agent.run may use (0 = unlimited)."""
    user_token_budget: int = 0
    """Tokens one user may use over the life of the pool (0 = unlimited)."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request body the gateway forwards (the model endpoint answers 413 beyond it)."""
    max_user_calls: int = 16
    """Model calls one user's workers may have in flight at once; more are answered 503
    ``overloaded_error`` with ``retry-after`` (the SDK waits and retries)."""
    request_timeout: float = 600.0
    allowed_models: tuple[str, ...] = ("claude-*",)
    """Models a call from the sandbox may name (``*`` globs); any other is refused."""
    max_tokens_limit: int = 32000
    """``max_tokens`` of a call from the sandbox is clamped to this."""
    allowed_betas: tuple[str, ...] = DEFAULT_ALLOWED_BETAS
    """``anthropic-beta`` values passed on; any other value is dropped from the header."""
    allow_mcp_servers: bool = False
    """Pass ``mcp_servers`` (the provider then connects to the URLs the sandbox names)."""
    allow_server_tools: bool = False
    """Pass server-side tool types (``web_search_*``, ``web_fetch_*``, ``code_execution_*``, ...)."""
    allow_container: bool = False
    """Pass ``container`` (a provider-side container, reusable across requests)."""
    allow_remote_sources: bool = False
    """Pass content blocks whose ``source`` is a ``url`` (the provider fetches it) or a ``file``
    (an uploaded file of the key's organisation)."""
    extra_body_fields: tuple[str, ...] = ()
    """Top-level request fields passed on besides the built-in list."""

    def __post_init__(self) -> None:
        _validate_key(self.api_key)

    @property
    def effective_provider(self) -> Literal["anthropic", "offline"]:
        """What ``provider`` means now: ``auto`` is ``anthropic`` with an API key, else ``offline``."""
        if self.provider == "auto":
            return "anthropic" if self.api_key else "offline"
        return self.provider


@dataclass(frozen=True)
class ServiceConfig:
    """``sandbox serve``: where it listens and who may do what."""

    socket_group: str | None = None
    """A group (name or gid) whose members may connect to the Unix socket: it is then 0660 in a
    0750 directory of that group. None: 0600 in a 0700 directory (only our uid and root)."""
    socket_path: Path | None = None
    """Unix socket (0600, or 0660 with ``socket_group``); None = ``$XDG_RUNTIME_DIR/sandbox/sandbox.sock``,
    else the system socket ``/run/sandbox/sandbox.sock`` (never a path under ``/tmp``)."""
    tokens_file: Path | None = None
    """TOML file of bearer tokens for TCP (``[[token]] sha256|token, user, role``)."""
    operator_uids: tuple[str, ...] = ()
    """Unix-socket peers (uids) that are operators besides root and the server's own uid."""
    server_uids: tuple[str, ...] = ()
    """uids a client accepts as the server on a Unix socket besides root and its own (a
    dedicated service account): they may own the socket and its directory and listen on it."""
    cancel_on_disconnect: bool = True
    """A client that disconnects mid-stream cancels its run."""
    keepalive_seconds: float = 15.0
    """Seconds between SSE keep-alive comments."""
    drain_grace: float = 30.0
    """Seconds in-flight runs get after SIGTERM before they are killed."""
    max_buffered_events: int = 10000
    """Events kept per run for re-attaching streams."""
    run_buffer_mb: int = 8
    """MiB of events (measured as their JSON) kept per run for re-attaching streams; beyond
    it the oldest output is dropped and counted in one ``gap`` event."""
    slow_client_seconds: float = 10.0
    """Seconds a run waits for a live stream that has stopped reading before it drops events
    that stream has not read (the stream then gets a ``gap`` event)."""
    run_ttl: float = 600.0
    """Seconds a finished run stays (for its summary and re-attaching), then it is released."""
    max_runs_per_user: int = 50
    """Runs kept per user: a new run releases the user's oldest finished one; when all are
    still running, the new one is refused (HTTP 429)."""
    max_body_mb: int = 16
    """Largest request body in MiB; a larger one is refused while it is read (HTTP 413)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """The service's log (stderr; JSON lines when it is not a terminal): uvicorn's access log
    and ours (runs, auth failures) at ``info``."""


@dataclass(frozen=True)
class RecordConfig:
    """The durable record of runs and security-relevant events (``record.sqlite3`` in ``state_dir``)."""

    enabled: bool = True
    retention_days: float = 30.0
    """Rows older than this are deleted."""
    max_mb: int = 256
    """Beyond this size the oldest journal rows (then runs) are deleted."""
    preview_bytes: int = 512
    """Every string recorded (argv, prompt, tool input, output preview) is cut to this."""


@dataclass(frozen=True)
class NetworkPolicy:
    """What a strict sandbox may reach through its proxy (the host resolves and connects).

    Entries of ``allow``, ``deny`` and ``users`` are ``NAME`` or ``NAME:PORT``; a name is a
    host name, ``*.SUFFIX`` (any name below SUFFIX, not SUFFIX itself) or ``*`` (any name).
    ``deny`` wins over ``allow``. An address a name resolves to (or an IP literal) that is not
    public (loopback, private, link-local, multicast, metadata...) is refused unless
    ``allow_private`` lists it.
    """

    mode: NetworkMode = "none"
    """``none``: no network (the proxy answers 403 saying so); ``allowlist``: ``allow`` only."""
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    hosts: Mapping[str, str] = field(default_factory=dict)
    """Static name -> IP address overrides used by the host instead of DNS."""
    allow_private: tuple[str, ...] = ()
    """CIDRs of non-public addresses that may be reached after resolution (and as IP literals)."""
    users: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Per-user narrowing: a listed user reaches only what both ``allow`` and their list allow."""
    max_connections: int = 32
    """Connections one worker may have open (or opening) at once."""
    max_mb: int = 0
    """MiB one worker may relay over its life, both directions together (0 = no limit)."""
    connect_timeout: float = 10.0
    """Seconds the host gives name resolution plus the TCP connect of one connection."""
    log_refusals: int = 20
    """Refusals of one worker logged (and journalled) per minute; past that they are counted and
    said in one summary line, so a sandbox looping on denied connects cannot flood the log
    (0 = log every one)."""


def parse_cidr(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR (or one address) of ``allow_private``, or ValueError."""
    try:
        return ipaddress.ip_network(entry, strict=True)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{entry!r} is not a CIDR ({exc})") from None


FRAME_SLACK = 128 * 1024
"""What a ``gateway.request`` frame holds besides the body's base64 (method, URL, headers)."""


@dataclass(frozen=True)
class ProcessSandboxConfig:
    """Everything the orchestrator and its workers need, immutable once loaded."""

    profile: Profile = "strict"
    workspace_root: Path = field(
        default_factory=lambda: Path.home() / ".local" / "share" / "sandbox" / "workspaces"
    )
    """One directory per user below this, created 0700."""
    state_dir: Path = field(default_factory=lambda: default_state_dir(os.environ))
    """Where the orchestrator keeps what must outlive it (the tenants' uid map):
    ``/var/lib/sandbox`` as root, else ``$XDG_STATE_HOME/sandbox``."""
    default_user: str | None = None
    startup_timeout: float = 10.0
    """Seconds a new worker has to finish its handshake."""
    request_timeout: float = 300.0
    """Default deadline of one request."""
    terminal_timeout: float = 0.0
    """Default deadline of a terminal session (``pool.terminal``, ``sandbox shell``, ``exec -t``,
    the service's ``/v1/terminal``); 0 = ``request_timeout``. Shells usually want longer."""
    worker_timeout: float = 300.0
    """Idle seconds after which a bound worker is reaped."""
    max_workers: int = 8
    max_workers_per_user: int = 2
    """A user's concurrent requests get up to this many workers, then queue."""
    min_idle: int = 1
    """Pre-warmed unbound workers kept ready."""
    new_user_spares: int = 0
    """Of the ``min_idle`` pre-warmed workers, how many wait already switched to the uid of the
    spare workspace staged for them (strict profile on a root host with per-user uids; elsewhere
    none): a claim by a user with no uid and no workspace yet then skips the switch and its
    check. Such a worker serves no other user (a returning one takes another, or gets one
    started), and its uid is never given back, even when no user took it."""
    preload: Preload = "auto"
    """What idle workers load ahead of a request: ``agent`` imports the SDK, builds the client on
    the gateway connection and runs one canned offline turn, so a worker's first agent text is
    hot; ``auto`` becomes ``agent`` at the first agent request the pool sees; ``none`` never."""
    head_start: bool = True
    """One-shot in-process commands (``sandbox exec`` without a service) spawn their worker as
    soon as the config is read, while the host still loads the pool (:mod:`sandbox_core.head_start`);
    off, the pool spawns it when the request comes, as a library pool always does."""
    max_requests_per_worker: int = 200
    """A worker is recycled after this many requests (0 = never)."""
    acquire_timeout: float = 10.0
    """How long a request waits for a free slot before PoolExhausted."""
    cleanup_interval: float = 5.0
    max_frame_bytes: int = 8 * 1024 * 1024
    shutdown_grace: float = 5.0
    """Seconds in-flight requests get at shutdown, and a worker gets between SIGTERM and SIGKILL."""
    cancel_grace: float = 2.0
    """Seconds a cancelled request has to answer before its worker is killed."""
    start_failure_threshold: int = 3
    """Consecutive start failures that open the circuit breaker."""
    circuit_reset: float = 30.0
    """Seconds the circuit stays open."""
    stderr_lines: int = 200
    """Lines of worker stderr kept for diagnostics."""
    allow_root_process: bool = False
    """Let the ``process`` profile run when the host is root. It has no uid switch: its
    commands would run as root with the host's full access, so without this it refuses."""
    env: EnvPolicy = field(default_factory=EnvPolicy)
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    strict: StrictIsolation = field(default_factory=StrictIsolation)
    model: ModelConfig = field(default_factory=ModelConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    network: NetworkPolicy = field(default_factory=NetworkPolicy)

    def __post_init__(self) -> None:
        _validate(self)

    def replace(self, **changes: Any) -> ProcessSandboxConfig:
        return dataclasses.replace(self, **changes)

    @property
    def model_body_limit(self) -> int:
        """The largest request body the in-sandbox model endpoint accepts: ``model.max_body_bytes``,
        lowered so that its base64 (plus the request's head) fits in one ``max_frame_bytes`` frame."""
        fits = (self.max_frame_bytes - FRAME_SLACK) // 4 * 3
        return max(0, min(self.model.max_body_bytes, fits))

    def workspace_for(self, user_id: str) -> Path:
        """The workspace path of ``user_id`` (validated; not created)."""
        validate_user_id(user_id)
        return self.workspace_root / user_id


def _validate_key(key: str | None) -> None:
    """An API key goes into an HTTP header: printable ASCII with no whitespace, or ConfigError.

    A key read from a file or a variable with a trailing newline would otherwise fail in the
    HTTP layer, whose error message quotes the whole header value. The message never holds the key.
    """
    bad = next((i for i, ch in enumerate(key or "") if not "!" <= ch <= "~"), None)
    if key and bad is not None:
        where = f"has whitespace or a control character at position {bad} of {len(key)}" + (
            " (a trailing newline?)" if bad == len(key) - 1 else "")
        raise ConfigError("model.api_key", f"the API key {where}: it must be printable ASCII without "
                          "whitespace (check ANTHROPIC_API_KEY or model.api_key)")


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """``$SANDBOX_STATE_DIR``, else ``/var/lib/sandbox`` for root, else ``$XDG_STATE_HOME/sandbox``
    (``~/.local/state/sandbox``). (The variable is the ``state_dir`` setting itself; reading it
    here too makes a config built in code keep to it, as the tests' private state does.)"""
    if environ.get("SANDBOX_STATE_DIR"):
        return Path(environ["SANDBOX_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/sandbox")
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sandbox"


def parse_uid_range(text: str) -> tuple[int, int]:
    """``"LO-HI"`` as (LO, HI), or ConfigError: unprivileged (LO > 65535), at most 2**31 - 2."""
    lo_text, sep, hi_text = text.partition("-")
    if not sep or not lo_text.strip().isdigit() or not hi_text.strip().isdigit():
        raise ConfigError("strict.uid_range", f"{text!r} is not LO-HI (for example {DEFAULT_UID_RANGE!r})")
    lo, hi = int(lo_text), int(hi_text)
    if lo > hi:
        raise ConfigError("strict.uid_range", f"{text!r}: LO is above HI")
    if lo <= 65535:
        raise ConfigError("strict.uid_range", f"{text!r} reaches below 65536 (regular accounts, nobody, "
                          "systemd's dynamic users): start it higher")
    if hi > 2**31 - 2:
        raise ConfigError("strict.uid_range", f"{text!r} goes past 2147483646")
    return lo, hi


def _positive(cfg: object, names: tuple[str, ...], prefix: str = "", zero_ok: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < 0 or (value == 0 and not zero_ok):
            raise ConfigError(prefix + name, f"must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")


def _validate(cfg: ProcessSandboxConfig) -> None:
    _positive(cfg, ("startup_timeout", "request_timeout", "worker_timeout", "max_workers",
                    "max_workers_per_user", "acquire_timeout", "cleanup_interval",
                    "max_frame_bytes", "stderr_lines", "start_failure_threshold"))
    _positive(cfg, ("min_idle", "new_user_spares", "max_requests_per_worker", "shutdown_grace", "cancel_grace",
                    "circuit_reset", "terminal_timeout"), zero_ok=True)
    if cfg.min_idle > cfg.max_workers:
        raise ConfigError("min_idle", f"must not exceed max_workers ({cfg.max_workers})")
    if cfg.max_frame_bytes < 1024:
        raise ConfigError("max_frame_bytes", "must be at least 1024")
    if cfg.preload not in ("auto", "agent", "none"):
        raise ConfigError("preload", f"must be 'auto', 'agent' or 'none', got {cfg.preload!r}")
    if cfg.profile not in ("strict", "process"):
        raise ConfigError("profile", f"must be 'strict' or 'process', got {cfg.profile!r}")
    _validate_paths(cfg)
    parse_uid_range(cfg.strict.uid_range)
    if cfg.default_user is not None:
        try:
            validate_user_id(cfg.default_user)
        except ConfigError as exc:
            raise ConfigError("default_user", exc.message) from None
    for name in cfg.env.allow:
        if not _ENV_NAME.match(name):
            raise ConfigError("env.allow", f"{name!r} is not a variable name or NAME_* pattern")
    for key in cfg.env.fixed:
        if not _ENV_NAME.match(key) or key.endswith("*"):
            raise ConfigError("env.fixed", f"{key!r} is not a variable name")
    _positive(cfg.limits, ("address_space_mb", "memory_mb", "cpu_seconds", "open_files",
                           "processes", "file_size_mb", "output_mb", "transfer_mb", "cpus", "cpu_budget_seconds",
                           "socket_mb", "workspace_mb", "workspace_inodes"), "limits.", zero_ok=True)
    if cfg.model.provider not in ("auto", "anthropic", "offline"):
        raise ConfigError("model.provider", f"must be auto, anthropic or offline, got {cfg.model.provider!r}")
    _positive(cfg.model, ("max_tokens", "max_turns", "max_body_bytes", "request_timeout", "max_tokens_limit",
                          "max_user_calls"),
              "model.")
    _positive(cfg.model, ("request_token_budget", "user_token_budget"), "model.", zero_ok=True)
    _positive(cfg.service, ("keepalive_seconds", "drain_grace", "max_buffered_events", "run_buffer_mb",
                            "slow_client_seconds", "run_ttl", "max_runs_per_user", "max_body_mb"), "service.")
    for name in ("operator_uids", "server_uids"):
        for uid in getattr(cfg.service, name):
            if not uid.isdigit():
                raise ConfigError(f"service.{name}", f"{uid!r} is not a numeric uid")
    if not re.match(r"^https?://", cfg.model.base_url):
        raise ConfigError("model.base_url", f"must be an http(s) URL, got {cfg.model.base_url!r}")
    _validate_network(cfg)


def _validate_network(cfg: ProcessSandboxConfig) -> None:
    """Every network entry parses, or ConfigError naming the setting and the entry."""
    net = cfg.network
    if net.mode not in ("none", "allowlist"):
        raise ConfigError("network.mode", f"must be 'none' or 'allowlist', got {net.mode!r}")
    if net.mode == "allowlist" and cfg.profile != "strict":
        raise ConfigError("network.mode", f"'allowlist' needs the strict profile: the {cfg.profile} profile has no "
                          "network namespace of its own, so nothing would stop a direct connection")  # fmt: skip
    _positive(net, ("max_connections", "connect_timeout"), "network.")
    _positive(net, ("max_mb", "log_refusals"), "network.", zero_ok=True)
    lists: list[tuple[str, tuple[str, ...]]] = [("network.allow", net.allow), ("network.deny", net.deny)]
    for user, entries in net.users.items():
        try:
            validate_user_id(user)
        except ConfigError as exc:
            raise ConfigError("network.users", exc.message) from None
        lists.append((f"network.users.{user}", entries))
    for setting, entries in lists:
        for entry in entries:
            try:
                parse_host_entry(entry)
            except ValueError as exc:
                raise ConfigError(setting, str(exc)) from None
    for name, address in net.hosts.items():
        try:
            host, port = parse_host_entry(name)
        except ValueError as exc:
            raise ConfigError("network.hosts", str(exc)) from None
        if port is not None or host.startswith("*"):
            raise ConfigError("network.hosts", f"{name!r}: a key is one plain host name (no port, no wildcard)")
        if not is_ip_literal(address):
            raise ConfigError("network.hosts", f"{name!r} = {address!r}: the value must be an IP address")
    for entry in net.allow_private:
        try:
            parse_cidr(entry)
        except ValueError as exc:
            raise ConfigError("network.allow_private", str(exc)) from None


def _validate_paths(cfg: ProcessSandboxConfig) -> None:
    """Every path setting names one absolute place, or ConfigError naming the setting and the entry.

    What depends on the sandbox's mount view (does a deny path show inside?) is checked when a
    strict worker is planned (:mod:`sandbox_core.isolation.strict`), not here.
    """
    root = str(cfg.workspace_root)
    if (problem := path_problem(root)) is not None:
        raise ConfigError("workspace_root", f"{root!r} {problem}")
    if (problem := path_problem(str(cfg.state_dir))) is not None:
        raise ConfigError("state_dir", f"{str(cfg.state_dir)!r} {problem}")
    if cfg.workspace_root == Path("/"):
        raise ConfigError("workspace_root", "'/' would make each user's workspace a top-level directory "
                          "(user 'etc' would be given /etc)")  # fmt: skip
    for setting in ("ro_binds", "rw_binds"):
        for entry in getattr(cfg.strict, setting):
            src, sep, dest = entry.partition(":")
            for part, value in (("source", src), ("destination", dest)) if sep else (("source", src),):
                if (problem := path_problem(value)) is not None:
                    raise ConfigError(f"strict.{setting}", f"{entry!r}: its {part} {value!r} {problem}")
    for entry in cfg.strict.deny_paths:
        if (problem := path_problem(entry)) is not None:
            raise ConfigError("strict.deny_paths", f"{entry!r} {problem}")
    bwrap = cfg.strict.bwrap  # a bare name is looked up on PATH; anything with a slash is a path
    if (problem := path_problem(bwrap) if bwrap == "" or "/" in bwrap else None) is not None:
        raise ConfigError("strict.bwrap", f"{bwrap!r} {problem} (or give a bare name looked up on PATH)")
    _positive(cfg.record, ("retention_days", "max_mb", "preview_bytes"), "record.")
    for name in ("socket_path", "tokens_file"):
        value = getattr(cfg.service, name)
        if value is not None and (problem := path_problem(str(value))) is not None:
            raise ConfigError(f"service.{name}", f"{str(value)!r} {problem}")


# ---------------------------------------------------------------- loading

_SECTIONS: dict[str, type[Any]] = {
    "env": EnvPolicy,
    "limits": ResourceLimits,
    "strict": StrictIsolation,
    "model": ModelConfig,
    "service": ServiceConfig,
    "record": RecordConfig,
    "network": NetworkPolicy,
}


def field_types() -> dict[str, Any]:
    """Every dotted key and its annotated type."""
    out: dict[str, Any] = {}
    for name, tp in typing.get_type_hints(ProcessSandboxConfig).items():
        if name in _SECTIONS:
            for sub, stp in typing.get_type_hints(_SECTIONS[name]).items():
                out[f"{name}.{sub}"] = stp
        else:
            out[name] = tp
    return out


def _coerce(key: str, tp: Any, value: Any, from_text: bool) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (from_text and value in ("", "none", "None"))):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, inner[0], value, from_text)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if from_text and str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(key, f"must be a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        try:
            return int(value) if (from_text or isinstance(value, int)) else _fail(key, "an integer", value)
        except ValueError:
            raise ConfigError(key, f"must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(key, f"must be a number, got {value!r}")
        try:
            return float(value) if (from_text or isinstance(value, int | float)) else _fail(key, "a number", value)
        except ValueError:
            raise ConfigError(key, f"must be a number, got {value!r}") from None
    if tp is Path:
        if not isinstance(value, str | Path):
            _fail(key, "a path", value)
        if str(value) == "":  # Path("") is ".", the current directory: never what was meant
            raise ConfigError(key, "'' is empty (it would mean whatever the current directory is)")
        return Path(os.path.expanduser(str(value)))
    if tp is Secret:
        if not isinstance(value, str):
            _fail(key, "a string", value)
        return Secret(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(key, "a string", value)
        return value
    if origin is tuple:
        if from_text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            _fail(key, "a list of strings", value)
        return tuple(value)
    if (origin in (Mapping, dict) or tp is Mapping) and args and typing.get_origin(args[1]) is tuple:
        if not isinstance(value, dict) or not all(
            isinstance(v, list | tuple) and all(isinstance(e, str) for e in v) for v in value.values()
        ):
            _fail(key, "a table of lists of strings (set it in the config file)", value)
        return {k: tuple(v) for k, v in value.items()}
    if origin in (Mapping, dict) or tp is Mapping:
        if from_text and isinstance(value, str):
            pairs = [p for p in value.split(",") if p.strip()]
            try:
                value = dict(p.split("=", 1) for p in pairs)
            except ValueError:
                _fail(key, "NAME=VALUE pairs", value)
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            _fail(key, "a table of strings", value)
        return dict(value)
    raise ConfigError(key, f"unsupported type {tp!r}")  # pragma: no cover


def _fail(key: str, what: str, value: Any) -> typing.NoReturn:
    raise ConfigError(key, f"must be {what}, got {value!r}")


def env_variable(key: str) -> str:
    """The ``SANDBOX_*`` variable of dotted ``key`` (``limits.cpu_seconds`` → ``SANDBOX_LIMITS__CPU_SECONDS``)."""
    return "SANDBOX_" + key.upper().replace(".", "__")


def _from_environ(environ: Mapping[str, str], known: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """The settings ``SANDBOX_*`` (and the two ``ANTHROPIC_*`` aliases) give, and each one's variable.

    A ``SANDBOX_*`` name that is no setting is a ConfigError (a typo must not pass silently).
    """
    out: dict[str, str] = {}
    origin: dict[str, str] = {}
    for var, key in ENV_ALIASES.items():
        if environ.get(var):
            out[key], origin[key] = environ[var], var
    for var, value in sorted(environ.items()):
        if not var.startswith("SANDBOX_") or var in CLIENT_VARIABLES:
            continue
        key = var[len("SANDBOX_"):].lower().replace("__", ".")
        if key not in known:
            import difflib  # only for this message

            close = difflib.get_close_matches(var, [env_variable(k) for k in known], n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(var, f"no such setting{hint} (a setting is SANDBOX_ and its dotted key, "
                              "'.' written '__': SANDBOX_LIMITS__CPU_SECONDS)")  # fmt: skip
        out[key], origin[key] = value, var
    return out, origin


def _toml_lines(text: str) -> dict[str, int]:
    """The line of each ``key = `` (dotted with its ``[section]``) in a TOML text, for messages."""
    lines: dict[str, int] = {}
    section = ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if header := re.match(r"^\[\s*([A-Za-z0-9_.-]+)\s*\]", stripped):
            section = header.group(1) + "."
        elif assign := re.match(r"^([A-Za-z0-9_-]+)\s*=", stripped):
            lines.setdefault(section + assign.group(1), number)
    return lines


@dataclass(frozen=True)
class LoadedConfig:
    """A config plus where each value came from (for ``sandbox config show``)."""

    config: ProcessSandboxConfig
    sources: Mapping[str, Source]
    path: Path | None
    origins: Mapping[str, str] = field(default_factory=dict)
    """Where each value that is not a default was set: ``FILE line N``, ``SANDBOX_X``, ``flag``."""


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LoadedConfig:
    """Build the effective config: defaults < TOML file < environment < overrides.

    ``path=None`` uses the default path if that file exists; an explicit path must exist.
    """
    env = os.environ if environ is None else environ
    known = field_types()
    layers: list[tuple[Source, dict[str, Any], bool]] = []
    origins: dict[str, str] = {}
    where: dict[str, str] = {}
    """dotted key -> how a message names its origin (``in FILE line N``, ``by SANDBOX_X``)."""
    used_path: Path | None = None
    file_path = path if path is not None else Path(default_config_path(env))
    if path is not None or file_path.is_file():
        import tomllib  # only with a config file: a command without one does not pay for the parser

        try:
            text = file_path.read_text()
            data = tomllib.loads(text)
        except FileNotFoundError:
            raise ConfigError("config", f"config file not found: {file_path}") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError("config", f"cannot read {file_path}: {exc}") from None
        flat = flatten_toml(data)
        lines = _toml_lines(text)
        for key in flat:
            line = lines.get(key)
            origins[key] = f"{file_path} line {line}" if line else str(file_path)
            where[key] = f"in {origins[key]}"
        layers.append(("file", flat, False))
        used_path = file_path
    from_env, env_origin = _from_environ(env, known)
    layers.append(("env", from_env, True))
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    layers.append(("flag", flags, False))

    values: dict[str, Any] = {}
    sources: dict[str, Source] = dict.fromkeys(known, "default")
    for source, layer, from_text in layers:
        for key, raw in layer.items():
            if source == "env":
                origins[key], where[key] = env_origin[key], f"by {env_origin[key]}"
            elif source == "flag":
                origins[key], where[key] = "flag", "by a command-line flag"
            if key not in known:
                raise ConfigError(key, "unknown setting", source=where.get(key))
            try:
                values[key] = _coerce(key, known[key], raw, from_text)
            except ConfigError as exc:
                raise ConfigError(exc.field, exc.detail, source=where.get(key)) from None
            sources[key] = source
    try:
        config = build_config(values)
    except ConfigError as exc:
        if exc.source is None and exc.field in where:
            raise ConfigError(exc.field, exc.detail, source=where[exc.field]) from None
        raise
    return LoadedConfig(config, sources, used_path, {k: v for k, v in origins.items() if k in known})


def build_config(values: Mapping[str, Any]) -> ProcessSandboxConfig:
    """A config from already-typed dotted values (unknown keys are a ConfigError)."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for key, value in values.items():
        head, _, tail = key.partition(".")
        if tail and head in sections:
            sections[head][tail] = value
        elif not tail:
            top[key] = value
        else:
            raise ConfigError(key, "unknown setting")
    for name, cls in _SECTIONS.items():
        if sections[name]:
            try:
                top[name] = cls(**sections[name])
            except TypeError as exc:
                raise ConfigError(name, str(exc)) from None
    try:
        return ProcessSandboxConfig(**top)
    except TypeError as exc:
        raise ConfigError("config", str(exc)) from None


def flat_values(cfg: ProcessSandboxConfig) -> dict[str, Any]:
    """Every dotted key of ``cfg`` with its value (secrets stay :class:`Secret`)."""
    out: dict[str, Any] = {}
    for key in field_types():
        head, _, tail = key.partition(".")
        obj: Any = getattr(cfg, head)
        out[key] = getattr(obj, tail) if tail else obj
    return out
