"""Isolation layers a worker applies to itself, and the report of what is in force.

Runs inside the worker during ``initialize``, before any request is served. The report
is built from what the process observes about itself (``/proc/self/status``, its open
descriptors, its rlimits), not from what was asked for, so the host sees the truth.
A layer that was asked for but cannot be applied raises IsolationUnavailable: the
worker fails its handshake and never serves a request (fail closed).
"""

from __future__ import annotations

import os
import resource

from sandbox_core.errors import IsolationUnavailable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing or pathlib at boot
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from sandbox_core.inside import landlock

RLIMITS: dict[str, int] = {
    "as": resource.RLIMIT_AS,
    "cpu": resource.RLIMIT_CPU,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "fsize": resource.RLIMIT_FSIZE,
    "core": resource.RLIMIT_CORE,
}


def apply(plan: dict[str, Any]) -> dict[str, Any]:
    """Apply the plan's in-process layers (in a safe order) and return the report."""
    from sandbox_core.inside import identity

    layers: dict[str, Any] = {"profile": plan.get("profile", "process")}
    switch = plan.get("switch_user")
    if isinstance(switch, dict):
        identity.switch_user(int(switch["uid"]), int(switch["gid"]))
    elif plan.get("await_user"):
        identity.await_user()
    _apply_rlimits(plan.get("rlimits") or {})
    os.umask(int(plan.get("umask", 0o077)))
    check_mounts(plan.get("expect_mounts") or [])
    if not plan.get("await_user"):
        make_home(plan.get("home"))
    identity.become_subreaper()
    if plan.get("no_new_privs"):
        identity.set_no_new_privs()
    layers.update(observe())
    layers["env_allowlist"] = bool(plan.get("env_allowlist", True))
    layers["new_session"] = os.getsid(0) == os.getpid() or plan.get("profile") == "strict"
    for name, value in (plan.get("host_layers") or {}).items():
        layers[name] = value
    return layers


def become_user(plan: dict[str, Any], params: dict[str, Any], report: dict[str, Any]) -> None:
    """An unbound worker's claim: check the attached mounts, switch to the user's uid for good,
    make HOME; updates ``report`` with what the process now observes (fails closed)."""
    from sandbox_core.inside import identity

    uid, gid, expect = params.get("uid"), params.get("gid"), params.get("expect_mounts")
    if not isinstance(uid, int) or not isinstance(gid, int) or isinstance(uid, bool) or isinstance(gid, bool):
        raise IsolationUnavailable("bind of an unbound worker needs int uid and gid")
    if uid == 0 or gid == 0:
        raise IsolationUnavailable("an unbound worker never becomes root")
    check_mounts(expect if isinstance(expect, list) else [])
    identity.become_user(uid, gid)
    make_home(plan.get("home"))
    report.update(observe())


def after_bind(plan: dict[str, Any], workspace: str | Path, report: dict[str, Any]) -> None:
    """Layers that need the workspace (landlock rules); updates ``report`` in place.

    An unbound worker's rules that do not name the workspace were added while it waited
    (:func:`prepare_landlock`): only the workspace's is added here, then the ruleset is in force.
    """
    global _prepared
    landlock_rules = plan.get("landlock")
    if isinstance(landlock_rules, dict):
        from sandbox_core.inside import landlock

        prepared, _prepared = _prepared, None
        if prepared is not None:
            prepared.allow_write([str(workspace)])
            abi = prepared.restrict_self()
        else:
            abi = landlock.restrict(
                read_only=[str(p) for p in landlock_rules.get("read_only", [])],
                read_write=[str(workspace), *(str(p) for p in landlock_rules.get("read_write", []))],
            )
        if abi == 0 and landlock_rules.get("required"):
            raise IsolationUnavailable("landlock was required but the kernel does not support it")
        report["landlock"] = {"abi": abi} if abi else False


_prepared: landlock.Ruleset | None = None
"""The unbound worker's ruleset, built while it waits for its claim (see :func:`after_bind`)."""


def prepare_landlock(plan: dict[str, Any]) -> None:
    """Build the landlock rules of an unbound worker that do not name its workspace (every
    one but the workspace's: system trees, ``/tmp``, ``/dev``, ``/home``), off the claim's path.

    Only our own code runs until the claim, and the ruleset's descriptor is close-on-exec
    and closed when it is put in force; a worker never claimed drops it when it exits.
    """
    global _prepared
    landlock_rules = plan.get("landlock")
    if not isinstance(landlock_rules, dict) or _prepared is not None:
        return
    from sandbox_core.inside import landlock

    _prepared = landlock.Ruleset.build(
        read_only=[str(p) for p in landlock_rules.get("read_only", [])],
        read_write=[str(p) for p in landlock_rules.get("read_write", [])],
    )


def check_mounts(expected: list[list[str]], mountinfo: str | None = None) -> None:
    """Fail closed unless each ``[path, "ro"|"rw"]`` is a mount point here, with that access.

    The host made these mounts to hold protected and denied entries in place; one that is
    missing or landed elsewhere (a path swapped while the sandbox was built) is caught here,
    before anything untrusted runs.
    """
    if not expected:
        return
    if mountinfo is None:
        with open("/proc/self/mountinfo") as fh:
            mountinfo = fh.read()
    access: dict[str, str] = {}
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 5:
            access[_unescape(fields[4])] = "ro" if "ro" in fields[5].split(",") else "rw"
    for path, mode in expected:
        if access.get(path) != mode:
            got = access.get(path, "not a mount point")
            raise IsolationUnavailable(f"{path} should be a {mode} mount point but is {got}")


def _unescape(field: str) -> str:
    r"""A mountinfo path: the kernel writes space, tab, newline and backslash as ``\ooo``."""
    if "\\" not in field:  # nearly every mount point: no per-character walk (it ran at every claim)
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def make_home(home: object) -> None:
    """Create the sandbox user's ``HOME`` (0700, after the uid switch so that it owns it)."""
    if isinstance(home, str):
        try:
            os.makedirs(home, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise IsolationUnavailable(f"cannot create HOME {home}: {exc}") from None
        os.environ["HOME"] = home


def _apply_rlimits(limits: dict[str, Any]) -> None:
    for name, value in limits.items():
        if name not in RLIMITS:
            raise IsolationUnavailable(f"unknown rlimit {name!r}")
        soft, hard = (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
        try:
            resource.setrlimit(RLIMITS[name], (soft, hard))
        except (ValueError, OSError) as exc:
            raise IsolationUnavailable(f"cannot set rlimit {name}={value}: {exc}") from None


def _status() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                out[key] = value.strip()
    except OSError:
        pass
    return out


def open_fds() -> list[int]:
    """The descriptors this process has open (Linux: /proc/self/fd)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return []
    fds = sorted(int(n) for n in names if n.isdigit())
    return [fd for fd in fds if _is_open(fd)]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def observe() -> dict[str, Any]:
    """Facts about this process that tell which layers are in force."""
    status = _status()
    limits = {}
    for name, res in RLIMITS.items():
        soft, _hard = resource.getrlimit(res)
        limits[name] = None if soft == resource.RLIM_INFINITY else soft
    cap_eff = status.get("CapEff")
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "rlimits": limits,
        "umask": f"{_current_umask():03o}",
        "no_new_privs": status.get("NoNewPrivs") == "1",
        "seccomp": status.get("Seccomp") == "2",
        "capabilities_zero": cap_eff is not None and int(cap_eff, 16) == 0,
        "open_fds": len(open_fds()),
    }


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
