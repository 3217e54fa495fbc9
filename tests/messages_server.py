"""A local stand-in for the Messages API: HTTP/1.1 on 127.0.0.1, a random port, its own thread.

It answers from a script (a queue of :class:`Reply` values, or functions of the recorded
request that return one) and records every request: method, path, query, headers (the key
it received included) and JSON body, so tests can check what reached "the API".

Replies speak the real wire format: server-sent events written and flushed one event at a
time with chunked transfer encoding (:func:`stream`), JSON bodies, and API error bodies
(:func:`error`: 429 with ``retry-after``, 500, 529 overloaded...). A reply can drop the
connection after some events (``cut_after``: the client sees an unfinished chunked body), or
stop before an event until the test releases it (``hold_at`` / ``release``), while watching
for the client going away (``Recorded.disconnected``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

MODEL = "claude-sonnet-5-5"


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    received: float
    disconnected: bool = False
    """The client closed the connection before the reply was complete."""


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    chunked: bool = False
    """Chunked transfer encoding (streams); otherwise Content-Length."""
    cut_after: int | None = None
    """Write this many chunks, then drop the connection."""
    hold_at: int | None = None
    """Wait for :meth:`MessagesServer.release` before writing chunk number ``hold_at``."""


Script = Reply | Callable[[Recorded], Reply]


# ---------------------------------------------------------------- building replies


def event(obj: dict[str, Any]) -> bytes:
    return f"event: {obj['type']}\ndata: {json.dumps(obj)}\n\n".encode()


def message_events(
    content: list[dict[str, Any]], stop_reason: str, *, input_tokens: int = 10, output_tokens: int = 5,
    msg_id: str = "msg_test", text_pieces: int = 3,
) -> list[bytes]:
    """The SSE events of one assistant message (``text`` and ``tool_use`` blocks)."""
    start: dict[str, Any] = {"id": msg_id, "type": "message", "role": "assistant", "model": MODEL, "content": [],
             "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 1}}
    out = [event({"type": "message_start", "message": start}), event({"type": "ping"})]
    for index, block in enumerate(content):
        if block["type"] == "text":
            out.append(event({"type": "content_block_start", "index": index,
                              "content_block": {"type": "text", "text": ""}}))
            text: str = block["text"]
            step = max(1, -(-len(text) // text_pieces))
            for i in range(0, len(text), step):
                out.append(event({"type": "content_block_delta", "index": index,
                                  "delta": {"type": "text_delta", "text": text[i : i + step]}}))
        else:
            out.append(event({"type": "content_block_start", "index": index,
                              "content_block": {"type": "tool_use", "id": block["id"], "name": block["name"],
                                                "input": {}}}))
            raw = json.dumps(block["input"])
            for piece in (raw[:5], raw[5:]):
                out.append(event({"type": "content_block_delta", "index": index,
                                  "delta": {"type": "input_json_delta", "partial_json": piece}}))
        out.append(event({"type": "content_block_stop", "index": index}))
    out.append(event({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                      "usage": {"output_tokens": output_tokens}}))
    out.append(event({"type": "message_stop"}))
    return out


def stream(events: list[bytes], **options: Any) -> Reply:
    return Reply(200, [("content-type", "text/event-stream")], events, chunked=True, **options)


def text_reply(text: str, *, input_tokens: int = 10, output_tokens: int = 5) -> Reply:
    blocks = [{"type": "text", "text": text}]
    return stream(message_events(blocks, "end_turn", input_tokens=input_tokens, output_tokens=output_tokens))


def tool_reply(
    calls: Iterable[tuple[str, str, dict[str, Any]]], text: str = "", *, input_tokens: int = 10, output_tokens: int = 5
) -> Reply:
    """A streamed reply that calls tools: ``calls`` are (id, name, input)."""
    blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    blocks += [{"type": "tool_use", "id": i, "name": n, "input": inp} for i, n, inp in calls]
    return stream(message_events(blocks, "tool_use", input_tokens=input_tokens, output_tokens=output_tokens))


def error(status: int, kind: str, message: str, headers: Iterable[tuple[str, str]] = ()) -> Reply:
    body = json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
    return Reply(status, [("content-type", "application/json"), *headers], [body])


def json_reply(obj: dict[str, Any], status: int = 200) -> Reply:
    return Reply(status, [("content-type", "application/json")], [json.dumps(obj).encode()])


def tool_results(recorded: Recorded) -> list[dict[str, Any]]:
    """The ``tool_result`` blocks of the last user message of a recorded request."""
    messages = recorded.body.get("messages", []) if isinstance(recorded.body, dict) else []
    users = [m for m in messages if m.get("role") == "user"]
    content = users[-1]["content"] if users else []
    return [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]


# ---------------------------------------------------------------- the server


class MessagesServer:
    """``with MessagesServer([...]) as server:`` then point a client at ``server.url``."""

    def __init__(self, script: Iterable[Script] = ()) -> None:
        self._script: list[Script] = list(script)
        self._lock = threading.Lock()
        self.requests: list[Recorded] = []
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._released = False
        self._holding: list[threading.Event] = []
        self._ids = itertools.count(1)

    def push(self, *replies: Script) -> None:
        with self._lock:
            self._script.extend(replies)

    def release(self) -> None:
        """Let held replies go on (and any later one: a release is never lost)."""
        with self._lock:
            self._released = True
            for waiter in self._holding:
                waiter.set()
            self._holding.clear()

    def __enter__(self) -> MessagesServer:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            server = self._loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            ready.set()
            self._loop.run_forever()
            server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

        self._thread = threading.Thread(target=serve, name="messages-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("messages server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _next_reply(self, recorded: Recorded) -> Reply:
        with self._lock:
            item = self._script.pop(0) if self._script else None
        if item is None:
            return error(500, "api_error", "the test server has no scripted reply left")
        return item(recorded) if callable(item) else item

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._exchange(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        line = await reader.readline()
        if not line.strip():
            return False
        method, target, _version = line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while (raw := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
        path, _, query = target.partition("?")
        try:
            parsed: Any = json.loads(body) if body else None
        except ValueError:
            parsed = body.decode(errors="replace")
        recorded = Recorded(method, path, query, headers, parsed, time.monotonic())
        with self._lock:
            self.requests.append(recorded)
        reply = self._next_reply(recorded)
        return await self._send(reply, recorded, reader, writer)

    async def _send(
        self, reply: Reply, recorded: Recorded, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        head = [f"HTTP/1.1 {reply.status} X", f"request-id: req_test_{next(self._ids)}", *(
            f"{k}: {v}" for k, v in reply.headers)]
        head.append("transfer-encoding: chunked" if reply.chunked else
                    f"content-length: {sum(len(c) for c in reply.chunks)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        for number, chunk in enumerate(reply.chunks):
            if reply.cut_after is not None and number >= reply.cut_after:
                writer.transport.abort()
                return False
            if reply.hold_at == number and not await self._hold(reader):
                recorded.disconnected = True
                return False
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if reply.chunked else chunk)
            try:
                await writer.drain()
            except ConnectionError:
                recorded.disconnected = True
                return False
        if reply.chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _hold(self, reader: asyncio.StreamReader) -> bool:
        """Wait for :meth:`release`; False if the client went away first."""
        waiter = threading.Event()
        with self._lock:
            if self._released:
                return True
            self._holding.append(waiter)
        released = asyncio.ensure_future(asyncio.to_thread(waiter.wait, 60))
        gone = asyncio.ensure_future(reader.read(1))
        done, _ = await asyncio.wait({released, gone}, return_when=asyncio.FIRST_COMPLETED)
        if gone in done:
            waiter.set()  # frees the helper thread
            return False
        gone.cancel()  # and wait until it is gone: the next request's readline() would find it still reading
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        return True
