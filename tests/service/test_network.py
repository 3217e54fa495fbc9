"""Per-request network narrowing through the service: the body's ``network``, checked and enforced."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx2
import pytest

from sandbox_core.config import NetworkPolicy
from sandbox_core.service.client import ServiceClient
from tests.helpers import short_socket_path, wait_for
from tests.service.conftest import Live, _run, service_config

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")

GET = """
import json, sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=20) as r:
        print(json.dumps({"status": r.status, "body": r.read().decode()}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "reason": e.reason, "body": e.read().decode()}))
"""


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.seen.append(self.path)  # type: ignore[attr-defined]
        body = b"hello\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def registry() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.seen = []  # type: ignore[attr-defined]
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Live]:
    sock = short_socket_path("test")
    network = NetworkPolicy(mode="allowlist", allow=("registry.test", "other.test"), allow_private=("127.0.0.1/32",),
                            hosts={"registry.test": "127.0.0.1", "other.test": "127.0.0.1"})  # fmt: skip
    config = service_config(tmp_path, "strict", socket_path=sock).replace(network=network)
    async for where in _run(config, None):
        await wait_for(sock.exists, 5, "socket")
        yield Live(where, config, {}, sock)


async def _get(client: ServiceClient, url: str, network: object = None) -> dict[str, object]:
    body: dict[str, object] = {"argv": ["python3", "-c", GET, url], "timeout": 30}
    if network is not None:
        body["network"] = network
    events = [e async for e in client.stream("exec", body)]
    out = "".join(str(e.data.get("data", "")) for e in events if e.type == "stdout")
    answer: dict[str, object] = json.loads(out)
    return answer


async def test_a_request_narrows_the_network_and_never_widens_it(
    service: Live, registry: http.server.ThreadingHTTPServer
) -> None:
    url = f"http://registry.test:{registry.server_address[1]}/n"
    async with ServiceClient(service.target) as client:
        assert (await _get(client, url))["status"] == 200
        narrowed = await _get(client, url, {"allow": ["other.test"]})  # allowed by config, narrowed away
        assert narrowed["status"] == 403 and "request network = [other.test]" in str(narrowed["body"])
        none = await _get(client, url, {"mode": "none"})
        assert none["status"] == 403
        assert (await _get(client, url, {"allow": ["registry.test"]}))["status"] == 200
    assert service.socket_path is not None
    transport = httpx2.AsyncHTTPTransport(uds=str(service.socket_path))
    async with httpx2.AsyncClient(base_url="http://x", transport=transport, timeout=10) as http:
        wider = await http.post("/v1/runs/exec", json={"argv": ["true"], "network": {"allow": ["evil.example"]}})
        assert wider.status_code == 400
        assert wider.json()["field"] == "network.allow" and wider.json()["entry"] == "evil.example"
        assert "would widen the network policy" in wider.json()["error"]
        for bad in ({"mode": "open"}, {"allow": "registry.test"}, {"allow": ["no way"]}, ["registry.test"]):
            answer = await http.post("/v1/runs/agent", json={"prompt": "hi", "network": bad})
            assert answer.status_code == 400 and answer.json()["field"] == "network", bad
    assert registry.seen == ["/n", "/n"]  # type: ignore[attr-defined]


async def test_a_terminal_narrows_the_network_and_a_widening_opening_is_refused(
    service: Live, registry: http.server.ThreadingHTTPServer
) -> None:
    """``WS /v1/terminal`` takes the same ``network`` as a run: a narrowed terminal's program gets
    the 403 of its narrowing; an opening that would widen the policy is refused (4400) before any
    worker is asked."""
    from websockets.asyncio.client import unix_connect

    url = f"http://registry.test:{registry.server_address[1]}/t"
    async with ServiceClient(service.target) as client:
        async with client.terminal(["python3", "-c", GET, url], network=("other.test",)) as term:
            seen = bytearray()
            while chunk := await term.read():
                seen += chunk
            assert await term.wait() == 0
        narrowed = json.loads(bytes(seen).decode().strip().splitlines()[-1])
        assert narrowed["status"] == 403 and "request network = [other.test]" in str(narrowed["body"])
        async with client.terminal(["python3", "-c", GET, url]) as term:  # the configured policy
            seen = bytearray()
            while chunk := await term.read():
                seen += chunk
        assert json.loads(bytes(seen).decode().strip().splitlines()[-1])["status"] == 200
    assert service.socket_path is not None
    for opening, field in (({"allow": ["evil.example"]}, "would widen"), ({"mode": "open"}, "network")):
        async with unix_connect(str(service.socket_path), "ws://x/v1/terminal") as ws:
            await ws.send(json.dumps({"argv": ["true"], "network": opening}))
            refusal = json.loads(await ws.recv())
            assert refusal["type"] == "error" and field in refusal["error"]["message"], refusal
            await ws.wait_closed()
            assert ws.close_code == 4400
    assert registry.seen == ["/t"]  # type: ignore[attr-defined]
