"""Plant the audit's canaries and listeners on the host, and remove them afterwards.

Canary values never leave the host: the sandbox gets their SHA-256 digests
(:meth:`Plants.digests`) and the host searches what comes back for the raw values.

Where the audit plants, and why root can do it safely. The host is root and a sandbox can
write its workspace, so the host must never open, chmod, chown or unlink *by path* inside a
workspace: a process in the sandbox can swap any directory on that path for a symlink (a
slow maze of them, to widen the window) between any two system calls. So the audit plants
into no live workspace. It audits a fresh throwaway user, ``audit-<nonce>`` (a sandbox
depends on its user id only through the workspace, so this is the sandbox any user gets),
beside a fresh peer user ``audit-peer-<nonce>``:

1. Both workspaces are made with ``mkdirat`` under a descriptor of ``workspace_root``, which
   is root's and never mounted into a sandbox; ``mkdirat`` fails on an existing name, so no
   worker for either user exists or has ever existed. They are root's 0700: until they are
   handed over, no other uid can create, rename or remove anything in them.
2. Everything is planted then, through descriptors (:class:`~sandbox_core.audit.tree.Tree`):
   ``mkdirat``/``openat(O_EXCL|O_NOFOLLOW)`` relative to held directories, ``bind`` through
   ``/proc/self/fd/N/``, modes set on held inodes.
3. The trees are checked to hold exactly the inodes planted, then given to the sandbox
   identity with ``fchown`` on the held descriptors (children first); only after that does
   the audit start a worker. From then on the host does nothing by path inside them.
4. Afterwards both are removed by :func:`~sandbox_core.audit.tree.remove_tree`, which resolves
   no path of more than one component below the held ``workspace_root`` descriptor: each entry
   is ``fstatat(AT_SYMLINK_NOFOLLOW)``-ed, entered only by ``openat(O_DIRECTORY|O_NOFOLLOW)``
   from its open parent, removed by ``unlinkat``/``rmdir`` of its one name. ``unlink`` never
   follows a symlink, so a link (soft or hard) to a host file loses only its name; a
   directory swapped for a symlink fails the ``O_NOFOLLOW`` open and is unlinked as the link
   it is; a directory moved meanwhile is still the one held; other filesystems are not walked.

The canary directory is a fresh root-owned 0755 directory in ``/var/tmp`` (sticky: only root
may rename or remove root's entry there), handled the same way; stray files a probe may
have made in ``/etc``, ``/usr``, ``/``, ``/var/tmp`` and ``workspace_root`` are unlinked by name
in those root-owned directories, regular files only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox_core.audit import tree
from sandbox_core.audit.tree import Tree
from sandbox_core.config import NetworkPolicy, ProcessSandboxConfig
from sandbox_core.isolation.launch import host_sockets_checked_at_launch, workspace_owner
from sandbox_core.shared import CANARY_PREFIX, proxy_environment, sha256_hex

CANARY_VAR = "SANDBOX_AUDIT_CANARY"
"""The host environment variable that holds the environment canary during an audit."""
SANDBOX_SET_VARS = frozenset({"HOME", "PWD", "LC_CTYPE", *proxy_environment()})
"""Variables the sandbox sets itself (HOME = the workspace, PWD from bwrap's chdir, LC_CTYPE
from Python's locale coercion, the proxy variables of the strict profile): accepted outside the
allowlist only with a value that is not the host's own (a host value would mean it was inherited)."""
EGRESS_ALLOWED_ADDRESS = "127.77.0.1"
"""Where the egress listener the audit's policy allows is bound (``allow_private`` lists it alone)..."""
EGRESS_OTHER_ADDRESS = "127.77.0.2"
"""...and its twin on the same port, which nothing may reach (a private name maps here, and the
IP-literal probe asks for it)."""
EGRESS_NAMES = {
    "allowed": "allowed.audit.sandbox.test", "denied": "denied.audit.sandbox.test",
    "private": "private.audit.sandbox.test",
}  # fmt: skip


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

    def tagged(self, kind: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
        """Like :meth:`handler`, and records the first line the connection sends (its tag)."""

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            entry = {"listener": kind, "peer": str(writer.get_extra_info("peername"))[:120], "at": time.time(),
                     "tag": None}  # fmt: skip
            self.seen.append(entry)
            with contextlib.suppress(Exception):
                entry["tag"] = (await asyncio.wait_for(reader.readline(), 5.0)).decode(errors="replace")[:80].strip()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

        return on_connect

    def count(self, prefix: str) -> int:
        return sum(1 for s in self.seen if s["listener"].startswith(prefix))


def egress_policy(config: ProcessSandboxConfig) -> NetworkPolicy:
    """The network policy the audit's worker runs with: the planted names only, so the audit
    exercises the host's enforcement whatever the operator allows (``strict`` only: the other
    profile cannot enforce one)."""
    if config.profile != "strict":
        return config.network
    names = EGRESS_NAMES
    return NetworkPolicy(
        mode="allowlist", allow=tuple(names.values()), deny=(names["denied"],),
        hosts={names["allowed"]: EGRESS_ALLOWED_ADDRESS, names["denied"]: EGRESS_ALLOWED_ADDRESS,
               names["private"]: EGRESS_OTHER_ADDRESS},
        allow_private=(f"{EGRESS_ALLOWED_ADDRESS}/32",), max_connections=8,
    )  # fmt: skip


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
    egress_port: int = 0
    """Port of the egress listeners (on :data:`EGRESS_ALLOWED_ADDRESS` and :data:`EGRESS_OTHER_ADDRESS`)."""
    unix_path: str = ""
    unix_in_workspace: str | None = None
    abstract: str = ""
    recorder: _Recorder = field(default_factory=_Recorder)
    host_env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    decoy_pid: int | None = None
    audited_user: str = ""
    """The throwaway user whose fresh workspace the audit planted in and ran its worker for."""
    planting: dict[str, Any] = field(default_factory=dict)
    """How the planting went (fresh, owners, modes, tampering seen at hand-over): evidence."""
    socket_tree: Path | None = None
    """A workspace holding a listening host socket that the launcher must refuse to mount
    (where the launch check, not Landlock, keeps path sockets out: see isolation.sockets)."""
    launch_check: dict[str, Any] | None = None
    """What launching a sandbox on :attr:`socket_tree` did (filled in by the run)."""

    def describe(self) -> dict[str, Any]:
        """Where each canary and listener was (paths, port, pid; never the values)."""
        return {
            "env_var": CANARY_VAR,
            "audited_user": self.audited_user,
            "audited_workspace": str(self.workspace),
            "canary_dir": str(self.canary_dir),
            "secret_file": str(self.secret_file),
            "world_file": str(self.world_file),
            "peer_user": self.peer_user,
            "peer_workspace": str(self.peer_dir),
            "scratch_dir": str(self.workspace / self.scratch),
            "tcp_listener": f"127.0.0.1:{self.tcp_port}",
            "egress_listeners": [f"{a}:{self.egress_port}" for a in (EGRESS_ALLOWED_ADDRESS, EGRESS_OTHER_ADDRESS)],
            "unix_listeners": [p for p in (self.unix_path, self.unix_in_workspace and str(self.workspace /
                               self.unix_in_workspace), "@" + self.abstract,
                               self.socket_tree and str(self.socket_tree / "agent.sock")) if p],
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


@contextlib.asynccontextmanager
async def planted(config: ProcessSandboxConfig) -> AsyncIterator[Plants]:
    """Plant every canary and listener for a fresh throwaway user; remove all of it on the way out."""
    async with contextlib.AsyncExitStack() as stack:
        canaries = {label: _canary() for label in ("env", "cmdline", "secret_file", "world_file", "peer_workspace",
                                                   "api_key")}
        nonce = secrets.token_hex(6)
        rec = _Recorder()
        canary_dir, host_sock = _plant_canary_dir(stack, nonce, canaries)
        await _serve_unix(stack, rec, "unix:host-path", host_sock)

        scratch = f".sba-{nonce}"
        launch_checked = host_sockets_checked_at_launch(config)
        planting = await _plant_workspaces(stack, rec, config, nonce, canaries["peer_workspace"], launch_checked)
        audited, peer = planting["audited_user"], planting["peer_user"]
        workspace, peer_dir = config.workspace_root / audited, config.workspace_root / peer
        plants = Plants(canaries, canary_dir, canary_dir / "secret.txt", canary_dir / "world.txt", peer,
                        peer_dir, peer_dir / "notes.txt", workspace, scratch, nonce, recorder=rec,
                        audited_user=audited, planting=planting)  # fmt: skip
        plants.unix_path = str(canary_dir / "host.sock")
        if launch_checked:  # the audited workspace would not launch: the check gets a tree of its own
            plants.socket_tree = config.workspace_root / planting["socket_tree"]
        else:
            plants.unix_in_workspace = f"{scratch}/u.sock"

        tcp = await asyncio.start_server(rec.handler("tcp"), host="127.0.0.1", port=0)
        stack.push_async_callback(_close_server, tcp)
        plants.tcp_port = int(tcp.sockets[0].getsockname()[1])
        egress = await asyncio.start_server(rec.tagged("egress:allowed"), host=EGRESS_ALLOWED_ADDRESS, port=0)
        stack.push_async_callback(_close_server, egress)
        plants.egress_port = int(egress.sockets[0].getsockname()[1])
        twin = await asyncio.start_server(rec.tagged("egress:other"), EGRESS_OTHER_ADDRESS, plants.egress_port)
        stack.push_async_callback(_close_server, twin)
        plants.abstract = f"sandbox-audit-{nonce}"
        await _serve_unix(stack, rec, "unix:abstract", _abstract_socket(plants.abstract))

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


def _plant_canary_dir(
    stack: contextlib.AsyncExitStack, nonce: str, canaries: dict[str, str]
) -> tuple[Path, socket.socket]:
    """The canary files and the host-path socket, in a fresh root-owned 0755 directory."""
    parent = _canary_parent()
    parent_fd = tree.open_dir(parent)
    stack.callback(os.close, parent_fd)
    canary = _fresh_tree(stack, parent_fd, f"sandbox-audit-{nonce}-{secrets.token_hex(4)}", 0o755)
    canary.write(canary.fd, "secret.txt", f"db_password={canaries['secret_file']}\n", 0o600)
    canary.write(canary.fd, "world.txt", f"api_token={canaries['world_file']}\n", 0o644)
    sock = canary.bind(canary.fd, "host.sock")
    canary.close()
    return Path(parent) / canary.name, sock


async def _plant_workspaces(
    stack: contextlib.AsyncExitStack,
    rec: _Recorder,
    config: ProcessSandboxConfig,
    nonce: str,
    peer_secret: str,
    launch_checked: bool,
) -> dict[str, Any]:
    """The audited and the peer workspace, planted while root's and then handed over.

    Plants the peer's secret file and, in the audited workspace, the scratch dir with a
    listening socket (``launch_checked``: in a third workspace of its own, which the launcher
    must refuse). Returns the evidence of :func:`_hand_over`.
    """
    config.workspace_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    root_fd = tree.open_dir(config.workspace_root)
    stack.callback(os.close, root_fd)
    audited = _fresh_tree(stack, root_fd, f"audit-{nonce}")
    peer = _fresh_tree(stack, root_fd, f"audit-peer-{nonce}")
    stack.callback(_remove_strays, root_fd, nonce)
    peer.write(peer.fd, "notes.txt", f"peer_secret={peer_secret}\n", 0o600)
    scratch_fd = audited.mkdir(audited.fd, f".sba-{nonce}")
    if not launch_checked:
        await _serve_unix(stack, rec, "unix:in-workspace", audited.bind(scratch_fd, "u.sock"))
        return _hand_over(config, root_fd, (audited, peer))
    held = _fresh_tree(stack, root_fd, f"audit-sock-{nonce}")
    await _serve_unix(stack, rec, "unix:launch-check", held.bind(held.fd, "agent.sock"))
    return {**_hand_over(config, root_fd, (audited, peer, held)), "socket_tree": held.name}


def _fresh_tree(stack: contextlib.AsyncExitStack, parent_fd: int, name: str, mode: int = 0o700) -> Tree:
    """A new directory the exit stack removes (by descriptors) however the audit ends."""
    made = Tree(parent_fd, name, mode)
    stack.callback(tree.remove_tree, parent_fd, name, made.identity)
    stack.callback(made.close)
    return made


def _hand_over(config: ProcessSandboxConfig, root_fd: int, trees: tuple[Tree, ...]) -> dict[str, Any]:
    """Check the trees hold exactly what was planted, give them to the sandbox identity.

    Returns the evidence for the ``audit.planting`` check.
    """
    root = os.fstat(root_fd)
    tampered = [problem for made in trees for problem in made.tampered()]
    owners = [workspace_owner(config, made.name) for made in trees]
    for made, owner in zip(trees, owners, strict=True):
        made.hand_over(owner)
        made.close()
    return {
        "audited_user": trees[0].name,
        "peer_user": trees[1].name,
        "planted_as_uid": os.geteuid(),
        "workspace_root_owner": root.st_uid,
        "workspace_root_mode": oct(stat.S_IMODE(root.st_mode)),
        "workspace_root_private": root.st_uid == os.geteuid() and not root.st_mode & 0o022,
        "tampered": tampered,
        "handed_to": list(owners[0]) if owners[0] is not None else None,
        "peer_handed_to": list(owners[1]) if owners[1] is not None else None,
        "handed_over_at": time.monotonic(),
    }


def _abstract_socket(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("\0" + name)
    except BaseException:
        sock.close()
        raise
    return sock


async def _serve_unix(stack: contextlib.AsyncExitStack, rec: _Recorder, kind: str, sock: socket.socket) -> None:
    """Accept (and record) connections on ``sock``; the server closes with the exit stack."""
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


def _remove_strays(root_fd: int, nonce: str) -> None:
    """Unlink files a probe managed to create outside the workspace (it removes them itself too)."""
    names = (f".sandbox-audit-{nonce}-w", f".sandbox-audit-{nonce}-s")
    tree.unlink_files(root_fd, names)
    for directory in ("/etc", "/var/tmp", "/usr", "/"):
        try:
            fd = tree.open_dir(directory)
        except OSError:
            continue
        try:
            tree.unlink_files(fd, names)
        finally:
            os.close(fd)
