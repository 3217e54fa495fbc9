"""Controlled egress with real strict workers: the in-sandbox proxy, the host's policy and relay.

Only loopback is ever reached: a loopback HTTP server and a TCP echo server stand in for a
registry, reached by names mapped with ``network.hosts`` and allowed with
``allow_private = ["127.0.0.1/32"]``. Every refusal is checked twice: the documented answer
inside, and the server having seen nothing.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import shutil
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_core.config import NetworkPolicy, ProcessSandboxConfig
from sandbox_core.errors import ConfigError
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.requests import ExecRequest
from sandbox_core.shared import EGRESS_PROXY_PORT
from tests.helpers import process_config, wait_for

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")

PATTERN = bytes(range(256)) * 4096  # 1 MiB


class _Registry(http.server.BaseHTTPRequestHandler):
    """``GET /bytes/N`` answers N bytes of a fixed pattern; anything else a short text."""

    protocol_version = "HTTP/1.1"
    seen: list[str]

    def do_GET(self) -> None:
        self.server.seen.append(self.path)  # type: ignore[attr-defined]
        if self.path.startswith("/bytes/"):
            size = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            sent = 0
            while sent < size:
                chunk = PATTERN[: min(len(PATTERN), size - sent)]
                try:
                    self.wfile.write(chunk)
                except OSError:
                    return
                sent += len(chunk)
            return
        body = f"registry says hello to {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.connections += 1  # type: ignore[attr-defined]
        while data := self.request.recv(65536):
            self.request.sendall(data)


class Servers:
    def __init__(self) -> None:
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
        self.http.seen = []  # type: ignore[attr-defined]
        self.http.daemon_threads = True
        self.echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
        self.echo.connections = 0  # type: ignore[attr-defined]
        self.echo.daemon_threads = True
        for server in (self.http, self.echo):
            threading.Thread(target=server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.http.server_address[1])

    @property
    def echo_port(self) -> int:
        return int(self.echo.server_address[1])

    @property
    def seen(self) -> list[str]:
        return self.http.seen  # type: ignore[attr-defined, no-any-return]

    @property
    def echo_connections(self) -> int:
        return self.echo.connections  # type: ignore[attr-defined, no-any-return]

    def close(self) -> None:
        for server in (self.http, self.echo):
            server.shutdown()
            server.server_close()


@pytest.fixture
def servers() -> Iterator[Servers]:
    s = Servers()
    yield s
    s.close()


HOSTS = {
    "registry.test": "127.0.0.1",
    "api.github.com": "127.0.0.1",
    "github.com": "127.0.0.1",
    "github.com.evil.example": "127.0.0.1",
    "bad.github.com": "127.0.0.1",
    "internal.test": "10.20.30.40",
    "other.test": "127.0.0.1",
}


def config(root: Path, **network: object) -> ProcessSandboxConfig:
    base = NetworkPolicy(
        mode="allowlist",
        allow=("registry.test", "other.test", "*.github.com", "internal.test"),
        deny=("bad.github.com",),
        hosts=HOSTS,
        allow_private=("127.0.0.1/32",),
    )
    fields = {**base.__dict__, **network}
    return process_config(root).replace(profile="strict", network=NetworkPolicy(**fields))


def py(code: str, **kw: object) -> ExecRequest:
    return ExecRequest(argv=("python3", "-c", code), timeout=30, **kw)  # type: ignore[arg-type]


GET = """
import json, sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1] if len(sys.argv) > 1 else {url!r}, timeout=20) as r:
        print(json.dumps({{"status": r.status, "body": r.read().decode()}}))
except urllib.error.HTTPError as e:
    print(json.dumps({{"status": e.code, "reason": e.reason, "body": e.read().decode()}}))
"""

TUNNEL = """
import http.client, json
conn = http.client.HTTPConnection("127.0.0.1", {proxy}, timeout=20)
conn.set_tunnel({host!r}, {port})   # what pip (urllib3) does for https, minus TLS
try:
    conn.request("GET", "/tunnelled")
    r = conn.getresponse()
    print(json.dumps({{"status": r.status, "body": r.read().decode()}}))
except OSError as e:
    print(json.dumps({{"error": str(e)}}))
"""


def tunnel(host: str, port: int) -> ExecRequest:
    return py(TUNNEL.format(proxy=EGRESS_PROXY_PORT, host=host, port=port))


async def run_json(pool: SandboxOrchestrator, user: str, request: ExecRequest) -> dict[str, object]:
    result = await pool.execute(user, request)
    assert result.exit_code == 0, result.stderr_text
    answer: dict[str, object] = json.loads(result.stdout_text)
    return answer


async def test_an_allowed_name_works_through_connect_and_plain_http(workspace_root: Path, servers: Servers,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sandbox_core.egress")
    async with SandboxOrchestrator(config(workspace_root)) as pool:
        plain = await run_json(pool, "alice", py(GET.format(url=f"http://registry.test:{servers.port}/simple/six/")))
        assert plain == {"status": 200, "body": "registry says hello to /simple/six/\n"}
        tunnelled = await run_json(pool, "alice", tunnel("registry.test", servers.port))
        assert tunnelled == {"status": 200, "body": "registry says hello to /tunnelled\n"}
        curl = await pool.execute("alice", ExecRequest(shell=f"curl -sS -p http://api.github.com:{servers.port}/c"))
        assert curl.stdout_text == "registry says hello to /c\n", curl.stderr_text
    assert servers.seen == ["/simple/six/", "/tunnelled", "/c"]
    allowed = [r.getMessage() for r in caplog.records if "egress allowed" in r.getMessage()]
    assert len(allowed) == 3
    assert all("user=alice" in m and f"port={servers.port}" in m and "address=127.0.0.1" in m for m in allowed)


async def test_commands_get_the_proxy_in_both_spellings(workspace_root: Path) -> None:
    async with SandboxOrchestrator(config(workspace_root)) as pool:
        result = await pool.execute("alice", ExecRequest(shell="env | grep -i _proxy= | sort"))
    url = f"http://127.0.0.1:{EGRESS_PROXY_PORT}"
    env = dict(line.split("=", 1) for line in result.stdout_text.splitlines())
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        assert env[name] == env[name.lower()] == url
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1,::1"


NOT_LISTED = "network.allow_private does not list it"


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("evil.example", "evil.example:{port} is not in network.allow"),
        ("github.com.evil.example", "github.com.evil.example:{port} is not in network.allow"),
        ("github.com", "github.com:{port} is not in network.allow"),  # *.github.com is only below it
        ("evilgithub.com", "evilgithub.com:{port} is not in network.allow"),
        ("bad.github.com", "bad.github.com:{port} matches network.deny entry 'bad.github.com'"),
        ("internal.test", "internal.test resolves to 10.20.30.40 (private), and " + NOT_LISTED),
        ("127.0.0.2", "127.0.0.2:{port} is an IP address, and " + NOT_LISTED),
        ("[::1]", "::1:{port} is an IP address, and " + NOT_LISTED),
    ],
)
async def test_refusals_answer_403_naming_host_and_policy(workspace_root: Path, servers: Servers, host: str,
                                                           reason: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sandbox_core.egress")
    want = reason.format(port=servers.port)
    async with SandboxOrchestrator(config(workspace_root)) as pool:
        plain = await run_json(pool, "alice", py(GET.format(url=f"http://{host}:{servers.port}/x")))
        tunnelled = await run_json(pool, "alice", tunnel(host.strip("[]"), servers.port))
    assert plain["status"] == 403 and plain["reason"] == want
    body = str(plain["body"])
    bare = host.strip("[]")
    assert f"host: {bare}\n" in body and f"port: {servers.port}\n" in body
    assert "policy: network.mode = allowlist; network.allow = [registry.test, other.test, *.github.com" in body
    assert tunnelled == {"error": f"Tunnel connection failed: 403 {want}"}  # the same status line
    assert servers.seen == []
    refused = [r.getMessage() for r in caplog.records if "egress refused" in r.getMessage()]
    assert len(refused) == 2 and all(f"user=alice host={bare} port={servers.port}" in m for m in refused)


async def test_a_loopback_name_or_literal_needs_allow_private(workspace_root: Path, servers: Servers) -> None:
    async with SandboxOrchestrator(config(workspace_root, allow_private=())) as pool:
        by_name = await run_json(pool, "alice", py(GET.format(url=f"http://registry.test:{servers.port}/n")))
        literal = await run_json(pool, "alice", tunnel("127.0.0.1", servers.port))  # NO_PROXY skips it: ask explicitly
    assert by_name["status"] == 403
    assert by_name["reason"] == "registry.test resolves to 127.0.0.1 (loopback), and " + NOT_LISTED
    want = f"127.0.0.1:{servers.port} is an IP address, and {NOT_LISTED}"
    assert literal == {"error": f"Tunnel connection failed: 403 {want}"}
    assert servers.seen == []


async def test_a_direct_socket_bypassing_the_proxy_reaches_nothing(workspace_root: Path, servers: Servers) -> None:
    code = f"""
import socket
for port in ({servers.port}, {servers.echo_port}):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5)
        print("CONNECTED")
    except OSError as e:
        print(type(e).__name__)
"""
    async with SandboxOrchestrator(config(workspace_root)) as pool:
        result = await pool.execute("alice", py(code))
        noproxy = await pool.execute(
            "alice", ExecRequest(shell=f"curl -sS --noproxy '*' http://registry.test:{servers.port}/direct", timeout=30)
        )
    assert result.stdout_text == "ConnectionRefusedError\nConnectionRefusedError\n"
    assert noproxy.exit_code != 0 and "resolve" in noproxy.stderr_text.lower()  # no DNS inside either
    assert servers.seen == [] and servers.echo_connections == 0


async def test_mode_none_says_why_on_the_first_line(workspace_root: Path, servers: Servers) -> None:
    cfg = process_config(workspace_root).replace(profile="strict")  # the default: network.mode = none
    async with SandboxOrchestrator(cfg) as pool:
        plain = await run_json(pool, "alice", py(GET.format(url=f"http://registry.test:{servers.port}/x")))
        curl = await pool.execute("alice", ExecRequest(shell="curl -sS -i -p http://pypi.org/simple/six/", timeout=30))
    why = "this sandbox has no network access (network.mode = none)"
    assert plain["status"] == 403 and plain["reason"] == why
    assert curl.stdout_text.startswith(f"HTTP/1.1 403 {why}\r\n")
    assert servers.seen == []


async def test_per_user_and_per_request_policy_only_narrow(workspace_root: Path, servers: Servers) -> None:
    cfg = config(workspace_root, users={"bob": ("other.test",)})
    url = f"http://registry.test:{servers.port}/u"
    other = f"http://other.test:{servers.port}/o"
    async with SandboxOrchestrator(cfg) as pool:
        alice = await run_json(pool, "alice", py(GET.format(url=url)))
        bob = await run_json(pool, "bob", py(GET.format(url=url)))
        bob_other = await run_json(pool, "bob", py(GET.format(url=other)))
        narrowed = await run_json(pool, "alice", py(GET.format(url=url), network=("other.test",)))
        none_at_all = await run_json(pool, "alice", py(GET.format(url=other), network=()))
        with pytest.raises(ConfigError) as wider:  # refused before any worker is asked
            await pool.execute("alice", py(GET.format(url="http://evil.example/"), network=("evil.example",)))
        with pytest.raises(ConfigError) as bob_wider:
            await pool.execute("bob", py(GET.format(url=url), network=("registry.test",)))
        after = await run_json(pool, "alice", py(GET.format(url=url)))  # the narrowing ended with its request
    assert alice["status"] == 200 and bob_other["status"] == 200 and after["status"] == 200
    assert bob["status"] == 403 and bob["reason"] == f"registry.test:{servers.port} is not in network.users.bob"
    assert narrowed["status"] == 403 and "is not in this request's network list" in str(narrowed["reason"])
    assert "request network = [other.test]" in str(narrowed["body"])  # the answer names the policy
    assert none_at_all["status"] == 403
    assert wider.value.data["entry"] == "evil.example" and "not within network.allow" in wider.value.message
    assert bob_wider.value.data["entry"] == "registry.test" and "network.users.bob" in bob_wider.value.message
    assert servers.seen == ["/u", "/o", "/u"]


async def test_workers_are_pooled_per_network_policy(workspace_root: Path, servers: Servers) -> None:
    """A narrowed request never runs on a worker bound to another policy, and its worker stays narrowed."""
    url = f"http://registry.test:{servers.port}/p"
    async with SandboxOrchestrator(config(workspace_root).replace(max_workers_per_user=1)) as pool:
        wide = await pool.execute("alice", py(GET.format(url=url)))
        narrow = await pool.execute("alice", py(GET.format(url=url), network=("other.test",)))
        again = await pool.execute("alice", py(GET.format(url=url), network=("other.test",)))
        worker = pool._workers[again.worker_id]
        assert worker.egress is not None and worker.egress.request_network == ("other.test",)  # also between requests
        wide_again = await pool.execute("alice", py(GET.format(url=url)))
        recycled = pool.get_pool_stats()
        both = await pool.execute("alice", ExecRequest(argv=("true",), network=("other.test", "registry.test")))
        reordered = await pool.execute("alice", ExecRequest(argv=("true",), network=("registry.test", "other.test")))
    assert both.worker_id == reordered.worker_id  # the same entries in another order: the same policy
    assert narrow.worker_id != wide.worker_id and again.worker_id == narrow.worker_id
    assert wide_again.worker_id not in (wide.worker_id, narrow.worker_id)
    assert [json.loads(r.stdout_text)["status"] for r in (wide, narrow, again, wide_again)] == [200, 403, 403, 200]
    assert servers.seen == ["/p", "/p"]
    assert "recycled" in json.dumps(recycled)


async def test_file_transfers_take_a_narrowed_worker_and_bind_no_policy(workspace_root: Path, servers: Servers) -> None:
    """A file transfer needs no network: it takes the user's worker whatever its narrowing (no
    recycle), and on a worker bound to no narrowing yet it binds none (the next request's policy
    binds it)."""
    url = f"http://registry.test:{servers.port}/f"
    async with SandboxOrchestrator(config(workspace_root).replace(max_workers_per_user=1)) as pool:
        narrow = await pool.execute("alice", py(GET.format(url=url), network=("other.test",)))
        await pool.files.put("alice", "note.txt", b"kept")
        assert await pool.files.get("alice", "note.txt") == b"kept"
        after = await pool.execute("alice", py(GET.format(url=url), network=("other.test",)))
        assert after.worker_id == narrow.worker_id and pool.get_pool_stats()["recycled"] == 0
        assert json.loads(after.stdout_text)["status"] == 403  # still narrowed: the transfer widened nothing
        await pool.stop_workers(user_id="alice")
        await pool.files.put("alice", "first.txt", b"a transfer first")
        (fresh,) = [w for w in pool._workers.values() if w.user_id == "alice"]
        assert fresh.egress is not None and not fresh.network_bound
        wide = await pool.execute("alice", py(GET.format(url=url)))
        assert wide.worker_id == fresh.worker_id and json.loads(wide.stdout_text)["status"] == 200
        assert pool.get_pool_stats()["recycled"] == 0
    assert servers.seen == ["/f"]


HOLD = """
import socket, sys, time
socks = []
for i in range({n}):
    s = socket.create_connection(("127.0.0.1", {proxy}), timeout=20)
    s.sendall(b"CONNECT registry.test:{port} HTTP/1.1\\r\\n\\r\\n")
    head = b""
    while b"\\r\\n\\r\\n" not in head:
        part = s.recv(4096)
        if not part:
            break
        head += part
    print(head.split(b"\\r\\n")[0].decode(), flush=True)
    socks.append(s)
socks[0].close()
deadline = time.monotonic() + 10  # the host frees the slot once both ends of the tunnel closed
while True:
    s = socket.create_connection(("127.0.0.1", {proxy}), timeout=20)
    s.sendall(b"CONNECT registry.test:{port} HTTP/1.1\\r\\n\\r\\n")
    line = s.recv(4096).split(b"\\r\\n")[0].decode()
    if " 200 " in line or time.monotonic() > deadline:
        break
    s.close()
    time.sleep(0.02)
print(line)
"""


async def test_the_connection_cap(workspace_root: Path, servers: Servers) -> None:
    async with SandboxOrchestrator(config(workspace_root, max_connections=2)) as pool:
        result = await pool.execute("alice", py(HOLD.format(n=3, proxy=EGRESS_PROXY_PORT, port=servers.echo_port)))
        worker = pool._workers[result.worker_id]
        assert worker.egress is not None
        await wait_for(lambda: worker.egress is not None and worker.egress.open_connections == 0, 10, "closed")
    lines = result.stdout_text.splitlines()
    assert lines[:2] == ["HTTP/1.1 200 Connection established"] * 2
    assert lines[2] == "HTTP/1.1 403 this worker has 2 connections open (network.max_connections)"
    assert lines[3] == "HTTP/1.1 200 Connection established"  # one closed: room again
    assert servers.echo_connections == 3


async def test_the_byte_cap_cuts_the_connection_and_refuses_more(workspace_root: Path, servers: Servers) -> None:
    code = GET.replace("r.read().decode()", "len(r.read())")
    async with SandboxOrchestrator(config(workspace_root, max_mb=1)) as pool:
        big = await pool.execute("alice", py(code.format(url=f"http://registry.test:{servers.port}/bytes/4000000")))
        again = await run_json(pool, "alice", py(GET.format(url=f"http://registry.test:{servers.port}/small")))
    assert big.exit_code != 0 and "IncompleteRead" in big.stderr_text
    assert again["status"] == 403 and again["reason"] == "this worker relayed its 1 MiB (network.max_mb)"
    assert servers.seen == ["/bytes/4000000"]


async def test_bytes_arrive_as_sent_both_ways(workspace_root: Path, servers: Servers) -> None:
    size = 24 * 1024 * 1024
    digest = hashlib.sha256((PATTERN * 24)[:size]).hexdigest()
    download = f"""
import hashlib, urllib.request
h = hashlib.sha256()
with urllib.request.urlopen("http://registry.test:{servers.port}/bytes/{size}") as r:
    while chunk := r.read(1 << 20):
        h.update(chunk)
print(h.hexdigest())
"""
    echo = f"""
import hashlib, os, socket, threading
s = socket.create_connection(("127.0.0.1", {EGRESS_PROXY_PORT}))
s.sendall(b"CONNECT registry.test:{servers.echo_port} HTTP/1.1\\r\\n\\r\\n")
assert s.recv(4096).startswith(b"HTTP/1.1 200")
data = os.urandom(8 << 20)
def send():
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=send).start()
back = bytearray()
while chunk := s.recv(1 << 20):
    back += chunk
print(hashlib.sha256(data).hexdigest() == hashlib.sha256(back).hexdigest(), len(back))
"""
    async with SandboxOrchestrator(config(workspace_root)) as pool:
        down = await pool.execute("alice", py(download))
        both = await pool.execute("alice", py(echo))
    assert down.stdout_text.strip() == digest, down.stderr_text
    assert both.stdout_text.strip() == f"True {8 << 20}", both.stderr_text


def test_allowlist_needs_the_strict_profile(workspace_root: Path) -> None:
    with pytest.raises(ConfigError) as info:
        process_config(workspace_root, network=NetworkPolicy(mode="allowlist", allow=("pypi.org",)))
    assert info.value.field == "network.mode" and "strict profile" in info.value.message


async def test_every_decision_goes_into_the_record(workspace_root: Path, servers: Servers, tmp_path: Path) -> None:
    from sandbox_core.record import Record

    record = Record(tmp_path / "record.sqlite3")
    try:
        async with SandboxOrchestrator(config(workspace_root), record=record) as pool:
            ok = await run_json(pool, "erin", py(GET.format(url=f"http://registry.test:{servers.port}/ok")))
            assert ok["status"] == 200
            refused = await run_json(pool, "erin", py(GET.format(url=f"http://bad.github.com:{servers.port}/no")))
            assert refused["status"] == 403
        assert record.flush()
        entries = [e for e in record.entries(kind="egress")]
        assert [(e["user_id"], e["detail"]["host"], e["detail"]["allowed"]) for e in entries] == [
            ("erin", "registry.test", True), ("erin", "bad.github.com", False)]
        assert entries[0]["detail"]["address"] == "127.0.0.1" and entries[1]["detail"]["reason"] == "denied"
    finally:
        record.close()
    assert servers.seen == ["/ok"]


DENIED_LOOP = """
import socket
for i in range({n}):
    s = socket.create_connection(("127.0.0.1", {proxy}), timeout=20)
    s.sendall(b"CONNECT bad.github.com:{port} HTTP/1.1\\r\\n\\r\\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 403 "), i
    s.close()
print("done")
"""


async def test_a_loop_of_denied_connects_cannot_flood_the_log(workspace_root: Path, servers: Servers, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Every refusal is answered, but past network.log_refusals only a count reaches the log and the record."""
    from sandbox_core.record import Record

    caplog.set_level(logging.INFO, logger="sandbox_core.egress")
    record = Record(tmp_path / "record.sqlite3")
    try:
        async with SandboxOrchestrator(config(workspace_root, log_refusals=5), record=record) as pool:
            code = DENIED_LOOP.format(n=60, proxy=EGRESS_PROXY_PORT, port=servers.echo_port)
            result = await pool.execute("mallory", py(code))
            assert result.stdout_text == "done\n", result.stderr_text
            worker = pool._workers[result.worker_id]
            assert worker.egress is not None and worker.egress.stats["refused"] == 60
        assert record.flush()
        rows = [e["detail"] for e in record.entries(kind="egress")]
    finally:
        record.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "sandbox_core.egress"]
    refused = [m for m in lines if "reason=denied" in m]
    assert len(refused) == 5 and all("user=mallory host=bad.github.com" in m for m in refused)
    summary = [m for m in lines if "more refusals suppressed" in m]
    assert len(summary) == 1 and "user=mallory: 55 more refusals suppressed in the last 60 s" in summary[0]
    assert [r["reason"] for r in rows] == ["denied"] * 5 + ["suppressed"] and rows[-1]["suppressed"] == 55
    assert servers.echo_connections == 0
