"""The strict profile's engine against real bubblewrap sandboxes.

Most tests run the exact argv of :func:`strict_launch` with the worker's ``-c`` program
replaced by a probe: the probe applies the plan's in-process layers exactly as the
worker's ``initialize`` does (uid switch, rlimits, no_new_privs, then landlock at bind),
runs its checks and prints one JSON object. A few tests drive a real SandboxWorker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_core.config import ProcessSandboxConfig, ResourceLimits, StrictIsolation
from sandbox_core.errors import IsolationUnavailable
from sandbox_core.isolation import cgroups
from sandbox_core.isolation.launch import LaunchSpec, prepare_workspace
from sandbox_core.isolation.runtime import app_dir, runtime
from sandbox_core.isolation.strict import launch_args, strict_launch
from sandbox_core.kernel import landlock_abi

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="strict profile is Linux only"),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
]
AS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not AS_ROOT, reason="the uid switch happens only when the host is root")
needs_landlock = pytest.mark.skipif(landlock_abi() == 0, reason="kernel has no landlock")
needs_cgroups = pytest.mark.skipif(cgroups.available() is not None, reason=f"cgroups: {cgroups.available()}")

PRELUDE = """
import json, os, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from sandbox_core.inside import confine as inside
plan = json.loads(sys.argv[1])
out = {{}}
def attempt(fn, *args):
    try:
        res = fn(*args)
        return res if isinstance(res, str) else "ok"
    except OSError as exc:
        return exc.errno
"""
APPLY = """
report = inside.apply(plan)
os.chdir("/workspace")
inside.after_bind(plan, Path("/workspace"), report)
out["report"] = report
"""


def _config(tmp_path: Path, **strict: Any) -> ProcessSandboxConfig:
    limits = strict.pop("limits", ResourceLimits())
    return ProcessSandboxConfig(
        profile="strict",
        workspace_root=tmp_path / "ws",
        min_idle=0,
        strict=StrictIsolation(**strict),
        limits=limits,
    )


@contextlib.contextmanager
def launched(tmp_path: Path, worker_id: str = "t", **strict: Any) -> Iterator[LaunchSpec]:
    config = _config(tmp_path, **strict)
    spec = strict_launch(config, worker_id, prepare_workspace(config, "alice"))
    try:
        yield spec
    finally:
        if spec.cleanup is not None:
            spec.cleanup()


def probe_argv(spec: LaunchSpec, code: str, *, apply: bool = True) -> list[str]:
    """The spec's argv with the worker program replaced by ``code`` (plan in argv[1])."""
    at = spec.argv.index("--")
    interpreter = spec.argv[at + 1]
    program = PRELUDE.format(root=app_dir()) + (APPLY if apply else "") + textwrap.dedent(code)
    program += "\nprint(json.dumps(out, default=str))\n"
    return [*spec.argv[: at + 1], interpreter, "-I", "-c", program, json.dumps(spec.plan)]


def spawn(spec: LaunchSpec, code: str, *, apply: bool = True, stdin: int | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        probe_argv(spec, code, apply=apply),
        env=spec.env,
        cwd=spec.cwd,
        pass_fds=spec.pass_fds,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    if spec.after_spawn is not None:
        spec.after_spawn(proc.pid)
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"probe failed ({proc.returncode}): {stderr}"
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def run(spec: LaunchSpec, code: str, *, apply: bool = True) -> dict[str, Any]:
    return finish(spawn(spec, code, apply=apply))


def poll(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


# ----------------------------------------------------------------- environment


def test_no_secret_in_env_pid1_or_command_lines(tmp_path: Path, host_canary: str) -> None:
    with launched(tmp_path) as spec:
        assert host_canary not in json.dumps(spec.env) and host_canary not in " ".join(spec.argv)
        assert "--clearenv" not in spec.argv and "--setenv" not in spec.argv
        code = """
        def scan(kind):
            found = {}
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        found[pid] = open(f"/proc/{pid}/{kind}", "rb").read().decode(errors="replace")
                    except OSError as exc:
                        found[pid] = f"error {exc.errno}"
            return found
        out["environ"], out["cmdline"] = scan("environ"), scan("cmdline")
        out["self_env"] = dict(os.environ)
        out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        """
        before = run(spec, code, apply=False)  # still uid 0 inside: can read PID 1 (bwrap)
    assert before["environ"]["1"].startswith("PATH=") or "HOME=/home/sandbox" in before["environ"]["1"]
    for kind in ("environ", "cmdline"):
        for pid, text in before[kind].items():
            assert host_canary not in text, f"canary in /proc/{pid}/{kind}"
    # bwrap itself exports PWD after its chdir (to "/"); everything else is the allowlist
    assert set(before["self_env"]) <= {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TERM", "TZ", "HOME", "PWD"}
    assert before["self_env"].get("PWD", "/") == "/"
    assert before["self_env"]["HOME"] == "/home/sandbox"
    assert before["pids"][0] == 1 and len(before["pids"]) <= 3  # only the sandbox's own pids


def test_passed_descriptors_do_not_leak_into_the_sandbox(tmp_path: Path) -> None:
    with launched(tmp_path) as spec:
        assert spec.pass_fds  # seccomp program and generated /etc files
        out = run(
            spec, 'out["fds"] = {f: attempt(os.readlink, f"/proc/self/fd/{f}") for f in os.listdir("/proc/self/fd")}'
        )
    leaked = {fd: target for fd, target in out["fds"].items() if int(fd) > 2 and "memfd" in str(target)}
    assert leaked == {}
    assert len(out["fds"]) <= 4  # 0, 1, 2 and the directory being listed


def test_host_side_descriptors_are_closed_after_spawn(tmp_path: Path) -> None:
    with launched(tmp_path) as spec:
        run(spec, "pass")
        for fd in spec.pass_fds:
            with pytest.raises(OSError):
                os.fstat(fd)


# ----------------------------------------------------------------- filesystem


def test_minimal_read_only_view_and_only_workspace_writable(tmp_path: Path) -> None:
    code = """
    import pwd
    out["exists"] = {p: os.path.lexists(p) for p in
        ["/etc/shadow", "/etc/gshadow", "/home", "/var", "/run", "/srv", "/root/.bashrc", "/root/.ssh",
         "/etc/ssl/private", "/etc/environment", "/sys", "/usr/bin/env", "/etc/ssl/certs", "/etc/passwd"]}
    out["root_listing"] = attempt(os.listdir, "/root")
    out["home"] = [os.environ["HOME"], os.listdir("/home"), oct(os.stat(os.environ["HOME"]).st_mode & 0o777)]
    out["writable"] = {}
    for d in ["/", "/workspace", "/tmp", "/dev/shm", "/usr", "/etc", "/root", "/work/main/sandbox_core",
              "/proc", "/dev", "/home/sandbox", "/opt/sandbox", "/opt/sandbox/app/sandbox_core"]:
        out["writable"][d] = attempt(lambda d: open(os.path.join(d, "probe-file"), "w").close(), d)
    out["me"] = pwd.getpwuid(os.getuid()).pw_name
    out["passwd"] = open("/etc/passwd").read()
    out["cwd"] = os.getcwd()
    """
    bob = prepare_workspace(_config(tmp_path), "bob")
    (bob / "bob-secret").write_text("bob")
    code = textwrap.dedent(code) + f"out['bob'] = [os.path.exists({str(bob)!r}), os.path.exists({str(bob.parent)!r})]\n"
    host_ws = _config(tmp_path).workspace_for("alice")
    with launched(tmp_path) as spec:
        out = run(spec, code)
    assert not any(
        out["exists"][p]
        for p in [
            "/etc/shadow",
            "/etc/gshadow",
            "/var",
            "/run",
            "/srv",
            "/root/.bashrc",
            "/root/.ssh",
            "/etc/ssl/private",
            "/etc/environment",
            "/sys",
        ]
    )
    assert out["exists"]["/usr/bin/env"] and out["exists"]["/etc/ssl/certs"]
    if AS_ROOT:
        assert out["root_listing"] != "ok"  # only a traversable path to the interpreter
    writable = {d for d, res in out["writable"].items() if res == "ok"}
    assert writable == {"/workspace", "/tmp", "/dev/shm", "/home/sandbox"}  # private tmpfs but the workspace
    assert out["home"] == ["/home/sandbox", ["sandbox"], "0o700"]  # the host's /home is not there
    assert (host_ws / "probe-file").exists()
    assert out["cwd"] == "/workspace"
    assert out["bob"] == [False, False]  # other users' workspaces (and their root) are not mounted
    assert len(out["passwd"].splitlines()) == 2 and out["me"] == "sandbox"


def test_deny_paths_win_over_binds_and_secrets_cannot_be_bound(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "private").mkdir(parents=True)
    (data / "private" / "key").write_text("top-secret")
    (data / "secret.txt").write_text("top-secret")
    (data / "public.txt").write_text("hello")
    data.chmod(0o755)
    code = """
    out["public"] = open("/data/public.txt").read()
    out["secret"] = attempt(lambda: open("/data/secret.txt").read())
    out["secret_text"] = open("/data/secret.txt").read() if out["secret"] == "ok" else ""
    out["private"] = attempt(os.listdir, "/data/private")
    out["key"] = os.path.exists("/data/private/key")
    out["rw_denied"] = attempt(lambda: open("/rw/x", "w").close())
    """
    with launched(
        tmp_path,
        ro_binds=(f"{data}:/data",),
        rw_binds=(f"{data}:/rw",),
        deny_paths=("/data/secret.txt", "/data/private", "/rw"),
    ) as spec:
        out = run(spec, code)
        assert spec.plan["host_layers"]["filesystem"]["denied"] == ["/data/secret.txt", "/data/private", "/rw"]
    assert out["public"] == "hello"
    assert "top-secret" not in out["secret_text"] and out["key"] is False
    assert out["private"] != "ok" and out["rw_denied"] != "ok"
    for bad in ("/etc", "/", "/etc/shadow"):
        with pytest.raises(IsolationUnavailable, match="expose host secrets"):
            strict_launch(_config(tmp_path, ro_binds=(bad,)), "x", None)


# ----------------------------------------------------------------- network and sockets


def test_unix_sockets_off_denied_inet_confined_asyncio_and_subprocess_work(tmp_path: Path) -> None:
    sockdir = tmp_path / "sock"
    sockdir.mkdir()
    sockdir.chmod(0o755)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(sockdir / "redis.sock"))
    os.chmod(sockdir / "redis.sock", 0o777)
    unix.listen()
    unix.setblocking(False)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    tcp.setblocking(False)
    port = tcp.getsockname()[1]
    code = f"""
    import socket, asyncio, subprocess, errno
    out["unix"] = attempt(socket.socket, socket.AF_UNIX, socket.SOCK_STREAM)
    out["vsock"] = attempt(socket.socket, socket.AF_VSOCK, socket.SOCK_STREAM)
    out["packet"] = attempt(socket.socket, socket.AF_PACKET, socket.SOCK_RAW)
    out["dgram_pair"] = attempt(socket.socketpair, socket.AF_UNIX, socket.SOCK_DGRAM)
    a, b = socket.socketpair()
    b.close()
    out["pair_connect"] = attempt(a.connect, "/hostsock/redis.sock")
    out["pair_sendto"] = attempt(a.sendto, b"x", "/hostsock/redis.sock")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    out["inet"] = "ok"
    s.settimeout(5)
    out["tcp_host_listener"] = attempt(s.connect, ("127.0.0.1", {port}))
    route = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out["outbound"] = attempt(route.connect, ("198.51.100.1", 9))  # a route lookup: sends nothing
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    out["own_loopback"] = "ok"
    async def main():
        proc = await asyncio.create_subprocess_exec("echo", "hi", stdout=asyncio.subprocess.PIPE)
        return (await proc.communicate())[0].decode()
    out["asyncio_subprocess"] = asyncio.run(main())
    out["subprocess"] = subprocess.run(["sh", "-c", "echo sub"], capture_output=True, text=True).stdout
    out["nc"] = subprocess.run(["python3", "-c", "import socket; socket.socket(socket.AF_UNIX)"],
                               capture_output=True, text=True).stderr.strip().splitlines()[-1]
    """
    try:
        # AF_UNIX off (strict.unix_sockets = false): the seccomp rule alone keeps the socket out
        # of reach; with it on, see tests/security/test_unix_sockets.py
        with launched(tmp_path, unix_sockets=False, ro_binds=(f"{sockdir}:/hostsock",)) as spec:
            out = run(spec, code)
        with pytest.raises(BlockingIOError):
            tcp.accept()  # the host TCP listener saw nothing
        with pytest.raises(BlockingIOError):
            unix.accept()  # ...nor the Unix listener
    finally:
        unix.close()
        tcp.close()
    import errno

    assert out["unix"] == errno.EPERM and out["vsock"] == errno.EPERM and out["packet"] == errno.EPERM
    assert out["dgram_pair"] == errno.EPERM
    assert out["pair_connect"] == errno.EISCONN and out["pair_sendto"] == errno.EISCONN
    assert out["inet"] == "ok" and out["own_loopback"] == "ok"
    assert out["tcp_host_listener"] == errno.ECONNREFUSED
    assert out["outbound"] == errno.ENETUNREACH  # no route off the machine at all
    assert out["asyncio_subprocess"] == "hi\n" and out["subprocess"] == "sub\n"
    assert out["nc"].startswith("PermissionError")


# ----------------------------------------------------------------- seccomp and identity


def test_dangerous_syscalls_fail_with_eperm(tmp_path: Path) -> None:
    code = """
    import ctypes, errno, fcntl, termios
    libc = ctypes.CDLL(None, use_errno=True)
    def sys_(name, *args):
        nr = {"ptrace": 101, "unshare": 272, "setns": 308, "clone": 56, "clone3": 435, "mount": 165,
              "io_uring_setup": 425, "bpf": 321, "keyctl": 250, "process_vm_readv": 310,
              "perf_event_open": 298, "userfaultfd": 323, "personality": 135, "pivot_root": 155,
              "fsopen": 430, "add_key": 248}[name]
        res = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
        return "ok" if res >= 0 else ctypes.get_errno()
    if os.uname().machine != "x86_64":
        raise SystemExit(0)
    out["ptrace_attach_1"] = sys_("ptrace", 16, 1, 0, 0)
    out["ptrace_traceme"] = sys_("ptrace", 0, 0, 0, 0)
    out["unshare_user"] = sys_("unshare", 0x10000000)
    out["unshare_net"] = sys_("unshare", 0x40000000)
    out["setns"] = sys_("setns", 0, 0)
    out["clone_newuser"] = sys_("clone", 0x10000000 | 17, 0, 0, 0, 0)
    out["clone_newuser_hi_bits"] = sys_("clone", (1 << 40) | 0x10000000 | 17, 0, 0, 0, 0)
    out["clone3"] = sys_("clone3", 0, 0)
    out["mount"] = sys_("mount", 0, 0, 0, 0, 0)
    out["pivot_root"] = sys_("pivot_root", 0, 0)
    out["fsopen"] = sys_("fsopen", 0, 0)
    out["io_uring_setup"] = sys_("io_uring_setup", 1, 0)
    out["bpf"] = sys_("bpf", 0, 0, 0)
    out["keyctl"] = sys_("keyctl", 0, 0)
    out["add_key"] = sys_("add_key", 0, 0, 0, 0, 0)
    out["process_vm_readv"] = sys_("process_vm_readv", 1, 0, 0, 0, 0, 0)
    out["perf_event_open"] = sys_("perf_event_open", 0, 0, -1, -1, 0)
    out["userfaultfd"] = sys_("userfaultfd", 0)
    out["personality_no_aslr"] = sys_("personality", 0x0040000)
    out["personality_no_aslr_hi"] = sys_("personality", 0xFFFFFFFF7FFFFFFF)
    out["personality_query"] = sys_("personality", 0xFFFFFFFF)
    out["personality_linux"] = sys_("personality", 0)
    out["tiocsti"] = attempt(fcntl.ioctl, 2, termios.TIOCSTI, b"x")
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    out["fork"] = os.waitpid(pid, 0)[1]
    import threading
    t = threading.Thread(target=lambda: None); t.start(); t.join()
    out["thread"] = "ok"
    out["status"] = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
    """
    with launched(tmp_path) as spec:
        out = run(spec, code)
    if not out:
        pytest.skip("syscall numbers in this probe are for x86_64")
    import errno

    eperm = [
        k
        for k in out
        if k
        not in {"clone3", "personality_query", "personality_linux", "fork", "thread", "status", "report", "tiocsti"}
    ]
    assert {k: out[k] for k in eperm} == dict.fromkeys(eperm, errno.EPERM)
    assert out["clone3"] == errno.ENOSYS
    assert out["personality_query"] == "ok" and out["personality_linux"] == "ok"
    assert out["tiocsti"] in (errno.EPERM, errno.ENOTTY, errno.EBADF)
    assert out["fork"] == 0 and out["thread"] == "ok"
    assert out["status"]["Seccomp"].strip() == "2"


@needs_root
def test_uid_switch_drops_every_capability(tmp_path: Path) -> None:
    code = """
    out["ids"] = [os.getresuid(), os.getresgid(), os.getgroups()]
    out["status"] = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
    out["setuid_back"] = attempt(os.setuid, 0)
    import subprocess
    out["su"] = subprocess.run(["/usr/bin/su", "-c", "id"], capture_output=True, text=True, input="").returncode
    """
    with launched(tmp_path) as spec:
        options = launch_args(spec)
        assert "--unshare-user" not in options
        assert options[options.index("--cap-drop") : options.index("--cap-drop") + 8] == [
            "--cap-drop",
            "ALL",
            "--cap-add",
            "CAP_SETUID",
            "--cap-add",
            "CAP_SETGID",
            "--cap-add",
            "CAP_SETPCAP",
        ]
        uid = spec.plan["switch_user"]["uid"]
        assert spec.plan["switch_user"] == {"uid": uid, "gid": uid} and spec.plan["no_new_privs"]
        assert 200000 <= uid <= 299999  # the default strict.uid_range: a uid of alice's own
        out = run(spec, code)
    status = {k: v.strip() for k, v in out["status"].items()}
    assert out["ids"] == [[uid] * 3, [uid] * 3, []]
    assert status["CapEff"] == status["CapPrm"] == status["CapAmb"] == status["CapInh"] == "0000000000000000"
    assert status["CapBnd"] == "0000000000000000"
    assert status["NoNewPrivs"] == "1"
    assert out["setuid_back"] != "ok" and out["su"] != 0
    report = out["report"]
    assert report["uid"] == uid and report["capabilities_zero"] and report["no_new_privs"]
    assert report["seccomp"] is True and report["limits"] in ("cgroup-v1", "rlimits")
    assert report["namespaces"] == ["mount", "pid", "net", "ipc", "uts", "cgroup"]
    assert report["engine"].startswith("bubblewrap")


def test_unprivileged_host_uses_a_user_namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime()  # staged as the real uid (the stage must belong to the uid that builds it)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with launched(tmp_path) as spec:
        options = launch_args(spec)
        assert "--unshare-user" in options and "--disable-userns" in options
        assert "--cap-add" not in options and "switch_user" not in spec.plan
        assert spec.plan["host_layers"]["namespaces"][0] == "user"


# ----------------------------------------------------------------- landlock


@needs_landlock
def test_landlock_blocks_writes_that_the_mounts_allow(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "existing").write_text("data")
    shared.chmod(0o777)
    (shared / "existing").chmod(0o666)
    code = """
    from sandbox_core.inside import landlock
    out["before"] = attempt(lambda: open("/shared/before", "w").close())
    ro = [Path(p) for p in plan["landlock"]["read_only"]] + [Path("/shared")]
    out["abi"] = landlock.restrict(read_only=ro, read_write=[Path("/workspace"), Path("/tmp"), Path("/dev")])
    out["after"] = attempt(lambda: open("/shared/after", "w").close())
    out["truncate"] = attempt(lambda: open("/shared/existing", "r+").truncate(0))
    out["read"] = open("/shared/existing").read()
    out["workspace"] = attempt(lambda: open("/workspace/f", "w").write("x"))
    out["devnull"] = attempt(lambda: open("/dev/null", "w").write("x"))
    import subprocess
    out["exec"] = subprocess.run(["sh", "-c", "echo hi > /dev/stdout; cat /shared/existing"],
                                 capture_output=True, text=True).stdout
    """
    with launched(tmp_path, rw_binds=(f"{shared}:/shared",)) as spec:
        out = run(spec, code)
    import errno

    assert out["before"] == "ok"  # the bind mount itself is writable...
    assert out["after"] == errno.EACCES and out["truncate"] == errno.EACCES  # ...landlock is not
    assert out["read"] == "data" and out["workspace"] == "ok" and out["devnull"] == "ok"
    assert out["exec"] == "hi\ndata"
    assert out["abi"] == landlock_abi() and out["report"]["landlock"] == {"abi": out["abi"]}


@needs_landlock
def test_plan_landlock_keeps_the_worker_working(tmp_path: Path) -> None:
    code = """
    import asyncio, subprocess, importlib
    importlib.import_module("sandbox_core.inside.runner")
    out["asyncio"] = asyncio.run(asyncio.sleep(0, "ok"))
    out["sh"] = subprocess.run(["sh", "-c", "ls /usr/bin/env && echo x > /tmp/t && cat /tmp/t"],
                               capture_output=True, text=True).stdout
    out["proc_write"] = attempt(lambda: open("/proc/self/attr/current", "w").write("x"))
    out["status"] = open("/proc/self/status").read().count("Seccomp")
    """
    with launched(tmp_path) as spec:
        assert spec.plan["landlock"]["required"] is True
        out = run(spec, code)
    assert out["report"]["landlock"]["abi"] >= 1
    assert out["asyncio"] == "ok" and out["sh"] == "/usr/bin/env\nx\n" and out["proc_write"] != "ok"


# ----------------------------------------------------------------- limits


FORK_BOMB = """
import errno
r, w = os.pipe()
children = 0
try:
    while children < 10000:
        pid = os.fork()
        if pid == 0:
            os.close(w)
            os.read(r, 1)  # block until the parent closes the pipe: no sleeping
            os._exit(0)
        children += 1
except OSError as exc:
    out["error"] = exc.errno
out["children"] = children
print(json.dumps(out), flush=True)
sys.stdin.readline()  # hold the processes until the test says so
os.close(w)
for _ in range(children):
    os.wait()
"""


FORK_15 = """
pids = []
for _ in range(15):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    pids.append(pid)
for pid in pids:
    os.waitpid(pid, 0)
out["forked"] = len(pids)
"""


@needs_cgroups
def test_fork_bomb_hits_the_per_worker_pids_limit_only(tmp_path: Path) -> None:
    limits = ResourceLimits(processes=24)
    with (
        launched(tmp_path, "bomb", limits=limits) as bomb_spec,
        launched(tmp_path, "other", limits=limits) as other_spec,
    ):
        assert "nproc" not in bomb_spec.plan["rlimits"]  # per-uid: would be shared by all workers
        bomb = spawn(bomb_spec, FORK_BOMB, stdin=subprocess.PIPE)
        assert bomb.stdout is not None and bomb.stdin is not None
        first = json.loads(bomb.stdout.readline())
        pids_dir = cgroups.CGROUP_ROOT / bomb_spec.plan["host_layers"]["limits_detail"]["cgroups"]["pids"]
        assert (pids_dir / "pids.max").read_text().strip() == "24"
        assert int((pids_dir / "pids.current").read_text()) <= 24
        # while the bomb holds its processes, another worker (same uid) can still fork
        other = run(other_spec, FORK_15)
        bomb.communicate(input="\n", timeout=30)
        assert bomb.returncode == 0
    import errno

    assert first["error"] == errno.EAGAIN and 5 <= first["children"] < 24
    assert other["forked"] == 15


@needs_cgroups
def test_memory_hog_is_killed_inside_its_cgroup(tmp_path: Path) -> None:
    limits = ResourceLimits(memory_mb=96, address_space_mb=0)
    code = """
    import subprocess
    hog = subprocess.run([sys.executable, "-c", "b = b'x' * (512 << 20); print(len(b))"],
                         capture_output=True, text=True)
    out["hog"] = hog.returncode
    out["alive"] = True
    """
    with launched(tmp_path, "hog", limits=limits) as spec:
        proc = spawn(spec, code)
        out = finish(proc)
        mem = cgroups.CGROUP_ROOT / spec.plan["host_layers"]["limits_detail"]["cgroups"]["memory"]
        assert int((mem / "memory.limit_in_bytes").read_text()) == 96 << 20
        oom = dict(line.split() for line in (mem / "memory.oom_control").read_text().splitlines())
        assert int(oom["oom_kill"]) >= 1  # the kernel's OOM killer acted inside this cgroup only
    assert out["hog"] == -9 and out["alive"] is True
    assert not mem.exists()  # cleanup removed the cgroup


@needs_cgroups
def test_killing_bwrap_kills_the_whole_sandbox(tmp_path: Path) -> None:
    code = """
    import subprocess
    child = subprocess.Popen(["sh", "-c", "read x"], stdin=subprocess.PIPE, start_new_session=True)
    out["child"] = child.pid
    print(json.dumps(out), flush=True)
    child.wait()
    """
    with launched(tmp_path, "kill") as spec:
        proc = spawn(spec, code)
        assert proc.stdout is not None
        json.loads(proc.stdout.readline())
        assert spec.after_spawn is not None
        group: Path = cgroups.CGROUP_ROOT / spec.plan["host_layers"]["limits_detail"]["cgroups"]["pids"]

        def members() -> list[str]:
            return (group / "cgroup.procs").read_text().split()

        assert len(members()) >= 4  # bwrap, its PID 1, the probe, sh
        proc.kill()  # SIGKILL to the process the host spawned (bwrap) only
        proc.communicate(timeout=10)
        poll(lambda: members() == [], what="sandbox processes to die with bwrap")


def test_limits_fall_back_to_rlimits_without_cgroups(tmp_path: Path) -> None:
    with launched(tmp_path, cgroups=False, limits=ResourceLimits(processes=50)) as spec:
        layers = spec.plan["host_layers"]
        assert layers["limits"] == "rlimits" and layers["limits_detail"]["why"] == "disabled by strict.cgroups"
        assert spec.plan["rlimits"]["nproc"] == 50  # the only process limit left, per uid


def test_own_cgroup_follows_this_process_hierarchy() -> None:
    text = "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/abc\n0::/\n"
    assert cgroups.own_cgroup("memory", text) == cgroups.CGROUP_ROOT / "memory/process_api/abc"
    assert cgroups.own_cgroup("pids", text) == cgroups.CGROUP_ROOT / "pids"
    assert cgroups.own_cgroup("cpu", text) is None


def test_a_spec_that_never_spawns_leaves_nothing_behind(tmp_path: Path) -> None:
    config = _config(tmp_path)
    spec = strict_launch(config, "never", prepare_workspace(config, "alice"))
    for fd in spec.pass_fds:
        os.fstat(fd)  # open until spawn
    detail = spec.plan["host_layers"]["limits_detail"]
    if detail["mode"] == "cgroup-v1":
        assert not any((cgroups.CGROUP_ROOT / p).exists() for p in detail["cgroups"].values())
    assert spec.cleanup is not None
    spec.cleanup()
    for fd in spec.pass_fds:
        with pytest.raises(OSError):
            os.fstat(fd)


# ----------------------------------------------------------------- fail closed and a real worker


def test_missing_bwrap_fails_closed_with_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(IsolationUnavailable, match=r"apt-get install bubblewrap"):
        strict_launch(_config(tmp_path), "w", None)
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(IsolationUnavailable, match="needs Linux"):
        strict_launch(_config(tmp_path), "w", None)


def test_unknown_sandbox_user_fails_closed(tmp_path: Path) -> None:
    if not AS_ROOT:
        pytest.skip("the sandbox user is only used when the host is root")
    with pytest.raises(IsolationUnavailable, match="does not exist"):
        strict_launch(_config(tmp_path, sandbox_user="no-such-user-xyz"), "w", None)


def test_real_worker_handshake_and_exec(tmp_path: Path, host_canary: str) -> None:
    from sandbox_core.requests import ExecRequest
    from sandbox_core.worker import SandboxWorker

    config = _config(tmp_path)
    workspace = prepare_workspace(config, "alice")

    async def scenario() -> tuple[dict[str, Any], list[str], float]:
        worker = SandboxWorker(config, "real", user_id="alice", workspace=workspace)
        began = time.perf_counter()
        await worker.start()
        started = time.perf_counter() - began
        try:
            script = "id -u; pwd; env; cat /proc/1/environ; ls /proc | grep -c '^[0-9]'"
            lines: list[str] = []
            async for event in worker.execute_stream("exec", ExecRequest(shell=script).params()):
                if event.type in ("stdout", "stderr"):
                    lines.append(event.chunk().decode())
            return worker.report, lines, started
        finally:
            await worker.stop()

    report, lines, started = asyncio.run(scenario())
    text = "".join(lines)
    assert host_canary not in text
    assert report["profile"] == "strict" and report["seccomp"] is True and report["no_new_privs"] is True
    assert report["capabilities_zero"] is True and report["engine"].startswith("bubblewrap")
    if AS_ROOT:
        uid = workspace.stat().st_uid
        assert 200000 <= uid <= 299999 and report["uid"] == uid and text.startswith(f"{uid}\n/workspace\n")
    if landlock_abi():
        assert report["landlock"] == {"abi": landlock_abi()}
    if cgroups.available() is None:
        assert report["limits"] == "cgroup-v1"
        leftovers = [
            c for c in ("memory", "pids") if (cgroups.CGROUP_ROOT / report["limits_detail"]["cgroups"][c]).exists()
        ]
        assert leftovers == []
    assert started < 5
