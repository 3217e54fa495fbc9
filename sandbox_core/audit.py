"""Isolation audit: canaries planted on the host, probes run inside a real worker.

:func:`run_audit` plants, for the duration of one audit:

* random canary secrets (``sbx-canary-`` + 32 hex digits) in a host environment variable
  (:data:`CANARY_VAR`, set in this process's ``os.environ`` and restored afterwards), in a
  decoy host process's environment and command line, in an owner-only 0600 file and a
  world-readable file in a fresh directory under ``/var/tmp`` (a path no profile
  allows), and in a second user's workspace;
* a TCP listener on ``127.0.0.1`` (random port) and Unix socket listeners (a socket file
  outside the allowed paths, one planted inside the audited user's workspace, and an
  abstract name) that record every connection.

Then it starts a worker of the configured profile for the user and asks it what it can
reach: a command run through ``exec`` reports what commands inherit, and ``audit.probe``
requests (:mod:`sandbox_core.audit_probes`) try each path. The canary values never enter
the sandbox: probes get their SHA-256 digests and report matches by label, and the host
also searches everything the sandbox sent back for the raw values.

A fork bomb and a memory hog run last, each as a helper process with its own deadline,
while the host measures its own event-loop latency and how long it takes to spawn a
process of its own. Everything planted is removed afterwards, also on error or cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox_core.audit_probes import CANARY_PREFIX, LIMIT_PROBES, STATIC_PROBES, sha256_hex, unix_address
from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import SandboxError
from sandbox_core.isolation.launch import PACKAGE_ROOT, prepare_workspace

CANARY_VAR = "SANDBOX_AUDIT_CANARY"
"""The host environment variable that holds the environment canary during an audit."""
SANDBOX_SET_VARS = frozenset({"HOME", "PWD", "LC_CTYPE"})
"""Variables the sandbox sets itself (HOME = the workspace, PWD from bwrap's chdir, LC_CTYPE
from Python's locale coercion): accepted outside the allowlist only with a value that is not
the host's own (a host value would mean it was inherited)."""

CHECKS: tuple[tuple[str, str], ...] = (
    ("env.allowlist", "the worker and its commands see only allowlisted variables (plus HOME, PATH, env.fixed)"),
    ("env.canary", "the host's canary variable reaches neither the worker nor a command"),
    ("proc.pid1_environ", "/proc/1/environ is unreadable or holds no canary"),
    ("proc.environ", "no readable /proc/*/environ holds a canary"),
    ("proc.cmdline", "no readable /proc/*/cmdline holds a canary"),
    ("proc.pids", "/proc shows only the sandbox's own processes (own pid namespace)"),
    ("fds.command", "a command inherits only stdin, stdout and stderr"),
    ("fds.worker", "the worker holds only stdio, its protocol pipes and its event loop"),
    ("files.secret", "the owner-only 0600 canary file cannot be read"),
    ("files.world", "the world-readable canary file outside the allowed paths cannot be read"),
    ("files.shadow", "/etc/shadow and /etc/gshadow cannot be read"),
    ("files.write_outside", "creating a file outside the workspace fails (workspace parent, other "
                            "workspace, /etc, /usr, /var/tmp, /)"),
    ("escape.symlink", "symlinks from the workspace to host paths read and write nothing"),
    ("escape.hardlink", "hard links from the workspace to host files cannot be made"),
    ("net.host_tcp", "TCP connect to the host's 127.0.0.1 listener fails; the listener saw nothing"),
    ("net.host_unix", "connect to the host's Unix sockets (host path, planted in the workspace, abstract) "
                      "fails; the listeners saw nothing"),
    ("net.outbound", "no way out: own network namespace, loopback only, connects fail"),
    ("proc.ptrace", "PTRACE_SEIZE on another process is refused"),
    ("proc.vm_readv", "process_vm_readv on another process (a child, the parent) is refused"),
    ("ns.user", "unshare(CLONE_NEWUSER) fails"),
    ("priv.setuid", "a setuid-root program runs without root privilege"),
    ("priv.capabilities", "effective, permitted and ambient capabilities are empty (worker and commands)"),
    ("priv.no_new_privs", "no_new_privs is set (worker and commands)"),
    ("workspace.other_user", "another user's workspace is neither readable nor listed"),
    ("limits.fork_bomb", "a fork bomb is refused at the process limit (limits.processes)"),
    ("limits.memory", "a memory hog is stopped at the memory limit (limits.memory_mb)"),
    ("host.responsive", "while the bomb and the hog run, the host's event loop and its own process "
                        "spawns stay fast"),
    ("canary.exfiltration", "no canary value appears anywhere in what the sandbox sent back"),
)  # fmt: skip
"""Every check, in report order, with its expectation. Names are stable (tests use them)."""
CHECK_NAMES: tuple[str, ...] = tuple(name for name, _ in CHECKS)
_EXPECTATION = dict(CHECKS)

_MAX_LOOP_LAG = 0.5
_MAX_SPAWN = 2.0
_MEMORY_SLACK_MB = 64


@dataclass(frozen=True)
class Check:
    """One audited property: what must hold, what was seen, and whether it held."""

    name: str
    expectation: str
    observed: str
    passed: bool
    details: dict[str, Any] = field(default_factory=dict)
    """The probe's raw observations behind this check (metadata only, JSON-able)."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "expectation": self.expectation, "observed": self.observed,
                "passed": self.passed, "details": self.details}  # fmt: skip


@dataclass
class AuditReport:
    """The outcome of one audit: checks, and which host variables the sandbox saw."""

    profile: str
    user_id: str
    worker_id: str
    checks: list[Check]
    withheld_variables: list[str]
    """Host variables the sandbox did not see."""
    passed_variables: list[str]
    """Host variables the sandbox saw with the host's value."""
    replaced_variables: list[str] = field(default_factory=list)
    """Host variable names the sandbox saw with a value of its own (HOME, a default PATH)."""
    added_variables: list[str] = field(default_factory=list)
    """Variables inside that the host does not have (env.fixed, HOME, locale coercion)."""
    layers: dict[str, Any] = field(default_factory=dict)
    """The worker's handshake report (isolation layers in force, as the worker observed them)."""
    planted: dict[str, Any] = field(default_factory=dict)
    """What this audit planted on the host, and where (all removed when the audit ends)."""
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "user_id": self.user_id,
            "worker_id": self.worker_id,
            "passed": self.passed,
            "summary": {
                "total": len(self.checks),
                "passed": len(self.checks) - len(self.failed),
                "failed": len(self.failed),
            },
            "checks": [c.to_dict() for c in self.checks],
            "variables": {
                "withheld": self.withheld_variables,
                "passed": self.passed_variables,
                "replaced": self.replaced_variables,
                "added": self.added_variables,
            },
            "layers": self.layers,
            "planted": self.planted,
            "duration_s": self.duration_s,
        }


# ---------------------------------------------------------------- host-side plants


class _Recorder:
    """Counts connections to the host's listeners (each closed at once)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def handler(self, kind: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.seen.append({"listener": kind, "peer": str(writer.get_extra_info("peername"))[:120],
                              "at": time.time()})  # fmt: skip
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

        return on_connect

    def count(self, prefix: str) -> int:
        return sum(1 for s in self.seen if s["listener"].startswith(prefix))


@dataclass
class _Plants:
    canaries: dict[str, str]
    canary_dir: Path
    secret_file: Path
    world_file: Path
    peer_user: str
    peer_dir: Path
    peer_file: Path
    workspace: Path
    scratch: str
    nonce: str
    tcp_port: int = 0
    unix_path: str = ""
    unix_in_workspace: str | None = None
    abstract: str = ""
    recorder: _Recorder = field(default_factory=_Recorder)
    host_env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    decoy_pid: int | None = None

    def describe(self) -> dict[str, Any]:
        """Where each canary and listener was (paths, port, pid; never the values)."""
        return {
            "env_var": CANARY_VAR,
            "canary_dir": str(self.canary_dir),
            "secret_file": str(self.secret_file),
            "world_file": str(self.world_file),
            "peer_user": self.peer_user,
            "peer_workspace": str(self.peer_dir),
            "scratch_dir": str(self.workspace / self.scratch),
            "tcp_listener": f"127.0.0.1:{self.tcp_port}",
            "unix_listeners": [p for p in (self.unix_path, self.unix_in_workspace and str(self.workspace /
                               self.unix_in_workspace), "@" + self.abstract) if p],
            "decoy_pid": self.decoy_pid,
            "nonce": self.nonce,
            "notes": self.notes,
        }  # fmt: skip

    def digests(self) -> dict[str, str]:
        return {sha256_hex(value): label for label, value in self.canaries.items()}

    def leaked_in(self, text: str) -> list[str]:
        return [label for label, value in self.canaries.items() if value in text]


def _canary() -> str:
    return CANARY_PREFIX + secrets.token_hex(16)


def _canary_parent() -> str:
    for candidate in ("/var/tmp", tempfile.gettempdir()):
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    return tempfile.gettempdir()


def _write_new(path: Path, text: str, mode: int, owner: tuple[int, int] | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _owner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


@contextlib.asynccontextmanager
async def _planted(config: ProcessSandboxConfig, user_id: str) -> AsyncIterator[_Plants]:
    """Plant every canary and listener; remove all of it on the way out."""
    async with contextlib.AsyncExitStack() as stack:
        canaries = {label: _canary() for label in ("env", "cmdline", "secret_file", "world_file", "peer_workspace")}
        nonce = secrets.token_hex(6)

        canary_dir = Path(tempfile.mkdtemp(prefix=f"sandbox-audit-{nonce}-", dir=_canary_parent()))
        stack.callback(shutil.rmtree, canary_dir, True)
        os.chmod(canary_dir, 0o755)
        secret_file, world_file = canary_dir / "secret.txt", canary_dir / "world.txt"
        _write_new(secret_file, f"db_password={canaries['secret_file']}\n", 0o600)
        _write_new(world_file, f"api_token={canaries['world_file']}\n", 0o644)

        workspace = await asyncio.to_thread(prepare_workspace, config, user_id)
        peer_user = f"audit-peer-{nonce}"
        peer_dir = await asyncio.to_thread(prepare_workspace, config, peer_user)
        stack.callback(shutil.rmtree, peer_dir, True)
        peer_file = peer_dir / "notes.txt"
        _write_new(peer_file, f"peer_secret={canaries['peer_workspace']}\n", 0o600, _owner(peer_dir))

        scratch = f".sba-{nonce}"
        scratch_dir = workspace / scratch
        os.mkdir(scratch_dir, 0o700)
        stack.callback(shutil.rmtree, scratch_dir, True)
        os.chown(scratch_dir, *_owner(workspace), follow_symlinks=False)

        plants = _Plants(canaries, canary_dir, secret_file, world_file, peer_user, peer_dir, peer_file,
                         workspace, scratch, nonce)  # fmt: skip
        stack.callback(_remove_strays, config, plants)

        rec = plants.recorder
        tcp = await asyncio.start_server(rec.handler("tcp"), host="127.0.0.1", port=0)
        stack.push_async_callback(_close_server, tcp)
        plants.tcp_port = int(tcp.sockets[0].getsockname()[1])

        plants.unix_path = str(canary_dir / "host.sock")
        await _unix_listener(stack, rec, "unix:host-path", plants.unix_path)
        in_ws = scratch_dir / "u.sock"
        await _unix_listener(stack, rec, "unix:in-workspace", str(in_ws))
        os.chown(in_ws, *_owner(workspace), follow_symlinks=False)
        plants.unix_in_workspace = f"{scratch}/u.sock"
        plants.abstract = f"sandbox-audit-{nonce}"
        await _unix_listener(stack, rec, "unix:abstract", "\0" + plants.abstract)

        decoy = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", "-c", "import sys; sys.stdin.buffer.read()",
            f"--audit-canary={canaries['cmdline']}", f"--audit-nonce={nonce}",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", config.env.default_path), CANARY_VAR: canaries["env"]},
            start_new_session=True,
        )  # fmt: skip
        stack.push_async_callback(_stop_decoy, decoy)
        plants.decoy_pid = decoy.pid

        previous = os.environ.get(CANARY_VAR)
        os.environ[CANARY_VAR] = canaries["env"]
        stack.callback(_restore_env, previous)
        plants.host_env = dict(os.environ)
        yield plants


async def _unix_listener(stack: contextlib.AsyncExitStack, rec: _Recorder, kind: str, path: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with unix_address(path) as address:
            sock.bind(address)
        if not path.startswith("\0"):
            os.chmod(path, 0o777)  # only the sandbox should stop a connect, not the file mode
    except BaseException:
        sock.close()
        raise
    server = await asyncio.start_unix_server(rec.handler(kind), sock=sock)
    stack.push_async_callback(_close_server, server)


async def _close_server(server: asyncio.Server) -> None:
    server.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server.wait_closed(), 2)


async def _stop_decoy(proc: asyncio.subprocess.Process) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), 2)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _restore_env(previous: str | None) -> None:
    if previous is None:
        os.environ.pop(CANARY_VAR, None)
    else:
        os.environ[CANARY_VAR] = previous


def _remove_strays(config: ProcessSandboxConfig, plants: _Plants) -> None:
    """Remove files a probe managed to create outside the workspace (it removes them itself too)."""
    names = (f".sandbox-audit-{plants.nonce}-w", f".sandbox-audit-{plants.nonce}-s")
    for directory in (str(config.workspace_root), str(plants.peer_dir), "/etc", "/var/tmp", "/usr", "/"):
        for name in names:
            path = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(path).st_mode):
                    os.unlink(path)


def _host_ns() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for kind in ("pid", "net", "user", "mnt"):
        try:
            out[kind] = os.readlink(f"/proc/self/ns/{kind}")
        except OSError:
            out[kind] = None
    return out


def _mem_available_mb() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        return None
    return None


def _limit_plan(config: ProcessSandboxConfig) -> dict[str, Any]:
    limits = config.limits
    pids = limits.processes or None
    memory = limits.memory_mb or limits.address_space_mb or None
    memory_cap = (memory or 1024) + 256
    available = _mem_available_mb()
    if available is not None:
        memory_cap = min(memory_cap, available // 2)
    return {
        "pids_limit": pids,
        "fork_cap": min((pids or 256) + 32, 1024),
        "memory_limit_mb": memory,
        "memory_cap_mb": max(memory_cap, 16),
        "host_available_mb": available,
    }


# ---------------------------------------------------------------- host monitor


class _Monitor:
    """Measures the host while the limit probes run: event-loop lag and its own spawns."""

    def __init__(self) -> None:
        self.max_lag = 0.0
        self.spawns = 0
        self.spawn_failures: list[str] = []
        self.max_spawn = 0.0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._true = shutil.which("true") or "/bin/true"

    async def __aenter__(self) -> _Monitor:
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._lag()), asyncio.create_task(self._spawn())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _lag(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            await asyncio.sleep(0.02)
            self.max_lag = max(self.max_lag, time.monotonic() - began - 0.02)

    async def _spawn(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                proc = await asyncio.create_subprocess_exec(
                    self._true, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
                await asyncio.wait_for(proc.wait(), _MAX_SPAWN * 2)
                self.spawns += 1
            except (OSError, TimeoutError) as exc:
                self.spawn_failures.append(f"{type(exc).__name__}: {exc}"[:120])
            self.max_spawn = max(self.max_spawn, time.monotonic() - began)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.2)

    def summary(self) -> dict[str, Any]:
        return {"max_loop_lag_ms": round(self.max_lag * 1000, 1), "host_spawns": self.spawns,
                "spawn_failures": self.spawn_failures, "max_spawn_ms": round(self.max_spawn * 1000, 1)}  # fmt: skip


# ---------------------------------------------------------------- running


async def run_audit(
    config: ProcessSandboxConfig,
    user_id: str,
    *,
    progress: Callable[[str], None] | None = None,
) -> AuditReport:
    """Plant canaries, run every probe in a fresh worker of ``config.profile``, evaluate.

    Raises :class:`~sandbox_core.errors.SandboxError` when no worker can be started (for
    example IsolationUnavailable in the strict profile: fail closed); a probe that fails
    later turns the checks that depend on it into failures instead.
    """
    from sandbox_core.orchestrator import SandboxOrchestrator
    from sandbox_core.requests import ExecRequest, RawRequest

    def say(msg: str) -> None:
        if progress is not None:
            progress(msg)

    began = time.monotonic()
    config = config.replace(min_idle=0)
    limits = _limit_plan(config)
    say("planting canaries")
    async with _planted(config, user_id) as plants:
        spec: dict[str, Any] = {
            "digests": plants.digests(),
            "nonce": plants.nonce,
            "scratch": plants.scratch,
            "paths": {
                "secret_file": str(plants.secret_file), "world_file": str(plants.world_file),
                "canary_dir": str(plants.canary_dir), "peer_user": plants.peer_user,
                "peer_dir": str(plants.peer_dir), "peer_file": str(plants.peer_file),
                "workspace_root": str(config.workspace_root),
            },
            "tcp": {"host": "127.0.0.1", "port": plants.tcp_port},
            "unix": {"path": plants.unix_path, "in_workspace": plants.unix_in_workspace,
                     "abstract": plants.abstract},
            "limits": limits,
        }  # fmt: skip
        results: dict[str, Any] = {}
        errors: dict[str, str] = {}
        sent_back: list[str] = []
        worker_id, layers = "", {}
        monitor = _Monitor()
        async with SandboxOrchestrator(config) as orchestrator:
            say("starting a worker and reading what a command inherits")
            boot = (f"import sys; sys.path.insert(0, {PACKAGE_ROOT!r}); "
                    "from sandbox_core.audit_probes import command_main; command_main()")  # fmt: skip
            snapshot = ExecRequest(argv=(sys.executable, "-I", "-c", boot, json.dumps({"digests": spec["digests"]})),
                                   timeout=30)  # fmt: skip
            try:
                res = await orchestrator.execute(user_id, snapshot)
                worker_id = res.worker_id
                layers = orchestrator.worker_report(worker_id) or {}
                sent_back += [res.stdout, res.stderr]
                lines = res.stdout.strip().splitlines()
                results["command"] = json.loads(lines[-1]) if lines else {"error": f"no output: {res.stderr[-300:]}"}
            except SandboxError as exc:
                if _cancelling() or (not worker_id and not isinstance(exc, _RECOVERABLE)):
                    raise
                errors["command"] = str(exc)
            except ValueError as exc:
                errors["command"] = f"unparsable snapshot: {exc}"

            for phase, names, timeout in (("static", STATIC_PROBES, 120.0), ("fork_bomb", ("fork_bomb",), 45.0),
                                          ("memory_hog", ("memory_hog",), 45.0)):  # fmt: skip
                say(f"probing: {', '.join(names) if len(names) < 3 else 'files, /proc, network, privileges'}")
                request = RawRequest("audit.probe", {**spec, "probes": list(names)}, timeout=timeout)
                try:
                    if phase in LIMIT_PROBES:
                        async with monitor:
                            res = await orchestrator.execute(user_id, request)
                    else:
                        res = await orchestrator.execute(user_id, request)
                except SandboxError as exc:
                    if _cancelling() or (not worker_id and not isinstance(exc, _RECOVERABLE)):
                        raise
                    for name in names:
                        errors[name] = f"{type(exc).__name__}: {exc}"
                    continue
                worker_id = worker_id or res.worker_id
                if not layers:
                    layers = orchestrator.worker_report(res.worker_id) or {}
                raw = res.result.get("probes")
                sent_back.append(json.dumps(res.result, default=str))
                if isinstance(raw, dict):
                    results.update(raw)
                if isinstance(res.result.get("workspace"), str):
                    results["_workspace"] = res.result["workspace"]
        say("evaluating")
        ctx = _Context(config, plants, results, errors, limits, monitor.summary(), _host_ns(),
                       "\n".join(sent_back))  # fmt: skip
        checks = [_evaluate(ctx, name) for name in CHECK_NAMES]
        variables = _variables(ctx)
        profile = str(layers.get("profile", config.profile)) if layers else config.profile
        report = AuditReport(profile, user_id, worker_id, checks, *variables, layers=layers,
                             planted=plants.describe(), duration_s=round(time.monotonic() - began, 3))  # fmt: skip
    return report


def _cancelling() -> bool:
    """True when the audit itself is being cancelled (Ctrl-C): then nothing is recoverable."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _recoverable() -> tuple[type[SandboxError], ...]:
    from sandbox_core.errors import RequestCancelled, RequestTimeout, WorkerCrashed

    return (WorkerCrashed, RequestTimeout, RequestCancelled)


_RECOVERABLE = _recoverable()
"""Errors after which the audit goes on (the affected checks fail); others abort it."""


# ---------------------------------------------------------------- evaluation


class _Missing(Exception):
    """A probe result needed by a check is missing or failed."""


@dataclass
class _Context:
    config: ProcessSandboxConfig
    plants: _Plants
    results: dict[str, Any]
    errors: dict[str, str]
    limits: dict[str, Any]
    monitor: dict[str, Any]
    host_ns: dict[str, str | None]
    sent_back: str

    def sandbox_paths(self) -> set[str]:
        """Digests of the values HOME and PWD legitimately have inside: ``/`` and the workspace."""
        inside = self.results.get("_workspace")
        return {sha256_hex(v) for v in ("/", str(inside or ""), str(self.plants.workspace)) if v}

    def get(self, probe: str) -> dict[str, Any]:
        if probe in self.errors:
            raise _Missing(f"probe {probe} failed: {self.errors[probe]}")
        obs = self.results.get(probe)
        if not isinstance(obs, dict):
            raise _Missing(f"probe {probe} returned nothing")
        if "error" in obs:
            raise _Missing(f"probe {probe} failed: {obs['error']}")
        return obs


Verdict = tuple[bool, str, dict[str, Any]]


def _evaluate(ctx: _Context, name: str) -> Check:
    fn = _EVALUATORS[name]
    try:
        passed, observed, details = fn(ctx)
    except _Missing as exc:
        passed, observed, details = False, str(exc), {}
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        passed, observed, details = False, f"could not evaluate: {type(exc).__name__}: {exc}", {}
    return Check(name, _EXPECTATION[name], observed, passed, details)


def _allowlisted(config: ProcessSandboxConfig, name: str) -> bool:
    if name == "PATH" or name in config.env.fixed:
        return True
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in config.env.allow)


def _inside_env(ctx: _Context) -> dict[str, set[str]]:
    """Every variable seen inside (worker now, worker at start, a command) -> value digests."""
    seen: dict[str, set[str]] = {}
    worker = ctx.get("worker_env")
    command = ctx.get("command")
    for env in (worker.get("env", {}), command.get("env", {})):
        for name, digest in env.items():
            seen.setdefault(name, set()).add(digest)
    for name in worker.get("initial_names", []):
        seen.setdefault(name, set())
    return seen


def _env_allowlist(ctx: _Context) -> Verdict:
    inside = _inside_env(ctx)
    host = ctx.plants.host_env
    unexpected, own = [], []
    for name, digests in sorted(inside.items()):
        if _allowlisted(ctx.config, name):
            continue
        inherited = name in host and sha256_hex(host[name]) in digests
        if name in SANDBOX_SET_VARS and (not inherited or digests <= ctx.sandbox_paths()):
            own.append(name)
        else:
            unexpected.append(name)
    names = sorted(inside)
    details = {"names": names, "unexpected": unexpected, "set_by_sandbox": own}
    if unexpected:
        return False, f"not allowlisted: {', '.join(unexpected)}", details
    allowed = [n for n in names if n not in own]
    return True, f"allowlisted: {', '.join(allowed) or 'none'}; set by the sandbox: {', '.join(own) or 'none'}", details


def _env_canary(ctx: _Context) -> Verdict:
    worker, command = ctx.get("worker_env"), ctx.get("command")
    found = sorted({*worker.get("canaries", []), *command.get("canaries", [])})
    inside = _inside_env(ctx)
    details = {"canaries_found": found, "canary_var_inside": CANARY_VAR in inside}
    if found or CANARY_VAR in inside:
        return False, f"canary reached the sandbox ({', '.join(found) or CANARY_VAR})", details
    return True, f"{CANARY_VAR} withheld; no canary in worker or command environment", details


def _variables(ctx: _Context) -> tuple[list[str], list[str], list[str], list[str]]:
    try:
        inside = _inside_env(ctx)
    except _Missing:
        return sorted(ctx.plants.host_env), [], [], []
    withheld, passed, replaced = [], [], []
    for name, value in sorted(ctx.plants.host_env.items()):
        if name not in inside:
            withheld.append(name)
        elif inside[name] and inside[name] <= {sha256_hex(value)}:
            passed.append(name)
        else:
            replaced.append(name)
    added = sorted(n for n in inside if n not in ctx.plants.host_env)
    return withheld, passed, replaced, added


def _pid1_environ(ctx: _Context) -> Verdict:
    pid1 = ctx.get("proc_scan")["pid1_environ"]
    if not pid1.get("readable"):
        return True, f"unreadable ({pid1.get('errno')})", pid1
    if pid1.get("canaries"):
        return False, f"canary in /proc/1/environ: {', '.join(pid1['canaries'])}", pid1
    return True, f"readable ({pid1.get('bytes')} bytes), no canary", pid1


def _proc_files(kind: str) -> Callable[[_Context], Verdict]:
    def check(ctx: _Context) -> Verdict:
        scan = ctx.get("proc_scan")
        bucket = scan[kind]
        details = {**bucket, "truncated": scan.get("truncated")}
        summary = f"{bucket['readable']} readable, {bucket['unreadable']} unreadable"
        if bucket["matches"]:
            where = ", ".join(f"{m['canary']} in pid {m['pid']}" for m in bucket["matches"][:5])
            return False, f"{summary}; canary found: {where}", details
        if scan.get("truncated"):
            return False, f"{summary}; scan did not finish in time", details
        return True, f"{summary}; no canary", details

    return check


def _proc_pids(ctx: _Context) -> Verdict:
    scan = ctx.get("proc_scan")
    same_ns = scan.get("pid_ns") is not None and scan.get("pid_ns") == ctx.host_ns.get("pid")
    details = {k: scan.get(k) for k in ("visible", "foreign", "foreign_sample", "ancestors", "pid_ns")}
    details["host_pid_ns"] = ctx.host_ns.get("pid")
    ns = "host pid namespace" if same_ns else "own pid namespace"
    if scan["foreign"] or same_ns:
        return False, f"{scan['visible']} pids visible, {scan['foreign']} not the sandbox's; {ns}", details
    return True, f"{scan['visible']} pids visible, all the sandbox's; {ns}", details


def _fds_command(ctx: _Context) -> Verdict:
    fds: dict[str, str] = ctx.get("command")["fds"]
    extra = {fd: target for fd, target in fds.items() if fd not in ("0", "1", "2")}
    if extra:
        listed = ", ".join(f"{fd} → {target}" for fd, target in sorted(extra.items(), key=lambda x: int(x[0])))
        return False, f"inherited beyond stdio: {listed}", {"fds": fds}
    return True, f"only {', '.join(sorted(fds, key=int))}", {"fds": fds}


def _fds_worker(ctx: _Context) -> Verdict:
    fds: list[dict[str, Any]] = ctx.get("worker_fds")["fds"]
    budget = {"pipe": 2, "eventpoll": 1, "socketpair": 2}
    counts: dict[str, int] = {}
    unexpected: list[str] = []
    for entry in fds:
        kind = str(entry.get("kind"))
        if entry["fd"] <= 2:
            if kind not in ("devnull", "pipe", "tty"):
                unexpected.append(f"{entry['fd']}: {kind} {entry.get('target', '')}".strip())
            continue
        counts[kind] = counts.get(kind, 0) + 1
        if counts[kind] > budget.get(kind, 0):
            unexpected.append(f"{entry['fd']}: {kind} {entry.get('target', entry.get('peer', ''))}".strip())
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    if unexpected:
        return False, f"unexpected: {'; '.join(unexpected)} (others: {summary})", {"fds": fds}
    return True, f"stdio + {summary} (protocol pipes, event loop)", {"fds": fds}


def _read_outcome(obs: dict[str, Any]) -> str:
    if obs.get("readable"):
        found = obs.get("canaries") or []
        return f"READ {obs.get('bytes')} bytes" + (f", canary {', '.join(found)}" if found else "")
    if not obs.get("visible"):
        return f"not visible ({obs.get('errno')})"
    return f"visible, unreadable ({obs.get('errno')})"


def _file_check(key: str) -> Callable[[_Context], Verdict]:
    def check(ctx: _Context) -> Verdict:
        obs = ctx.get("files")[key]
        return not obs.get("readable"), _read_outcome(obs), obs

    return check


def _shadow(ctx: _Context) -> Verdict:
    attempts: list[dict[str, Any]] = ctx.get("files")["shadow"]
    observed = "; ".join(f"{Path(a['path']).name}: {_read_outcome(a)}" for a in attempts)
    return not any(a.get("readable") for a in attempts), observed, {"attempts": attempts}


def _errno_summary(attempts: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for a in attempts:
        key = str(a.get("errno") or a.get("symlink_errno") or "?")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in sorted(counts.items()))


def _write_outside(ctx: _Context) -> Verdict:
    attempts: list[dict[str, Any]] = ctx.get("write_outside")["attempts"]
    written = [str(Path(a["path"]).parent) for a in attempts if a.get("written")]
    if written:
        return False, f"WROTE into {', '.join(written)}", {"attempts": attempts}
    return True, f"all {len(attempts)} refused ({_errno_summary(attempts)})", {"attempts": attempts}


def _symlink(ctx: _Context) -> Verdict:
    obs = ctx.get("symlink_escape")
    bad = [f"read via {r['link']}" for r in obs["reads"] if r.get("readable")]
    bad += [f"wrote via {w['link']}" for w in obs["writes"] if w.get("written")]
    if bad:
        return False, "; ".join(bad), obs
    tried = len(obs["reads"]) + len(obs["writes"])
    return True, f"{tried} links, nothing reached ({_errno_summary(obs['reads'] + obs['writes'])})", obs


def _hardlink(ctx: _Context) -> Verdict:
    attempts: list[dict[str, Any]] = ctx.get("hardlink_escape")["attempts"]
    linked = [a["source"] for a in attempts if a.get("linked")]
    if linked:
        return False, f"LINKED {', '.join(linked)} into the workspace", {"attempts": attempts}
    return True, f"all {len(attempts)} refused ({_errno_summary(attempts)})", {"attempts": attempts}


def _attempts_text(attempts: list[dict[str, Any]]) -> str:
    parts = []
    for a in attempts:
        outcome = "CONNECTED" if a.get("connected") else f"{a.get('stage')}: {a.get('errno')}"
        parts.append(f"{a['target']} {outcome}")
    return "; ".join(parts)


def _host_tcp(ctx: _Context) -> Verdict:
    attempts: list[dict[str, Any]] = ctx.get("host_tcp")["attempts"]
    seen = ctx.plants.recorder.count("tcp")
    details = {"attempts": attempts, "listener_connections": seen}
    ok = not any(a.get("connected") for a in attempts) and seen == 0
    return ok, f"{_attempts_text(attempts)}; listener saw {seen}", details


def _host_unix(ctx: _Context) -> Verdict:
    attempts: list[dict[str, Any]] = ctx.get("host_unix")["attempts"]
    seen = ctx.plants.recorder.count("unix")
    details = {"attempts": attempts, "listener_connections": seen, "notes": ctx.plants.notes}
    ok = not any(a.get("connected") for a in attempts) and seen == 0
    return ok, f"{_attempts_text(attempts)}; listeners saw {seen}", details


def _outbound(ctx: _Context) -> Verdict:
    obs = ctx.get("outbound")
    same_ns = obs.get("net_ns") is not None and obs.get("net_ns") == ctx.host_ns.get("net")
    interfaces = obs.get("interfaces")
    only_lo = isinstance(interfaces, list) and set(interfaces) <= {"lo"}
    connected = any(a.get("connected") for a in obs["attempts"])
    ns = "host network namespace" if same_ns else "own network namespace"
    ifaces = ", ".join(interfaces) if isinstance(interfaces, list) else str(interfaces)
    observed = f"{ns}; interfaces: {ifaces or 'none'}; {_attempts_text(obs['attempts'])}"
    return (not connected and not same_ns and only_lo), observed, {**obs, "host_net_ns": ctx.host_ns.get("net")}


def _ptrace(ctx: _Context) -> Verdict:
    obs = ctx.get("ptrace")["attach_child"]
    if obs.get("allowed"):
        return False, f"PTRACE_SEIZE of a child (pid {obs['pid']}) succeeded", obs
    return True, f"PTRACE_SEIZE of a child refused ({obs.get('errno')})", obs


def _vm_readv(ctx: _Context) -> Verdict:
    obs = ctx.get("ptrace")
    parts, ok = [], True
    for key, who in (("vm_read_child", "child"), ("vm_read_parent", "parent")):
        o = obs[key]
        ok = ok and not o.get("allowed")
        how = o.get("errno") or f"{o.get('bytes')} bytes"
        parts.append(f"{who}: {'ALLOWED' if o.get('allowed') else 'refused'} ({how})")
    return ok, "; ".join(parts), {k: obs[k] for k in ("vm_read_child", "vm_read_parent")}


def _userns(ctx: _Context) -> Verdict:
    obs = ctx.get("userns")
    out = obs.get("output")
    if not isinstance(out, dict):
        return False, f"helper gave no answer (exit {obs.get('returncode')}, timed out: {obs.get('timed_out')})", obs
    if out.get("unshare"):
        return False, "unshare(CLONE_NEWUSER) SUCCEEDED", obs
    return True, f"refused ({out.get('errno')})", obs


def _setuid(ctx: _Context) -> Verdict:
    obs = ctx.get("setuid")
    if obs.get("uid") == 0 or obs.get("euid") == 0:
        return False, "the worker already runs as root (uid 0): setuid is moot, privilege is total", obs
    if obs.get("ran") is None:
        return True, "no setuid-root program visible", obs
    euid = obs.get("child_euid")
    if euid is None:
        return False, f"could not read the credentials of {obs['ran']}", obs
    if euid == 0 or euid != obs.get("uid"):
        return False, f"{obs['ran']} ran with euid {euid} (worker uid {obs.get('uid')})", obs
    return True, f"{obs['ran']} ran with euid {euid}, unchanged ({obs['setuid_root_visible']} setuid-root visible)", obs


def _statuses(ctx: _Context) -> dict[str, dict[str, Any]]:
    return {"worker": ctx.get("caps"), "command": ctx.get("command")["status"]}


def _capabilities(ctx: _Context) -> Verdict:
    statuses = _statuses(ctx)
    bad: list[str] = []
    for who, st in statuses.items():
        for key in ("CapEff", "CapPrm", "CapAmb"):
            value = st.get(key)
            if value is None or int(value, 16) != 0:
                bad.append(f"{who} {key}={value}")
    worker = statuses["worker"]
    extra = f"(CapInh={worker.get('CapInh')}, CapBnd={worker.get('CapBnd')})"
    if bad:
        return False, f"{', '.join(bad)} {extra}", statuses
    return True, f"CapEff, CapPrm, CapAmb = 0 in worker and command {extra}", statuses


def _no_new_privs(ctx: _Context) -> Verdict:
    statuses = _statuses(ctx)
    values = {who: st.get("NoNewPrivs") for who, st in statuses.items()}
    ok = all(v == "1" for v in values.values())
    return ok, ", ".join(f"{who} NoNewPrivs={v}" for who, v in values.items()), statuses


def _other_workspace(ctx: _Context) -> Verdict:
    obs = ctx.get("other_workspace")
    bad = [f"read {r['path']}" for r in obs["reads"] if r.get("readable")]
    bad += [f"{entry['dir']} lists it" for entry in obs["listings"] if entry.get("peer_listed")]
    if bad:
        return False, "; ".join(bad), obs
    reads = ", ".join(_read_outcome(r) for r in obs["reads"])
    return True, f"{reads}; not listed", obs


def _fork_bomb(ctx: _Context) -> Verdict:
    obs = ctx.get("fork_bomb")
    out = obs.get("output")
    limit = ctx.limits["pids_limit"]
    details = {**obs, "pids_limit": limit}
    if not isinstance(out, dict):
        return False, f"bomb gave no answer (exit {obs.get('returncode')}, timed out: {obs.get('timed_out')})", details
    forked, err = out.get("forked"), out.get("errno")
    if err is None:
        return False, f"{forked} processes forked without refusal (safety cap {obs.get('cap')}; limit {limit})", details
    if limit is not None and forked > limit:
        return False, f"refused ({err}) only after {forked} processes (limit {limit})", details
    return True, f"refused ({err}) after {forked} processes (limit {limit})", details


def _memory(ctx: _Context) -> Verdict:
    obs = ctx.get("memory_hog")
    limit = ctx.limits["memory_limit_mb"]
    details = {**obs, "memory_limit_mb": limit, "host_available_mb": ctx.limits.get("host_available_mb")}
    reached = int(obs.get("reached_mb", 0))
    out = obs.get("output") if isinstance(obs.get("output"), dict) else {}
    stopped_by = obs.get("signal") or (out or {}).get("error")
    if obs.get("timed_out"):
        return False, f"still running at its deadline after {reached} MB", details
    if not stopped_by:
        cap = int(obs.get("cap_mb", 0))
        if limit is not None and cap <= limit:
            why = f"the host has {ctx.limits.get('host_available_mb')} MB available, too little to test the limit"
            return False, f"allocated {reached} MB (its cap) unhindered; {why} ({limit} MB)", details
        return False, f"allocated {reached} MB (its cap) unhindered; limit {limit or 'none'} MB not enforced", details
    if limit is not None and reached > limit + _MEMORY_SLACK_MB:
        return False, f"stopped ({stopped_by}) only at {reached} MB (limit {limit} MB)", details
    return True, f"stopped ({stopped_by}) at {reached} MB (limit {limit} MB)", details


def _responsive(ctx: _Context) -> Verdict:
    m = ctx.monitor
    for probe in LIMIT_PROBES:
        if probe in ctx.errors:
            raise _Missing(f"probe {probe} failed: {ctx.errors[probe]}")
    lag_ok = m["max_loop_lag_ms"] < _MAX_LOOP_LAG * 1000
    spawn_ok = not m["spawn_failures"] and m["host_spawns"] > 0 and m["max_spawn_ms"] < _MAX_SPAWN * 1000
    observed = (f"event-loop lag max {m['max_loop_lag_ms']} ms; {m['host_spawns']} host spawns, "
                f"slowest {m['max_spawn_ms']} ms, {len(m['spawn_failures'])} failed")  # fmt: skip
    return lag_ok and spawn_ok, observed, m


def _exfiltration(ctx: _Context) -> Verdict:
    ctx.get("worker_env")  # nothing came back at all: no verdict either way
    leaked = ctx.plants.leaked_in(ctx.sent_back)
    if leaked:
        return False, f"raw canary value sent back: {', '.join(leaked)}", {"leaked": leaked}
    return True, f"none in {len(ctx.sent_back)} bytes of probe output", {}


_EVALUATORS: dict[str, Callable[[_Context], Verdict]] = {
    "env.allowlist": _env_allowlist,
    "env.canary": _env_canary,
    "proc.pid1_environ": _pid1_environ,
    "proc.environ": _proc_files("environ"),
    "proc.cmdline": _proc_files("cmdline"),
    "proc.pids": _proc_pids,
    "fds.command": _fds_command,
    "fds.worker": _fds_worker,
    "files.secret": _file_check("secret_file"),
    "files.world": _file_check("world_file"),
    "files.shadow": _shadow,
    "files.write_outside": _write_outside,
    "escape.symlink": _symlink,
    "escape.hardlink": _hardlink,
    "net.host_tcp": _host_tcp,
    "net.host_unix": _host_unix,
    "net.outbound": _outbound,
    "proc.ptrace": _ptrace,
    "proc.vm_readv": _vm_readv,
    "ns.user": _userns,
    "priv.setuid": _setuid,
    "priv.capabilities": _capabilities,
    "priv.no_new_privs": _no_new_privs,
    "workspace.other_user": _other_workspace,
    "limits.fork_bomb": _fork_bomb,
    "limits.memory": _memory,
    "host.responsive": _responsive,
    "canary.exfiltration": _exfiltration,
}
assert set(_EVALUATORS) == set(CHECK_NAMES)

