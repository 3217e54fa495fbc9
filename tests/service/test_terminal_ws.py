"""``WS /v1/terminal`` on a real uvicorn server: a pty session in the caller's own sandbox."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from sandbox_core.errors import RequestTimeout
from sandbox_core.service.client import RemoteTerminal, ServiceClient
from tests.service.conftest import tcp_service_with, unix_service_with

PROFILE = "strict" if shutil.which("bwrap") else "process"
SHELL = ["/bin/sh", "-c", "PS1='READY> ' exec bash --norc --noprofile -i"]


async def expect(term: RemoteTerminal, pattern: bytes, seen: bytearray, timeout: float = 15.0) -> bytes:
    start = len(seen)
    deadline = time.monotonic() + timeout
    while pattern not in seen[start:]:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} in {bytes(seen[start:])[-400:]!r}")
        try:
            chunk = await asyncio.wait_for(term.read(), max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            continue
        if not chunk:
            raise AssertionError(f"ended before {pattern!r}: {bytes(seen[start:])[-400:]!r}")
        seen += chunk
    return bytes(seen[start:])


async def test_a_shell_over_the_websocket_on_tcp(tmp_path: Path) -> None:
    async with tcp_service_with(tmp_path, profile=PROFILE) as live:
        (live.config.workspace_root / "user01").mkdir(parents=True, exist_ok=True)
        async with ServiceClient(live.target, token=live.tokens["user01"]) as client, \
                client.terminal(SHELL, rows=33, cols=101, term="xterm-256color") as term:
            seen = bytearray()
            await expect(term, b"READY> ", seen)
            await term.write(b"tty; stty size; echo $TERM; echo mine > note\r")
            out = await expect(term, b"READY> ", seen)
            assert b"/dev/pts/" in out and b"33 101" in out and b"xterm-256color" in out
            await term.resize(44, 120)
            await term.write(b"stty size\r")
            await expect(term, b"44 120", seen)
            await term.write(b"touch started; sleep 100; echo not-interrupted\r")
            started = live.config.workspace_root / "user01" / "started"
            deadline = time.monotonic() + 10
            while not started.exists():
                assert time.monotonic() < deadline, "the command did not start"
                await asyncio.sleep(0.02)
            await term.write(b"\x03")
            after_c = (await expect(term, b"READY> ", seen)).partition(b"^C")[2]
            assert b"not-interrupted" not in after_c
            await term.write(b"echo after-$((40+2))\r")
            await expect(term, b"after-42", seen)
            await term.write(b"exit 3\r")
            assert await term.wait() == 3
        assert (live.config.workspace_root / "user01" / "note").read_text() == "mine\n"


async def test_a_second_user_cannot_reach_the_first_users_terminal_or_sandbox(tmp_path: Path) -> None:
    async with tcp_service_with(tmp_path, profile=PROFILE) as live:
        root = live.config.workspace_root
        async with ServiceClient(live.target, token=live.tokens["user02"]) as alice, \
                alice.terminal(SHELL) as term:
            seen = bytearray()
            await expect(term, b"READY> ", seen)
            await term.write(b"echo secret > alice-only\r")
            await expect(term, b"READY> ", seen)
            uri = "ws" + live.target[len("http"):] + "/v1/terminal"
            bob = {"Authorization": f"Bearer {live.tokens['user03']}"}
            async with connect(uri, additional_headers=bob) as ws:  # naming alice is refused
                await ws.send(json.dumps({"user_id": "user02", "argv": ["cat", "alice-only"]}))
                refusal = json.loads(await ws.recv())
                assert refusal["type"] == "error" and "own sandbox" in refusal["error"]["message"]
                await ws.wait_closed()
                assert ws.close_code == 4403
            async with ServiceClient(live.target, token=live.tokens["user03"]) as bob_client, \
                    bob_client.terminal(["sh", "-c", "cat alice-only; pwd; ls"]) as other:
                out = bytearray()
                while chunk := await other.read():
                    out += chunk
                assert b"secret" not in out and b"No such file" in out and other.exit_code == 0
            for headers in ({}, {"Authorization": "Bearer not-a-token-of-anyone"}):
                with pytest.raises(InvalidStatus) as refused:
                    async with connect(uri, additional_headers=headers):
                        pass
                assert refused.value.response.status_code == 401
            await term.write(b"exit\r")
            assert await term.wait() == 0
        assert (root / "user02" / "alice-only").read_text() == "secret\n"
        assert not (root / "user03" / "alice-only").exists()


async def test_the_unix_socket_terminal_and_its_end_when_the_client_goes(tmp_path: Path) -> None:
    async with unix_service_with(tmp_path, profile=PROFILE) as live, ServiceClient(live.target) as client:
        async with client.terminal(SHELL) as term:
            seen = bytearray()
            await expect(term, b"READY> ", seen)
            await term.write(b"echo $((6*7)) > answer; sleep 300\r")
            answer = live.config.workspace_root / next(p.name for p in live.config.workspace_root.iterdir())
            deadline = time.monotonic() + 10
            while not (answer / "answer").exists():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        # leaving the block closed the socket: the session's worker becomes free again
        events = [e async for e in client.stream("exec", {"shell": "cat answer"})]
        assert events[-1].data["exit_code"] == 0
        with pytest.raises(RequestTimeout):
            async with client.terminal(SHELL, timeout=1.0) as term:
                await term.wait()


def test_openapi_documents_the_terminal_route() -> None:
    from sandbox_core.service.openapi import openapi_schema

    schema = openapi_schema()
    route = schema["paths"]["/v1/terminal"]["get"]
    assert "101" in route["responses"] and "401" in route["responses"]
    for name in ("TerminalOpen", "TerminalControl", "TerminalEnd"):
        assert name in schema["components"]["schemas"]


async def test_bad_opening_messages_are_refused_with_4400(tmp_path: Path) -> None:
    async with tcp_service_with(tmp_path, profile=PROFILE) as live:
        uri = "ws" + live.target[len("http"):] + "/v1/terminal"
        headers = {"Authorization": f"Bearer {live.tokens['user04']}"}
        for opening in ('{"term": "x; rm -rf /"}', '{"rows": 0}', '{"argv": []}', "[1]", "not json"):
            async with connect(uri, additional_headers=headers) as ws:
                await ws.send(opening)
                refusal = json.loads(await ws.recv())
                assert refusal["type"] == "error", opening
                await ws.wait_closed()
                assert ws.close_code == 4400, opening
