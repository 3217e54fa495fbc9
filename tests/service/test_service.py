"""The service on a real uvicorn server: Unix socket and loopback TCP."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest

from sandbox_core.errors import ConfigError, SandboxError
from sandbox_core.events import Event
from sandbox_core.service.auth import TokenTable, principal_for_uid
from sandbox_core.service.client import ServiceClient, ServiceError
from tests.helpers import pid_alive, wait_for, wait_for_async
from tests.service.conftest import USERS, Live


async def collect(client: ServiceClient, kind: str, body: dict[str, object]) -> list[Event]:
    return [e async for e in client.stream(kind, body)]


async def test_unix_socket_is_private_and_streams_exec(unix_service: Live) -> None:
    assert unix_service.socket_path is not None
    mode = stat.S_IMODE(unix_service.socket_path.stat().st_mode)
    assert mode == 0o600
    async with ServiceClient(unix_service.target) as client:
        assert (await client.health())["status"] == "ok"
        events = await collect(client, "exec", {"shell": "echo one; echo two >&2; exit 3"})
        kinds = [e.type for e in events]
        assert kinds[0] == "started" and kinds[-1] == "done"
        assert "".join(e.data["data"] for e in events if e.type == "stdout") == "one\n"
        assert events[-1].data["exit_code"] == 3
        seqs = [e.seq for e in events]
        assert seqs == list(range(1, len(events) + 1))  # SSE ids are the run's sequence
        stats = await client.stats()  # root over the socket is an operator
        assert stats["requests"]["ok"] == 1


async def test_sse_wire_format_has_ids_and_keepalives(unix_service: Live) -> None:
    assert unix_service.socket_path is not None
    transport = httpx2.AsyncHTTPTransport(uds=str(unix_service.socket_path))
    async with httpx2.AsyncClient(base_url="http://x", transport=transport, timeout=30) as http:
        body = {"shell": "sleep 1.2; echo late"}
        async with http.stream("POST", "/v1/runs/exec", json=body) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            raw = (await response.aread()).decode()
    assert ": keep-alive" in raw  # keepalive_seconds = 0.5 in the test config
    assert "id: 1\nevent: started\ndata: {" in raw
    assert "event: done" in raw


async def test_socket_peer_uid_maps_to_user_role(unix_service: Live) -> None:
    assert unix_service.socket_path is not None
    os.chmod(unix_service.socket_path, 0o666)
    os.chmod(unix_service.socket_path.parent, 0o755)
    probe = (
        "import http.client, socket, sys\n"
        "class C(http.client.HTTPConnection):\n"
        "    def connect(self):\n"
        "        self.sock = socket.socket(socket.AF_UNIX); self.sock.connect(sys.argv[1])\n"
        "c = C('x'); c.request('GET', '/v1/stats'); print(c.getresponse().status)\n"
    )
    result = await asyncio.to_thread(
        subprocess.run,
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-I", "-c", probe,
         str(unix_service.socket_path)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.stdout.strip() == "403", result.stderr
    assert principal_for_uid(65534).role == "user" and principal_for_uid(0).role == "operator"


async def test_tcp_requires_a_valid_bearer_token(tcp_service: Live) -> None:
    async with httpx2.AsyncClient(base_url=tcp_service.target, timeout=10) as http:
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": "Basic x"}):
            response = await http.get("/v1/runs", headers=headers)
            assert response.status_code == 401 and response.text == "unauthorized"
        assert (await http.get("/v1/health")).status_code == 200
    async with ServiceClient(tcp_service.target, "wrong-token-0123456789") as client:
        with pytest.raises(ServiceError, match="401"):
            await client.runs()


async def test_operator_endpoints_refuse_user_tokens(tcp_service: Live) -> None:
    async with ServiceClient(tcp_service.target, tcp_service.tokens["user00"]) as user:
        for call in (user.stats(), user.workers(), user.launch(1), user.stop_workers(everything=True)):
            with pytest.raises(ServiceError, match="403"):
                await call
    async with ServiceClient(tcp_service.target, tcp_service.tokens["ops"]) as ops:
        assert "workers" in await ops.stats()
        assert await ops.workers() == []
    async with httpx2.AsyncClient(base_url=tcp_service.target, timeout=10) as http:
        headers = {"Authorization": f"Bearer {tcp_service.tokens['ops']}"}
        text = (await http.get("/metrics", headers=headers)).text
        assert "# TYPE sandbox_workers gauge" in text and 'sandbox_requests_total{outcome="ok"}' in text
        schema = (await http.get("/openapi.json")).json()
        assert schema["openapi"].startswith("3.") and "/v1/runs/agent" in schema["paths"]


async def test_user_b_cannot_see_stream_or_cancel_user_a_run(tcp_service: Live) -> None:
    a = ServiceClient(tcp_service.target, tcp_service.tokens["user01"])
    b = ServiceClient(tcp_service.target, tcp_service.tokens["user02"])
    gate = tcp_service.config.workspace_for("user01") / "go"
    try:
        stream = a.stream("exec", {"shell": "echo started; while [ ! -e go ]; do sleep 0.01; done; echo fin"})
        first = [await anext(stream), await anext(stream)]
        assert first[1].data["data"] == "started\n"
        run_id = a.last_run_id
        assert run_id is not None
        async with httpx2.AsyncClient(base_url=tcp_service.target, timeout=10) as http:
            headers = {"Authorization": f"Bearer {tcp_service.tokens['user02']}"}
            for method, path in (("GET", f"/v1/runs/{run_id}"), ("GET", f"/v1/runs/{run_id}/events"),
                                 ("POST", f"/v1/runs/{run_id}/cancel")):
                assert (await http.request(method, path, headers=headers)).status_code == 404
        assert await b.runs() == []
        assert [r["run_id"] for r in await a.runs()] == [run_id]
        gate.touch()
        rest = [e async for e in stream]
        assert rest[-1].type == "done"
        # the owner can re-attach and replay from an event id
        replay = [e async for e in a.attach(run_id, after=1)]
        assert replay[0].seq == 2 and replay[-1].type == "done"
    finally:
        await a.aclose()
        await b.aclose()


async def test_twenty_concurrent_streams_without_cross_talk(tcp_service: Live) -> None:
    async def one(user: str) -> tuple[str, str]:
        async with ServiceClient(tcp_service.target, tcp_service.tokens[user]) as client:
            events = await collect(client, "exec", {"shell": "pwd; echo $HOME"})
            return user, "".join(e.data["data"] for e in events if e.type == "stdout")

    results = await asyncio.gather(*(one(u) for u in USERS))
    for user, out in results:
        ws = str(tcp_service.config.workspace_for(user))
        assert out == f"{ws}\n{ws}\n"


async def test_client_disconnect_cancels_run_and_kills_processes(unix_service: Live) -> None:
    client = ServiceClient(unix_service.target)
    stream = client.stream("exec", {"shell": "echo $$ > pid; echo started; sleep 300"})
    async for event in stream:
        if event.type == "stdout" and "started" in event.data["data"]:
            break
    run_id = client.last_run_id
    await stream.aclose()
    await client.aclose()
    pid = int((unix_service.config.workspace_for(_me()) / "pid").read_text())
    async with ServiceClient(unix_service.target) as other:

        async def cancelled() -> bool:
            runs = {r["run_id"]: r for r in await other.runs()}
            return bool(runs[str(run_id)]["state"] == "cancelled")

        await wait_for_async(cancelled, 10, "run cancelled")
    await wait_for(lambda: not pid_alive(pid), 10, "the run's process to die")


def _me() -> str:
    from sandbox_core.service.auth import principal_for_uid

    return principal_for_uid(os.getuid()).user_id


async def test_bad_bodies_are_400(unix_service: Live) -> None:
    assert unix_service.socket_path is not None
    transport = httpx2.AsyncHTTPTransport(uds=str(unix_service.socket_path))
    async with httpx2.AsyncClient(base_url="http://x", transport=transport, timeout=10) as http:
        assert (await http.post("/v1/runs/exec", content=b"not json")).status_code == 400
        assert (await http.post("/v1/runs/exec", json={"argv": []})).status_code == 400
        assert (await http.post("/v1/runs/agent", json={"prompt": ""})).status_code == 400
        deep = await http.post("/v1/runs/exec", content=b"[" * 100_000 + b"]" * 100_000)
        assert deep.status_code == 400 and "nests deeper" in deep.json()["error"]  # not a 500


def test_token_file_rules(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[[token]]\ntoken = "short"\nuser = "a"\n')
    path.chmod(0o600)
    with pytest.raises(ConfigError):
        TokenTable.from_file(path)
    path.write_text('[[token]]\ntoken = "0123456789abcdef0123"\nuser = "a"\nrole = "operator"\n')
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        TokenTable.from_file(path)
    path.chmod(0o600)
    table = TokenTable.from_file(path)
    principal = table.lookup("0123456789abcdef0123")
    assert principal is not None and principal.is_operator and table.lookup("nope") is None


def test_sse_error_event_becomes_typed_error() -> None:
    from sandbox_core.errors import RequestTimeout, from_wire

    payload = json.loads(json.dumps(RequestTimeout("too slow").to_wire()))
    assert isinstance(from_wire(payload), RequestTimeout)
    assert issubclass(ServiceError, SandboxError)


def test_the_default_socket_is_never_under_tmp(tmp_path: Path) -> None:
    """Without XDG_RUNTIME_DIR both ends use the system socket; a server that cannot make it says what to set."""
    from sandbox_core.config import ProcessSandboxConfig
    from sandbox_core.service.paths import SYSTEM_SOCKET, default_socket_path
    from sandbox_core.service.server import bind_unix

    assert default_socket_path(ProcessSandboxConfig(), environ={}) == Path(SYSTEM_SOCKET)
    assert SYSTEM_SOCKET == "/run/sandbox/sandbox.sock"
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"set XDG_RUNTIME_DIR, or service.socket_path \(--socket\)") as info:
        bind_unix(tmp_path / "file" / "sandbox" / "sandbox.sock")
    assert info.value.field == "service.socket_path"



PEER = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect": exc.errno})); sys.exit(0)
body = b'{"shell": "true"}'
s.sendall(b"POST /v1/runs/exec HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
          b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
data = b""
while chunk := s.recv(65536):
    data += chunk
print(json.dumps({"status": data.split(b" ", 2)[1].decode(), "body": data.decode(errors="replace")}))
"""


def _as(uid: int, groups: list[int]):  # type: ignore[no-untyped-def]
    def switch() -> None:
        os.setgroups(groups)
        os.setgid(groups[0] if groups else uid)
        os.setuid(uid)

    return switch


@pytest.mark.skipif(os.getuid() != 0, reason="switching to other uids needs root")
async def test_socket_group_lets_its_members_connect_as_themselves(tmp_path: Path) -> None:
    from tests.service.conftest import unix_service_with

    async with unix_service_with(tmp_path, socket_group="4242") as live:
        sock = live.socket_path
        assert sock is not None
        st, parent = sock.stat(), sock.parent.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, 4242)
        assert (stat.S_IMODE(parent.st_mode), parent.st_gid) == (0o750, 4242)

        async def peer(uid: int, groups: list[int]) -> dict[str, object]:
            proc = await asyncio.create_subprocess_exec(
                "/usr/bin/python3", "-I", "-c", PEER, str(sock), stdout=asyncio.subprocess.PIPE,
                preexec_fn=_as(uid, groups))  # fmt: skip
            out, _ = await proc.communicate()
            result: dict[str, object] = json.loads(out)
            return result

        member = await peer(4343, [4242])
        assert member["status"] == "200", member
        assert '"user_id":"uid4343"' in str(member["body"])  # mapped to its own user, not the server's
        outsider = await peer(4344, [4344])
        assert outsider == {"connect": 13}  # EACCES: not in the group


async def test_a_service_stopped_by_cancellation_can_be_started_again_in_the_same_process(tmp_path: Path) -> None:
    """serve() cancelled (as an embedding program stops it) must close uvicorn's listeners: a
    stale loop registration would otherwise swallow the next listener on the same fd number."""
    from tests.service.conftest import tcp_service_with

    for round_ in range(3):
        (tmp_path / str(round_)).mkdir()
        async with (tcp_service_with(tmp_path / str(round_)) as live,
                    ServiceClient(live.target, live.tokens["user01"]) as client):  # fmt: skip
            assert (await asyncio.wait_for(client.health(), 10))["status"] == "ok"
            assert await asyncio.wait_for(client.runs(), 10) == []
