"""Judge the probes' observations: one verdict per check, from evidence only."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox_core.audit import tenancy
from sandbox_core.audit.plant import CANARY_VAR, SANDBOX_SET_VARS, Plants
from sandbox_core.audit.report import CHECK_NAMES, CHECKS, Check
from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.isolation.spec import PACKAGE_ROOT
from sandbox_core.shared import (
    EGRESS_PROXY_PORT,
    LIMIT_PROBES,
    MODEL_ENDPOINT_HOST,
    MODEL_ENDPOINT_PORT,
    MODEL_ENDPOINT_URL,
    PLACEHOLDER_API_KEY,
    sha256_hex,
)

_EXPECTATION = dict(CHECKS)
ENDPOINT_VARS = {"ANTHROPIC_BASE_URL": MODEL_ENDPOINT_URL, "ANTHROPIC_API_KEY": PLACEHOLDER_API_KEY}
"""What the worker sets for its model endpoint: accepted outside the allowlist with exactly these values."""
_MAX_LOOP_LAG = 0.5
MAX_SPAWN = 2.0
_MEMORY_SLACK_MB = 64


class _Missing(Exception):
    """A probe result needed by a check is missing or failed."""


@dataclass
class Evidence:
    config: ProcessSandboxConfig
    plants: Plants
    results: dict[str, Any]
    errors: dict[str, str]
    limits: dict[str, Any]
    monitor: dict[str, Any]
    host_ns: dict[str, str | None]
    sent_back: str
    tenancy: dict[str, Any] = field(default_factory=dict)
    """What the host read of the worker's uid, cgroups and disk quota (:mod:`sandbox_core.audit.tenancy`)."""

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


def judge(ctx: Evidence, name: str) -> Check:
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


def _inside_env(ctx: Evidence) -> dict[str, set[str]]:
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


def _env_allowlist(ctx: Evidence) -> Verdict:
    inside = _inside_env(ctx)
    host = ctx.plants.host_env
    unexpected, own = [], []
    for name, digests in sorted(inside.items()):
        if _allowlisted(ctx.config, name):
            continue
        if name in ENDPOINT_VARS and digests <= {sha256_hex(ENDPOINT_VARS[name])}:
            own.append(name)
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


def _env_canary(ctx: Evidence) -> Verdict:
    worker, command = ctx.get("worker_env"), ctx.get("command")
    found = sorted({*worker.get("canaries", []), *command.get("canaries", [])})
    inside = _inside_env(ctx)
    details = {"canaries_found": found, "canary_var_inside": CANARY_VAR in inside}
    if found or CANARY_VAR in inside:
        return False, f"canary reached the sandbox ({', '.join(found) or CANARY_VAR})", details
    return True, f"{CANARY_VAR} withheld; no canary in worker or command environment", details


def classify_variables(ctx: Evidence) -> tuple[list[str], list[str], list[str], list[str]]:
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


def _pid1_environ(ctx: Evidence) -> Verdict:
    pid1 = ctx.get("proc_scan")["pid1_environ"]
    if not pid1.get("readable"):
        return True, f"unreadable ({pid1.get('errno')})", pid1
    if pid1.get("canaries"):
        return False, f"canary in /proc/1/environ: {', '.join(pid1['canaries'])}", pid1
    return True, f"readable ({pid1.get('bytes')} bytes), no canary", pid1


def _proc_files(kind: str) -> Callable[[Evidence], Verdict]:
    def check(ctx: Evidence) -> Verdict:
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


def _proc_pids(ctx: Evidence) -> Verdict:
    scan = ctx.get("proc_scan")
    same_ns = scan.get("pid_ns") is not None and scan.get("pid_ns") == ctx.host_ns.get("pid")
    details = {k: scan.get(k) for k in ("visible", "foreign", "foreign_sample", "ancestors", "pid_ns")}
    details["host_pid_ns"] = ctx.host_ns.get("pid")
    ns = "host pid namespace" if same_ns else "own pid namespace"
    if scan["foreign"] or same_ns:
        return False, f"{scan['visible']} pids visible, {scan['foreign']} not the sandbox's; {ns}", details
    return True, f"{scan['visible']} pids visible, all the sandbox's; {ns}", details


def _fds_command(ctx: Evidence) -> Verdict:
    fds: dict[str, str] = ctx.get("command")["fds"]
    extra = {fd: target for fd, target in fds.items() if fd not in ("0", "1", "2")}
    if extra:
        listed = ", ".join(f"{fd} → {target}" for fd, target in sorted(extra.items(), key=lambda x: int(x[0])))
        return False, f"inherited beyond stdio: {listed}", {"fds": fds}
    return True, f"only {', '.join(sorted(fds, key=int))}", {"fds": fds}


def _fds_worker(ctx: Evidence) -> Verdict:
    fds: list[dict[str, Any]] = ctx.get("worker_fds")["fds"]
    # control in and out, output and input pipes; the model endpoint's loopback listener (strict);
    # the proxy's listening socket (strict) and the egress socketpair when the policy allows network
    budget = {"pipe": 4, "eventpoll": 1, "socketpair": 2, "model endpoint": 1}
    if ctx.config.profile == "strict":
        budget["proxy"] = 1
        if ctx.config.network.mode == "allowlist":
            budget["socketpair"] += 1
    counts: dict[str, int] = {}
    unexpected: list[str] = []
    for entry in fds:
        kind = str(entry.get("kind"))
        if entry["fd"] <= 2:
            if kind not in ("devnull", "pipe", "tty"):
                unexpected.append(f"{entry['fd']}: {kind} {entry.get('target', '')}".strip())
            continue
        if kind == "listener" and entry.get("local") == f"{MODEL_ENDPOINT_HOST}:{MODEL_ENDPOINT_PORT}":
            kind = "model endpoint"
        elif kind == "listener" and entry.get("local") == f"127.0.0.1:{EGRESS_PROXY_PORT}":
            kind = "proxy"
        counts[kind] = counts.get(kind, 0) + 1
        if counts[kind] > budget.get(kind, 0):
            unexpected.append(f"{entry['fd']}: {kind} {entry.get('target', entry.get('peer', ''))}".strip())
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    if unexpected:
        return False, f"unexpected: {'; '.join(unexpected)} (others: {summary})", {"fds": fds}
    return True, f"stdio + {summary} (protocol pipes, event loop, model endpoint, proxy)", {"fds": fds}


def _read_outcome(obs: dict[str, Any]) -> str:
    if obs.get("readable"):
        found = obs.get("canaries") or []
        return f"READ {obs.get('bytes')} bytes" + (f", canary {', '.join(found)}" if found else "")
    if not obs.get("visible"):
        return f"not visible ({obs.get('errno')})"
    return f"visible, unreadable ({obs.get('errno')})"


def _file_check(key: str) -> Callable[[Evidence], Verdict]:
    def check(ctx: Evidence) -> Verdict:
        obs = ctx.get("files")[key]
        return not obs.get("readable"), _read_outcome(obs), obs

    return check


def _shadow(ctx: Evidence) -> Verdict:
    attempts: list[dict[str, Any]] = ctx.get("files")["shadow"]
    observed = "; ".join(f"{Path(a['path']).name}: {_read_outcome(a)}" for a in attempts)
    return not any(a.get("readable") for a in attempts), observed, {"attempts": attempts}


def _errno_summary(attempts: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for a in attempts:
        key = str(a.get("errno") or a.get("symlink_errno") or "?")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in sorted(counts.items()))


def _write_outside(ctx: Evidence) -> Verdict:
    attempts: list[dict[str, Any]] = ctx.get("write_outside")["attempts"]
    written = [str(Path(a["path"]).parent) for a in attempts if a.get("written")]
    if written:
        return False, f"WROTE into {', '.join(written)}", {"attempts": attempts}
    return True, f"all {len(attempts)} refused ({_errno_summary(attempts)})", {"attempts": attempts}


def _symlink(ctx: Evidence) -> Verdict:
    obs = ctx.get("symlink_escape")
    bad = [f"read via {r['link']}" for r in obs["reads"] if r.get("readable")]
    bad += [f"wrote via {w['link']}" for w in obs["writes"] if w.get("written")]
    if bad:
        return False, "; ".join(bad), obs
    tried = len(obs["reads"]) + len(obs["writes"])
    return True, f"{tried} links, nothing reached ({_errno_summary(obs['reads'] + obs['writes'])})", obs


def _hardlink(ctx: Evidence) -> Verdict:
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


def _host_tcp(ctx: Evidence) -> Verdict:
    attempts: list[dict[str, Any]] = ctx.get("host_tcp")["attempts"]
    seen = ctx.plants.recorder.count("tcp")
    details = {"attempts": attempts, "listener_connections": seen}
    ok = not any(a.get("connected") for a in attempts) and seen == 0
    return ok, f"{_attempts_text(attempts)}; listener saw {seen}", details


def _host_unix(ctx: Evidence) -> Verdict:
    attempts: list[dict[str, Any]] = ctx.get("host_unix")["attempts"]
    seen = ctx.plants.recorder.count("unix")
    details = {"attempts": attempts, "listener_connections": seen, "notes": ctx.plants.notes}
    ok = not any(a.get("connected") for a in attempts) and seen == 0
    observed = f"{_attempts_text(attempts)}; listeners saw {seen}"
    check = ctx.plants.launch_check
    if check is not None:  # no Landlock ABI 9: the launcher must refuse a tree exposing a host socket
        details["launch_check"] = check
        refused = check.get("refused") and check.get("reason") == "host_socket"
        ok = ok and bool(refused)
        observed += "; a workspace holding a host socket: " + (
            "launch refused" if refused else f"LAUNCHED ({check.get('message', 'no error')})"
        )
    return ok, observed, details


def _egress_tags(ctx: Evidence) -> list[str]:
    return [str(s.get("tag")) for s in ctx.plants.recorder.seen if str(s["listener"]).startswith("egress")]


def _egress_allowed(ctx: Evidence) -> Verdict:
    obs = ctx.get("egress")["allowed"]
    tags = _egress_tags(ctx)
    ok = bool(obs.get("tunnel")) and "egress-allowed" in tags
    status = obs.get("status") or obs.get("errno")
    return ok, f"{obs.get('target')}: {status}; the listener saw {tags or 'nothing'}", obs


def _egress_refused(label: str) -> Callable[[Evidence], Verdict]:
    def evaluate(ctx: Evidence) -> Verdict:
        obs = ctx.get("egress")[label]
        tags = _egress_tags(ctx)
        status = str(obs.get("status") or obs.get("errno"))
        reached = f"egress-{label}" in tags or any(t != "egress-allowed" for t in tags)
        ok = status.startswith("HTTP/1.1 403 ") and not obs.get("tunnel") and not reached
        return ok, f"{obs.get('target')}: {status}; listener {'REACHED' if reached else 'saw nothing of it'}", obs

    return evaluate


def _egress_direct(ctx: Evidence) -> Verdict:
    obs = ctx.get("egress")["direct"]
    other = [s for s in ctx.plants.recorder.seen if str(s["listener"]).startswith("egress")
             and s.get("tag") != "egress-allowed"]  # fmt: skip
    ok = not obs.get("connected") and not other
    outcome = "CONNECTED" if obs.get("connected") else f"{obs.get('stage')}: {obs.get('errno')}"
    return ok, f"{obs.get('target')} {outcome}; untagged or other connections at the listener: {len(other)}", obs


def _route_text(route: dict[str, Any]) -> str:
    if route.get("route"):
        return f"ROUTE to {route['target']} (from {route.get('source')})"
    return f"no route to {route['target']} ({route.get('errno')})"


def _model_endpoint(ctx: Evidence) -> Verdict:
    obs = ctx.get("model_endpoint")
    if obs.get("canaries"):
        return False, f"a canary came back through the model endpoint: {', '.join(obs['canaries'])}", obs
    if not obs.get("base_url"):
        why = " (the process profile has none: a host loopback port would be open to every local user)" \
            if ctx.config.profile == "process" else ""
        return False, f"no model endpoint: ANTHROPIC_BASE_URL is not set{why}", obs
    ok = (obs.get("base_url_is_endpoint") and obs.get("key_is_placeholder") and obs.get("status") == 200
          and obs.get("reply_type") == "message")  # fmt: skip
    key = "the placeholder" if obs.get("key_is_placeholder") else "NOT the placeholder"
    answer = f"HTTP {obs.get('status')} {obs.get('reply_type')}" if obs.get("status") else obs.get("client_error")
    return bool(ok), f"{obs.get('base_url')} with {key} key: {answer}; no canary (the key) in what came back", obs


def _outbound(ctx: Evidence) -> Verdict:
    obs = ctx.get("outbound")
    same_ns = obs.get("net_ns") is not None and obs.get("net_ns") == ctx.host_ns.get("net")
    interfaces = obs.get("interfaces")
    only_lo = isinstance(interfaces, list) and set(interfaces) <= {"lo"}
    routed = any(r.get("route") for r in obs["routes"])
    ns = "host network namespace" if same_ns else "own network namespace"
    ifaces = ", ".join(interfaces) if isinstance(interfaces, list) else str(interfaces)
    routes = "; ".join(_route_text(r) for r in obs["routes"])
    observed = f"{ns}; interfaces: {ifaces or 'none'}; {routes} (looked up, nothing sent)"
    return (not routed and not same_ns and only_lo), observed, {**obs, "host_net_ns": ctx.host_ns.get("net")}


def _ptrace(ctx: Evidence) -> Verdict:
    obs = ctx.get("ptrace")["attach_child"]
    if obs.get("allowed"):
        return False, f"PTRACE_SEIZE of a child (pid {obs['pid']}) succeeded", obs
    return True, f"PTRACE_SEIZE of a child refused ({obs.get('errno')})", obs


def _vm_readv(ctx: Evidence) -> Verdict:
    obs = ctx.get("ptrace")
    parts, ok = [], True
    for key, who in (("vm_read_child", "child"), ("vm_read_parent", "parent")):
        o = obs[key]
        ok = ok and not o.get("allowed")
        how = o.get("errno") or f"{o.get('bytes')} bytes"
        parts.append(f"{who}: {'ALLOWED' if o.get('allowed') else 'refused'} ({how})")
    return ok, "; ".join(parts), {k: obs[k] for k in ("vm_read_child", "vm_read_parent")}


def _userns(ctx: Evidence) -> Verdict:
    obs = ctx.get("userns")
    out = obs.get("output")
    if not isinstance(out, dict):
        return False, f"helper gave no answer (exit {obs.get('returncode')}, timed out: {obs.get('timed_out')})", obs
    if out.get("unshare"):
        return False, "unshare(CLONE_NEWUSER) SUCCEEDED", obs
    return True, f"refused ({out.get('errno')})", obs


def _setuid(ctx: Evidence) -> Verdict:
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


def _statuses(ctx: Evidence) -> dict[str, dict[str, Any]]:
    return {"worker": ctx.get("caps"), "command": ctx.get("command")["status"]}


def _capabilities(ctx: Evidence) -> Verdict:
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


def _no_new_privs(ctx: Evidence) -> Verdict:
    statuses = _statuses(ctx)
    values = {who: st.get("NoNewPrivs") for who, st in statuses.items()}
    ok = all(v == "1" for v in values.values())
    return ok, ", ".join(f"{who} NoNewPrivs={v}" for who, v in values.items()), statuses


def _other_workspace(ctx: Evidence) -> Verdict:
    obs = ctx.get("other_workspace")
    bad = [f"read {r['path']}" for r in obs["reads"] if r.get("readable")]
    bad += [f"{entry['dir']} lists it" for entry in obs["listings"] if entry.get("peer_listed")]
    if bad:
        return False, "; ".join(bad), obs
    reads = ", ".join(_read_outcome(r) for r in obs["reads"])
    return True, f"{reads}; not listed", obs


def _protected(ctx: Evidence) -> Verdict:
    obs = ctx.get("protected")
    done = [f"{a['attempt']} {a['path']} ({'worked' if a.get('done') else a.get('errno')})"
            for a in obs["attempts"] if not a.get("refused")]  # fmt: skip
    if done:
        return False, "not refused: " + "; ".join(done), obs
    return True, ", ".join(f"{a['attempt']} {a['errno']}" for a in obs["attempts"]), obs


def _host_paths(ctx: Evidence) -> Verdict:
    """Host paths that would help aim an attack, looked for in what /proc shows the sandbox.

    A bind mount's root field (the 4th of a mountinfo line) is its source path within the source
    filesystem: the kernel shows the workspace's host path there, and that alone is allowed.
    """
    obs = ctx.get("host_paths")
    paths = {"checkout": PACKAGE_ROOT, "venv": sys.prefix, "interpreter": os.path.realpath(sys.base_prefix),
             "workspace root": str(ctx.config.workspace_root)}  # fmt: skip
    telling = {what: p for what, p in paths.items() if p != "/" and not p.startswith("/usr")}
    found = [f"{what} in {key}" for key in ("pid1_cmdline", "own_cmdline") for what, p in telling.items()
             if p in obs[key]]  # fmt: skip
    for line in obs["mountinfo"].splitlines():
        fields = line.split(" ")
        for what, p in telling.items():
            where = " ".join(fields[4:]) if what == "workspace root" else line
            if p in where:
                found.append(f"{what} in mountinfo: {line[:160]}")
    if found:
        return False, "; ".join(sorted(set(found))[:6]), {"found": found}
    return True, "none of " + ", ".join(telling), {}


def _fork_bomb(ctx: Evidence) -> Verdict:
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


def _memory(ctx: Evidence) -> Verdict:
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


def _responsive(ctx: Evidence) -> Verdict:
    m = ctx.monitor
    for probe in LIMIT_PROBES:
        if probe in ctx.errors:
            raise _Missing(f"probe {probe} failed: {ctx.errors[probe]}")
    lag_ok = m["max_loop_lag_ms"] < _MAX_LOOP_LAG * 1000
    spawn_ok = not m["spawn_failures"] and m["host_spawns"] > 0 and m["max_spawn_ms"] < MAX_SPAWN * 1000
    observed = (f"event-loop lag max {m['max_loop_lag_ms']} ms; {m['host_spawns']} host spawns, "
                f"slowest {m['max_spawn_ms']} ms, {len(m['spawn_failures'])} failed")  # fmt: skip
    return lag_ok and spawn_ok, observed, m


def _exfiltration(ctx: Evidence) -> Verdict:
    ctx.get("worker_env")  # nothing came back at all: no verdict either way
    leaked = ctx.plants.leaked_in(ctx.sent_back)
    if leaked:
        return False, f"raw canary value sent back: {', '.join(leaked)}", {"leaked": leaked}
    return True, f"none in {len(ctx.sent_back)} bytes of probe output", {}


def _planting(ctx: Evidence) -> Verdict:
    """The audit's own footing: its planting record, and proof the worker ran in the planted tree."""
    links = ctx.get("symlink_escape")  # it makes its links in the planted scratch dir
    record = ctx.plants.planting
    made = [e for e in links["reads"] + links["writes"] if "symlink_errno" not in e]
    problems = [f"tampered before hand-over: {', '.join(record['tampered'])}"] if record["tampered"] else []
    if not record["workspace_root_private"]:
        problems.append(f"workspace_root is writable by others (mode {record['workspace_root_mode']}, "
                        f"owner {record['workspace_root_owner']})")  # fmt: skip
    if record["handed_over_at"] > record["first_request_at"]:
        problems.append("handed over after the first worker was asked for")
    if not made:
        problems.append("the worker did not find the planted scratch directory in its workspace")
    owner, uid = record["handed_to"], record["planted_as_uid"]
    handed = f"then given to uid {owner[0]}" if owner else f"kept by uid {uid} (the worker's own)"
    observed = (f"fresh user {record['audited_user']} (and peer {record['peer_user']}): planted as uid {uid} "
                f"in 0700 workspaces, untouched, {handed}, all before the first worker; the worker found "
                "the scratch dir")  # fmt: skip
    return not problems, "; ".join(problems) or observed, record


def _tenancy(ctx: Evidence) -> dict[str, Any]:
    if not ctx.tenancy:
        raise _Missing("the host read nothing of the worker's tenancy: the worker returned nothing")
    return ctx.tenancy


_EVALUATORS: dict[str, Callable[[Evidence], Verdict]] = {
    "tenancy.uid": lambda ctx: tenancy.uid_row(ctx.plants.planting, _tenancy(ctx)),
    "tenancy.cgroups": lambda ctx: tenancy.cgroup_row(_tenancy(ctx)),
    "tenancy.cpu": lambda ctx: tenancy.cpu_row(ctx.config, _tenancy(ctx)),
    "tenancy.sockets": lambda ctx: tenancy.socket_row(ctx.config, _tenancy(ctx)),
    "tenancy.disk_quota": lambda ctx: tenancy.quota_row(_tenancy(ctx).get("quota_probe") or {}),
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
    "model.endpoint": _model_endpoint,
    "egress.allowed": _egress_allowed,
    "egress.denied_name": _egress_refused("denied"),
    "egress.ip_literal": _egress_refused("literal"),
    "egress.private_name": _egress_refused("private"),
    "egress.direct": _egress_direct,
    "proc.ptrace": _ptrace,
    "proc.vm_readv": _vm_readv,
    "ns.user": _userns,
    "priv.setuid": _setuid,
    "priv.capabilities": _capabilities,
    "priv.no_new_privs": _no_new_privs,
    "workspace.other_user": _other_workspace,
    "workspace.protected": _protected,
    "proc.host_paths": _host_paths,
    "limits.fork_bomb": _fork_bomb,
    "limits.memory": _memory,
    "host.responsive": _responsive,
    "canary.exfiltration": _exfiltration,
    "audit.planting": _planting,
}
assert set(_EVALUATORS) == set(CHECK_NAMES)
