"""The agent end to end: orchestrator → real worker process → SDK → pipe → gateway → model.

Workers use the ``process`` profile here (the strict profile's own tests live with it); the
model is the offline provider, or the local Messages API server through the ``anthropic``
provider with a real-looking key that must reach the server and nothing inside the sandbox.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_core.config import ModelConfig, ProcessSandboxConfig, Secret
from sandbox_core.errors import GatewayError, RequestCancelled
from sandbox_core.events import Event
from sandbox_core.gateway import ModelGateway
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.requests import AgentRequest, RawRequest
from tests.helpers import process_config, wait_for
from tests.messages_server import MessagesServer, Recorded, Reply, error, text_reply, tool_reply, tool_results

MODEL = "claude-sonnet-5-5"
KEY = "sk-ant-e2e-" + "5ca1ab1e0ddba11"


def _group_alive(pgid: int) -> bool:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


@pytest.fixture
def server() -> Iterator[MessagesServer]:
    with MessagesServer() as srv:
        yield srv


async def _pool(config: ProcessSandboxConfig) -> AsyncIterator[tuple[SandboxOrchestrator, ModelGateway]]:
    gateway = ModelGateway(config.model)
    try:
        async with SandboxOrchestrator(config, gateway=gateway) as pool:
            yield pool, gateway
    finally:
        await gateway.aclose()


@pytest.fixture
async def offline(workspace_root: Path) -> AsyncIterator[tuple[SandboxOrchestrator, ModelGateway]]:
    async for pair in _pool(process_config(workspace_root, request_timeout=60.0)):
        yield pair


@pytest.fixture
async def api(
    workspace_root: Path, server: MessagesServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[SandboxOrchestrator, ModelGateway]]:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)  # on the host, where the gateway may use it
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    model = ModelConfig(provider="anthropic", api_key=Secret(KEY), base_url=server.url)
    async for pair in _pool(process_config(workspace_root, request_timeout=60.0, model=model)):
        yield pair


async def _events(pool: SandboxOrchestrator, request: AgentRequest | RawRequest) -> list[Event]:
    return [event async for event in pool.execute_stream("alice", request)]


def _data(events: list[Event], kind: str) -> list[dict[str, Any]]:
    return [e.data for e in events if e.type == kind]


async def test_offline_agent_runs_commands_in_the_sandbox(
    offline: tuple[SandboxOrchestrator, ModelGateway], workspace_root: Path
) -> None:
    pool, gateway = offline
    events = await _events(pool, AgentRequest(prompt="run: echo sandboxed > proof.txt; cat proof.txt; ls",
                                              model=MODEL))
    kinds = [e.type for e in events]
    assert kinds[0] == "started" and kinds[-1] == "done" and kinds.index("tool_use") < kinds.index("tool_result")
    (result,) = _data(events, "tool_result")
    assert result["output"] == "sandboxed\nproof.txt" and result["is_error"] is False
    assert (workspace_root / "alice" / "proof.txt").read_text() == "sandboxed\n"
    done = events[-1].data
    assert done["stop_reason"] == "end_turn" and done["turns"] == 2 and done["profile"] == "process"
    assert "sandboxed" in "".join(d["text"] for d in _data(events, "text"))
    assert gateway.stats()["alice"]["calls"] == 2
    assert pool.get_pool_stats()["gateway"]["alice"]["input_tokens"] == done["usage"]["input_tokens"]
    reset = await pool.execute("alice", RawRequest("agent.reset", {"conversation_id": "default"}))
    assert reset.result["forgotten"] == ["default"]


async def test_tool_output_streams_from_the_worker_while_the_command_runs(
    offline: tuple[SandboxOrchestrator, ModelGateway], workspace_root: Path
) -> None:
    pool, _ = offline
    command = "echo first; while [ ! -e go ]; do sleep 0.05; done; echo second"
    events: list[Event] = []

    async def consume() -> None:
        async for event in pool.execute_stream("alice", AgentRequest(prompt=f"run: {command}", model=MODEL)):
            events.append(event)

    task = asyncio.create_task(consume())
    try:
        await wait_for(lambda: any(e.type == "stdout" for e in events) or task.done(), 30, "the first output")
        (use,) = _data(events, "tool_use")
        seen = [(e.data["tool_use_id"], e.chunk()) for e in events if e.type == "stdout"]
        assert seen == [(use["id"], b"first\n")]
        assert not _data(events, "tool_result")
        (workspace_root / "alice" / "go").touch()
        await asyncio.wait_for(task, 30)
    finally:
        task.cancel()
    kinds = [e.type for e in events]
    outputs = [e for e in events if e.type == "stdout"]
    assert [e.chunk() for e in outputs] == [b"first\n", b"second\n"]
    assert {e.data["tool_use_id"] for e in outputs} == {use["id"]}
    assert kinds.index("tool_use") < events.index(outputs[0]) < events.index(outputs[1]) < kinds.index("tool_result")
    assert _data(events, "tool_result")[0]["output"] == "first\nsecond" and kinds[-1] == "done"


async def test_key_reaches_the_api_and_nothing_in_the_sandbox(
    api: tuple[SandboxOrchestrator, ModelGateway], server: MessagesServer
) -> None:
    pool, _ = api
    probe = "env; tr '\\0' '\\n' < /proc/$PPID/environ; cat /proc/$PPID/cmdline; ls -a ~; echo probe-done"

    def check_probe(recorded: Recorded) -> Reply:
        (result,) = tool_results(recorded)
        assert "probe-done" in result["content"] and KEY not in result["content"]
        return text_reply("clean")

    server.push(tool_reply([("toolu_p", "bash", {"command": probe})]), check_probe)
    events = await _events(pool, AgentRequest(prompt="probe", model=MODEL))
    assert events[-1].data["stop_reason"] == "end_turn"
    assert "".join(d["text"] for d in _data(events, "text")) == "clean"
    (result,) = _data(events, "tool_result")
    assert "probe-done" in result["output"] and KEY not in result["output"]
    assert [r.headers["x-api-key"] for r in server.requests] == [KEY, KEY]
    pid = events[0].data["pid"]
    assert KEY.encode() not in Path(f"/proc/{pid}/environ").read_bytes()


async def test_text_arrives_incrementally_through_the_worker(
    api: tuple[SandboxOrchestrator, ModelGateway], server: MessagesServer
) -> None:
    pool, _ = api
    reply = text_reply("alpha beta gamma")
    reply.hold_at = 4  # the first text delta goes out, the rest waits for release()
    server.push(reply)
    texts: list[str] = []
    async for event in pool.execute_stream("alice", AgentRequest(prompt="hi", model=MODEL)):
        if event.type == "text":
            texts.append(event.data["text"])
            if len(texts) == 1:
                server.release()
    assert texts == ["alpha ", "beta g", "amma"]


async def test_api_errors_reach_the_caller_typed(
    api: tuple[SandboxOrchestrator, ModelGateway], server: MessagesServer
) -> None:
    pool, gateway = api
    server.push(*(error(529, "overloaded_error", "Overloaded", [("retry-after-ms", "5")]) for _ in range(3)))
    events: list[Event] = []
    with pytest.raises(GatewayError, match="529") as caught:
        async for event in pool.execute_stream("alice", AgentRequest(prompt="hi", model=MODEL)):
            events.append(event)
    assert caught.value.data["error_type"] == "overloaded_error"
    assert _data(events, "error")[0]["code"] == "overloaded_error" and len(server.requests) == 3
    assert gateway.stats()["alice"]["errors"] == 3


async def test_cancel_kills_the_running_tool(
    offline: tuple[SandboxOrchestrator, ModelGateway], workspace_root: Path
) -> None:
    pool, _ = offline
    pid_file = workspace_root / "alice" / "shell.pid"

    async def consume() -> None:
        async for _event in pool.execute_stream("alice", AgentRequest(prompt="run: echo $$ > shell.pid; sleep 60",
                                                                      model=MODEL)):
            pass

    task = asyncio.create_task(consume())
    await wait_for(lambda: pid_file.exists() and pid_file.read_text().strip() != "", 30, "the command to start")
    pgid = int(pid_file.read_text())
    task.cancel()
    with pytest.raises((asyncio.CancelledError, RequestCancelled)):
        await task
    await wait_for(lambda: not _group_alive(pgid), 10, "the command's process group to die")


async def test_cancel_mid_stream_reaches_the_api(
    api: tuple[SandboxOrchestrator, ModelGateway], server: MessagesServer
) -> None:
    pool, _ = api
    reply = text_reply("alpha beta gamma")
    reply.hold_at = 4
    server.push(reply)
    seen = asyncio.Event()

    async def consume() -> None:
        async for event in pool.execute_stream("alice", AgentRequest(prompt="hi", model=MODEL)):
            if event.type == "text":
                seen.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(seen.wait(), 30)
    task.cancel()
    with pytest.raises((asyncio.CancelledError, RequestCancelled)):
        await task
    await wait_for(lambda: server.requests[0].disconnected, 10, "the API to see the stream closed")


async def test_provider_switch_keeps_workers_and_conversation(tmp_path: Path) -> None:
    from tests.helpers import process_config

    root = tmp_path / "ws"
    root.mkdir()
    config = process_config(root).replace(model=ModelConfig(provider="offline"))
    async with SandboxOrchestrator(config) as pool:
        first = await pool.execute("zed", AgentRequest(prompt="run: echo one", conversation_id="c"))
        providers = [pool.gateway.provider]
        await pool.set_model_config(ModelConfig(provider="anthropic", api_key=Secret("sk-test"),
                                                base_url="http://127.0.0.1:9"))
        providers.append(pool.gateway.provider)
        assert providers == ["offline", "anthropic"]
        await pool.set_model_config(ModelConfig(provider="offline"))
        second = await pool.execute("zed", AgentRequest(prompt="run: echo two", conversation_id="c"))
        assert second.worker_id == first.worker_id
        assert second.result["turns"] >= 1 and "two" in second.text
        assert pool.get_pool_stats()["spawned"] == 1
