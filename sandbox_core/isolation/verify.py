"""Host-side verification of a started worker: every promised layer, checked from /proc, fail closed.

The worker reports what it observes about itself, but a report is not a check: a launcher that
silently drops a layer (a bwrap stand-in without ``--seccomp`` or ``--unshare-net``, a plan
without the uid switch) yields a worker that truthfully reports a weaker sandbox, and nothing
compared it with what was asked for. So after the handshake, and before the worker is bound or
serves a request, the host reads the worker process's kernel state itself (:mod:`procfs`) and
compares it with what must hold; any mismatch kills the worker and fails its start with
IsolationUnavailable naming the layer and what was seen.

What must hold (:class:`Expected`) is the configured profile's promise (:data:`PROMISES`,
derived from the config alone, so a launcher cannot lower it) joined with whatever the launch
plan asks for on top. Which observation proves which layer is the declared table
:data:`CHECKS`. Landlock leaves no trace in /proc: it is checked against the worker's report
of the ruleset it installed, when the worker is bound (the rules need the workspace), and
recorded apart from the layers the host read itself.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from sandbox_core.config import EnvPolicy, ProcessSandboxConfig, parse_uid_range
from sandbox_core.errors import IsolationUnavailable
from sandbox_core.isolation import procfs
from sandbox_core.isolation.spec import rlimit_plan
from sandbox_core.isolation.strict import identity_mode, shared_identity
from sandbox_core.kernel import landlock_abi

Stage = Literal["start", "bind"]
LAUNCHER_VARIABLES = frozenset({"PWD"})
"""Variables a launcher itself adds to the allowlisted environment (bwrap exports PWD after
``--chdir``); a path, never a secret."""
STRICT_NAMESPACES = frozenset({"mnt", "pid", "net", "ipc", "uts"})
"""Namespaces every strict worker has; ``user`` too when the host is not root."""
PLAN_NAMESPACES = {"mount": "mnt"}
"""The plan's names for namespace kinds where they differ from /proc/PID/ns."""
RLIMIT_ROWS = {
    "as": "Max address space",
    "cpu": "Max cpu time",
    "nofile": "Max open files",
    "nproc": "Max processes",
    "fsize": "Max file size",
    "core": "Max core file size",
}
"""The plan's rlimit names → their rows in /proc/PID/limits."""
CAPABILITY_SETS = ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb")


@dataclass(frozen=True)
class Expected:
    """What must hold in a started worker (a layer that is off is not checked)."""

    seccomp: bool = False
    no_new_privs: bool = False
    no_capabilities: bool = False
    identity: tuple[int, int] | None = None
    """(uid, gid) the worker must run as, with no supplementary groups."""
    tenant_range: tuple[int, int] | None = None
    """Per-user uids: the worker's identity must be a uid (and gid) in this range."""
    namespaces: frozenset[str] = frozenset()
    rlimits: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    """(soft, hard) by the plan's rlimit name."""
    umask: int | None = None
    new_session: bool = False
    environment: EnvPolicy | None = None
    """The allowlist the worker's starting environment must keep to (names only)."""
    cgroups: Mapping[str, str] = field(default_factory=dict)
    """cgroup controller (v1) or ``unified`` (v2) → path below its hierarchy that the worker must be in."""
    cgroups_required: bool = False
    """``strict.cgroups``: the worker must be in cgroups of its own (a plan without any is refused)."""
    landlock: bool = False
    unbound: bool = False
    """A pre-warmed worker before its claim: uid 0 holding only CAP_SETUID/CAP_SETGID (checked
    instead of the identity and the empty capability sets, which are checked at claim)."""

    def join(self, other: Expected) -> Expected:
        """Both sets of demands; where both name a value (uid, a limit), this one's wins."""
        return Expected(
            seccomp=self.seccomp or other.seccomp,
            no_new_privs=self.no_new_privs or other.no_new_privs,
            no_capabilities=self.no_capabilities or other.no_capabilities,
            identity=self.identity or other.identity,
            tenant_range=self.tenant_range or other.tenant_range,
            namespaces=self.namespaces | other.namespaces,
            rlimits={**other.rlimits, **self.rlimits},
            umask=self.umask if self.umask is not None else other.umask,
            new_session=self.new_session or other.new_session,
            environment=self.environment or other.environment,
            cgroups={**other.cgroups, **self.cgroups},
            cgroups_required=self.cgroups_required or other.cgroups_required,
            landlock=self.landlock or other.landlock,
            unbound=self.unbound and other.unbound,
        )


# ---------------------------------------------------------------- what each profile promises


def _process_promise(config: ProcessSandboxConfig) -> Expected:
    """The ``process`` profile: allowlisted environment, rlimits, umask 077, a new session."""
    limits = {name: _pair(value) for name, value in rlimit_plan(config.limits).items()}
    return Expected(rlimits=limits, umask=0o077, new_session=True, environment=config.env)


def _strict_promise(config: ProcessSandboxConfig) -> Expected:
    """The ``strict`` profile: the process promise plus the sandbox's layers.

    RLIMIT_NPROC is left to the plan: where cgroups are writable the per-worker pids cgroup
    replaces it (and then the plan's cgroup paths are checked instead).
    """
    base = _process_promise(config)
    mode = identity_mode(config)
    identity = shared_identity(config) if mode == "shared" else None
    tenant_range = parse_uid_range(config.strict.uid_range) if mode == "per-user" else None
    namespaces = STRICT_NAMESPACES | ({"user"} if mode == "user-namespace" else set())
    rlimits = {k: v for k, v in base.rlimits.items() if not (k == "nproc" and config.strict.cgroups)}
    return Expected(
        seccomp=config.strict.seccomp,
        no_new_privs=True,
        no_capabilities=True,
        identity=identity,
        tenant_range=tenant_range,
        cgroups_required=config.strict.cgroups,
        namespaces=frozenset(namespaces),
        rlimits=rlimits,
        umask=base.umask,
        new_session=True,
        environment=base.environment,
        landlock=config.strict.landlock and landlock_abi() > 0,
    )


PROMISES: dict[str, Callable[[ProcessSandboxConfig], Expected]] = {
    "process": _process_promise,
    "strict": _strict_promise,
}
"""The configured profile → what every worker of it must show, whatever its launcher planned."""


def _from_plan(plan: Mapping[str, Any]) -> Expected:
    """What a launch plan asks for on top of its profile's promise."""
    layers = plan.get("host_layers") or {}
    switch = plan.get("switch_user")
    identity = (int(switch["uid"]), int(switch["gid"])) if isinstance(switch, dict) else None
    kinds = {PLAN_NAMESPACES.get(str(n), str(n)) for n in layers.get("namespaces") or ()}
    host = _host_namespaces()
    namespaces = frozenset(k for k in kinds if k != "cgroup" or host.get("cgroup") is not None)  # bwrap: -try
    detail = layers.get("limits_detail") or {}
    cgroups = dict(detail.get("cgroups") or {}) if detail.get("mode") in ("cgroup-v1", "cgroup-v2") else {}
    landlock = plan.get("landlock")
    return Expected(
        seccomp=bool(layers.get("seccomp_filter")),
        no_new_privs=bool(plan.get("no_new_privs")),
        no_capabilities=identity is not None or plan.get("profile") == "strict",
        identity=identity,
        namespaces=namespaces,
        rlimits={str(k): _pair(v) for k, v in (plan.get("rlimits") or {}).items()},
        umask=int(plan["umask"]) if "umask" in plan else None,
        cgroups={str(c): _in_hierarchy(str(p)) for c, p in cgroups.items()},
        landlock=isinstance(landlock, dict) and bool(landlock.get("required")),
    )


def expectations(config: ProcessSandboxConfig, plan: Mapping[str, Any]) -> Expected:
    """The profile's promise joined with the plan's demands (the promise wins on values)."""
    return PROMISES[config.profile](config).join(_from_plan(plan))


def _in_hierarchy(path: str) -> str:
    """``memory/a/b`` (relative to the cgroup mount) as /proc/PID/cgroup shows it: ``/a/b``."""
    return "/" + path.partition("/")[2]


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


@functools.cache
def _host_namespaces() -> dict[str, int | None]:
    """The host's namespace ids (the process's own: they do not change while it runs)."""
    return procfs.host_namespaces()


# ---------------------------------------------------------------- what the host reads


@dataclass(frozen=True)
class Facts:
    """Everything the checks look at: the worker's /proc, the host's own ids, the worker's report."""

    worker: procfs.Snapshot | None
    host_namespaces: Mapping[str, int | None]
    host_session: int
    report: Mapping[str, Any]


@dataclass(frozen=True)
class Check:
    """One row of the table: a layer, what proves it, and when the plan asks for it."""

    layer: str
    reads: str
    """What the host reads..."""
    wants: str
    """...and what it must show (both for readers of the table and for the error's data)."""
    asked: Callable[[Expected], bool]
    holds: Callable[[Facts, Expected], str | None]
    """None when the observation matches, else what was seen."""
    stage: Stage = "start"
    by_host: bool = True
    """False where the host can only compare the worker's report (landlock)."""


def _status(facts: Facts, key: str) -> str:
    assert facts.worker is not None
    return facts.worker.status.get(key, "")


def _seccomp(facts: Facts, _: Expected) -> str | None:
    mode = _status(facts, "Seccomp")
    return None if mode == "2" else f"the worker runs with Seccomp {mode or '(none)'}, the plan asked for a filter"


def _no_new_privs(facts: Facts, _: Expected) -> str | None:
    flag = _status(facts, "NoNewPrivs")
    return None if flag == "1" else f"the worker runs with NoNewPrivs {flag or '(none)'}, the plan asked for 1"


def _capabilities(facts: Facts, _: Expected) -> str | None:
    held = {key: _status(facts, key) for key in CAPABILITY_SETS}
    bad = {key: value for key, value in held.items() if not _is_zero_hex(value)}
    if not bad:
        return None
    return "the worker holds " + ", ".join(f"{k} {v or '(none)'}" for k, v in bad.items()) + ", the plan asked for none"


def _is_zero_hex(value: str) -> bool:
    try:
        return int(value, 16) == 0
    except ValueError:
        return False


def _identity(facts: Facts, want: Expected) -> str | None:
    uids, gids = _status(facts, "Uid").split(), _status(facts, "Gid").split()
    groups = _status(facts, "Groups").split()
    shown = f"uid {' '.join(uids) or '?'} gid {' '.join(gids) or '?'} groups [{' '.join(groups)}]"
    if want.identity is None:
        assert want.tenant_range is not None
        lo, hi = want.tenant_range
        return (f"the worker runs as {shown} (real, effective, saved, fs), the plan asked for no uid switch; "
                f"strict.uid_range promises a per-user uid in {lo}-{hi}")
    uid, gid = want.identity
    if want.tenant_range is not None and not (
        want.tenant_range[0] <= uid <= want.tenant_range[1] and want.tenant_range[0] <= gid <= want.tenant_range[1]
    ):
        lo, hi = want.tenant_range
        return f"the plan asked for uid {uid} gid {gid}, outside strict.uid_range {lo}-{hi}"
    if uids == [str(uid)] * 4 and gids == [str(gid)] * 4 and not groups:
        return None
    return f"the worker runs as {shown} (real, effective, saved, fs), the plan asked for uid {uid} gid {gid}, no groups"


def _namespace(kind: str) -> Callable[[Facts, Expected], str | None]:
    def holds(facts: Facts, _: Expected) -> str | None:
        assert facts.worker is not None
        mine, host = facts.worker.namespaces.get(kind), facts.host_namespaces.get(kind)
        if mine is None or host is None:
            return f"cannot compare: /proc/PID/ns/{kind} is unreadable ({'worker' if mine is None else 'host'})"
        if mine == host:
            return f"the worker shares the host's {kind} namespace ({kind}:[{mine}]), the plan asked for its own"
        return None

    return holds


def _asks_namespace(kind: str) -> Callable[[Expected], bool]:
    return lambda e: kind in e.namespaces


def _rlimits(facts: Facts, want: Expected) -> str | None:
    assert facts.worker is not None
    wrong: list[str] = []
    for name, (soft, hard) in sorted(want.rlimits.items()):
        seen = facts.worker.limits.get(RLIMIT_ROWS.get(name, ""))
        if seen is None:
            wrong.append(f"{name} unreadable")
        elif seen != (soft, hard):
            wrong.append(f"{name} {_limit(seen[0])}/{_limit(seen[1])} (plan {soft}/{hard})")
        # a limit the worker could not raise back is the same as the plan's: equality is required
    return None if not wrong else "the worker's limits are " + ", ".join(wrong)


def _limit(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


def _umask(facts: Facts, want: Expected) -> str | None:
    seen = _status(facts, "Umask")
    try:
        if want.umask is not None and int(seen, 8) == want.umask:
            return None
    except ValueError:
        pass
    return f"the worker's umask is {seen or '(none)'}, the plan asked for {want.umask:04o}"


def _session(facts: Facts, _: Expected) -> str | None:
    assert facts.worker is not None
    sid, tty = int(facts.worker.stat[3]), int(facts.worker.stat[4])
    if sid != facts.host_session and tty == 0:
        return None
    return (
        f"the worker is in session {sid} with terminal {tty} (host session {facts.host_session}), "
        "the plan asked for a new session without a terminal"
    )


def _environment(facts: Facts, want: Expected) -> str | None:
    assert facts.worker is not None and want.environment is not None
    names = facts.worker.environ_names
    if names is None:
        return "cannot read the worker's environment"
    extra = sorted(n for n in names if not _allowed(n, want.environment))
    return None if not extra else f"the worker started with {', '.join(extra)} beyond the allowlist"


def _allowed(name: str, policy: EnvPolicy) -> bool:
    if name in policy.fixed or name in ("HOME", "PATH") or name in LAUNCHER_VARIABLES:
        return True
    return any(name == a or (a.endswith("*") and name.startswith(a[:-1])) for a in policy.allow)


def _cgroups(facts: Facts, want: Expected) -> str | None:
    assert facts.worker is not None
    if not want.cgroups:
        return "the plan puts the worker in no cgroups of its own; strict.cgroups requires them"
    wrong = [
        f"{controller} {facts.worker.cgroups.get(controller, '(none)')} (plan {path})"
        for controller, path in sorted(want.cgroups.items())
        if facts.worker.cgroups.get(controller) != path
    ]
    return None if not wrong else "the worker is in " + ", ".join(wrong)


UNBOUND_CAPS = (1 << 6) | (1 << 7)
"""CAP_SETGID | CAP_SETUID: all an unbound worker may hold, and only until its claim."""


def _unbound(facts: Facts, _: Expected) -> str | None:
    held = {key: _status(facts, key) for key in CAPABILITY_SETS}
    allowed = {"CapEff": UNBOUND_CAPS, "CapPrm": UNBOUND_CAPS}
    bad = {}
    for key, value in held.items():
        try:
            extra = int(value, 16) & ~allowed.get(key, 0)
        except ValueError:
            extra = -1
        if extra:
            bad[key] = value or "(none)"
    uids, gids = _status(facts, "Uid").split(), _status(facts, "Gid").split()
    if bad or uids != ["0"] * 4 or gids != ["0"] * 4 or _status(facts, "Groups").split():
        shown = ", ".join(f"{k} {v}" for k, v in bad.items()) or "no extra capability"
        return (f"the unbound worker holds {shown} as uid {' '.join(uids)} gid {' '.join(gids)}; "
                "it may hold only CAP_SETUID/CAP_SETGID, as uid 0, no groups, until its claim")
    return None


def _landlock(facts: Facts, _: Expected) -> str | None:
    seen = facts.report.get("landlock")
    abi = seen.get("abi") if isinstance(seen, dict) else None
    if isinstance(abi, int) and not isinstance(abi, bool) and abi >= 1:
        return None
    return f"the worker reports landlock {seen!r}, the plan requires a ruleset"


CHECKS: tuple[Check, ...] = (
    Check("seccomp", "/proc/PID/status Seccomp", "2 (a filter)", lambda e: e.seccomp, _seccomp),
    Check("no_new_privs", "/proc/PID/status NoNewPrivs", "1", lambda e: e.no_new_privs, _no_new_privs),
    Check("capabilities", "/proc/PID/status " + " ".join(CAPABILITY_SETS), "all 0",
          lambda e: e.no_capabilities, _capabilities),
    Check("identity", "/proc/PID/status Uid Gid Groups", "the sandbox uid/gid ×4, no groups",
          lambda e: e.identity is not None or e.tenant_range is not None, _identity),
    *(
        Check(f"namespace {kind}", f"/proc/PID/ns/{kind} inode", "differs from the host's",
              _asks_namespace(kind), _namespace(kind))
        for kind in procfs.NAMESPACES
    ),
    Check("rlimits", "/proc/PID/limits", "soft/hard as planned", lambda e: bool(e.rlimits), _rlimits),
    Check("umask", "/proc/PID/status Umask", "as planned (0077)", lambda e: e.umask is not None, _umask),
    Check("session", "/proc/PID/stat session, tty_nr", "not the host's session, no terminal",
          lambda e: e.new_session, _session),
    Check("environment", "/proc/PID/environ (names only)", "only allowlisted names",
          lambda e: e.environment is not None, _environment),
    Check("cgroups", "/proc/PID/cgroup", "the planned memory, pids (and cpu) cgroups",
          lambda e: bool(e.cgroups) or e.cgroups_required, _cgroups),
    Check("unbound", "/proc/PID/status Cap* Uid Gid Groups", "uid 0, at most CAP_SETUID/CAP_SETGID, no bounding set",
          lambda e: e.unbound, _unbound),
    Check("landlock", "the worker's report (Landlock has no /proc view)", "a ruleset (ABI >= 1)",
          lambda e: e.landlock, _landlock, stage="bind", by_host=False),
)  # fmt: skip
"""The policy: layer → what the host reads → what must hold, and when the check runs."""


# ---------------------------------------------------------------- running the table


@dataclass(frozen=True)
class Prepared:
    """The expectations of a claim as ``uid``/``gid``, worked out ahead (:func:`claim_expectations`)."""

    uid: int
    gid: int
    expected: Expected


@dataclass
class Verified:
    """The outcome of the checks so far, for the worker's report."""

    expected: Expected
    worker_pid: int | None = None
    """The worker's host pid, as located at start."""
    process: procfs.WorkerProcess | None = None
    """An unbound worker's process, kept pinned from its start for the re-check at claim
    (:func:`claimed`); closed by whoever holds the worker (:meth:`release`)."""
    by_host: list[str] = field(default_factory=list)
    from_report: list[str] = field(default_factory=list)

    def release(self) -> None:
        """Close the pinned process, if any (idempotent)."""
        if self.process is not None:
            self.process.close()
            self.process = None


def run_checks(stage: Stage, expected: Expected, facts: Facts, verified: Verified) -> None:
    """Run the table's checks of ``stage`` that ``expected`` asks for; raise naming every mismatch."""
    failed: dict[str, str] = {}
    wanted: dict[str, str] = {}
    for check in CHECKS:
        if check.stage != stage or not check.asked(expected):
            continue
        seen = check.holds(facts, expected)
        if seen is not None:
            failed[check.layer] = seen
            wanted[check.layer] = f"{check.reads}: {check.wants}"
        elif check.by_host:
            verified.by_host.append(check.layer)
        else:
            verified.from_report.append(check.layer)
    if failed:
        detail = "; ".join(f"{layer}: {seen}" for layer, seen in failed.items())
        pid = facts.worker.pid if facts.worker is not None else verified.worker_pid
        raise IsolationUnavailable(
            f"the host's check of the worker failed, so it was killed: {detail}",
            data={"failed_layers": failed, "expected": wanted, "worker_pid": pid},
        )


def started(config: ProcessSandboxConfig, plan: Mapping[str, Any], spawned: int, pid_inside: object,
            report: Mapping[str, Any], *, unbound: bool = False) -> Verified:  # fmt: skip
    """Verify a worker after its handshake; on any mismatch kill it and raise IsolationUnavailable.

    ``spawned`` is the pid the host spawned, ``pid_inside`` the pid the handshake gave.
    ``unbound`` (decided by the host: the worker was launched without a user) checks a
    pre-warmed strict worker: everything but the identity and the capabilities, which must
    instead be uid 0 with at most CAP_SETUID/CAP_SETGID; :func:`claimed` checks the rest.
    """
    try:
        expected = expectations(config, plan)
    except (KeyError, TypeError, ValueError) as exc:
        raise IsolationUnavailable(f"the launch plan cannot be verified ({type(exc).__name__}: {exc})") from None
    if unbound:
        expected = dataclasses.replace(expected, identity=None, tenant_range=None, no_capabilities=False,
                                       unbound=True)
    if not isinstance(pid_inside, int) or isinstance(pid_inside, bool):
        raise IsolationUnavailable(f"the worker's handshake gave no pid to verify ({pid_inside!r:.40})")
    verified = Verified(expected)
    proc = procfs.locate(spawned, pid_inside)
    try:
        verified.worker_pid = proc.pid
        _check(proc, expected, report, verified)
    except BaseException:
        proc.close()
        raise
    if unbound:
        verified.process = proc  # pinned: the claim re-reads this very process, no second search
    else:
        proc.close()
    return verified


def _check(proc: procfs.WorkerProcess, expected: Expected, report: Mapping[str, Any], verified: Verified) -> None:
    """Run the start checks on ``proc``; kill it on any mismatch."""
    try:
        facts = Facts(proc.snapshot(), _host_namespaces(), os.getsid(0), report)
        run_checks("start", expected, facts, verified)
    except BaseException:
        proc.kill()
        raise


def claim_expectations(config: ProcessSandboxConfig, plan: Mapping[str, Any], uid: int, gid: int) -> Prepared:
    """What a worker claimed as ``uid``/``gid`` must show (for :func:`claimed`); worked out
    before the claim where the uid is known then (a staged spare's), off the request path."""
    return Prepared(uid, gid, expectations(config, {**plan, "switch_user": {"uid": uid, "gid": gid}}))


def claimed(config: ProcessSandboxConfig, plan: Mapping[str, Any], at_start: Verified,
            report: Mapping[str, Any], uid: int, gid: int, prepared: Prepared | None = None) -> Verified:  # fmt: skip
    """Verify a claimed worker after its ``bind``, before its first request: every layer of
    :func:`started` again, now with the user's ``uid``/``gid`` and no capabilities at all.

    ``prepared`` (from :func:`claim_expectations`) is used when it is for this ``uid`` and
    ``gid``; otherwise the expectations are worked out here. Reads the process pinned at start
    (``at_start.process``: its /proc directory and pidfd, so a process that exited, or a reused
    pid, fails the reads) and closes it: a few small /proc reads, done on the caller's thread.
    """
    proc = at_start.process
    if proc is None:
        raise IsolationUnavailable("the claimed worker's process was not kept from its start; not verifying it")
    at_start.process = None
    try:
        if prepared is None or (prepared.uid, prepared.gid) != (uid, gid):
            prepared = claim_expectations(config, plan, uid, gid)
        expected = prepared.expected
        verified = Verified(expected, worker_pid=proc.pid)
        _check(proc, expected, report, verified)
    except (KeyError, TypeError, ValueError) as exc:
        raise IsolationUnavailable(f"the launch plan cannot be verified ({type(exc).__name__}: {exc})") from None
    finally:
        proc.close()
    return verified


def bound(verified: Verified, reply: Mapping[str, Any]) -> None:
    """Verify the layers that come with binding (landlock) against the ``bind`` answer."""
    run_checks("bind", verified.expected, Facts(None, {}, 0, reply), verified)
