"""The service's end of the terminal crossing: ``WS /v1/terminal``, one pty session per socket.

The WebSocket carries the terminal's bytes both ways as binary messages, and JSON text
messages for the rest:

    client → service   first message (text): {"argv"?: [...], "shell"?: "...", "rows": R,
                       "cols": C, "term"?: "xterm-256color", "timeout"?: S, "stdin"?: true,
                       "network"?: {"mode": "none"} | {"allow": ["HOST[:PORT]", ...]}}
                       then binary messages: keys; text: {"type": "resize", "rows", "cols"},
                       {"type": "eof"} (no more keys)
    service → client   binary messages: what the terminal wrote; once, at the end (text):
                       {"type": "exit", "exit_code": N, ...} or {"type": "error", "error":
                       {code, message, data}}; then the service closes the socket (1000)

Without ``argv`` or ``shell`` the program is the login shell. The session opens in the
caller's own sandbox: the user comes from the credentials (the peer uid on the Unix socket,
the bearer token on TCP), exactly as for runs, and an opening message naming another
``user_id`` is refused (close code 4403). A session lives as long as its socket: there is
no id to attach to, so nobody else can reach it; a client that goes away ends it (the
program is killed). Wrong credentials get a bare 401 before the upgrade, a draining
service 503. Each session is an exec request of the pool: it holds one of the user's
workers busy and ends at its timeout (``request_timeout`` by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from sandbox_core.errors import ConfigError, SandboxError
from sandbox_core.requests import TERM_NAME, check_window, network_from_json
from sandbox_core.terminal import LOGIN_SHELL, Terminal

OPEN_TIMEOUT = 10.0
"""Seconds a client has, after the upgrade, to send its opening message."""
MAX_CONTROL = 4096
"""Largest JSON text message a client may send (opening message, resize, eof)."""
REFUSED_USER = 4403
INVALID = 4400


class _Opening:
    """A validated opening message."""

    def __init__(self, body: Any, user_id: str) -> None:
        if not isinstance(body, dict):
            raise ConfigError("terminal", "the opening message must be a JSON object")
        named = body.get("user_id")
        if named is not None and named != user_id:
            raise PermissionError(f"a terminal opens in your own sandbox ({user_id}), not {named!r}")
        argv, shell = body.get("argv"), body.get("shell")
        if argv is not None:
            if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
                raise ConfigError("argv", "must be a non-empty list of strings")
            self.argv: tuple[str, ...] = tuple(argv)
        elif shell is not None:
            if not isinstance(shell, str) or not shell:
                raise ConfigError("shell", "must be a non-empty string")
            self.argv = ("/bin/sh", "-c", shell)
        else:
            self.argv = LOGIN_SHELL
        rows, cols = body.get("rows", 24), body.get("cols", 80)
        try:
            check_window(rows, cols)
        except ValueError as exc:
            raise ConfigError("rows/cols", str(exc)) from None
        self.rows, self.cols = int(rows), int(cols)
        term = body.get("term")
        if term is not None and not (isinstance(term, str) and TERM_NAME.match(term)):
            raise ConfigError("term", "must be 1-64 letters, digits or ._+- characters")
        self.term = term
        timeout = body.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0):
            raise ConfigError("timeout", "must be a positive number of seconds")
        self.timeout = float(timeout) if timeout is not None else None
        self.stdin = body.get("stdin", True) is not False
        try:
            self.network = network_from_json(body.get("network"))
        except ValueError as exc:
            raise ConfigError("network", str(exc)) from None


def _control(text: str) -> dict[str, Any]:
    if len(text) > MAX_CONTROL:
        raise ConfigError("message", f"text messages are at most {MAX_CONTROL} characters")
    try:
        body = json.loads(text)
    except ValueError:
        raise ConfigError("message", "text messages must be JSON objects") from None
    if not isinstance(body, dict):
        raise ConfigError("message", "text messages must be JSON objects")
    return body


async def _refuse(websocket: WebSocket, code: int, message: str) -> None:
    await websocket.send_text(json.dumps({"type": "error", "error": {"code": code, "message": message}}))
    await websocket.close(code)


async def serve_terminal(websocket: WebSocket, user_id: str, pool: Any) -> None:
    """Run one terminal session over an accepted ``websocket`` for ``user_id`` on ``pool``."""
    try:
        first = await asyncio.wait_for(websocket.receive_text(), OPEN_TIMEOUT)
        opening = _Opening(_control(first), user_id)
    except TimeoutError:
        await _refuse(websocket, INVALID, f"no opening message within {OPEN_TIMEOUT:g} s")
        return
    except PermissionError as exc:
        await _refuse(websocket, REFUSED_USER, str(exc))
        return
    except (ConfigError, KeyError, RuntimeError) as exc:  # RuntimeError: a binary first message
        await _refuse(websocket, INVALID, str(exc))
        return
    except WebSocketDisconnect:
        return
    try:
        session = pool.terminal(user_id, opening.argv, rows=opening.rows, cols=opening.cols, term=opening.term,
                                timeout=opening.timeout, stdin=opening.stdin, network=opening.network)
    except ConfigError as exc:  # a narrowing that would widen the policy
        await _refuse(websocket, INVALID, str(exc))
        return
    async with session as term:
        output = asyncio.create_task(_output(websocket, term))
        keys = asyncio.create_task(_keys(websocket, term, opening.stdin))
        try:
            await asyncio.wait({output, keys}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (output, keys):
                task.cancel()
            await asyncio.gather(output, keys, return_exceptions=True)
        if output.cancelled() or output.exception() is not None:
            return  # the client went away (or broke the protocol): leaving the block kills the program
        end = output.result()
        with contextlib.suppress(Exception):
            await websocket.send_text(json.dumps(end))
            await websocket.close(1000)


async def _output(websocket: WebSocket, term: Terminal) -> dict[str, Any]:
    """The terminal's bytes to the client; the closing message (exit, or the error)."""
    try:
        while chunk := await term.read():
            await websocket.send_bytes(chunk)
    except SandboxError as exc:
        return {"type": "error", "error": exc.to_wire()}
    return {"type": "exit", **(term.result or {})}


async def _keys(websocket: WebSocket, term: Terminal, stdin: bool) -> None:
    """The client's messages until it goes away: keys, resizes, eof. Returns when it is gone."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data, text = message.get("bytes"), message.get("text")
        if data:
            if stdin:
                await term.write(data)
            continue
        if not text:
            continue
        try:
            body = _control(text)
            kind = body.get("type")
            if kind == "resize":
                await term.resize(body.get("rows"), body.get("cols"))  # type: ignore[arg-type]
            elif kind == "eof":
                if stdin:
                    await term.close_stdin()
                    stdin = False
            else:
                raise ConfigError("message", f"unknown message type {kind!r}")
        except (ConfigError, ValueError) as exc:
            await _refuse(websocket, INVALID, str(exc))
            return


def denial(status: int) -> PlainTextResponse:
    return PlainTextResponse({401: "unauthorized", 503: "the service is draining"}.get(status, "forbidden"),
                             status_code=status)
