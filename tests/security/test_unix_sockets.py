"""AF_UNIX inside the strict sandbox: the sandbox's own sockets work, the host's stay out of reach."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import textwrap
from pathlib import Path

import pytest

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import IsolationUnavailable
from sandbox_core.isolation import sockets
from sandbox_core.isolation.strict import LANDLOCK_RESOLVE_UNIX_ABI, strict_launch
from sandbox_core.kernel import landlock_abi
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.requests import ExecRequest
from tests.helpers import process_config
from tests.security.test_strict_engine import launched, run

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")
RESOLVE_UNIX = landlock_abi() >= LANDLOCK_RESOLVE_UNIX_ABI
"""This kernel's Landlock refuses host path sockets itself (else: the launch check does)."""


def strict(root: Path) -> ProcessSandboxConfig:
    return process_config(root).replace(profile="strict")


def listener(path: Path, mode: int = 0o777) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, mode)
    sock.listen()
    sock.setblocking(False)
    return sock


def saw_nothing(sock: socket.socket) -> bool:
    try:
        sock.accept()[0].close()
    except BlockingIOError:
        return True
    return False


INTERNAL = textwrap.dedent(
    r"""
    import multiprocessing as mp, os, socket, subprocess, sys, threading

    def square(x):
        return x * x

    if __name__ == "__main__":
        out = {}
        with mp.Manager() as manager:  # a server process on an AF_UNIX socket
            shared = manager.dict(a=1)
            shared["b"] = 2
            out["manager"] = dict(shared)
        ctx = mp.get_context("forkserver")  # the default on Linux from Python 3.14
        with ctx.Pool(2) as pool:
            out["forkserver"] = pool.map(square, [1, 2, 3])
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        a.send(b"dgram")
        out["dgram_pair"] = b.recv(16).decode()
        for where in ("/tmp/own.sock", "/workspace/own.sock", "@own-abstract"):
            srv = socket.socket(socket.AF_UNIX)
            srv.bind(where.replace("@", "\0"))
            srv.listen()
            child = subprocess.run([sys.executable, "-c",
                "import socket, sys; c = socket.socket(socket.AF_UNIX); "
                "c.connect(sys.argv[1].replace('@', chr(0))); c.sendall(b'hi')", where])
            conn, _ = srv.accept()
            out[where] = conn.recv(2).decode() if child.returncode == 0 else child.returncode
            conn.close(); srv.close()
        for proto, name in ((0, "route"), (4, "sock_diag"), (9, "audit"), (15, "uevent"), (16, "generic"), (99, "99")):
            try:
                socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, proto).close()
                out["netlink_" + name] = "ok"
            except OSError as exc:
                out["netlink_" + name] = exc.errno
        out["interfaces"] = [n for _, n in socket.if_nameindex()]
        print(out)
    """
)


async def test_sandbox_internal_unix_sockets_work(workspace_root: Path) -> None:
    async with SandboxOrchestrator(strict(workspace_root)) as pool:
        await pool.execute("ula", ExecRequest(shell=f"cat > /workspace/internal.py <<'EOF'\n{INTERNAL}\nEOF"))
        result = await pool.execute("ula", ExecRequest(argv=("python3", "/workspace/internal.py"), timeout=120))
        assert result.exit_code == 0, result.stderr_text
        out = eval(result.stdout_text)  # our own script's repr of plain values
        assert out["manager"] == {"a": 1, "b": 2}
        assert out["forkserver"] == [1, 4, 9]
        assert out["dgram_pair"] == "dgram"
        assert out["/tmp/own.sock"] == out["/workspace/own.sock"] == out["@own-abstract"] == "hi"
        # netlink: only NETLINK_ROUTE (the sandbox's own interface list) is kept
        assert out["netlink_route"] == "ok" and out["interfaces"] == ["lo"]
        for name in ("sock_diag", "audit", "uevent", "generic", "99"):
            assert out["netlink_" + name] == errno.EPERM, name
        report = pool.worker_report(result.worker_id)
        assert report is not None


def test_a_bound_tree_with_a_host_socket_is_refused_or_unreachable(tmp_path: Path) -> None:
    sockdir = tmp_path / "sock"
    sockdir.mkdir()
    sockdir.chmod(0o755)
    host = listener(sockdir / "redis.sock")
    code = 'import socket\ns = socket.socket(socket.AF_UNIX)\nout["unix"] = attempt(s.connect, "/hostsock/redis.sock")'
    try:
        if RESOLVE_UNIX:
            with launched(tmp_path, ro_binds=(f"{sockdir}:/hostsock",)) as spec:
                assert run(spec, code)["unix"] == errno.EACCES
        else:
            with (
                pytest.raises(IsolationUnavailable, match=r"/hostsock/redis\.sock") as caught,
                launched(tmp_path, ro_binds=(f"{sockdir}:/hostsock",)),
            ):
                pass
            assert caught.value.data["reason"] == "host_socket"
        # with AF_UNIX off, the old seccomp rule holds and nothing needs checking
        with launched(tmp_path, unix_sockets=False, ro_binds=(f"{sockdir}:/hostsock",)) as spec:
            assert spec.plan["host_layers"]["unix_sockets"] is False
            denied = run(spec, 'import socket\nout["unix"] = attempt(socket.socket, socket.AF_UNIX)')
            assert denied["unix"] == errno.EPERM
        assert saw_nothing(host)
    finally:
        host.close()


def test_a_host_socket_planted_in_the_workspace_is_refused_or_unreachable(tmp_path: Path) -> None:
    config = strict(tmp_path)
    ws = tmp_path / "ws-owned"
    ws.mkdir()
    planted = listener(ws / "agent.sock")
    try:
        if RESOLVE_UNIX:
            _launch_and_clean(config, ws)
        else:
            with pytest.raises(IsolationUnavailable, match=r"/workspace/agent\.sock"):
                strict_launch(config, "w", ws)
        os.chmod(ws / "agent.sock", 0o755)  # the sandbox identity may not write it: not reachable
        _launch_and_clean(config, ws)
    finally:
        planted.close()


def _launch_and_clean(config: ProcessSandboxConfig, ws: Path) -> None:
    spec = strict_launch(config, "w", ws)
    if spec.cleanup is not None:
        spec.cleanup()


def test_after_launch_a_new_host_socket_is_reachable_only_without_landlock_abi_9(tmp_path: Path) -> None:
    """The documented limit of the launch check: it sees the trees as they are at launch."""
    sockdir = tmp_path / "sock"
    sockdir.mkdir()
    sockdir.chmod(0o755)
    code = 'import socket\ns = socket.socket(socket.AF_UNIX)\nout["unix"] = attempt(s.connect, "/hostsock/late.sock")'
    with launched(tmp_path, ro_binds=(f"{sockdir}:/hostsock",)) as spec:
        layer = spec.plan["host_layers"]["unix_sockets"]
        late = listener(sockdir / "late.sock")
        try:
            out = run(spec, code)
        finally:
            late.close()
    if RESOLVE_UNIX:
        assert out["unix"] == errno.EACCES and "Landlock" in layer["host_path_sockets"]
    else:
        assert out["unix"] == "ok" and "cannot refuse one created later" in layer["host_path_sockets"]


# ----------------------------------------------------------------- the walk itself


def _tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "file").write_text("x")
    os.mkfifo(root / "a" / "fifo")


def test_walk_finds_writable_socket_files_with_a_host_socket_behind_them(tmp_path: Path) -> None:
    root = tmp_path / "t"
    _tree(root)
    held = [listener(root / "a" / "b" / "open.sock"), listener(root / "closed.sock", 0o755),
            listener(root / "a" / "group.sock", 0o775)]  # fmt: skip
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(root / "a" / "stale.sock"))  # a leftover: the file stays, nothing is bound to it
    stale.close()
    os.chmod(root / "a" / "stale.sock", 0o777)
    try:
        os.chown(root / "a" / "group.sock", 0, 4242)
        stranger = sockets.Identity(uid=4343, gids=frozenset({4343}))
        assert sockets.exposed([(str(root), "/w")], stranger) == ["/w/a/b/open.sock"]
        member = sockets.Identity(uid=4343, gids=frozenset({4242}))
        assert sorted(sockets.exposed([(str(root), "/w")], member)) == ["/w/a/b/open.sock", "/w/a/group.sock"]
        # the file's owner proves nothing (a host daemon's tree may have been chowned to the sandbox)
        owner = sockets.Identity(uid=os.stat(root / "closed.sock").st_uid, gids=frozenset())
        assert sorted(sockets.exposed([(str(root), "/w")], owner)) == [
            "/w/a/b/open.sock", "/w/a/group.sock", "/w/closed.sock"]
        # no host socket bound to any of them (as for the sandbox's own): nothing counts...
        assert sockets.exposed([(str(root), "/w")], stranger, host=frozenset()) == []
        # ...and when the host's sockets cannot be listed, every writable one does (fail closed)
        unknown = sockets.exposed([(str(root), "/w")], stranger, host=None)
        assert "/w/a/stale.sock" not in unknown  # the kernel listed them: the stale file has none
        # the socket itself as the bound path, and a path that does not exist
        assert sockets.exposed([(str(root / "a" / "b" / "open.sock"), "/s"), (str(tmp_path / "gone"), "/g")],
                               stranger) == ["/s"]  # fmt: skip
    finally:
        for sock in held:
            sock.close()


def test_walk_fails_closed_when_the_hosts_sockets_cannot_be_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "t"
    root.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(root / "stale.sock"))
    stale.close()
    os.chmod(root / "stale.sock", 0o777)
    monkeypatch.setattr(sockets, "host_bound_files", lambda: None)
    assert sockets.exposed([(str(root), "/w")], sockets.Identity(4343, frozenset())) == ["/w/stale.sock"]


def test_walk_never_follows_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    held = listener(outside / "host.sock")
    root = tmp_path / "t"
    root.mkdir()
    (root / "link").symlink_to(outside)
    (root / "sock-link").symlink_to(outside / "host.sock")
    try:
        assert sockets.exposed([(str(root), "/w")], sockets.Identity(4343, frozenset())) == []
    finally:
        held.close()


def test_walk_refuses_a_tree_deeper_than_it_checks(tmp_path: Path) -> None:
    root = tmp_path / "t"
    deep = root
    for _ in range(sockets.MAX_DEPTH + 1):
        deep = deep / "d"
    deep.mkdir(parents=True)
    with pytest.raises(IsolationUnavailable, match="deep"):
        sockets.exposed([(str(root), "/w")], sockets.Identity(4343, frozenset()))
    assert stat.S_ISDIR(os.lstat(deep).st_mode)
    shutil.rmtree(root)  # pytest's own clean-up recurses and would hit the recursion limit
