"""``sandbox exec/run --network none`` and ``--allow HOST[:PORT]``: a request's own narrowing."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.remote import request_body
from sandbox_core.requests import AgentRequest, ExecRequest
from tests.cli.conftest import Invoke, Run

GET = """
import json, sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=20) as r:
        print(json.dumps({"status": r.status}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": e.read().decode()}))
"""


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def test_the_flags_map_onto_the_service_body() -> None:
    assert request_body(ExecRequest(argv=("true",), network=()))[1]["network"] == {"mode": "none"}
    agent = request_body(AgentRequest(prompt="hi", network=("pypi.org", "*.github.com:443")))
    assert agent == ("agent", {"prompt": "hi", "conversation_id": "default",
                               "network": {"allow": ["pypi.org", "*.github.com:443"]}})  # fmt: skip
    assert "network" not in request_body(ExecRequest(argv=("true",)))[1]


def test_contradicting_or_malformed_flags_are_usage_errors(invoke: Invoke) -> None:
    both = invoke("exec", "--network", "none", "--allow", "pypi.org", "--", "true")
    assert both.exit_code == 2 and "contradict" in both.output
    bad = invoke("run", "--allow", "no way", "hi")
    assert bad.exit_code == 2 and "--allow no way" in bad.output
    assert invoke("exec", "--network", "open", "--", "true").exit_code == 2


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")
def test_exec_allow_and_network_none_narrow_the_configured_policy(run_cli: Run, tmp_path: Path, port: int) -> None:
    config = tmp_path / "sandbox.toml"
    config.write_text(
        '[network]\nmode = "allowlist"\nallow = ["registry.test", "other.test"]\n'
        'allow_private = ["127.0.0.1/32"]\nhosts = { "registry.test" = "127.0.0.1", "other.test" = "127.0.0.1" }\n'
    )
    url = f"http://registry.test:{port}/x"

    def get(*flags: str) -> dict[str, object]:
        result = run_cli("--config", str(config), "--profile", "strict", "exec", *flags, "--", "python3", "-c", GET,
                         url)  # fmt: skip
        assert result.returncode == 0, result.stderr
        answer: dict[str, object] = json.loads(result.stdout)
        return answer

    assert get()["status"] == 204
    assert get("--allow", "registry.test").get("status") == 204
    narrowed = get("--allow", "other.test")
    assert narrowed["status"] == 403 and "request network = [other.test]" in str(narrowed["body"])
    assert get("--network", "none")["status"] == 403
    wider = run_cli("--config", str(config), "--profile", "strict", "exec", "--allow", "evil.example", "--", "true")
    assert wider.returncode == 2 and "'evil.example' would widen the network policy" in wider.stderr
