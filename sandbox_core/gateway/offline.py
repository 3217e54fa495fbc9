"""The offline model: a deterministic stand-in for the Messages API, answered on the host.

It lets the whole agent path run for real (SDK, tool runner, tools, sandbox) with no key and
no network. The gateway calls :func:`respond` with the request path and JSON body; the
answer is the Messages API wire format, streamed (``"stream": true``: server-sent events
``message_start``, ``ping``, ``content_block_start`` / ``content_block_delta`` (``text_delta``
or ``input_json_delta``) / ``content_block_stop``, ``message_delta`` with ``stop_reason``
and ``usage``, ``message_stop``) or as one JSON message. Pure JSON, no ``anthropic`` import.

What it understands, in the text of the last ``user`` message:

- a line ``run: CMD`` runs ``CMD`` with the ``bash`` tool;
- every other ``CMD`` written between single backticks (`` `ls -la` ``) runs with ``bash``;
- a line ``read: PATH`` reads a file with the ``read`` tool;
- a line ``write: PATH`` followed by a fenced block (three backticks) writes the block's
  lines to ``PATH`` with the ``write`` tool (text in fenced blocks is never run);
- a line ``glob: PATTERN`` or ``grep: REGEX`` uses the ``glob`` or ``grep`` tool.

Directives (``run:`` etc., any case) are honoured in prompt order, one tool call each, all in
one reply (``stop_reason: tool_use``), and only for tools the request offers; others are
named as skipped. A prompt with none gets a short reply that lists these rules.

When the last ``user`` message carries ``tool_result`` blocks, the reply is a text summary
that quotes each result's real output (first 2,000 characters) with its tool call and
whether it failed, and ``stop_reason: end_turn``.

Token counts are estimates (4 characters a token); ids are derived from the request, so
the same request always gets the same bytes. ``/v1/messages/count_tokens`` is answered
too, and so are ``GET /v1/models`` and ``/v1/models/{id}`` (the configured model). A reply
that would exceed ``max_tokens`` is cut there (``stop_reason: max_tokens``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

MODEL_NAME = "offline"
QUOTE_LIMIT = 2000
_DIRECTIVE = re.compile(r"^\s*(run|read|write|glob|grep):\s*(.*?)\s*$", re.IGNORECASE)
_FENCE = re.compile(r"^\s*```")
_INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
_WORDS = re.compile(r"\S+\s*|\s+")


@dataclass(frozen=True)
class OfflineReply:
    """What the offline model answers: an HTTP status, headers and the body in chunks."""

    status: int
    headers: list[tuple[str, str]]
    chunks: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class _Call:
    name: str
    input: dict[str, Any]
    summary: str


def models(path: str, model: str) -> OfflineReply:
    """``GET /v1/models`` (a list of the configured model) or ``/v1/models/{id}``."""
    info = {"type": "model", "id": model, "display_name": model, "created_at": "2026-01-01T00:00:00Z"}
    digest = hashlib.sha256(path.encode()).hexdigest()
    if path == "/v1/models":
        return _json(200, {"data": [info], "has_more": False, "first_id": model, "last_id": model}, digest)
    wanted = path.rsplit("/", 1)[-1]
    if wanted != model:
        return _error(404, "not_found_error", f"model: {wanted}")
    return _json(200, info, digest)


def respond(path: str, body: Any) -> OfflineReply:
    """Answer one Messages API request (``path`` without query) like the real API would."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        return _error(400, "invalid_request_error", "messages: at least one message is required")
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    input_tokens = max(1, len(json.dumps(body, default=str)) // 4)
    if path.endswith("/count_tokens"):
        return _json(200, {"input_tokens": input_tokens}, digest)
    text, calls, stop = _answer(body)
    max_tokens = body.get("max_tokens")
    output_tokens = max(1, (len(text) + sum(len(json.dumps(c.input)) for c in calls)) // 4)
    if isinstance(max_tokens, int) and output_tokens > max_tokens:
        text, calls, stop, output_tokens = text[: max(1, max_tokens) * 4], [], "max_tokens", max_tokens
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    content += [
        {"type": "tool_use", "id": f"toolu_offline_{digest[:12]}_{i}", "name": c.name, "input": c.input}
        for i, c in enumerate(calls)
    ]
    message = {
        "id": f"msg_offline_{digest[:20]}",
        "type": "message",
        "role": "assistant",
        "model": MODEL_NAME,  # who answered: never the model that was asked for
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }
    if body.get("stream"):
        return OfflineReply(200, _headers("text/event-stream; charset=utf-8", digest), list(_sse(message)))
    return _json(200, message, digest)


# ---------------------------------------------------------------- understanding the prompt


def _last_user(messages: list[Any]) -> tuple[int, list[dict[str, Any]]]:
    for index in range(len(messages) - 1, -1, -1):
        msg = messages[index]
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, str):
                return index, [{"type": "text", "text": content}]
            if isinstance(content, list):
                return index, [b for b in content if isinstance(b, dict)]
            return index, []
    return -1, []


def _answer(body: dict[str, Any]) -> tuple[str, list[_Call], str]:
    messages: list[Any] = body["messages"]
    index, blocks = _last_user(messages)
    results = [b for b in blocks if b.get("type") == "tool_result"]
    if results:
        return _summarise(results, messages[index - 1] if index > 0 else None), [], "end_turn"
    prompt = "\n".join(str(b.get("text", "")) for b in blocks if b.get("type") == "text")
    offered = {t.get("name") for t in body.get("tools") or [] if isinstance(t, dict)}
    wanted = _directives(prompt)
    calls = [c for c in wanted if c.name in offered]
    skipped = [c for c in wanted if c.name not in offered]
    lines = [f"I'll {c.summary}." for c in calls]
    lines += [f"(Skipped, the {c.name} tool is not enabled: {c.summary}.)" for c in skipped]
    if not wanted:
        lines = [
            "This is the offline model: it answers without a network or an API key.",
            "It runs a line `run: CMD` and each command in backticks with the bash tool, "
            "reads files with `read: PATH`, writes the fenced block after `write: PATH`, "
            "and searches with `glob: PATTERN` / `grep: REGEX`.",
            f"Your message had none of these ({len(prompt)} characters).",
        ]
    return "\n".join(lines), calls, "tool_use" if calls else "end_turn"


def _directives(prompt: str) -> list[_Call]:
    calls: list[_Call] = []
    lines = prompt.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if _FENCE.match(line):  # a fenced block that no write: claimed is never run
            while i < len(lines) and not _FENCE.match(lines[i]):
                i += 1
            i += 1
            continue
        match = _DIRECTIVE.match(line)
        if match is None:
            calls += [_Call("bash", {"command": cmd.strip()}, f"run `{cmd.strip()}`")
                      for cmd in _INLINE.findall(line) if cmd.strip()]
            continue
        verb, arg = match.group(1).lower(), match.group(2)
        if verb == "write":
            content: list[str] = []
            if i < len(lines) and _FENCE.match(lines[i]):
                i += 1
                while i < len(lines) and not _FENCE.match(lines[i]):
                    content.append(lines[i])
                    i += 1
                i += 1
            text = "\n".join(content) + ("\n" if content else "")
            calls.append(_Call("write", {"file_path": arg, "content": text}, f"write {len(text)} bytes to {arg}"))
        elif not arg:
            continue
        elif verb == "run":
            calls.append(_Call("bash", {"command": arg}, f"run `{arg}`"))
        elif verb == "read":
            calls.append(_Call("read", {"file_path": arg}, f"read {arg}"))
        else:
            calls.append(_Call(verb, {"pattern": arg}, f"{verb} for {arg}"))
    return calls


def _result_text(block: dict[str, Any]) -> str:
    content = block.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _summarise(results: list[dict[str, Any]], previous: Any) -> str:
    uses: dict[str, dict[str, Any]] = {}
    if isinstance(previous, dict) and isinstance(previous.get("content"), list):
        uses = {b.get("id", ""): b for b in previous["content"] if isinstance(b, dict) and b.get("type") == "tool_use"}
    parts = [f"Done: {len(results)} tool call{'s' if len(results) != 1 else ''}."]
    for block in results:
        use = uses.get(str(block.get("tool_use_id")), {})
        args = use.get("input")
        args = args if isinstance(args, dict) else {}
        what = str(args.get("command") or args.get("file_path") or args.get("pattern") or "")
        status = "failed" if block.get("is_error") else "succeeded"
        output = _result_text(block)
        quoted = output[:QUOTE_LIMIT] + (f"\n[... {len(output) - QUOTE_LIMIT} more characters]"
                                         if len(output) > QUOTE_LIMIT else "")
        parts.append(f"\n{use.get('name', 'tool')} `{what}` {status}:\n```\n{quoted}\n```")
    return "\n".join(parts)


# ---------------------------------------------------------------- the wire format


def _headers(content_type: str, digest: str) -> list[tuple[str, str]]:
    return [("content-type", content_type), ("request-id", f"req_offline_{digest[:20]}")]


def _json(status: int, obj: dict[str, Any], digest: str) -> OfflineReply:
    return OfflineReply(status, _headers("application/json", digest), [json.dumps(obj).encode()])


def _error(status: int, kind: str, message: str) -> OfflineReply:
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return OfflineReply(status, [("content-type", "application/json")], [json.dumps(body).encode()])


def sse_event(obj: dict[str, Any]) -> bytes:
    """One server-sent event named after the object's ``type``."""
    return f"event: {obj['type']}\ndata: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def _sse(message: dict[str, Any]) -> Iterator[bytes]:
    start = {**message, "content": [], "stop_reason": None,
             "usage": {"input_tokens": message["usage"]["input_tokens"], "output_tokens": 1}}
    yield sse_event({"type": "message_start", "message": start})
    yield sse_event({"type": "ping"})
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            empty = {"type": "text", "text": ""}
            yield sse_event({"type": "content_block_start", "index": index, "content_block": empty})
            for piece in _pieces(block["text"]):
                yield sse_event({"type": "content_block_delta", "index": index,
                                 "delta": {"type": "text_delta", "text": piece}})
        else:
            yield sse_event({"type": "content_block_start", "index": index, "content_block": {**block, "input": {}}})
            raw = json.dumps(block["input"])
            for piece in (raw[: len(raw) // 2], raw[len(raw) // 2 :]):
                yield sse_event({"type": "content_block_delta", "index": index,
                                 "delta": {"type": "input_json_delta", "partial_json": piece}})
        yield sse_event({"type": "content_block_stop", "index": index})
    yield sse_event({"type": "message_delta", "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                     "usage": {"output_tokens": message["usage"]["output_tokens"]}})
    yield sse_event({"type": "message_stop"})


def _pieces(text: str, words: int = 4) -> Iterator[str]:
    tokens = _WORDS.findall(text)
    for i in range(0, len(tokens), words):
        yield "".join(tokens[i : i + words])
