"""``agent.run`` in process: the real SDK, tool runner, tools and gateway, without a worker.

The fake context's ``call_host`` is ``ModelGateway.handle`` itself, so every model call goes
through the transport and the gateway exactly as from a worker, minus the pipe.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_core.config import ModelConfig, Secret
from sandbox_core.errors import ConfigError, GatewayError
from sandbox_core.events import EventType
from sandbox_core.gateway import ModelGateway
from sandbox_core.inside.agent import runtime
from tests.helpers import wait_for
from tests.messages_server import MessagesServer, Recorded, Reply, error, text_reply, tool_reply, tool_results

MODEL = "claude-sonnet-5-5"
KEY = "sk-ant-test-" + "feedfacecafe"


class FakeChannel:
    def __init__(self, gateway: ModelGateway, user: str) -> None:
        self.gateway, self.user = gateway, user

    def call_host(self, method: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        assert method == "gateway.request"
        return self.gateway.handle(self.user, params)


class FakeExecutor:
    def __init__(self) -> None:
        self.state: dict[str, Any] = {}


class FakeContext:
    def __init__(self, gateway: ModelGateway, workspace: Path, user: str = "alice") -> None:
        self.channel = FakeChannel(gateway, user)
        self.executor = FakeExecutor()
        self.workspace = workspace
        self.events: list[tuple[EventType, dict[str, Any]]] = []

    async def emit(self, kind: EventType, data: dict[str, Any]) -> None:
        self.events.append((kind, data))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [d for k, d in self.events if k == kind]

    @property
    def text(self) -> str:
        return "".join(d["text"] for d in self.of("text"))


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


@pytest.fixture
async def offline_ctx(workspace: Path) -> AsyncIterator[FakeContext]:
    gateway = ModelGateway(ModelConfig(provider="offline"))
    yield FakeContext(gateway, workspace)
    await gateway.aclose()


@pytest.fixture
def server() -> Iterator[MessagesServer]:
    with MessagesServer() as srv:
        yield srv


@pytest.fixture
async def api_ctx(server: MessagesServer, workspace: Path) -> AsyncIterator[FakeContext]:
    gateway = ModelGateway(ModelConfig(provider="anthropic", api_key=Secret(KEY), base_url=server.url))
    yield FakeContext(gateway, workspace)
    await gateway.aclose()


def _group_alive(pgid: int) -> bool:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


async def test_offline_run_streams_text_tool_use_and_real_output(offline_ctx: FakeContext) -> None:
    result = await runtime.run(offline_ctx, {"prompt": "run: echo hello-from-bash; pwd", "model": MODEL})
    kinds = [k for k, _ in offline_ctx.events]
    first_use, first_result = kinds.index("tool_use"), kinds.index("tool_result")
    assert kinds[0] == "text" and first_use < kinds.index("usage") < first_result
    assert kinds[-1] == "usage" and kinds[-2] == "text"
    (use,) = offline_ctx.of("tool_use")
    assert use["name"] == "bash" and use["input"] == {"command": "echo hello-from-bash; pwd"}
    (res,) = offline_ctx.of("tool_result")
    assert res["id"] == use["id"] and not res["is_error"] and not res["truncated"]
    assert res["output"] == f"hello-from-bash\n{offline_ctx.workspace}"
    assert "hello-from-bash" in offline_ctx.text.split("succeeded")[1]
    usage = offline_ctx.of("usage")
    assert result["usage"] == {k: sum(u[k] for u in usage) for k in ("input_tokens", "output_tokens")}
    assert result["stop_reason"] == "end_turn" and result["turns"] == 2
    assert result["model"] == "offline" and result["requested_model"] == MODEL  # who answered, and what was asked
    assert result["conversation_id"] == "default" and "warnings" not in result
    stats = offline_ctx.channel.gateway.stats()["alice"]
    assert stats["calls"] == 2 and stats["input_tokens"] == result["usage"]["input_tokens"]


async def test_failing_command_reports_exit_code_and_truncates_event_output(offline_ctx: FakeContext) -> None:
    await runtime.run(offline_ctx, {"prompt": "run: head -c 10000 /dev/zero | tr '\\0' x; exit 3", "model": MODEL})
    (res,) = offline_ctx.of("tool_result")
    assert res["is_error"] and res["exit_code"] == 3 and res["truncated"]
    assert len(res["output"].encode()) == runtime.EVENT_OUTPUT_LIMIT


async def test_file_tools_stay_in_the_workspace(offline_ctx: FakeContext, tmp_path: Path) -> None:
    ws = offline_ctx.workspace
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("top secret")
    (ws / "link").symlink_to(outside / "secret.txt")
    (ws / "dirlink").symlink_to(outside)
    prompt = ("read: link\nread: ../outside/secret.txt\nread: " + str(outside / "secret.txt") + "\n"
              "write: dirlink/planted.txt\n```\nx\n```\n"
              "write: notes/new.txt\n```\nhello file\n```\nread: notes/new.txt\n")
    await runtime.run(offline_ctx, {"prompt": prompt, "model": MODEL})
    results = offline_ctx.of("tool_result")
    assert [r["is_error"] for r in results] == [True, True, True, True, False, False]
    assert all("outside the session's working directory" in r["output"] for r in results[:4])
    assert "top secret" not in offline_ctx.text
    assert not (outside / "planted.txt").exists()
    assert (ws / "notes" / "new.txt").read_text() == "hello file\n" and results[5]["output"] == "hello file\n"


async def test_bash_sees_the_workspace_and_no_anthropic_variables(
    offline_ctx: FakeContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-should-not-leak")
    await runtime.run(offline_ctx, {"prompt": "run: echo key=${ANTHROPIC_API_KEY:-none} home=$HOME; cd /tmp && pwd",
                                    "model": MODEL})
    (res,) = offline_ctx.of("tool_result")
    assert res["output"].splitlines() == [f"key=none home={os.environ.get('HOME')}", "/tmp"]


async def test_tools_param_limits_what_runs(offline_ctx: FakeContext) -> None:
    params = {"prompt": "run: touch made\nread: made", "tools": ["read"], "model": MODEL}
    result = await runtime.run(offline_ctx, params)
    assert not (offline_ctx.workspace / "made").exists()
    assert [u["name"] for u in offline_ctx.of("tool_use")] == ["read"]
    assert "Skipped, the bash tool is not enabled" in offline_ctx.text and result["turns"] == 2
    with pytest.raises(ConfigError, match="unknown tool"):
        await runtime.run(offline_ctx, {"prompt": "x", "tools": ["bash", "rm"]})
    with pytest.raises(ConfigError, match="prompt"):
        await runtime.run(offline_ctx, {"prompt": ""})


async def test_max_turns_then_follow_up_continues(offline_ctx: FakeContext) -> None:
    result = await runtime.run(offline_ctx, {"prompt": "run: echo turn-one", "model": MODEL, "max_turns": 1})
    assert result["stop_reason"] == "max_turns" and result["turns"] == 1
    history = offline_ctx.executor.state[runtime.CONVERSATIONS]["default"]
    assert history[-1]["role"] == "user" and history[-1]["content"][0]["type"] == "tool_result"
    offline_ctx.events.clear()
    result = await runtime.run(offline_ctx, {"prompt": "what happened?", "model": MODEL})
    assert result["stop_reason"] == "end_turn" and "turn-one" in offline_ctx.text


async def test_deprecated_model_is_reported(offline_ctx: FakeContext) -> None:
    """Whatever the installed SDK lists as deprecated (its own table, not a name we pick)."""
    from anthropic._data.deprecated_models import DEPRECATED_MODELS

    if not DEPRECATED_MODELS:
        pytest.skip("the installed anthropic SDK lists no deprecated model")
    model = sorted(DEPRECATED_MODELS)[0]
    result = await runtime.run(offline_ctx, {"prompt": "hi", "model": model})
    assert any("deprecated" in w and model in w for w in result["warnings"])


async def test_conversation_continues_through_the_api_and_reset_forgets(
    api_ctx: FakeContext, server: MessagesServer
) -> None:
    def after_tool(recorded: Recorded) -> Reply:
        (result,) = tool_results(recorded)
        assert result["tool_use_id"] == "toolu_1" and result["content"] == "one"
        return text_reply("first done")

    server.push(tool_reply([("toolu_1", "bash", {"command": "echo one"})], text="running"), after_tool,
                text_reply("second"), text_reply("fresh"))
    await runtime.run(api_ctx, {"prompt": "go", "model": MODEL, "system": "be brief", "conversation_id": "c1"})
    result = await runtime.run(api_ctx, {"prompt": "again", "model": MODEL, "conversation_id": "c1"})
    assert result["turns"] == 1 and api_ctx.text.endswith("second")
    first, _, third = server.requests[:3]
    assert first.body["system"] == "be brief" and first.body["stream"] is True
    assert {t["name"] for t in first.body["tools"]} == {"bash", "read", "write", "edit", "glob", "grep"}
    roles = [m["role"] for m in third.body["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    assert third.body["messages"][-1]["content"] == [{"type": "text", "text": "again"}]
    assert all(r.headers["x-api-key"] == KEY and r.headers["authorization"] == f"Bearer {KEY}" for r in server.requests)
    assert await runtime.reset(api_ctx, {"conversation_id": "c1"}) == {"forgotten": ["c1"], "conversations": 0}
    await runtime.run(api_ctx, {"prompt": "new", "model": MODEL, "conversation_id": "c1"})
    assert len(server.requests[3].body["messages"]) == 1


async def test_text_events_arrive_before_the_reply_ends(api_ctx: FakeContext, server: MessagesServer) -> None:
    reply = text_reply("alpha beta gamma")
    reply.hold_at = 4  # start, ping, block start and the first delta go out; the rest waits
    server.push(reply)
    task = asyncio.create_task(runtime.run(api_ctx, {"prompt": "hi", "model": MODEL}))
    await wait_for(lambda: bool(api_ctx.of("text")), what="first text event")
    assert api_ctx.text == "alpha " and not task.done()
    server.release()
    result = await task
    assert api_ctx.text == "alpha beta gamma" and result["stop_reason"] == "end_turn"


async def test_retries_follow_retry_after_then_fail_typed(api_ctx: FakeContext, server: MessagesServer) -> None:
    server.push(error(429, "rate_limit_error", "slow down", [("retry-after", "0.3")]),
                error(529, "overloaded_error", "Overloaded", [("retry-after-ms", "10")]),
                error(529, "overloaded_error", "Overloaded", [("retry-after-ms", "10")]))
    with pytest.raises(GatewayError, match="529") as caught:
        await runtime.run(api_ctx, {"prompt": "hi", "model": MODEL})
    assert caught.value.data == {"status": 529, "error_type": "overloaded_error"}
    assert api_ctx.of("error") == [{"code": "overloaded_error", "message": caught.value.message}]
    first, second, third = server.requests
    assert second.received - first.received >= 0.3
    assert first.headers["x-stainless-retry-count"] == "0" and third.headers["x-stainless-retry-count"] == "2"


async def test_a_500_then_success_recovers(api_ctx: FakeContext, server: MessagesServer) -> None:
    server.push(error(500, "api_error", "boom", [("retry-after-ms", "5")]), text_reply("fine"))
    result = await runtime.run(api_ctx, {"prompt": "hi", "model": MODEL})
    assert result["stop_reason"] == "end_turn" and api_ctx.text == "fine" and len(server.requests) == 2


async def test_stream_cut_midway_is_an_error(api_ctx: FakeContext, server: MessagesServer) -> None:
    reply = text_reply("alpha beta gamma")
    reply.cut_after = 5
    server.push(reply)
    with pytest.raises(GatewayError, match="stream broke"):
        await runtime.run(api_ctx, {"prompt": "hi", "model": MODEL})
    assert api_ctx.of("error")[0]["code"] == "stream_broken" and api_ctx.text.startswith("alpha")
    assert len(server.requests) == 1  # a broken stream is not re-sent


async def test_gateway_refusal_is_not_retried(workspace: Path) -> None:
    gateway = ModelGateway(ModelConfig(provider="anthropic"))
    ctx = FakeContext(gateway, workspace)
    with pytest.raises(GatewayError, match="ANTHROPIC_API_KEY"):
        await runtime.run(ctx, {"prompt": "hi", "model": MODEL})
    assert ctx.of("error")[0]["code"] == "no_api_key"
    assert gateway.stats()["alice"]["refused"] == 1


async def test_a_busy_gateway_is_a_503_the_sdk_retries_after_retry_after(workspace: Path) -> None:
    """The gateway's ``overloaded`` refusal reaches the SDK as the API's busy answer (503
    ``overloaded_error``, ``retry-after``): retried, and in the end a typed 503, not a lost
    connection."""
    from sandbox_core.errors import SandboxError

    gateway = ModelGateway(ModelConfig(provider="offline"))
    ctx = FakeContext(gateway, workspace)
    calls: list[float] = []

    def busy(method: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async def refuse() -> AsyncIterator[dict[str, Any]]:
            calls.append(time.monotonic())
            if len(calls) <= 3:
                raise SandboxError("over model.max_user_calls", data={"reason": "overloaded", "retry_after": 1,
                                                                      "retryable": True})  # fmt: skip
            async for chunk in gateway.handle("alice", params):
                yield chunk

        return refuse()

    ctx.channel.call_host = busy  # type: ignore[method-assign]
    with pytest.raises(GatewayError) as caught:
        await runtime.run(ctx, {"prompt": "hi", "model": MODEL})
    assert caught.value.data == {"status": 503, "error_type": "overloaded_error"}
    assert len(calls) == 3  # the first try and the SDK's two retries
    assert min(b - a for a, b in itertools.pairwise(calls)) >= 0.9  # it waited what retry-after said
    calls.clear()
    calls.append(0.0)  # one more refusal, then the gateway answers
    calls.append(0.0)
    result = await runtime.run(ctx, {"prompt": "hi", "model": MODEL})
    assert result["stop_reason"] == "end_turn" and len(calls) == 4
    await gateway.aclose()


LIVE = "echo first; while [ ! -e go ]; do sleep 0.05; done; echo second"


def _stdout(ctx: FakeContext) -> list[tuple[str | None, str]]:
    return [(d["tool_use_id"], d["data"]) for d in ctx.of("stdout")]


async def test_bash_output_streams_while_the_command_runs(offline_ctx: FakeContext) -> None:
    task = asyncio.create_task(runtime.run(offline_ctx, {"prompt": f"run: {LIVE}", "model": MODEL}))
    try:
        await wait_for(lambda: bool(offline_ctx.of("stdout")), what="the command's first output")
        (use,) = offline_ctx.of("tool_use")
        assert _stdout(offline_ctx) == [(use["id"], "first\n")] and not offline_ctx.of("tool_result")
        (offline_ctx.workspace / "go").touch()
        await asyncio.wait_for(task, 30)
    finally:
        task.cancel()
    kinds = [k for k, _ in offline_ctx.events]
    assert _stdout(offline_ctx) == [(use["id"], "first\n"), (use["id"], "second\n")]
    last_stdout = max(i for i, kind in enumerate(kinds) if kind == "stdout")
    assert kinds.index("tool_use") < kinds.index("stdout") and last_stdout < kinds.index("tool_result")
    (res,) = offline_ctx.of("tool_result")
    assert res["id"] == use["id"] and res["output"] == "first\nsecond"


async def test_each_bash_call_tags_its_output_with_its_own_id(api_ctx: FakeContext, server: MessagesServer) -> None:
    calls = [
        ("toolu_bad", "bash", {"command": "echo same", "timeout_ms": "soon"}),  # fails validation: never runs
        ("toolu_a", "bash", {"command": "echo same"}),
        ("toolu_r", "read", {"file_path": "missing.txt"}),
        ("toolu_b", "bash", {"command": "echo same"}),
        ("toolu_c", "bash", {"command": "echo other; exit 3"}),  # ends the shell: the next call gets a new one
        ("toolu_d", "bash", {"command": "echo after"}),
    ]
    server.push(tool_reply(calls), text_reply("done"))
    await runtime.run(api_ctx, {"prompt": "hi", "model": MODEL})
    assert _stdout(api_ctx) == [("toolu_a", "same\n"), ("toolu_b", "same\n"), ("toolu_c", "other\n"),
                                ("toolu_d", "after\n")]
    results = {r["id"]: r for r in api_ctx.of("tool_result")}
    assert results["toolu_bad"]["is_error"] and results["toolu_c"]["exit_code"] == 3
    assert results["toolu_a"]["output"] == results["toolu_b"]["output"] == "same"


async def test_command_timeout_kills_its_process_group(api_ctx: FakeContext, server: MessagesServer) -> None:
    command = "echo $$ > shell.pid; sleep 30 & sleep 30"
    server.push(tool_reply([("toolu_t", "bash", {"command": command, "timeout_ms": 500})]), text_reply("ok"))
    started = time.monotonic()
    await runtime.run(api_ctx, {"prompt": "hi", "model": MODEL})
    (res,) = api_ctx.of("tool_result")
    assert res["is_error"] and "timed out after 0.5s" in res["output"] and time.monotonic() - started < 10
    pgid = int((api_ctx.workspace / "shell.pid").read_text())
    await wait_for(lambda: not _group_alive(pgid), what="the command's process group to die")


async def test_cancel_kills_the_running_command(offline_ctx: FakeContext) -> None:
    prompt = "run: echo $$ > shell.pid; sleep 60"
    task = asyncio.create_task(runtime.run(offline_ctx, {"prompt": prompt, "model": MODEL}))
    pid_file = offline_ctx.workspace / "shell.pid"
    await wait_for(lambda: pid_file.exists() and pid_file.read_text().strip() != "", what="the command to start")
    pgid = int(pid_file.read_text())
    assert _group_alive(pgid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: not _group_alive(pgid), what="the command's process group to die")
    history = offline_ctx.executor.state[runtime.CONVERSATIONS]["default"]
    assert history[-1]["content"][0]["is_error"] is True  # the unanswered call is closed for next time


async def test_cancel_mid_stream_closes_the_model_stream(api_ctx: FakeContext, server: MessagesServer) -> None:
    reply = text_reply("alpha beta gamma")
    reply.hold_at = 4
    server.push(reply)
    task = asyncio.create_task(runtime.run(api_ctx, {"prompt": "hi", "model": MODEL}))
    await wait_for(lambda: bool(api_ctx.of("text")), what="first text event")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: server.requests[0].disconnected, what="the API to see the client go")


def test_importing_the_worker_and_gateway_does_not_import_anthropic() -> None:
    code = ("import sys, sandbox_core.inside.worker_main, sandbox_core.gateway, sandbox_core.gateway.offline;"
            "print('anthropic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert out.stdout.strip() == "False"
