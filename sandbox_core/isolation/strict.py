"""The ``strict`` profile: a bubblewrap sandbox around the worker, built on the host.

The sandbox sees a minimal read-only system (/usr without /usr/local/etc, the /lib, /bin
symlinks, a few /etc files, a generated passwd/group/hosts), the worker's Python staged at
the neutral ``/opt/sandbox`` (:mod:`runtime`), private tmpfs /tmp, /dev/shm and ``HOME``, a
fresh /dev and /proc, and the user's workspace read-write at ``/workspace`` with its
protected and denied entries held in place (:mod:`protect`). It has new pid, net, ipc, uts,
mount and cgroup namespaces, a seccomp filter loaded by bwrap before exec, and no
capabilities except CAP_SETUID/CAP_SETGID when the host is root, which the worker uses once
to become the unprivileged sandbox user (then they are gone: ``no_new_privs`` is set).

The environment is the allowlisted one from :func:`worker_env` and is the environment of
bwrap itself, so PID 1 inside holds nothing else (never ``--clearenv``, never
``--setenv``). bwrap reads all its options from a sealed memfd (``--args FD``): PID 1's
``/proc/1/cmdline``, which every process inside can read, is ``bwrap --args N`` and names
no host path.
"""

from __future__ import annotations

import fcntl
import functools
import glob
import os
import pwd
import shutil
import subprocess
import sys
import weakref
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import ConfigError, IsolationUnavailable
from sandbox_core.isolation import cgroups, etc_stage, probes, quota, runtime, slots, spares, tenants
from sandbox_core.isolation.protect import DENY, FREEZE, TreeGuard
from sandbox_core.isolation.spec import LaunchSpec, python_argv, rlimit_plan, worker_env
from sandbox_core.kernel import landlock_abi
from sandbox_core.shared import EGRESS_PROXY_PORT, MODEL_ENDPOINT_PORT

WORKSPACE = "/workspace"
HOME = "/home/sandbox"
"""The sandbox user's home: on a per-worker tmpfs (``/home``), not in the workspace, so that
dotfiles written to ``~`` neither land in the project nor outlive the worker."""
HIDDEN = ("/usr/local/etc",)
"""System directories covered by an empty read-only tmpfs (npm's global config and tokens live
in /usr/local/etc)."""
BWRAP_OPTIONS = ("--args", "--bind-fd", "--ro-bind-fd")
"""bwrap options the strict profile cannot do without."""
_MB = 1024 * 1024
SYSTEM_TREES = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_ENTRIES = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "nsswitch.conf",
    "localtime",
    "timezone",
    "ssl/certs",
    "ssl/openssl.cnf",
    "pki/tls/certs",
    "pki/ca-trust/extracted",
    "alternatives",
    "protocols",
    "services",
    "os-release",
    "debian_version",
    "mime.types",
    "magic",
    "magic.mime",
)
"""Host /etc entries visible read-only (never shadow, ssl/private, environment, *rc)."""
NEVER = ("/etc/shadow", "/etc/gshadow", "/etc/ssl/private")
"""Host paths no extra bind may expose, not even through a parent directory."""
MIN_BWRAP = (0, 6, 0)
"""--perms and --size for tmpfs mounts."""
INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`)"


def sandbox_identity(config: ProcessSandboxConfig, key: str) -> tuple[int, int] | None:
    """The (uid, gid) the workers of tenant ``key`` (a user id, see :func:`tenants.tenant_key`)
    run as when the host is root: the tenant's own uid, or the one ``strict.sandbox_user``
    when that opt-out is set; None when the host is not root."""
    if os.geteuid() != 0:
        return None
    shared = shared_identity(config)
    if shared is not None:
        return shared
    tenant = tenants.identity_for(config, key)
    return tenant.uid, tenant.gid


def shared_identity(config: ProcessSandboxConfig) -> tuple[int, int] | None:
    """The one account every worker runs as when ``strict.sandbox_user`` is set (the opt-out of
    per-user uids), else None."""
    name = config.strict.sandbox_user
    if not name:
        return None
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, ValueError):
        raise IsolationUnavailable(
            f"strict.sandbox_user {name!r} does not exist on this host; create it "
            "(`useradd --system --no-create-home sandbox`) or leave strict.sandbox_user empty for per-user uids",
            data={"field": "strict.sandbox_user", "value": name},
        ) from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise IsolationUnavailable(f"strict.sandbox_user {name!r} is root; choose an unprivileged user",
                                   data={"field": "strict.sandbox_user", "value": name})
    return entry.pw_uid, entry.pw_gid


def identity_mode(config: ProcessSandboxConfig) -> str:
    """How workers get their uid here: ``per-user``, ``shared`` or ``user-namespace``."""
    if os.geteuid() != 0:
        return "user-namespace"
    return "shared" if config.strict.sandbox_user else "per-user"


def find_bwrap(config: ProcessSandboxConfig) -> str:
    """The bwrap executable, or IsolationUnavailable saying how to install it."""
    if not sys.platform.startswith("linux"):
        raise IsolationUnavailable(
            f"the strict profile needs Linux (this is {sys.platform}); "
            "use profile = 'process' explicitly to accept weaker isolation"
        )
    found = shutil.which(config.strict.bwrap)
    if found is None:
        raise IsolationUnavailable(
            f"bubblewrap ({config.strict.bwrap!r}) was not found on PATH; {INSTALL_HINT}, or point strict.bwrap at it",
            data={"field": "strict.bwrap", "value": config.strict.bwrap, "reason": "no_bwrap"},
        )
    return found


def _probe_cache(config: ProcessSandboxConfig) -> Path | None:
    """Where this host keeps bwrap's probe answers (None: probe every process; the state
    directory's own check then fails the launch with its reason)."""
    try:
        return probes.cache_dir(tenants.state_dir(config))
    except (IsolationUnavailable, OSError):
        return None


@functools.cache
def bwrap_version(bwrap: str, cache: Path | None = None) -> str:
    """``bwrap --version`` (cached in this process, and in ``cache`` for the same binary:
    :mod:`probes`; a run also proves the binary runs)."""

    def run() -> str:
        try:
            out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError) as exc:
            raise IsolationUnavailable(f"{bwrap} does not run ({exc}); {INSTALL_HINT}",
                                       data={"field": "strict.bwrap", "value": bwrap, "reason": "no_bwrap"}) from None
        return out.stdout.strip() or "bubblewrap (unknown version)"

    return probes.probe_output(cache, [bwrap, "--version"], run)


class _Fds:
    """Descriptors handed to one bwrap; closed after spawn, at cleanup, or when dropped."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self._finalizer = weakref.finalize(self, _close_all, self.fds)

    def add(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        _close_all(self.fds)


def _close_all(fds: list[int]) -> None:
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


class _Mounts:
    """Builds the mount part of the argv: parents first, traversable, never twice."""

    def __init__(self, fds: _Fds) -> None:
        self.args: list[str] = []
        self.fds = fds
        self.covered: list[str] = []
        """Sandbox paths already provided by a bind (their subtrees need nothing more)."""
        self.made: set[str] = {"/"}
        self.dest_to_host: list[tuple[str, str]] = []

    def copy(self, fds: _Fds) -> _Mounts:
        """An independent builder that continues from this one's state."""
        other = _Mounts(fds)
        other.args, other.covered = list(self.args), list(self.covered)
        other.made, other.dest_to_host = set(self.made), list(self.dest_to_host)
        return other

    def is_covered(self, dest: str) -> bool:
        return any(_under(dest, root) for root in self.covered)

    def parents(self, dest: str, mode: str = "0711") -> None:
        """Create the missing parents of ``dest`` (0711: traversable, not listable)."""
        for parent in reversed(PurePosixPath(dest).parents):
            p = str(parent)
            if p not in self.made and not self.is_covered(p):
                self.args += ["--perms", mode, "--dir", p]
                self.made.add(p)

    def dir(self, dest: str, mode: str) -> None:
        self.parents(dest)
        if dest not in self.made and not self.is_covered(dest):
            self.args += ["--perms", mode, "--dir", dest]
            self.made.add(dest)

    def bind(
        self, src: str, dest: str | None = None, *, rw: bool = False, force: bool = False, mode: str = "0711",
        via: str | None = None,
    ) -> None:
        """Bind ``src`` at ``dest``; ``via``: the path bwrap binds instead, where the host has
        mounted ``src`` (with mounts on it) for the launch (:func:`host_path` still answers ``src``)."""
        dest = dest or src
        if self.is_covered(dest) and not (rw or force):
            return
        self.parents(dest, mode)
        self.args += ["--bind" if rw else "--ro-bind", via or src, dest]
        self.covered.append(dest)
        self.dest_to_host.append((dest, src))

    def bind_staged(self, src: str, dest: str, names: list[str]) -> None:
        """Bind stage ``src`` read-only at ``dest``, a directory of only ``names`` (for
        :meth:`host_path`, any other path below ``dest`` is bound from nowhere)."""
        self.parents(dest, "0755")
        self.args += ["--ro-bind", src, dest]
        self.covered.append(dest)
        self.made.add(dest)
        self.dest_to_host += [(f"{dest}/{name}", f"{src}/{name}") for name in names]

    def symlink(self, target: str, dest: str) -> None:
        if self.is_covered(dest) or dest in self.made:
            return
        self.parents(dest)
        self.args += ["--symlink", target, dest]
        self.made.add(dest)

    def data(self, content: bytes, dest: str, mode: str = "0644") -> None:
        self.parents(dest)
        fd = self.fds.add(data_fd(PurePosixPath(dest).name, content))
        self.args += ["--perms", mode, "--ro-bind-data", str(fd), dest]

    def host_path(self, dest: str) -> str | None:
        """The host path behind sandbox path ``dest`` (deepest bind wins), if any."""
        for bound, src in sorted(self.dest_to_host, key=lambda x: -len(x[0])):
            if _under(dest, bound):
                return src + dest[len(bound) :] if bound != "/" else src + dest
        return None


def data_fd(name: str, data: bytes) -> int:
    """A sealed close-on-exec memfd holding ``data`` at offset 0, for bwrap's FD options.

    One per use: bwrap reads each to end of file, and a shared offset would race when two
    workers start at once.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _split_bind(spec: str) -> tuple[str, str]:
    src, sep, dest = spec.partition(":")
    return os.path.realpath(src), os.path.normpath(dest) if sep else os.path.realpath(src)


def _check_bind(src: str, dest: str, what: str) -> None:
    """Refuse a bind of ``strict.{what}`` that names a missing path, a secret or a bad destination."""
    field = f"strict.{what}"
    if not os.path.exists(src):
        raise IsolationUnavailable(f"{field}: {src} does not exist", data={"field": field, "value": src})
    if src == "/" or any(_under(never, src) for never in NEVER):
        raise IsolationUnavailable(f"{field}: binding {src} would expose host secrets",
                                   data={"field": field, "value": src})
    if not dest.startswith("/") or os.path.normpath(dest) in ("/", WORKSPACE, "/proc", "/dev"):
        raise IsolationUnavailable(f"{field}: {dest!r} is not a usable absolute destination",
                                   data={"field": field, "value": dest})


def _identity_layer(config: ProcessSandboxConfig, ident: tuple[int, int] | None) -> dict[str, Any]:
    """The report's ``identity`` entry: who the worker becomes, and how that uid was chosen."""
    mode = identity_mode(config)
    if ident is None:
        return {"mode": mode, "uid": os.getuid(), "note": "user namespace mapping the caller's uid (host not root)"}
    entry: dict[str, Any] = {"mode": mode, "uid": ident[0], "gid": ident[1]}
    if mode == "per-user":
        entry["uid_range"] = config.strict.uid_range
    return entry


def _passwd(ident: tuple[int, int] | None, user: str) -> tuple[bytes, bytes]:
    """A passwd and group that name only root and the sandbox user (no host accounts)."""
    uid, gid = ident if ident is not None else (os.getuid(), os.getgid())
    name = user if ident is not None and user and not user.isdigit() else "sandbox"
    passwd = f"root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n{name}:x:{uid}:{gid}:sandbox:{HOME}:/bin/sh\n"
    group = f"root:x:0:\n{name}:x:{gid}:\n"
    return passwd.encode(), group.encode()


HOSTS = b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tsandbox\n"


def strict_launch(
    config: ProcessSandboxConfig, worker_id: str, workspace: Path | None, *, unbound: bool = False
) -> LaunchSpec:
    """The bwrap argv, scrubbed environment, fds and plan of one strict worker (fails closed).

    ``unbound`` (root hosts, no workspace): a pre-warmed worker whose user is attached at claim
    through a slot (:mod:`slots`, :func:`attach_user`); it keeps CAP_SETUID/CAP_SETGID until then.
    """
    bwrap = find_bwrap(config)
    cache = _probe_cache(config)
    version = bwrap_version(bwrap, cache)
    if _version_tuple(version) < MIN_BWRAP:
        need = ".".join(map(str, MIN_BWRAP))
        raise IsolationUnavailable(f"{version} is too old for the strict profile (need {need}+); {INSTALL_HINT}",
                                   data={"field": "strict.bwrap", "value": bwrap, "reason": "no_bwrap"})
    _require_options(bwrap, version, cache)
    if unbound and (workspace is not None or os.geteuid() != 0):
        raise IsolationUnavailable("an unbound strict worker needs a root host and no workspace")
    key = tenants.tenant_key(config, workspace)
    ident = None if unbound else sandbox_identity(config, key)
    if quota.configured(config) and not unbound:
        if workspace is None or quota.unavailable(config) is not None:
            raise IsolationUnavailable(f"limits.workspace_mb is set but cannot be enforced: "
                                       f"{quota.unavailable(config) or 'the worker has no workspace'}",
                                       data={"field": "limits.workspace_mb", "value": config.limits.workspace_mb})
        quota.check(config, key, workspace.resolve())
    fds = _Fds()
    guards: dict[str, TreeGuard] = {}
    slot = slots.Slot.create(tenants.state_dir(config), worker_id) if unbound else None
    built = (slots.Slot.create(tenants.state_dir(config), worker_id, shared=False)
             if builds_workspace(config, workspace, unbound) else None)  # fmt: skip
    try:
        m = _static_view().copy(fds)
        etc_staged = _etc_view(m, config)
        # The private /tmp comes first: an interpreter or checkout that lives under /tmp on
        # the host (a CI clone, say) is then bound on top of it instead of hidden by it.
        m.args[:0] = ["--perms", "1777", *_tmpfs_size(config), "--tmpfs", "/tmp"]
        if slot is not None:  # rewritten in place for the user's uid at claim
            m.bind(str(slot.path / slots.PASSWD), "/etc/passwd", mode="0755", force=True)
            m.bind(str(slot.path / slots.GROUP), "/etc/group", mode="0755", force=True)
        else:
            passwd, group = _passwd(ident, config.strict.sandbox_user)
            m.data(passwd, "/etc/passwd")
            m.data(group, "/etc/group")
        m.data(HOSTS, "/etc/hosts")
        trees = _sandbox_view(m, config, workspace, slot.ws if slot is not None else None,
                              built.ws if built is not None else None)  # fmt: skip
        unix_layer = _unix_sockets(config, ident, trees, etc_staged=etc_staged)
        guards.update((dest, TreeGuard(src)) for dest, src in trees.items() if os.path.isdir(src))
        protected = _protect(guards.get(WORKSPACE) if workspace is not None else None, config.strict.protected_paths)
        deny_paths = config.strict.deny_paths
        if slot is not None:  # the workspace's are mounted at claim, onto the user's workspace
            deny_paths = tuple(p for p in deny_paths if not _under(os.path.normpath(p), WORKSPACE))
        denied, deny_missing = _deny(m, deny_paths, guards)
        if built is not None:  # the workspace's guards are mounted by the host, before bwrap runs
            held = _build_workspace(built, guards[WORKSPACE])
            held += _hold_in_place(m, {t: g for t, g in guards.items() if t != WORKSPACE}, fds)
        else:
            held = _hold_in_place(m, guards, fds)
        m.args += ["--remount-ro", "/"]
        seccomp_args, seccomp_info = _seccomp(config, fds, cache)
        ns_args, namespaces = _namespaces(ident is not None or slot is not None, version)
        strict = config.strict
        cgroup = (cgroups.plan(worker_id, config.limits, strict.cgroup_version, parent=strict.cgroup_parent)
                  if strict.cgroups else None)  # fmt: skip
        rlimits, limits_layer = _limits(config, cgroup)
        rt = runtime.runtime()
        # No --chdir into the workspace: it belongs to the sandbox uid (0700) and bwrap, holding
        # no CAP_DAC_OVERRIDE, cannot enter it; the worker changes into it after the uid switch.
        # (bwrap exports PWD=/ after its chdir; the rest of the environment is the allowlist.)
        # The options go through a memfd (they name host paths); the command stays on the
        # command line (bwrap takes it from there only) and names none.
        args = [*m.args, "--chdir", "/", *ns_args, "--new-session", "--die-with-parent", *seccomp_args]
        argv = [bwrap, "--args", str(fds.add(data_fd("sandbox-bwrap-args", _nul_separated(args))))]
        argv += ["--", *python_argv(config, executable=rt.executable, root=rt.app_dir)]
    except BaseException:
        fds.close()
        for made in (slot, built):
            if made is not None:
                made.release()
        raise
    finally:
        for guard in guards.values():
            guard.close()
    rw_dests = [d for d in trees if d != WORKSPACE]
    plan: dict[str, Any] = {
        "profile": "strict",
        "rlimits": rlimits,
        "umask": 0o077,
        "env_allowlist": True,
        "no_new_privs": True,
        "home": HOME,
        "site_packages": rt.site_dir,
        "expect_mounts": held,
        "host_layers": {
            "engine": version,
            "namespaces": namespaces,
            "identity": _identity_layer(config, ident),
            "filesystem": {
                "workspace": WORKSPACE,
                "home": HOME,
                "read_write": [WORKSPACE, "/tmp", "/dev/shm", "/home", *rw_dests],
                "protected": protected,
                "denied": denied,
                "deny_missing": deny_missing,
            },
            "seccomp_filter": seccomp_info,
            "unix_sockets": unix_layer,
            "disk_quota": quota.describe(config),
            "limits": limits_layer["mode"],
            "limits_detail": limits_layer,
        },
    }
    if "net" in namespaces:  # a loopback port of the sandbox's own: no other tenant can reach it
        plan["model_endpoint"] = {"port": MODEL_ENDPOINT_PORT, "max_body": config.model_body_limit}
    # The network crossing: the worker's proxy on the sandbox's loopback asks the host for each
    # connection; the egress socketpair (client sockets handed to the host) exists only when the
    # policy can allow one.
    plan["network"] = {"mode": config.network.mode, "proxy_port": EGRESS_PROXY_PORT,
                       "handoff": config.network.mode == "allowlist"}  # fmt: skip
    if ident is not None:
        plan["switch_user"] = {"uid": ident[0], "gid": ident[1]}
    if slot is not None:
        plan["await_user"] = True
        plan["claim_workspace"] = WORKSPACE  # where every claim attaches its user's workspace
        plan["host_layers"]["identity"] = {"mode": identity_mode(config), "uid": None,
                                           "note": "unbound: the user's uid is set at claim"}
    if config.strict.landlock:
        writable = [WORKSPACE, *rw_dests]
        plan["landlock"] = {
            "read_only": _roots({p for p in {"/etc", "/proc", *m.covered} if not any(_under(p, w) for w in writable)}),
            "read_write": ["/tmp", "/dev", "/home", *rw_dests],
            "required": landlock_abi() > 0,
        }

    def after_spawn(pid: int) -> None:
        fds.close()  # bwrap holds its own copies until it has read them
        if cgroup is not None:
            cgroup.after_spawn(pid)

    spare = spares.Spare(config, slot, worker_id) if slot is not None and shared_identity(config) is None else None

    def stage() -> None:
        assert spare is not None
        spare.stage(lambda ws: attach_user(config, spare.slot, ws))

    def cleanup() -> None:
        fds.close()
        try:
            if cgroup is not None:
                cgroup.cleanup()
        finally:
            if spare is not None:
                spare.close(slot.release)  # type: ignore[union-attr]
            elif slot is not None:
                slot.release()
            if built is not None:  # released after the start, unless the worker never got there
                built.release()

    env = worker_env(config, home=HOME)
    env["PATH"] = _inside_path(m, env.get("PATH", ""), config.env.default_path)
    return LaunchSpec(
        argv=argv,
        env=env,
        cwd="/",
        plan=plan,
        workspace_in_sandbox=WORKSPACE if workspace is not None else None,
        bound_at_spawn=slot is None,
        attach=(lambda ws, prepare: claim_slot(config, slot, spare, ws, prepare)) if slot is not None else None,
        stage=stage if spare is not None else None,
        spare=spare,
        pass_fds=tuple(fds.fds),
        after_spawn=after_spawn,
        after_start=(lambda: _release_built(built)) if built is not None else None,
        cleanup=cleanup,
        limit_events=cgroup.limit_events if cgroup is not None else None,
        cpu_usage=cgroup.cpu_usage_ns if cgroup is not None else None,
        cgroup_pids=cgroup.pids if cgroup is not None else None,
        sweep_session=False,  # the sandbox's pid namespace dies with its init (bwrap)
    )


def _nul_separated(args: list[str]) -> bytes:
    """bwrap's ``--args`` format: each argument followed by a NUL."""
    if any("\0" in a for a in args):
        raise IsolationUnavailable("a bwrap argument holds a NUL byte")
    return b"".join(a.encode() + b"\0" for a in args)


def launch_args(spec: LaunchSpec) -> list[str]:
    """The bwrap options behind ``spec.argv`` (``bwrap --args FD -- COMMAND``), read back from
    their memfd: for tests and diagnostics, before the spec is spawned (the fd is closed then)."""
    fd = int(spec.argv[spec.argv.index("--args") + 1])
    data = os.pread(fd, os.fstat(fd).st_size, 0)
    return data.decode().split("\0")[:-1]


@functools.cache
def _bwrap_help(bwrap: str, cache: Path | None = None) -> str:
    def run() -> str:
        try:
            out = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise IsolationUnavailable(f"{bwrap} does not run ({exc}); {INSTALL_HINT}") from None
        return out.stdout + out.stderr

    return probes.probe_output(cache, [bwrap, "--help"], run)


def _require_options(bwrap: str, version: str, cache: Path | None = None) -> None:
    """Fail closed unless bwrap has the options the profile is built on (``--args`` hides
    the argv from the sandbox, ``--bind-fd`` holds workspace entries in place)."""
    text = _bwrap_help(bwrap, cache)
    missing = [o for o in BWRAP_OPTIONS if o not in text]
    if missing:
        raise IsolationUnavailable(
            f"{version} lacks {', '.join(missing)}, which the strict profile needs; "
            f"install bubblewrap 0.6 or newer ({INSTALL_HINT})"
        )


def _inside_path(m: _Mounts, path: str, default: str) -> str:
    """``PATH`` with only the absolute entries that exist inside the sandbox, in order.

    Host entries such as a pyenv shim directory or a checkout's venv would name paths the
    sandbox does not have (and tell it where they are on the host).
    """
    def exists_inside(entry: str) -> bool:
        real = os.path.realpath(entry)  # /bin -> usr/bin is mirrored inside
        host = m.host_path(real)
        return entry.startswith("/") and host is not None and os.path.isdir(host) and host == real

    for candidate in (path, default, "/usr/bin:/bin"):
        kept = list(dict.fromkeys(e for e in candidate.split(":") if e and exists_inside(e)))
        if kept:
            return ":".join(kept)
    return "/usr/bin"


@functools.cache
def _static_view() -> _Mounts:
    """The system and Python part of the view, computed once per process (it does not vary)."""
    m = _Mounts(_Fds())
    _system_view(m)
    _python_view(m)
    return m


def _system_view(m: _Mounts) -> None:
    """/usr (minus :data:`HIDDEN`) and the /bin and /lib* links (/etc is per launch: :func:`_etc_view`)."""
    for tree in SYSTEM_TREES:
        if os.path.islink(tree):
            m.symlink(os.readlink(tree), tree)
        elif os.path.isdir(tree):
            m.bind(tree)
    for path in HIDDEN:
        if os.path.isdir(path) and m.host_path(path) == path:
            m.args += ["--perms", "0755", "--size", "4096", "--tmpfs", path, "--remount-ro", path]


@functools.cache
def _etc_entries() -> tuple[tuple[str, str], ...]:
    """The host's /etc entries the view shows: (name below /etc, host path)."""
    paths = [f"/etc/{entry}" for entry in ETC_ENTRIES] + sorted(glob.glob("/etc/python3*"))
    return tuple((path[len("/etc/"):], path) for path in paths)


def _etc_view(m: _Mounts, config: ProcessSandboxConfig) -> bool:
    """The selected /etc entries: their stage bound as one directory (:mod:`etc_stage`), or,
    where a configured bind goes below /etc (its mount point would have to be made in the
    read-only stage) or staging fails, each entry bound on its own. True when staged."""
    binds = (*config.strict.ro_binds, *config.strict.rw_binds)
    below_etc = any(_under(os.path.normpath(_split_bind(spec)[1]), "/etc") for spec in binds)
    staged = None if below_etc else etc_stage.staged_etc(_etc_entries())
    if staged is not None:
        m.bind_staged(staged.path, "/etc", [*staged.names, *etc_stage.MOUNT_POINTS])
        return True
    m.dir("/etc", "0755")
    for _name, path in _etc_entries():
        if os.path.exists(path):
            m.bind(os.path.realpath(path), path, mode="0755")
    return False


def _python_view(m: _Mounts) -> None:
    """The worker's staged runtime (interpreter, stdlib, its packages, sandbox_core), read-only.

    One bind of a neutral host directory: nothing of the interpreter's, the venv's or the
    checkout's host paths appears in the sandbox, not even in /proc/self/mountinfo.
    """
    m.bind(runtime.runtime().host_dir, runtime.SANDBOX_ROOT, mode="0755")


def _tmpfs_size(config: ProcessSandboxConfig) -> list[str]:
    return ["--size", str(config.limits.memory_mb * _MB)] if config.limits.memory_mb else []


def _sandbox_view(
    m: _Mounts, config: ProcessSandboxConfig, workspace: Path | None, slot_ws: str | None = None,
    built_ws: str | None = None,
) -> dict[str, str]:
    """Fresh /dev and /proc, private /tmp, /dev/shm and /home, the workspace, extra binds.

    ``slot_ws``: an unbound worker's attach point (no workspace yet); ``built_ws``: where the
    host builds ``workspace``'s tree for bwrap to bind (:func:`_build_workspace`).
    Returns the writable trees that come from the host: sandbox path -> host path.
    """
    size = _tmpfs_size(config)
    m.args += ["--dev", "/dev", "--proc", "/proc"]
    m.args += ["--perms", "1777", *size, "--tmpfs", "/dev/shm"]
    m.args += ["--perms", "1777", *size, "--tmpfs", os.path.dirname(HOME)]  # the worker makes HOME in it
    m.made.update({"/dev", "/proc", "/tmp", "/dev/shm", os.path.dirname(HOME)})
    trees: dict[str, str] = {}
    if workspace is not None:
        trees[WORKSPACE] = str(workspace.resolve())
        m.bind(trees[WORKSPACE], WORKSPACE, rw=True, via=built_ws)
    elif slot_ws is not None:  # the slot's mount point: the user's workspace appears in it at claim
        m.bind(slot_ws, WORKSPACE, rw=True)
    else:
        m.args += ["--perms", "1777", *size, "--tmpfs", WORKSPACE]
    binds = [(b, False) for b in config.strict.ro_binds] + [(b, True) for b in config.strict.rw_binds]
    for spec, rw in binds:
        what = "rw_binds" if rw else "ro_binds"
        src, dest = _split_bind(spec)
        _check_bind(src, dest, what)
        m.bind(src, dest, rw=rw, force=True)
        if rw:
            trees[dest] = src
    return trees


LANDLOCK_RESOLVE_UNIX_ABI = 9
"""The Landlock ABI that refuses connecting to path sockets created outside the sandbox."""


def host_sockets_checked_at_launch(config: ProcessSandboxConfig) -> bool:
    """Whether the launch check (not Landlock, not seccomp) keeps host path sockets out of reach."""
    if config.profile != "strict" or (config.strict.seccomp and not config.strict.unix_sockets):
        return False
    return not (config.strict.landlock and landlock_abi() >= LANDLOCK_RESOLVE_UNIX_ABI)


def _unix_sockets(
    config: ProcessSandboxConfig, ident: tuple[int, int] | None, trees: dict[str, str], *, etc_staged: bool
) -> dict[str, Any] | bool:
    """How host Unix sockets stay out of reach when the sandbox may use AF_UNIX (its report).

    Landlock ABI 9 refuses them all; on older kernels (or with Landlock off) the mounted
    host trees are checked now and the launch fails closed while one exposes a socket. A
    staged /etc holds no socket (only files, directories and symlinks are staged): only the
    entries bound one by one are checked.
    """
    if config.strict.seccomp and not config.strict.unix_sockets:
        return False  # seccomp denies AF_UNIX (socketpair(AF_UNIX, SOCK_STREAM) aside)
    if not host_sockets_checked_at_launch(config):
        return {"allowed": True, "host_path_sockets": "refused by Landlock (LANDLOCK_ACCESS_FS_RESOLVE_UNIX)"}
    from sandbox_core.isolation import sockets

    if ident is not None:
        who = sockets.Identity(ident[0], frozenset({ident[1]}))
    else:
        who = sockets.Identity(os.getuid(), frozenset({os.getgid(), *os.getgroups()}))
    bound = [(src, dest) for dest, src in trees.items()]
    for spec in config.strict.ro_binds:
        src, dest = _split_bind(spec)
        bound.append((src, dest))
    if not etc_staged:
        bound += [(os.path.realpath(path), path) for _name, path in _etc_entries()]
    sockets.refuse_exposed(bound, who)
    return {"allowed": True, "host_path_sockets": "none in the mounted trees at launch (checked by the host; "
            f"Landlock ABI {landlock_abi()} < {LANDLOCK_RESOLVE_UNIX_ABI} cannot refuse one created later)"}


def _protect(guard: TreeGuard | None, patterns: tuple[str, ...]) -> list[str]:
    """Freeze the workspace's protected paths (see :mod:`protect`); their sandbox paths."""
    if guard is None:
        return []
    for pattern in patterns:
        guard.protect(pattern)
    return sorted(f"{WORKSPACE}/{m.rel}" for m in guard.mounts.values() if m.kind == FREEZE)


def _hold_in_place(m: _Mounts, guards: dict[str, TreeGuard], fds: _Fds) -> list[list[str]]:
    """Emit the guards' mounts (parents first) and return them as [sandbox path, ro|rw] for the
    worker to check before it serves anything."""
    expect: list[list[str]] = []
    for tree, guard in guards.items():
        for mount in guard.ordered():
            dest = f"{tree}/{mount.rel}"
            if mount.kind == DENY:
                _cover(m, dest, mount.is_dir)
            else:
                option = "--ro-bind-fd" if mount.kind == FREEZE else "--bind-fd"
                m.args += [option, str(fds.add(guard.hand_over(mount))), dest]
            expect.append([dest, "rw" if mount.kind not in (FREEZE, DENY) else "ro"])
    return expect


def _seccomp(config: ProcessSandboxConfig, fds: _Fds, cache: Path | None) -> tuple[list[str], dict[str, Any] | bool]:
    """``--seccomp FD`` with the compiled filter (kept in ``cache``), and its summary for the report."""
    if not config.strict.seccomp:
        return [], False
    from sandbox_core.isolation import seccomp

    program = seccomp.program(config.strict.unix_sockets, cache)
    return ["--seccomp", str(fds.add(data_fd("sandbox-seccomp", program.bpf)))], program.summary()


def _namespaces(as_root: bool, version: str) -> tuple[list[str], list[str]]:
    """Namespace and capability options, and the namespace names for the report.

    As root: no user namespace (its uid 0 would be the host's root on every bind mount);
    all capabilities dropped but CAP_SETUID/CAP_SETGID/CAP_SETPCAP, which the worker spends,
    before anything else runs, on emptying its bounding set and switching to the sandbox
    user. Not root: a user namespace mapping the caller's uid.
    """
    args = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    args += ["--hostname", "sandbox", "--cap-drop", "ALL"]
    names = ["mount", "pid", "net", "ipc", "uts", "cgroup"]
    if as_root:
        caps = ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
        return [*args, *caps], names
    nested = ["--disable-userns"] if _version_tuple(version) >= (0, 8, 0) else []
    return ["--unshare-user", *nested, *args], ["user", *names]


def _limits(
    config: ProcessSandboxConfig, cgroup: cgroups.WorkerCgroup | None
) -> tuple[dict[str, int | tuple[int, int]], dict[str, Any]]:
    """The rlimits for the plan and the report's description of the limits in force."""
    rlimits = rlimit_plan(config.limits)
    if cgroup is not None:
        # RLIMIT_NPROC counts every process of the uid host-wide (of the tenant's uid, or of
        # everyone's with strict.sandbox_user), so one worker's fork bomb would starve the
        # user's other workers: the per-worker pids cgroup is the process limit instead.
        rlimits.pop("nproc", None)
        return rlimits, {"mode": cgroups.mode_of(cgroup), **cgroup.describe()}
    note = ("rlimits only, as asked (strict.cgroups = false): RLIMIT_NPROC counts all processes of the uid, "
            "memory is RLIMIT_AS per process, no CPU limit, socket buffers unbounded")
    return rlimits, {"mode": "rlimits", "why": "disabled by strict.cgroups", "note": note, "warning": True}


def _roots(paths: set[str]) -> list[str]:
    """The paths that are not below another one in the set (landlock rules are recursive)."""
    return sorted(p for p in paths if not any(q != p and _under(p, q) for q in paths))


def _version_tuple(version: str) -> tuple[int, ...]:
    for word in version.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return tuple(int(p) for p in parts)
    return (0,)


def _deny(m: _Mounts, deny_paths: tuple[str, ...], guards: dict[str, TreeGuard]) -> tuple[list[str], list[str]]:
    """Hide each deny path the sandbox would show; (denied, missing) sandbox paths.

    A path below a writable tree is handed to that tree's guard, which pins every directory
    between the tree's root and the path so that no rename of a parent can carry it out of
    reach (in this run or, as every worker pins them again, a later one); it is covered
    after the pins. A missing one is reported, never silently skipped. Elsewhere the view is
    read-only and the path is covered where it is.
    """
    denied: list[str] = []
    missing: list[str] = []
    for path in deny_paths:
        dest = os.path.normpath(path)
        tree = next((t for t in sorted(guards, key=len, reverse=True) if _under(dest, t) and dest != t), None)
        if tree is not None:
            found = guards[tree].deny(os.path.relpath(dest, tree))
            (missing if found is None else denied).append(dest)
            continue
        host = m.host_path(dest)
        if host is None and os.path.realpath(dest) != dest:  # under a mirrored symlink (/bin -> usr/bin)
            dest = os.path.realpath(dest)
            host = m.host_path(dest)
        kind = _deny_kind(m, path, dest, host)
        if kind is None:
            missing.append(dest)
            continue
        if kind == "generated":
            _blank_generated(m, dest)
        else:
            _cover(m, dest, kind == "dir")
        denied.append(dest)
    return denied, missing


def _cover(m: _Mounts, dest: str, is_dir: bool) -> None:
    """Hide ``dest``: an empty read-only 000 tmpfs over a directory, an empty 000 file over a file."""
    if is_dir:
        m.args += ["--perms", "0000", "--size", "4096", "--tmpfs", dest, "--remount-ro", dest]
    else:
        m.data(b"", dest, mode="0000")


SANDBOX_FILESYSTEMS = ("/proc", "/dev", "/tmp", WORKSPACE)
"""Trees the sandbox makes for itself (fresh proc and dev, private tmpfs): no host file is in them
unless a bind puts it there."""


def _deny_kind(m: _Mounts, path: str, dest: str, host: str | None) -> str | None:
    """How to hide deny path ``dest`` in this view: ``"dir"``, ``"file"``, ``"generated"`` (a file the
    view writes itself), or None (nothing to hide).

    A deny rule that cannot do what it says is a ConfigError naming the entry, never a silent
    skip: one that would hide what the worker needs, one inside the sandbox's own /proc, /dev,
    /tmp or tmpfs workspace, and one that names a host path the view neither binds nor generates
    (the operator meant something the rule does not reach). Only a path that exists nowhere, or
    a bound one whose host source does not exist yet, is skipped: there is nothing to hide.
    """
    needed = _needed_by_worker()
    if dest == "/" or dest in SANDBOX_FILESYSTEMS or any(_under(p, dest) or _under(dest, p) for p in needed):
        raise ConfigError("strict.deny_paths", f"{path!r} would hide what the worker needs to run")
    if dest in _generated(m):  # before the bind below it (a staged /etc holds its mount point)
        return "generated"
    if host is not None:  # shown through a bind: hide what is there now
        if not os.path.lexists(host):
            return None
        return "dir" if os.path.isdir(host) else "file"
    if dest in m.made:
        return "dir"
    inside = next((root for root in SANDBOX_FILESYSTEMS if _under(dest, root)), None)
    if inside is not None:
        raise ConfigError(
            "strict.deny_paths",
            f"{path!r} is inside the sandbox's own {inside}, which holds no host files: there is nothing to deny",
        )
    if os.path.lexists(dest):
        raise ConfigError(
            "strict.deny_paths",
            f"{path!r} is neither bound nor generated in the sandbox, so the rule hides nothing; deny paths "
            "name paths as the sandbox sees them (for a bind SRC:DEST, the path below DEST)",
        )
    return None


def _generated(m: _Mounts) -> set[str]:
    """Files the view writes itself (``--ro-bind-data FD DEST``: passwd, group, hosts)."""
    return {m.args[i + 2] for i, arg in enumerate(m.args[:-2]) if arg == "--ro-bind-data"}


def _blank_generated(m: _Mounts, dest: str) -> None:
    """Write generated file ``dest`` empty and mode 0000 instead (bwrap cannot mount over one)."""
    for i, arg in enumerate(m.args[:-2]):
        if arg == "--ro-bind-data" and m.args[i + 2] == dest:
            m.args[i + 1] = str(m.fds.add(data_fd(PurePosixPath(dest).name, b"")))
            if i >= 2 and m.args[i - 2] == "--perms":
                m.args[i - 1] = "0000"


@functools.cache
def _needed_by_worker() -> tuple[str, ...]:
    """Sandbox paths the worker cannot start without: its staged interpreter, libraries and package."""
    return (runtime.SANDBOX_ROOT,)


def claim_slot(config: ProcessSandboxConfig, slot: slots.Slot, spare: spares.Spare | None,
               workspace: Path, prepare: Callable[[], object]) -> dict[str, Any]:  # fmt: skip
    """The host side of a claim: a new user takes the slot's staged spare (:mod:`spares`) when
    there is one; anyone else gets their own workspace (``prepare``) attached (:func:`attach_user`)."""
    if spare is not None:
        attached = spare.claim(workspace)
        if attached is not None:
            return {**attached, "spare": True}
        spare.detach()
    prepare()
    return attach_user(config, slot, workspace)


def builds_workspace(config: ProcessSandboxConfig, workspace: Path | None, unbound: bool) -> bool:
    """Whether the host builds a worker's workspace tree itself before bwrap runs.

    bwrap pays a bind, a remount and a read of its mount table for each ``--ro-bind-fd``: the
    workspace's 19 guard mounts cost a strict spawn 4-5 ms of its 10-12 ms in bwrap. A root host
    with the mount API makes the same mounts on a detached clone of the workspace instead, the
    way a claim does (:meth:`slots.Slot.attach`, about 0.6 ms), mounts the finished tree in a
    private slot of its own, and bwrap binds that tree at ``/workspace`` in one recursive bind.
    bwrap's bind copies the tree itself (the top mount at the slot's ``ws``, with the guards on
    it), and the slot is private besides, so no mount event passes between the two copies: the
    host takes its own away in the background once the worker has started (bwrap built the
    sandbox before the handshake), and neither that nor anything later on the host reaches the
    sandbox. As at a claim, nothing resolves a path inside the workspace: the clone and every
    guard are taken by descriptor, and the only paths named are the slot's, below a root-only
    0700 directory. Elsewhere (not root, or no mount API) bwrap mounts each guard.
    """
    return workspace is not None and not unbound and slots.unavailable() is None and workspace.is_dir()


def _release_built(slot: slots.Slot) -> None:
    """Take the host's copy of a workspace tree built for bwrap away (the sandbox keeps its own)."""
    try:
        slot.release()
    except OSError as exc:
        raise IsolationUnavailable(f"cannot unmount the workspace tree the host built in {slot.path}: {exc}",
                                   data={"reason": "workspace_mounts"}) from None


def _build_workspace(slot: slots.Slot, guard: TreeGuard) -> list[list[str]]:
    """Mount ``guard``'s tree (its root, with its freeze, pin and deny mounts) at ``slot``'s
    ``ws``; what the worker must find mounted, as ``[sandbox path, ro|rw]``."""
    mounts = guard.ordered()
    try:
        slot.attach(guard.root_fd, [slots.GuardMount(m.rel, m.kind, m.fd, m.is_dir) for m in mounts])
    except OSError as exc:
        raise IsolationUnavailable(f"cannot mount the workspace's protections ({guard.root}): {exc}",
                                   data={"reason": "workspace_mounts"}) from None
    return [[f"{WORKSPACE}/{m.rel}", "ro" if m.kind in (FREEZE, DENY) else "rw"] for m in mounts]


def attach_user(config: ProcessSandboxConfig, slot: slots.Slot, workspace: Path) -> dict[str, Any]:
    """Attach ``workspace`` to an unbound worker's slot for its tenant (host side of a claim).

    Protected and denied entries are found and held like at spawn (:class:`TreeGuard`, by
    descriptor, never following a symlink), passwd and group name the tenant's uid, and the
    finished tree appears at ``/workspace`` at once. Returns what the worker's ``bind`` needs
    (uid, gid, the mounts it must find) and the report's filesystem entries; raises, leaving
    the slot for :meth:`slots.Slot.release`, on any failure.
    """
    ident = sandbox_identity(config, tenants.tenant_key(config, workspace))
    if ident is None:
        raise IsolationUnavailable("an unbound strict worker can only be claimed on a root host")
    root = str(workspace.resolve())
    if host_sockets_checked_at_launch(config):  # what the launch checks for a bound workspace
        from sandbox_core.isolation import sockets

        sockets.refuse_exposed([(root, WORKSPACE)], sockets.Identity(ident[0], frozenset({ident[1]})))
    guard = TreeGuard(root)
    try:
        protected = _protect(guard, config.strict.protected_paths)
        denied: list[str] = []
        missing: list[str] = []
        for path in config.strict.deny_paths:
            dest = os.path.normpath(path)
            if _under(dest, WORKSPACE) and dest != WORKSPACE:
                found = guard.deny(os.path.relpath(dest, WORKSPACE))
                (missing if found is None else denied).append(dest)
        passwd, group = _passwd(ident, config.strict.sandbox_user)
        slot.write_identity(passwd, group)
        expect = _build_workspace(slot, guard)
    finally:
        guard.close()
    return {
        "uid": ident[0], "gid": ident[1], "workspace": WORKSPACE, "expect_mounts": expect,
        "identity": _identity_layer(config, ident),
        "filesystem": {"protected": protected, "denied": denied, "deny_missing": missing},
    }  # fmt: skip


def can_attach(config: ProcessSandboxConfig) -> str | None:
    """Why this configuration's strict workers cannot be pre-warmed unbound (None: they can).

    Everything the attach cannot express falls back to spawning a worker per user: a disk
    quota (checked per workspace at launch), deny paths on the generated passwd/group.
    """
    reason = slots.unavailable()
    if reason is not None:
        return reason
    if quota.configured(config):
        return "limits.workspace_mb is set (the quota is checked per workspace at launch)"
    if any(os.path.normpath(p) in ("/etc/passwd", "/etc/group") for p in config.strict.deny_paths):
        return "strict.deny_paths names /etc/passwd or /etc/group, which are rewritten at claim"
    return None
