"""``agent.run`` and ``agent.reset``: the Claude agent inside the worker.

The loop is the SDK's own streaming tool runner (``client.beta.messages.tool_runner(...,
stream=True)``) over the reference agent toolset confined to the workspace
(:mod:`sandbox_core.inside.agent.tools`). The client's HTTP goes through
:class:`~sandbox_core.inside.agent.transport.GatewayTransport` to the host, with a placeholder key.
What this module adds, and why the runner does not do it:

- events: the runner yields one message stream per turn; this maps its ``text`` deltas,
  finished ``tool_use`` blocks and the turn's usage to events, and reads the turn's tool
  results through ``runner.generate_tool_call_response()`` (cached, so the runner sends the
  very same results) to emit ``tool_result`` events (output cut to 4 KiB; the model gets it
  whole); while a ``bash`` call runs, its output streams as ``stdout`` events with the
  call's ``tool_use_id`` (the runner tells a tool only its input: each finished ``bash``
  block is noted in :class:`~sandbox_core.inside.agent.tools.BashCalls` for the tool to
  claim);
- history: ``thread=False`` so every turn sends the whole conversation (no server-side
  thread: the offline model and compatible endpoints are stateless, and the worker is the
  one place that keeps a conversation); the history of each ``conversation_id`` is kept in
  ``executor.state`` so a follow-up prompt continues it;
- clean-up: the bash tool's shell is closed (its process group killed) when the run ends,
  which the Messages tool runner would not do; on cancel the model stream is closed (which
  abandons the host call) and the running command's group is killed, then the cancel
  propagates;
- errors: an ``error`` event with a typed code, then a :class:`GatewayError` (or the
  gateway's own error) for the caller.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sandbox_core.errors import ConfigError, GatewayError, SandboxError

if TYPE_CHECKING:
    from anthropic import AsyncAnthropic
    from anthropic.lib.tools import BetaAsyncStreamingToolRunner

    from sandbox_core.events import EventType

EVENT_OUTPUT_LIMIT = 4096
DEFAULT_MAX_TOKENS = 4096
DEFAULT_MAX_TURNS = 20
CONVERSATIONS = "agent.conversations"
HISTORY_MAX_BYTES = 4 * 1024 * 1024
"""The largest conversation returned for the host to keep (the frame limit is 8 MiB)."""
_LOCKS = "agent.locks"
CLIENT = "agent.client"
"""The executor state key of the client a preload built (runs use it and never close it)."""
TOOLS = "agent.tools"
"""The executor state key of the file tools built so far (by workspace and environment)."""
PRELOAD = "agent.preload"
"""The executor state key of the preload under way or done (:mod:`.preload`; runs wait for its end)."""


class _Channel(Protocol):
    def call_host(self, method: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...


class _Executor(Protocol):
    state: dict[str, Any]


class AgentContext(Protocol):
    """What ``run`` needs of a worker's ``RequestContext``."""

    @property
    def channel(self) -> _Channel: ...
    @property
    def executor(self) -> _Executor: ...
    @property
    def workspace(self) -> Path: ...
    async def emit(self, kind: EventType, data: dict[str, Any]) -> None: ...


class _Params:
    def __init__(self, params: dict[str, Any]) -> None:
        from sandbox_core.config import DEFAULT_MODEL
        from sandbox_core.inside.agent.tools import TOOL_NAMES

        self.prompt = _get(params, "prompt", str, None)
        if not self.prompt:
            raise ConfigError("prompt", "must be a non-empty string")
        self.system = _get(params, "system", str, None)
        self.model = _get(params, "model", str, None) or DEFAULT_MODEL
        self.max_turns = _get(params, "max_turns", int, DEFAULT_MAX_TURNS)
        self.max_tokens = _get(params, "max_tokens", int, DEFAULT_MAX_TOKENS)
        self.conversation_id = _get(params, "conversation_id", str, None) or "default"
        history = params.get("history")
        if history is not None and not isinstance(history, list):
            raise ConfigError("history", "must be a list of messages")
        self.history: list[Any] | None = history
        self.return_history = params.get("return_history") is True
        tools = params.get("tools")
        self.tools: tuple[str, ...]
        if tools is None:
            self.tools = TOOL_NAMES
        elif isinstance(tools, list) and all(isinstance(t, str) for t in tools):
            unknown = sorted(set(tools) - set(TOOL_NAMES))
            if unknown:
                raise ConfigError("tools", f"unknown tool(s) {', '.join(unknown)}; known: {', '.join(TOOL_NAMES)}")
            self.tools = tuple(t for t in TOOL_NAMES if t in tools)
        else:
            raise ConfigError("tools", "must be a list of tool names or null")
        if self.max_turns < 1 or self.max_tokens < 1:
            raise ConfigError("max_turns" if self.max_turns < 1 else "max_tokens", "must be > 0")


def _get(params: dict[str, Any], key: str, kind: type[Any], default: Any) -> Any:
    value = params.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(key, f"must be a {kind.__name__}, got {value!r}")
    return value


def _clip(text: str, limit: int = EVENT_OUTPUT_LIMIT) -> tuple[str, bool]:
    raw = text.encode()
    if len(raw) <= limit:
        return text, False
    return raw[:limit].decode(errors="ignore"), True


def _result_event(block: Any) -> dict[str, Any]:
    from sandbox_core.inside.agent.tools import EXIT_TRAILER

    content = block.get("content")
    if isinstance(content, str):
        text = content
    else:
        text = "\n".join(str(b.get("text", f"[{b.get('type')}]")) for b in content or [] if isinstance(b, dict))
    output, truncated = _clip(text)
    data: dict[str, Any] = {"id": block.get("tool_use_id"), "output": output,
                            "is_error": bool(block.get("is_error")), "truncated": truncated}
    match = EXIT_TRAILER.search(text)
    if match:
        data["exit_code"] = int(match.group(1))
    return data


def _use_event(block: Any) -> dict[str, Any]:
    args = block.input if isinstance(block.input, dict) else {}
    shown = {k: _clip(v)[0] if isinstance(v, str) else v for k, v in args.items()}
    return {"id": block.id, "name": block.name, "input": shown}


def _with_prompt(history: list[Any], prompt: str) -> list[Any]:
    """The history plus the prompt; after unanswered tool results it joins their message."""
    text = {"type": "text", "text": prompt}
    last = history[-1] if history else None
    if isinstance(last, dict) and last.get("role") == "user" and isinstance(last.get("content"), list):
        return [*history[:-1], {"role": "user", "content": [*last["content"], text]}]
    return [*history, {"role": "user", "content": [text]}]


def _answer_dangling(history: list[Any]) -> list[Any]:
    """Close a history that ends with tool calls that never got results (a cancel, a failure).

    The API refuses a conversation whose tool calls go unanswered, so the next prompt would fail.
    """
    last = history[-1] if history else None
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return history
    ids = [_field(b, "id") for b in last.get("content") or [] if _field(b, "type") == "tool_use"]
    if not ids:
        return history
    note = "not run: the agent run ended before this tool call finished"
    results = [{"type": "tool_result", "tool_use_id": i, "content": note, "is_error": True} for i in ids]
    return [*history, {"role": "user", "content": results}]


def _field(block: Any, name: str) -> Any:
    return block.get(name) if isinstance(block, dict) else getattr(block, name, None)


def _sandbox_cause(exc: BaseException) -> SandboxError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, SandboxError):
            return current
        error = getattr(current, "error", None)
        if isinstance(error, SandboxError):
            return error
        current = current.__cause__ or current.__context__
    return None


def _as_sandbox_error(exc: Exception) -> tuple[str, SandboxError]:
    """A typed code for the ``error`` event, and the error the request fails with."""
    import anthropic
    import httpx2

    found = _sandbox_cause(exc)
    if found is not None:
        return str(found.data.get("reason", "gateway_error")), found
    if isinstance(exc, anthropic.APIStatusError):
        kind = str(exc.type or "api_error")
        return kind, GatewayError(f"model API error {exc.status_code} ({kind}): {exc.api_message or exc.message}",
                                  data={"status": exc.status_code, "error_type": kind})
    if isinstance(exc, anthropic.APITimeoutError):
        return "timeout", GatewayError("model API request timed out")
    if isinstance(exc, anthropic.APIConnectionError):
        return "connection_error", GatewayError(f"cannot reach the model API: {exc}")
    if isinstance(exc, httpx2.HTTPError):
        return "stream_error", GatewayError(f"model stream failed: {exc}")
    return "internal_error", GatewayError(f"agent failed: {type(exc).__name__}: {exc}")


async def run(ctx: AgentContext, params: dict[str, Any]) -> dict[str, Any]:
    """Run the agent on ``params["prompt"]``; stream events; return the ``done`` data."""
    preload = ctx.executor.state.get(PRELOAD)
    if preload is not None:  # a preload imports the SDK in its thread: importing it here would block the loop
        await preload.done.wait()
    p = _Params(params)
    locks: dict[str, asyncio.Lock] = ctx.executor.state.setdefault(_LOCKS, {})
    async with locks.setdefault(p.conversation_id, asyncio.Lock()):
        return await _run(ctx, p)


def gateway_client(call_host: Any, send: Any) -> AsyncAnthropic:
    """The SDK client whose HTTP goes over the control pipe to the host's gateway (placeholder key)."""
    import httpx2
    from anthropic import AsyncAnthropic

    from sandbox_core.inside.agent.transport import GatewayTransport
    from sandbox_core.shared import GATEWAY_BASE_URL, PLACEHOLDER_API_KEY

    transport = GatewayTransport(call_host, cancel=None if send is None else _cancel_sender(send))
    return AsyncAnthropic(api_key=PLACEHOLDER_API_KEY, base_url=GATEWAY_BASE_URL,
                          http_client=httpx2.AsyncClient(transport=transport, trust_env=False))


async def _run(ctx: AgentContext, p: _Params) -> dict[str, Any]:
    from anthropic.lib.streaming import ParsedBetaContentBlockStopEvent, ParsedBetaTextEvent

    from sandbox_core.inside.agent.tools import BashCalls, WorkspaceShell, shell_env, workspace_tools

    started = time.monotonic()
    store: dict[str, list[Any]] = ctx.executor.state.setdefault(CONVERSATIONS, {})
    if p.history is not None and p.conversation_id not in store:  # a conversation this worker never had
        store[p.conversation_id] = p.history
    history = _with_prompt(store.get(p.conversation_id, []), p.prompt)
    client = ctx.executor.state.get(CLIENT)
    own_client = client is None
    if client is None:
        client = gateway_client(ctx.channel.call_host, getattr(ctx.channel, "send", None))
    shell = WorkspaceShell(ctx.workspace, shell_env(os.environ))
    tool_cache: dict[Any, Any] = ctx.executor.state.setdefault(TOOLS, {})
    cached = len(tool_cache)
    calls = BashCalls()
    extra = {"system": p.system} if p.system else {}
    runner: BetaAsyncStreamingToolRunner[None] | None = None
    built = 0
    usage = {"input_tokens": 0, "output_tokens": 0}
    turns, stop_reason = 0, ""
    answered_by = p.model
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runner = client.beta.messages.tool_runner(
                model=p.model, max_tokens=p.max_tokens, messages=history, stream=True, thread=False,
                tools=workspace_tools(ctx.workspace, shell, p.tools, calls, ctx.emit, tool_cache),
                max_iterations=p.max_turns,
                **extra,
            )
        built = len(tool_cache) - cached
        if caught:  # reported once in the result; the SDK would repeat it on every request
            warnings.filterwarnings("ignore", message=rf"The model '{re.escape(p.model)}' is deprecated")
        async for stream in runner:
            async for event in stream:
                if isinstance(event, ParsedBetaTextEvent):
                    await ctx.emit("text", {"text": event.text})
                elif isinstance(event, ParsedBetaContentBlockStopEvent) and event.content_block.type == "tool_use":
                    use = event.content_block
                    if use.name == "bash":
                        calls.expect(use.id, use.input)
                    await ctx.emit("tool_use", _use_event(use))
            message = await stream.get_final_message()
            if message.stop_reason is None:
                raise GatewayError("the model stream ended before message_stop", data={"reason": "stream_broken"})
            turns, stop_reason = turns + 1, str(message.stop_reason)
            answered_by = str(message.model or p.model)
            turn = {"input_tokens": message.usage.input_tokens, "output_tokens": message.usage.output_tokens}
            usage = {k: usage[k] + turn[k] for k in usage}
            await ctx.emit("usage", turn)
            history = [*history, message.to_param()]
            if message.stop_reason == "tool_use":
                results = await runner.generate_tool_call_response()
                calls.clear()
                if results is not None:
                    for block in results["content"]:
                        await ctx.emit("tool_result", _result_event(block))
                    history = [*history, results]
    except Exception as exc:
        code, error = _as_sandbox_error(exc)
        await ctx.emit("error", {"code": code, "message": error.message})
        raise error from exc
    finally:
        store[p.conversation_id] = _answer_dangling(history)
        if runner is not None:
            await runner.close()
        await shell.close()
        if own_client:
            await client.close()
    if stop_reason == "tool_use" and turns >= p.max_turns:
        stop_reason = "max_turns"
    result: dict[str, Any] = {
        "stop_reason": stop_reason, "turns": turns, "usage": usage,
        "duration_s": round(time.monotonic() - started, 6), "conversation_id": p.conversation_id,
        "model": answered_by,  # the model that answered (the offline one says "offline")
        "preloaded": not own_client,  # on the client (and imports) an idle-time preload made
        "tools_built": built,  # file tools this run had to build (0: a cache the preload or a run before filled)
    }
    if answered_by != p.model:
        result["requested_model"] = p.model
    if caught:
        result["warnings"] = sorted({str(w.message) for w in caught})
    if p.return_history:
        kept = json.loads(json.dumps(store[p.conversation_id], default=str))  # plain JSON, whatever the SDK built
        if len(json.dumps(kept)) <= HISTORY_MAX_BYTES:
            result["history"] = kept
        else:
            result["history_dropped"] = "the conversation is larger than HISTORY_MAX_BYTES"
    return result


def _cancel_sender(send: Any) -> Any:
    from sandbox_core.protocol import Notification

    async def cancel(call_id: Any) -> None:
        await send(Notification("cancel", {"id": call_id}))

    return cancel


async def reset(ctx: AgentContext, params: dict[str, Any]) -> dict[str, Any]:
    """Forget ``params["conversation_id"]``, or every conversation when none is given."""
    store: dict[str, list[Any]] = ctx.executor.state.setdefault(CONVERSATIONS, {})
    conversation_id = _get(params, "conversation_id", str, None)
    forgotten = [conversation_id] if conversation_id in store else [] if conversation_id else sorted(store)
    for key in forgotten:
        store.pop(key, None)
    return {"forgotten": forgotten, "conversations": len(store)}
