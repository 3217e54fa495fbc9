"""``sandbox audit-env`` against real workers: every check, one test each.

* strict: every check must pass (parametrized by check name, so a regression names the
  layer), and switching one layer off must make exactly that layer's checks fail;
* process: the weaknesses of the portable profile must be *reported* as failures, while
  the environment checks pass;
* the CLI through the real console script (``--json`` parses, exit codes);
* fail closed and clean-up: nothing planted outlives an audit, even one that cannot start.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import pytest

from sandbox_core.audit import CANARY_VAR, CHECK_NAMES, AuditReport, run_audit, tree
from sandbox_core.config import ProcessSandboxConfig, ResourceLimits, StrictIsolation
from sandbox_core.errors import IsolationUnavailable
from sandbox_core.shared import CANARY_PREFIX, CANARY_RE, LIMIT_PROBES, STATIC_PROBES
from tests.helpers import process_config

LINUX = sys.platform.startswith("linux")
AS_ROOT = os.geteuid() == 0


def _strict_unavailable() -> str | None:
    if not LINUX:
        return "the strict profile is Linux only"
    if importlib.util.find_spec("sandbox_core.isolation.strict") is None:
        return "sandbox_core.isolation.strict (the strict engine) is not importable yet"
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
    return None


STRICT_SKIP = _strict_unavailable()
needs_strict = pytest.mark.skipif(STRICT_SKIP is not None, reason=STRICT_SKIP or "")
needs_linux = pytest.mark.skipif(not LINUX, reason="the audit's probes read Linux /proc")

USER = "auditee"


def _quota_unavailable() -> str | None:
    from sandbox_core.isolation import quota

    probe = ProcessSandboxConfig(profile="strict", limits=ResourceLimits(workspace_mb=32))
    return quota.unavailable(probe)


QUOTA_SKIP = _quota_unavailable()
"""Why the audit's disk-quota row cannot pass here (then strict audits run without a quota)."""


AUDIT_MEMORY_MB = 384
"""The strict audits' memory limit: the hog must reach it within its budget to be stopped by it,
and on this kind of VM fresh memory is first touched at ~65 MB/s (976 MB took 15 s once), which
left the default 1024 MB only twice that margin; 384 MB is reached in ~6 s there."""


def _strict_config(root: Path, **strict: Any) -> ProcessSandboxConfig:
    return ProcessSandboxConfig(
        profile="strict", workspace_root=root, min_idle=0, startup_timeout=20.0, strict=StrictIsolation(**strict),
        limits=ResourceLimits(workspace_mb=0 if QUOTA_SKIP else 32, memory_mb=AUDIT_MEMORY_MB),
    )  # fmt: skip


def _audit(config: ProcessSandboxConfig, user: str = USER) -> AuditReport:
    return asyncio.run(run_audit(config, user))


def _my_decoys() -> list[int]:
    """Children of this test process carrying an audit canary on their command line."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmdline = fh.read()
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        if ppid == os.getpid() and b"--audit-canary=" + CANARY_PREFIX.encode() in cmdline:
            pids.append(int(name))
    return pids


def _assert_clean(root: Path, users: set[str], report: AuditReport | None = None) -> None:
    """Nothing this audit planted is left: canary files, peer workspace, scratch dir, decoy, env."""
    left = {p.name for p in root.iterdir()} if root.exists() else set()
    assert left <= users, f"workspaces left: {left - users}"
    for user in users & left:
        assert not [p for p in (root / user).iterdir() if p.name.startswith(".sba-")]
    assert CANARY_VAR not in os.environ
    assert _my_decoys() == []
    if report is not None:
        planted = report.planted
        for key in ("canary_dir", "secret_file", "world_file", "peer_workspace", "scratch_dir"):
            assert not os.path.lexists(planted[key]), f"{key} left: {planted[key]}"
        for path in planted["unix_listeners"]:
            assert path.startswith("@") or not os.path.lexists(path)
        assert planted["decoy_pid"] not in _my_decoys()


def _describe(report: AuditReport, name: str) -> str:
    check = report.check(name)
    return f"{name}: expected {check.expectation!r}, observed {check.observed!r}\n{json.dumps(check.details)[:2000]}"


# ---------------------------------------------------------------- strict


@pytest.fixture(scope="module")
def strict_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditReport]:
    if STRICT_SKIP is not None:
        pytest.skip(STRICT_SKIP)
    root = tmp_path_factory.mktemp("strict") / "ws"
    report = _audit(_strict_config(root))
    _assert_clean(root, {USER}, report)
    yield report


@needs_strict
@pytest.mark.parametrize("name", CHECK_NAMES)
def test_strict_check_passes(strict_report: AuditReport, name: str) -> None:
    if name == "tenancy.disk_quota" and QUOTA_SKIP:
        pytest.skip(f"disk quotas cannot be enforced here: {QUOTA_SKIP}")
    assert strict_report.check(name).passed, _describe(strict_report, name)


@needs_strict
def test_strict_report_shape(strict_report: AuditReport) -> None:
    assert strict_report.profile == "strict"
    assert [c.name for c in strict_report.checks] == list(CHECK_NAMES)
    assert strict_report.layers.get("profile") == "strict"
    assert CANARY_VAR in strict_report.withheld_variables
    assert CANARY_VAR not in strict_report.passed_variables
    allowed = set(ProcessSandboxConfig().env.allow) | {"PATH"}
    assert set(strict_report.passed_variables) <= allowed
    json.dumps(strict_report.to_dict())  # JSON-able throughout


@needs_strict
@pytest.mark.parametrize(
    ("layer", "expect_failing"),
    [
        # host Unix sockets are kept out by the network namespace, Landlock and the launch check,
        # not by seccomp (which allows sandbox-internal AF_UNIX)
        ({"seccomp": False}, {"proc.ptrace", "proc.vm_readv", "ns.user"}),
        ({"protected_paths": ()}, {"workspace.protected"}),
    ],
    ids=["seccomp-off", "protected-paths-lifted"],
)
def test_strict_layer_regression_is_named(tmp_path: Path, layer: dict[str, Any], expect_failing: set[str]) -> None:
    """Switching one layer off fails exactly the checks that layer is responsible for."""
    report = _audit(_strict_config(tmp_path / "ws", **layer))
    failing = {c.name for c in report.failed}
    assert failing == expect_failing, {n: report.check(n).observed for n in failing ^ expect_failing}


@needs_strict
def test_strict_host_unix_row_covers_the_launch_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the launch check keeps host path sockets out (no Landlock ABI 9), the row tests it:
    a launcher that mounts a workspace holding a host socket fails the row."""
    from sandbox_core.isolation import sockets
    from sandbox_core.isolation.strict import host_sockets_checked_at_launch

    config = _strict_config(tmp_path / "ws")
    if not host_sockets_checked_at_launch(config):
        pytest.skip("this kernel's Landlock (ABI 9) refuses host path sockets: no launch check to audit")
    row = _audit(config).check("net.host_unix")
    assert row.passed and "launch refused" in row.observed
    assert row.details["launch_check"]["reason"] == "host_socket"
    monkeypatch.setattr(sockets, "refuse_exposed", lambda trees, who: None)
    broken = _audit(_strict_config(tmp_path / "ws2")).check("net.host_unix")
    assert not broken.passed and "LAUNCHED" in broken.observed


@needs_strict
@pytest.mark.skipif(not AS_ROOT, reason="the strict profile only needs cgroups for limits when the host is root")
def test_strict_without_cgroups_reports_memory_unlimited(tmp_path: Path) -> None:
    """Without cgroups, limits.memory_mb is not enforced (only RLIMIT_AS): the audit says so."""
    report = _audit(_strict_config(tmp_path / "ws", cgroups=False))
    unlimited = {"limits.memory", "tenancy.cgroups", "tenancy.cpu", "tenancy.sockets"}
    assert {c.name for c in report.failed} == unlimited, [c.observed for c in report.failed]
    assert report.check("limits.fork_bomb").passed


@needs_linux
def test_strict_without_bwrap_fails_closed_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("sandbox_core.isolation.strict") is None:
        pytest.skip("sandbox_core.isolation.strict (the strict engine) is not importable yet")
    from sandbox_core.audit import plant

    canaries = tmp_path / "canaries"
    canaries.mkdir()
    monkeypatch.setattr(plant, "_canary_parent", lambda: str(canaries))
    root = tmp_path / "ws"
    config = _strict_config(root, bwrap=str(tmp_path / "no-such-bwrap"))
    with pytest.raises(IsolationUnavailable, match="bubblewrap"):
        _audit(config)
    assert list(canaries.iterdir()) == []
    _assert_clean(root, {USER})


# ---------------------------------------------------------------- process

PROCESS_MUST_FAIL = (
    "proc.environ", "proc.cmdline", "proc.pids", "files.secret", "files.world", "files.write_outside",
    "escape.symlink", "escape.hardlink", "net.host_tcp", "net.host_unix", "net.outbound", "proc.ptrace",
    "proc.vm_readv", "priv.no_new_privs", "workspace.other_user", "workspace.protected", "proc.host_paths",
    "limits.memory", "model.endpoint", "egress.allowed", "egress.denied_name", "egress.ip_literal",
    "egress.private_name", "egress.direct", "tenancy.uid", "tenancy.cgroups", "tenancy.cpu", "tenancy.sockets",
    "tenancy.disk_quota",
)  # fmt: skip
"""Weaknesses of the ``process`` profile, whoever runs it (it has no proxy and the host's network)."""
PROCESS_MUST_FAIL_AS_ROOT = ("files.shadow", "priv.capabilities", "priv.setuid", "ns.user", "limits.fork_bomb")
"""Further weaknesses when the host (and so the worker) is root."""
HOST_SECRET = "TEST_AUDIT_HOST_SECRET_OF_SANDBOX"
PROCESS_MUST_PASS = ("env.allowlist", "env.canary", "fds.command", "host.responsive", "canary.exfiltration")


@pytest.fixture(scope="module")
def process_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditReport]:
    if not LINUX:
        pytest.skip("the audit's probes read Linux /proc")
    root = tmp_path_factory.mktemp("process") / "ws"
    os.environ[HOST_SECRET] = "not-a-canary-" + os.urandom(8).hex()
    try:
        report = _audit(process_config(root, request_timeout=120.0))
    finally:
        del os.environ[HOST_SECRET]
    _assert_clean(root, {USER}, report)
    yield report


@needs_linux
@pytest.mark.parametrize("name", PROCESS_MUST_FAIL)
def test_process_reports_weakness(process_report: AuditReport, name: str) -> None:
    assert not process_report.check(name).passed, _describe(process_report, name)


@needs_linux
@pytest.mark.skipif(not AS_ROOT, reason="these are weaknesses of a root worker")
@pytest.mark.parametrize("name", PROCESS_MUST_FAIL_AS_ROOT)
def test_process_as_root_reports_weakness(process_report: AuditReport, name: str) -> None:
    assert not process_report.check(name).passed, _describe(process_report, name)


@needs_linux
@pytest.mark.parametrize("name", PROCESS_MUST_PASS)
def test_process_env_checks_pass(process_report: AuditReport, name: str) -> None:
    assert process_report.check(name).passed, _describe(process_report, name)


@needs_linux
def test_process_canaries_are_found_by_digest(process_report: AuditReport) -> None:
    """The probes recognise each canary (by its digest) where the process profile exposes it."""
    files = process_report.check("files.world").details
    assert files["canaries"] == ["world_file"]
    environ = process_report.check("proc.environ").details
    assert {m["canary"] for m in environ["matches"]} == {"env"}
    cmdline = process_report.check("proc.cmdline").details
    assert {m["canary"] for m in cmdline["matches"]} == {"cmdline"}
    assert process_report.check("net.host_tcp").details["listener_connections"] >= 1


@needs_linux
def test_process_variable_lists(process_report: AuditReport) -> None:
    assert {CANARY_VAR, HOST_SECRET} <= set(process_report.withheld_variables)
    assert set(process_report.passed_variables) <= set(ProcessSandboxConfig().env.allow) | {"PATH"}
    assert "HOME" in process_report.replaced_variables + process_report.added_variables
    assert not set(process_report.withheld_variables) & set(process_report.passed_variables)


@needs_linux
def test_canary_values_never_enter_the_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request the audit sends to the worker carries digests, never a canary value."""
    from sandbox_core.orchestrator import SandboxOrchestrator
    from sandbox_core.requests import Request, RequestResult

    sent: list[str] = []
    planted: list[str] = []
    real_execute = SandboxOrchestrator.execute

    async def spy(self: SandboxOrchestrator, user_id: str, request: Request) -> RequestResult:
        sent.append(json.dumps(request.params()) + json.dumps(list(getattr(request, "argv", None) or [])))
        planted.append(os.environ[CANARY_VAR])
        return await real_execute(self, user_id, request)

    monkeypatch.setattr(SandboxOrchestrator, "execute", spy)
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "ws"  # socket paths over AF_UNIX's 108 bytes still work
    report = asyncio.run(run_audit(process_config(deep, request_timeout=120.0), USER))
    assert len(sent) == 4  # the command snapshot, the static probes, the bomb, the hog
    unix = report.check("net.host_unix")
    assert len(str(deep)) > 108 and unix.details["listener_connections"] == 3, unix.observed
    assert planted and all(p.startswith(CANARY_PREFIX) for p in planted)
    for payload in sent:
        assert not CANARY_RE.search(payload.encode()), payload  # digests only, no canary token
        for value in planted:
            assert value not in payload
    assert report.check("canary.exfiltration").passed


# ---------------------------------------------------------------- CLI


def _registered() -> bool:
    from cli.app import app

    return any(c.name == "audit-env" for c in app.registered_commands)


def _cli_argv() -> list[str]:
    """The real console script once cli/app.py registers the command; until then the same app plus it."""
    if _registered():
        return [str(Path(sys.executable).with_name("sandbox"))]
    boot = "from cli.app import app; from cli.commands import audit_env; audit_env.register(app); app()"
    return [sys.executable, "-c", boot]


def _cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SANDBOX_", "ANTHROPIC_"))}
    env.pop("NO_COLOR", None)
    env.pop("FORCE_COLOR", None)
    env.update(
        XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_STATE_HOME=str(tmp_path / "state"),
        SANDBOX_WORKSPACE_ROOT=str(tmp_path / "ws"), SANDBOX_MIN_IDLE="0", COLUMNS="200",
        SANDBOX_ALLOW_ROOT_PROCESS="1",
        SANDBOX_STATE_DIR=str(tmp_path / "statedir"),  # not the host's uid map
    )  # fmt: skip
    return env


def _run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_cli_argv(), *args], capture_output=True, text=True, timeout=180, env=_cli_env(tmp_path), check=False
    )


@needs_linux
def test_cli_process_json_exits_1(tmp_path: Path) -> None:
    proc = _run_cli(tmp_path, "--profile", "process", "audit-env", "--user", USER, "--json")
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert data["profile"] == "process" and data["user_id"] == USER and data["passed"] is False
    assert [c["name"] for c in data["checks"]] == list(CHECK_NAMES)
    failing = {c["name"] for c in data["checks"] if not c["passed"]}
    assert set(PROCESS_MUST_FAIL) <= failing
    assert CANARY_VAR in data["variables"]["withheld"]
    assert "weaker than 'strict'" in proc.stderr  # the visible warning for the process profile


@needs_linux
def test_cli_command_options_and_table(tmp_path: Path) -> None:
    proc = _run_cli(tmp_path, "audit-env", "--profile", "process", "--user", "bob")
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert "profile process, user bob" in out
    for name in CHECK_NAMES:
        assert name in out
    assert "FAIL" in out and "PASS" in out
    assert "withheld host variables" in out and "passed host variables" in out
    assert "checks FAILED" in out


@needs_strict
def test_cli_strict_exits_0(tmp_path: Path) -> None:
    if QUOTA_SKIP:
        pytest.skip(f"disk quotas cannot be enforced here, so the audit's quota row fails: {QUOTA_SKIP}")
    env = {**_cli_env(tmp_path), "SANDBOX_LIMITS__WORKSPACE_MB": "32"}
    proc = subprocess.run([*_cli_argv(), "audit-env", "--profile", "strict", "--json"], capture_output=True,
                          text=True, timeout=180, env=env, check=False)  # fmt: skip
    data = json.loads(proc.stdout)
    failing = {c["name"]: c["observed"] for c in data["checks"] if not c["passed"]}
    assert proc.returncode == 0 and data["passed"] is True, failing


@needs_strict
def test_cli_strict_without_a_disk_quota_says_so(tmp_path: Path) -> None:
    proc = _run_cli(tmp_path, "audit-env", "--profile", "strict", "--json")
    data = json.loads(proc.stdout)
    failing = {c["name"]: c["observed"] for c in data["checks"] if not c["passed"]}
    assert proc.returncode == 1 and set(failing) == {"tenancy.disk_quota"}, failing
    assert "limits.workspace_mb = 0" in failing["tenancy.disk_quota"]


@needs_linux
def test_cli_fail_closed_exit_125(tmp_path: Path) -> None:
    if importlib.util.find_spec("sandbox_core.isolation.strict") is None:
        pytest.skip("sandbox_core.isolation.strict (the strict engine) is not importable yet")
    env = {"SANDBOX_STRICT__BWRAP": str(tmp_path / "no-such-bwrap")}
    proc = subprocess.run(
        [*_cli_argv(), "audit-env", "--profile", "strict", "--json"], capture_output=True, text=True,
        timeout=60, env={**_cli_env(tmp_path), **env}, check=False,
    )  # fmt: skip
    assert proc.returncode == 125, proc.stderr
    assert proc.stdout == ""
    assert "bubblewrap" in proc.stderr


def test_cli_run_audit_refuses_a_running_loop() -> None:
    """``run_audit`` (the REPL's entry) says to use ``run_audit_async`` inside an event loop."""
    from cli.commands.audit_env import run_audit as cli_run_audit

    async def inside() -> None:
        with pytest.raises(RuntimeError, match="run_audit_async"):
            cli_run_audit(ProcessSandboxConfig(profile="process", allow_root_process=True), USER)

    asyncio.run(inside())


def test_a_probe_that_returned_nothing_fails_its_checks(tmp_path: Path) -> None:
    """No check passes vacuously: without probe results (worker crashed, probe errored) all fail."""
    from sandbox_core.audit.judge import Evidence, judge
    from sandbox_core.audit.plant import Plants

    plants = Plants(
        canaries={"env": CANARY_PREFIX + "0" * 32}, canary_dir=tmp_path, secret_file=tmp_path / "s",
        world_file=tmp_path / "w", peer_user="p", peer_dir=tmp_path / "p", peer_file=tmp_path / "p" / "f",
        workspace=tmp_path / "u", scratch=".sba-x", nonce="x",
    )  # fmt: skip
    monitor = {"max_loop_lag_ms": 0.0, "host_spawns": 0, "spawn_failures": [], "max_spawn_ms": 0.0}
    limits = {"pids_limit": 128, "memory_limit_mb": 1024, "host_available_mb": 4096}
    failed: dict[str, Any] = {n: {"error": "boom"} for n in (*STATIC_PROBES, *LIMIT_PROBES, "command")}
    cases: list[tuple[dict[str, Any], dict[str, str]]] = [({}, {}), (failed, {}), ({}, {"static": "boom"})]
    for results, errors in cases:
        ctx = Evidence(ProcessSandboxConfig(), plants, results, errors, limits, monitor, {}, "")
        for name in CHECK_NAMES:
            check = judge(ctx, name)
            assert not check.passed, (name, check.observed)
            assert "boom" in check.observed or "returned nothing" in check.observed or name == "host.responsive"


@needs_linux
def test_repl_entry_prints_into_the_given_console(tmp_path: Path) -> None:
    """The REPL's /audit calls ``run_audit`` in a thread with its own console."""
    import io

    from rich.console import Console

    from cli.commands.audit_env import run_audit as cli_run_audit

    buffer = io.StringIO()
    console = Console(file=buffer, width=200, no_color=True)
    config = process_config(tmp_path / "ws", request_timeout=120.0)

    async def repl() -> int:
        return await asyncio.to_thread(cli_run_audit, config=config, user_id=USER, as_json=False, console=console)

    assert asyncio.run(repl()) == 1
    text = buffer.getvalue()
    assert "isolation audit: profile process" in text
    assert all(name in text for name in CHECK_NAMES)
    assert "checks FAILED" in text


@needs_linux
def test_cli_interrupt_exits_130_and_removes_everything(tmp_path: Path) -> None:
    """Ctrl-C in the middle of an audit: exit 130, and every canary, listener and decoy is gone."""
    import signal
    import time

    root = tmp_path / "ws"
    env = {**_cli_env(tmp_path), "SANDBOX_WORKSPACE_ROOT": str(root)}
    proc = subprocess.Popen(
        [*_cli_argv(), "--profile", "process", "audit-env", "--user", USER], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        nonce = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:  # wait until the canaries are planted
            peers = [p.name for p in root.iterdir() if p.name.startswith("audit-peer-")] if root.exists() else []
            planted_nonce = peers[0].removeprefix("audit-peer-") if peers else ""
            if planted_nonce and (root / f"audit-{planted_nonce}" / f".sba-{planted_nonce}").exists():
                nonce = planted_nonce
                break
            time.sleep(0.01)
        assert nonce, "the audit never planted its canaries"
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert not [n for n in os.listdir("/var/tmp") if n.startswith(f"sandbox-audit-{nonce}-")]
    assert [p.name for p in root.iterdir()] == []  # both throwaway workspaces are gone; USER's was never made
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as fh:
                    assert f"--audit-nonce={nonce}".encode() not in fh.read(), f"decoy {name} left running"
            except OSError:
                continue


# ---------------------------------------------------------------- planting under attack

ATTACKER = r"""
import ctypes, os, stat, struct, sys
host_ws, victim = sys.argv[1], sys.argv[2]
# A symlink maze: one deep chain of directories, at its bottom links that each point back
# through the whole chain (absolute host paths: root resolves them on the host). A path
# lookup through it takes milliseconds, long enough to swap the last component meanwhile.
depth = min(1800, (4000 - len(host_ws)) // 2 - 20)
chain = "m/" + "d/" * depth
top = os.open(".", os.O_DIRECTORY)
for part in chain.split("/")[:-1]:
    os.mkdir(part)
    os.chdir(part)
os.fchdir(top)
hops = 36
for i in range(hops):
    target = f"{host_ws}/{chain}n{i + 1}" if i + 1 < hops else f"{host_ws}/e"
    os.symlink(target, f"{chain}n{i}")
os.mkdir("e")
os.symlink(f"{host_ws}/{chain}n0", "maze")
libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE, AT_FDCWD = 2, -100
events = libc.inotify_init1(0)
IN_CREATE = 0x100
here, trap = libc.inotify_add_watch(events, b".", IN_CREATE), libc.inotify_add_watch(events, b"e", IN_CREATE)
assert here >= 0 and trap >= 0, ctypes.get_errno()
open("attacker-ready", "w").close()
seen = set()
while True:  # woken by each creation in the workspace or in e/; killed when the test ends
    buf, at = os.read(events, 65536), 0
    while at < len(buf):
        wd, _mask, _cookie, size = struct.unpack_from("iIII", buf, at)
        name = buf[at + 16 : at + 16 + size].rstrip(b"\0").decode()
        at += 16 + size
        if wd == here and name.startswith(".sba-") and name not in seen:
            seen.add(name)
            if os.path.lexists("e/u.sock"):
                os.unlink("e/u.sock")
            # one atomic step: the maze (ending in e/) takes the scratch dir's name, and back
            assert libc.renameat2(AT_FDCWD, b"maze", AT_FDCWD, name.encode(), RENAME_EXCHANGE) == 0
            os.rename("maze", ".old" + name)
            os.symlink(os.readlink(name), "maze")
        elif wd == trap and name == "u.sock" and stat.S_ISSOCK(os.lstat("e/u.sock").st_mode):
            os.symlink(victim, "e/bait")  # the host bound its socket in e/: the victim takes its place
            assert libc.renameat2(AT_FDCWD, b"e/bait", AT_FDCWD, b"e/u.sock", RENAME_EXCHANGE) == 0
            os.unlink("e/bait")
"""
"""Runs in the audited user's own sandbox, as a process already there when the audit starts would."""
ATTACKER_OWN = ["attacker-ready", "e", "m", "maze"]
"""What the attacker itself leaves in its workspace."""


def _mode_and_owner(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_mode & 0o7777, st.st_uid, st.st_gid


async def _audits_under_attack(
    config: ProcessSandboxConfig, victim: Path, rounds: int
) -> tuple[list[AuditReport], list[str]]:
    """Run ``rounds`` audits of USER while a process in USER's sandbox races path swaps.

    Returns the reports and what USER's workspace held at the end.
    """
    from sandbox_core.isolation.launch import worker_python
    from sandbox_core.orchestrator import SandboxOrchestrator
    from sandbox_core.requests import ExecRequest
    from tests.helpers import wait_for

    host_ws = config.workspace_for(USER)
    before = _mode_and_owner(victim)
    reports: list[AuditReport] = []
    try:
        async with SandboxOrchestrator(config) as pool:
            python, _app = worker_python(config)  # the sandbox's own interpreter (strict: the staged one)
            argv = (python, "-I", "-S", "-c", ATTACKER, str(host_ws), str(victim))
            attack = asyncio.create_task(pool.execute(USER, ExecRequest(argv=argv, timeout=900)))
            try:
                await wait_for(lambda: (host_ws / "attacker-ready").exists() or attack.done(), 60, "the attacker")
                assert not attack.done(), attack.result().stderr_text
                for _ in range(rounds):
                    reports.append(await run_audit(config, USER))
                    if _mode_and_owner(victim) != before:
                        break
            finally:
                attack.cancel()
                with contextlib.suppress(BaseException):
                    await attack
        held = sorted(os.listdir(host_ws))
    finally:
        root_fd = tree.open_dir(config.workspace_root)
        try:
            assert tree.remove_tree(root_fd, USER), "the attacker's maze outlived the test"  # too deep for shutil
        finally:
            os.close(root_fd)
    return reports, held


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim" / "host-secret.conf"
    victim.parent.mkdir(mode=0o700)
    victim.write_text("not for the sandbox\n")
    victim.chmod(0o600)
    return victim


@needs_strict
@pytest.mark.timeout(300)
def test_strict_planting_survives_path_swaps_from_the_users_sandbox(tmp_path: Path) -> None:
    """A process in the audited user's sandbox swaps the planted paths: root chmods nothing of the host."""
    victim = _victim(tmp_path)
    before = _mode_and_owner(victim)
    config = _strict_config(tmp_path / "ws").replace(limits=ResourceLimits())  # the attacker's live workspace: no image
    reports, held = asyncio.run(_audits_under_attack(config, victim, rounds=4))
    assert _mode_and_owner(victim) == before, f"the audit changed {victim}: {oct(victim.stat().st_mode)}"
    assert len(reports) == 4
    placeholders = {PurePosixPath(p).parts[0] for p in config.strict.protected_paths}  # the sandbox's own
    assert [n for n in held if n not in placeholders] == ATTACKER_OWN, "the audit planted in the user's live workspace"
    for report in reports:
        failing = {c.name for c in report.failed}
        assert failing == {"tenancy.disk_quota"}, {c.name: c.observed for c in report.failed}


@needs_linux
@pytest.mark.timeout(300)
def test_process_planting_survives_path_swaps_from_the_users_sandbox(tmp_path: Path) -> None:
    """The same race under ``process``: the audit's own chmod never reaches the victim."""
    victim = _victim(tmp_path)
    before = _mode_and_owner(victim)
    config = process_config(tmp_path / "ws", request_timeout=120.0)
    reports, held = asyncio.run(_audits_under_attack(config, victim, rounds=4))
    assert _mode_and_owner(victim) == before, f"the audit changed {victim}: {oct(victim.stat().st_mode)}"
    assert len(reports) == 4
    assert held == ATTACKER_OWN, "the audit planted in the user's live workspace"
    for report in reports:
        failing = {c.name for c in report.failed}
        assert set(PROCESS_MUST_PASS).isdisjoint(failing), {n: report.check(n).observed for n in failing}
        assert set(PROCESS_MUST_FAIL) <= failing


def _hostile_tree(ws: Path, victim_dir: Path) -> None:
    """What a sandbox may leave in its workspace: links to host files, a deep tree, a locked dir."""
    os.symlink(victim_dir, ws / "dir-link")
    os.symlink(victim_dir / "keep", ws / "file-link")
    os.link(victim_dir / "keep", ws / "hard-link")
    os.mkfifo(ws / "fifo")
    fd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(3000):  # deeper than any recursion or descriptor limit
        os.mkdir("d", dir_fd=fd)
        deeper = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = deeper
    os.symlink(victim_dir, "bottom-link", dir_fd=fd)
    os.close(fd)
    (ws / "locked").mkdir()
    (ws / "locked" / "f").write_text("x")
    (ws / "locked").chmod(0)
    (ws / "swapped").mkdir()
    (ws / "swapped" / "f").write_text("x")


def test_removal_follows_nothing_the_sandbox_planted(tmp_path: Path) -> None:
    """The throwaway workspace is removed by descriptors: links lose their names, host files stay.

    Meanwhile a racer keeps swapping a directory of the tree for a symlink to the victim
    directory and back, as a sandbox still running could.
    """
    import threading

    victim_dir = tmp_path / "victim"
    victim_dir.mkdir(mode=0o700)
    (victim_dir / "keep").write_text("host data\n")
    (victim_dir / "keep").chmod(0o600)
    (victim_dir / "sub").mkdir()
    ws = tmp_path / "root" / "audit-x"
    ws.mkdir(parents=True)
    _hostile_tree(ws, victim_dir)
    before = {p.name: _mode_and_owner(p) for p in victim_dir.iterdir()}
    stop = threading.Event()

    def race() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                os.rename(ws / "swapped", ws / "swapped.real")
                os.symlink(victim_dir, ws / "swapped")
                os.unlink(ws / "swapped")
                os.rename(ws / "swapped.real", ws / "swapped")

    racer = threading.Thread(target=race)
    root_fd = tree.open_dir(tmp_path / "root")
    top = tree.open_dir_at(root_fd, "audit-x")
    expect = tree.identity(top)
    os.close(top)
    try:
        racer.start()
        try:
            tree.remove_tree(root_fd, "audit-x", expect)
        finally:
            stop.set()
            racer.join()
        leftover = sorted(os.listdir(ws)) if ws.exists() else []
    finally:
        tree.remove_tree(root_fd, "audit-x", expect)  # what the racer put back after the walk
        os.close(root_fd)
    assert {p.name: _mode_and_owner(p) for p in victim_dir.iterdir()} == before
    assert (victim_dir / "keep").read_text() == "host data\n" and (victim_dir / "keep").stat().st_nlink == 1
    assert not ws.exists() and set(leftover) <= {"swapped", "swapped.real"}, leftover


# ---------------------------------------------------------------- net.outbound sends nothing


def _host_has_default_route() -> bool:
    """An IPv4 default route in /proc/net/route (read, not probed)."""
    with open("/proc/net/route") as fh:
        return any(line.split()[1:2] == ["00000000"] for line in fh.readlines()[1:])


def _loopback(address: Any) -> bool:
    import ipaddress

    if not isinstance(address, tuple):
        return True  # an AF_UNIX path or abstract name: not the network
    try:
        return ipaddress.ip_address(str(address[0]).split("%")[0]).is_loopback
    except ValueError:
        return False  # a name to resolve: never


class _Spy(socket.socket):
    """A socket that refuses, and records, anything that would put a packet on the wire.

    A TCP connect sends a SYN and a send sends data, so both are refused unless the peer is
    loopback; a UDP connect only looks the route up, so it goes through.
    """

    violations: ClassVar[list[str]] = []
    connects: ClassVar[list[tuple[str, Any]]] = []

    def _refuse(self, what: str, address: Any) -> None:
        self.violations.append(f"{what} on {self.type.name} to {address!r}")
        raise OSError(errno.EPERM, "refused by the test: this would send a packet")

    def connect(self, address: Any) -> None:
        self.connects.append((self.type.name, address))
        if self.type != socket.SOCK_DGRAM and not _loopback(address):
            self._refuse("connect", address)
        super().connect(address)

    def connect_ex(self, address: Any) -> int:
        self.connect(address)
        return 0

    def send(self, data: Any, flags: int = 0) -> int:
        self._refuse("send", self._peer())
        return 0

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._refuse("sendall", self._peer())

    def sendto(self, data: Any, *args: Any) -> int:
        self._refuse("sendto", args[-1])
        return 0

    def sendmsg(self, *args: Any) -> int:
        self._refuse("sendmsg", self._peer())
        return 0

    def _peer(self) -> Any:
        try:
            return self.getpeername()
        except OSError:
            return None


@needs_linux
def test_outbound_probe_sends_nothing_and_sees_the_hosts_route(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run on the host (the ``process`` profile's view): no TCP connect, no send, and a route found."""
    from sandbox_core.inside import probes

    monkeypatch.setattr(_Spy, "violations", [])
    monkeypatch.setattr(_Spy, "connects", [])
    monkeypatch.setattr(socket, "socket", _Spy)
    obs = probes.probe_outbound({}, tmp_path)
    assert _Spy.violations == []
    assert _Spy.connects and all(kind == "SOCK_DGRAM" for kind, _ in _Spy.connects), _Spy.connects
    assert {r["target"] for r in obs["routes"]} == {"198.51.100.1", "[2001:db8::1]"}
    if not _host_has_default_route():
        pytest.skip("this host has no IPv4 default route to find")
    ipv4 = obs["routes"][0]
    assert ipv4["route"] is True and ipv4["source"], obs


@needs_linux
def test_process_outbound_reports_the_route(process_report: AuditReport) -> None:
    check = process_report.check("net.outbound")
    if not _host_has_default_route():
        pytest.skip("this host has no IPv4 default route to find")
    assert not check.passed and "ROUTE to 198.51.100.1" in check.observed, check.observed
    assert "host network namespace" in check.observed


@needs_strict
def test_strict_outbound_reports_no_route(strict_report: AuditReport) -> None:
    check = strict_report.check("net.outbound")
    assert [(r["route"], r["errno"]) for r in check.details["routes"]] == [(False, "ENETUNREACH")] * 2, check.details
    assert "no route to 198.51.100.1" in check.observed and "ROUTE" not in check.observed, check.observed
