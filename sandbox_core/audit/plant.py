"""Plant the audit's canaries and listeners on the host, and remove them afterwards.

Canary values never leave the host: the sandbox gets their SHA-256 digests
(:meth:`Plants.digests`) and the host searches what comes back for the raw values.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.isolation.launch import prepare_workspace
from sandbox_core.shared import CANARY_PREFIX, sha256_hex, unix_address

CANARY_VAR = "SANDBOX_AUDIT_CANARY"
"""The host environment variable that holds the environment canary during an audit."""
SANDBOX_SET_VARS = frozenset({"HOME", "PWD", "LC_CTYPE"})
"""Variables the sandbox sets itself (HOME = the workspace, PWD from bwrap's chdir, LC_CTYPE
from Python's locale coercion): accepted outside the allowlist only with a value that is not
the host's own (a host value would mean it was inherited)."""


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
class Plants:
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
async def planted(config: ProcessSandboxConfig, user_id: str) -> AsyncIterator[Plants]:
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

        plants = Plants(canaries, canary_dir, secret_file, world_file, peer_user, peer_dir, peer_file,
                         workspace, scratch, nonce)  # fmt: skip
        stack.callback(remove_strays, config, plants)

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


def remove_strays(config: ProcessSandboxConfig, plants: Plants) -> None:
    """Remove files a probe managed to create outside the workspace (it removes them itself too)."""
    names = (f".sandbox-audit-{plants.nonce}-w", f".sandbox-audit-{plants.nonce}-s")
    for directory in (str(config.workspace_root), str(plants.peer_dir), "/etc", "/var/tmp", "/usr", "/"):
        for name in names:
            path = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(path).st_mode):
                    os.unlink(path)
