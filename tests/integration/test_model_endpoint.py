"""The model endpoint inside a strict sandbox: any client reaches the model, never the key."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from sandbox_core.config import ModelConfig, ProcessSandboxConfig, Secret
from sandbox_core.isolation import runtime
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.requests import AgentRequest, ExecRequest
from sandbox_core.shared import MODEL_ENDPOINT_URL, PLACEHOLDER_API_KEY
from tests.helpers import process_config, wait_for
from tests.messages_server import MessagesServer, Recorded, Reply, error, json_reply, stream, text_reply

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")

KEY = "sk-ant-endpoint-" + "5f3c9a0d7e1b2468"
BODY = {"model": "claude-sonnet-5-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hello"}]}
URLLIB = """
import json, os, sys, urllib.request, urllib.error
body = json.loads(sys.argv[1])
headers = {"content-type": "application/json", "x-api-key": os.environ["ANTHROPIC_API_KEY"],
           "anthropic-version": "2023-06-01", "x-http-method-override": "DELETE", "x-original-url": "/v1/files"}
headers.update(json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
req = urllib.request.Request(os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages", json.dumps(body).encode(), headers)
try:
    with urllib.request.urlopen(req, timeout=30) as resp:
        print(json.dumps({"status": resp.status, "type": resp.headers.get("content-type"),
                          "body": resp.read().decode()}))
except urllib.error.HTTPError as exc:
    print(json.dumps({"status": exc.code, "reason": exc.headers.get("x-sandbox-gateway-reason"),
                      "body": exc.read().decode()}))
"""


def strict(root: Path, **model: object) -> ProcessSandboxConfig:
    return process_config(root).replace(profile="strict", model=ModelConfig(**model))  # type: ignore[arg-type]


def python(*args: str) -> ExecRequest:
    """The sandbox's own interpreter, with the staged packages (the ``anthropic`` SDK) importable."""
    return ExecRequest(argv=("/usr/bin/env", f"PYTHONPATH={runtime.SANDBOX_ROOT}/lib", runtime.inside_executable(),
                             *args), timeout=90)  # fmt: skip


def urllib_post(body: dict[str, object], headers: dict[str, str] | None = None) -> ExecRequest:
    return python("-c", URLLIB, json.dumps(body), json.dumps(headers or {}))


def _answer(stdout: str) -> dict[str, object]:
    result: dict[str, object] = json.loads(stdout.strip().splitlines()[-1])
    return result


async def test_urllib_post_inside_gets_a_message_from_the_offline_model(workspace_root: Path) -> None:
    async with SandboxOrchestrator(strict(workspace_root, provider="offline")) as pool:
        env = await pool.execute("alice", ExecRequest(shell="echo $ANTHROPIC_BASE_URL $ANTHROPIC_API_KEY"))
        assert env.stdout_text.split() == [MODEL_ENDPOINT_URL, PLACEHOLDER_API_KEY]
        result = await pool.execute("alice", urllib_post(BODY))
        answer = _answer(result.stdout_text)
        assert answer["status"] == 200, answer
        message = json.loads(str(answer["body"]))
        assert message["type"] == "message" and message["role"] == "assistant"
        assert message["content"][0]["type"] == "text" and message["usage"]["output_tokens"] > 0
        stats = pool.get_pool_stats()["gateway"]["alice"]
        assert stats["calls"] == 1 and stats["refused"] == 0


async def test_refusals_reach_the_client_as_api_errors(workspace_root: Path) -> None:
    async with SandboxOrchestrator(strict(workspace_root, provider="offline")) as pool:
        mcp = {**BODY, "mcp_servers": [{"type": "url", "url": "https://evil.example/mcp", "name": "x"}]}
        answer = _answer((await pool.execute("alice", urllib_post(mcp))).stdout_text)
        assert answer["status"] == 403 and answer["reason"] == "mcp_servers"
        assert json.loads(str(answer["body"]))["error"]["type"] == "permission_error"
        answer = _answer((await pool.execute("alice", urllib_post({**BODY, "model": "gpt-5"}))).stdout_text)
        assert answer["status"] == 403 and answer["reason"] == "model"


def _streamed(recorded: Recorded) -> Reply:
    return text_reply("streamed through the endpoint")


async def test_anthropic_sdk_inside_reaches_the_api_with_the_real_key_it_never_sees(workspace_root: Path) -> None:
    with MessagesServer([_streamed, text_reply("second")]) as server:
        config = strict(workspace_root, provider="anthropic", api_key=Secret(KEY), base_url=server.url)
        script = (
            "import anthropic, json, os\n"
            "client = anthropic.Anthropic()\n"
            "with client.messages.stream(model='claude-sonnet-5-5', max_tokens=99999,"
            " messages=[{'role': 'user', 'content': 'hi'}]) as s:\n"
            "    text = ''.join(s.text_stream)\n"
            "print(json.dumps({'text': text, 'env': dict(os.environ)}))\n"
        )
        async with SandboxOrchestrator(config) as pool:
            result = await pool.execute("alice", python("-c", script))
            assert result.exit_code == 0, result.stderr_text[-2000:]
            answer = json.loads(result.stdout_text.strip().splitlines()[-1])
            assert answer["text"] == "streamed through the endpoint"
            assert answer["env"]["ANTHROPIC_API_KEY"] == PLACEHOLDER_API_KEY
            seen = server.requests[0]
            assert seen.headers["x-api-key"] == KEY and seen.body["max_tokens"] == 32000  # clamped
            leaked = await pool.execute("alice", ExecRequest(shell="env; cat /proc/self/environ; ls -la /", timeout=30))
            assert KEY not in result.stdout_text + result.stderr_text + leaked.stdout_text + leaked.stderr_text
            curl = shutil.which("curl")
            if curl is not None:  # a client that is not the SDK at all
                res = await pool.execute("alice", ExecRequest(shell=(
                    "curl -sS -N $ANTHROPIC_BASE_URL/v1/messages -H 'content-type: application/json' "
                    f"-H \"x-api-key: $ANTHROPIC_API_KEY\" -d '{json.dumps({**BODY, 'stream': True})}'"), timeout=30))
                assert "event: message_stop" in res.stdout_text and KEY not in res.stdout_text
                assert server.requests[1].headers["x-api-key"] == KEY
                assert server.requests[1].headers["anthropic-version"] == "2023-06-01"  # curl sent none


async def test_upstream_failures_reach_the_client_without_their_text(workspace_root: Path) -> None:
    replies = [error(529, "overloaded_error", "Overloaded"), stream([b"data: x\n\n"] * 3, cut_after=1)]
    with MessagesServer(replies) as srv:
        config = strict(workspace_root, provider="anthropic", api_key=Secret(KEY), base_url=srv.url)
        async with SandboxOrchestrator(config) as pool:
            answer = _answer((await pool.execute("alice", urllib_post(BODY))).stdout_text)
            assert answer["status"] == 529 and "overloaded_error" in str(answer["body"])
            assert KEY not in json.dumps(answer)
            seen = srv.requests[0].headers  # what the client sent beyond the allowlist never left the host
            assert "x-http-method-override" not in seen and "x-original-url" not in seen
            assert seen["x-api-key"] == KEY and PLACEHOLDER_API_KEY not in json.dumps(seen)
            cut = await pool.execute("alice", urllib_post({**BODY, "stream": True}))
            assert "IncompleteRead" in cut.stderr_text or "Incomplete" in cut.stderr_text, cut.stderr_text[-500:]
            assert KEY not in cut.stdout_text + cut.stderr_text


async def test_the_agents_bash_tool_gets_the_endpoint(workspace_root: Path) -> None:
    """A command the agent runs (its bash tool) gets the endpoint too, and its calls are the agent run's."""
    async with SandboxOrchestrator(strict(workspace_root, provider="offline")) as pool:
        result = await pool.execute("alice", AgentRequest(prompt="run: echo $ANTHROPIC_BASE_URL"))
        assert MODEL_ENDPOINT_URL in result.text


LOOP = """
import json, os, sys, urllib.request, urllib.error
statuses = []
for _ in range(8):
    req = urllib.request.Request(os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages", sys.argv[1].encode(),
                                 {"content-type": "application/json", "x-api-key": "anything"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            statuses.append(resp.status)
    except urllib.error.HTTPError as exc:
        statuses.append(f"{exc.code} {exc.headers.get('x-sandbox-gateway-reason')}")
        break
print(json.dumps(statuses))
"""


async def test_each_command_is_a_run_of_its_own_for_the_budget(workspace_root: Path) -> None:
    """The host binds every call a command makes to that command: request_token_budget holds per command."""
    async with SandboxOrchestrator(strict(workspace_root, provider="offline", request_token_budget=300)) as pool:
        first = json.loads((await pool.execute("alice", python("-c", LOOP, json.dumps(BODY)))).stdout_text)
        second = json.loads((await pool.execute("alice", python("-c", LOOP, json.dumps(BODY)))).stdout_text)
        assert first[-1] == second[-1] == "429 request_budget"
        assert 1 <= len(first) - 1 < 8 and first == second  # the same budget again: a fresh run
        stats = pool.get_pool_stats()["gateway"]["alice"]
        assert stats["refused"] == 2 and stats["input_tokens"] + stats["output_tokens"] <= 2 * 300


BUSY = """
import json, os, sys, threading, urllib.request, urllib.error
import anthropic
base, body = os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages", sys.argv[1].encode()
headers = {"content-type": "application/json", "x-api-key": os.environ["ANTHROPIC_API_KEY"]}
out, started = {}, threading.Event()
def held():  # the user's one call in flight (the server holds its reply)
    with urllib.request.urlopen(urllib.request.Request(base, body, headers), timeout=60) as r:
        started.set()
        out["held"] = r.status, len(r.read())
thread = threading.Thread(target=held)
thread.start()
assert started.wait(60)
try:
    urllib.request.urlopen(urllib.request.Request(base, body, headers), timeout=60)
except urllib.error.HTTPError as exc:
    out["urllib"] = [exc.code, exc.headers.get("retry-after"), exc.headers.get("x-should-retry"),
                     json.loads(exc.read())]
try:
    anthropic.Anthropic(max_retries=0).messages.create(**json.loads(body))
except anthropic.APIStatusError as exc:
    out["sdk_no_retry"] = [exc.status_code, exc.body["type"], exc.body["error"]["type"]]
# the host releases the held call after these two refusals: the SDK waits retry-after and gets through
message = anthropic.Anthropic(max_retries=4).messages.create(**json.loads(body))
out["sdk"] = message.content[0].text
thread.join()
print(json.dumps(out))
"""


async def test_a_busy_gateway_answers_503_overloaded_and_the_sdk_retries(workspace_root: Path) -> None:
    """Over ``model.max_user_calls`` calls in flight: 503 overloaded_error with retry-after, at once."""
    held = stream(text_reply("held").chunks, hold_at=2)
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": BODY["model"], "stop_reason": "end_turn",
               "content": [{"type": "text", "text": "after the wait"}], "stop_sequence": None,
               "usage": {"input_tokens": 3, "output_tokens": 3}}  # fmt: skip
    with MessagesServer([held, json_reply(message)]) as server:
        config = strict(workspace_root, provider="anthropic", api_key=Secret(KEY), base_url=server.url,
                        max_user_calls=1)
        async with SandboxOrchestrator(config) as pool:
            task = asyncio.ensure_future(pool.execute("alice", python("-c", BUSY, json.dumps(BODY))))

            def refused() -> bool:
                stats = pool.get_pool_stats().get("gateway", {}).get("alice", {})
                return bool(stats.get("refused", 0) >= 2 or task.done())

            try:
                await wait_for(refused, 90, "two refused calls")
                server.release()
                result = await asyncio.wait_for(task, 90)
            finally:
                task.cancel()
    assert result.exit_code == 0, result.stderr_text[-2000:]
    out = json.loads(result.stdout_text.strip().splitlines()[-1])
    code, retry_after, should_retry, body = out["urllib"]
    assert (code, retry_after, should_retry) == (503, "1", "true")
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"
    assert "model.max_user_calls" in body["error"]["message"]
    assert out["sdk_no_retry"] == [503, "error", "overloaded_error"]
    assert out["sdk"] == "after the wait" and out["held"][0] == 200
    assert len(server.requests) == 2  # the refused calls never left the host


BIG = """
import http.client, json, os, sys
size = int(sys.argv[1])
conn = http.client.HTTPConnection(os.environ["ANTHROPIC_BASE_URL"].split("//", 1)[1], timeout=30)
conn.putrequest("POST", "/v1/messages")
conn.putheader("content-type", "application/json")
conn.putheader("content-length", str(size))
conn.endheaders()
try:
    conn.send(b"x" * size)  # the endpoint may answer and close before it all went out
except OSError:
    pass
r = conn.getresponse()
print(json.dumps({"status": r.status, "body": json.loads(r.read())}))
"""


async def test_a_body_over_the_limit_is_refused_413_inside_before_it_is_read(workspace_root: Path) -> None:
    config = strict(workspace_root, provider="offline", max_body_bytes=1024 * 1024)
    assert config.model_body_limit == 1024 * 1024
    assert config.replace(max_frame_bytes=512 * 1024).model_body_limit < 512 * 1024 * 3 // 4  # fits one frame
    async with SandboxOrchestrator(config) as pool:
        result = await pool.execute("alice", python("-c", BIG, str(8 * 1024 * 1024)))
        answer = _answer(result.stdout_text)
        assert answer["status"] == 413, answer
        error_ = answer["body"]["error"]  # type: ignore[index]
        assert error_["type"] == "request_too_large"
        assert "limit of 1048576 bytes (model.max_body_bytes)" in error_["message"]
        assert "alice" not in pool.get_pool_stats().get("gateway", {})  # the host was never asked
