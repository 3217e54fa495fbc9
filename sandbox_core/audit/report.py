"""The audit's findings: every check with its expectation, and the report they make."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
                      "fails; the listeners saw nothing; without Landlock ABI 9, a workspace holding a "
                      "host socket is refused at launch"),
    ("net.outbound", "no way out: own network namespace, loopback only, no route off the machine "
                     "(route lookups only: nothing is sent)"),
    ("model.endpoint", "a command reaches the model through the loopback model endpoint with the placeholder "
                       "key (offline provider); the real key (a canary here) is never visible inside"),
    ("egress.allowed", "under network.mode = allowlist, the allowed name reaches the planted listener through "
                       "the proxy (CONNECT), resolved and connected by the host"),
    ("egress.denied_name", "a name on network.deny is refused with 403 and the listener sees nothing"),
    ("egress.ip_literal", "an IP literal not in network.allow_private is refused with 403; the listener sees nothing"),
    ("egress.private_name", "a name resolving to a loopback address not in network.allow_private is refused with "
                            "403; the listener sees nothing"),
    ("egress.direct", "a direct socket to the listener, bypassing the proxy, fails; the listener sees nothing"),
    ("proc.ptrace", "PTRACE_SEIZE on another process is refused"),
    ("proc.vm_readv", "process_vm_readv on another process (a child, the parent) is refused"),
    ("ns.user", "unshare(CLONE_NEWUSER) fails"),
    ("priv.setuid", "a setuid-root program runs without root privilege"),
    ("priv.capabilities", "effective, permitted and ambient capabilities are empty (worker and commands)"),
    ("priv.no_new_privs", "no_new_privs is set (worker and commands)"),
    ("workspace.other_user", "another user's workspace is neither readable nor listed"),
    ("workspace.protected", "the workspace's protected paths (.bashrc, .mcp.json, .claude, .ripgreprc) "
                            "cannot be written, created, renamed or replaced by a symlink"),
    ("proc.host_paths", "/proc/1/cmdline, the worker's cmdline and /proc/self/mountinfo name no host path of "
                        "the checkout, venv or interpreter; the workspace root only as a bind mount's root"),
    ("limits.fork_bomb", "a fork bomb is refused at the process limit (limits.processes)"),
    ("limits.memory", "a memory hog is stopped at the memory limit (limits.memory_mb)"),
    ("host.responsive", "while the bomb and the hog run, the host's event loop and its own process "
                        "spawns stay fast"),
    ("canary.exfiltration", "no canary value appears anywhere in what the sandbox sent back"),
    ("tenancy.uid", "each user has a host uid of their own (strict.uid_range; never 0 or 65534) that owns their "
                    "workspace, and the worker runs as it"),
    ("tenancy.cgroups", "the worker's limits are kernel cgroups of its own (which version says which)"),
    ("tenancy.cpu", "the worker's CPU is limited to limits.cpus (a CFS quota in its cgroup)"),
    ("tenancy.sockets", "the worker's socket buffers are bounded (v1 memory.kmem.tcp, v2 memory.max)"),
    ("tenancy.disk_quota", "writing past limits.workspace_mb fails inside (a kernel-enforced quota)"),
    ("audit.planting", "the audit planted in a fresh throwaway user's workspace, as root, before any sandbox "
                       "could touch it, and the worker ran there"),
)  # fmt: skip
"""Every check, in report order, with its expectation. Names are stable (tests use them)."""
CHECK_NAMES: tuple[str, ...] = tuple(name for name, _ in CHECKS)
_EXPECTATION = dict(CHECKS)


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
