"""The worker's handshake before asyncio (inside/boot.py, inside/handshake.py), over raw frames.

A real worker process (process profile) gets NDJSON written straight to its stdin, so
the tests control what arrives together in one read: whatever the handshake reads but does
not serve must reach the serving loop unchanged, and every frame gets the answer it got
before the handshake moved ahead of asyncio.
"""

from __future__ import annotations

import ast
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sandbox_core import codes, protocol
from sandbox_core.errors import ProtocolError
from sandbox_core.inside import handshake
from sandbox_core.isolation.spec import PACKAGE_ROOT, process_launch
from sandbox_core.protocol import Notification, Request, Response
from tests.helpers import process_config

READ_LIMIT = 15.0


class RawWorker:
    """A worker process spoken to in bytes; every read is capped by a deadline."""

    def __init__(self, root: Path) -> None:
        config = process_config(root)
        self.workspace = root / "u"
        self.workspace.mkdir(exist_ok=True)
        spec = process_launch(config, self.workspace)
        self.plan = spec.plan
        pipe = subprocess.PIPE
        self.proc = subprocess.Popen(spec.argv, env=spec.env, cwd=spec.cwd, stdin=pipe, stdout=pipe, stderr=pipe,
                                     start_new_session=True)  # fmt: skip
        self._buf = b""

    def send(self, *frames: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"".join(frames))  # one write: the worker may read them in one go
        self.proc.stdin.flush()

    def answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + READ_LIMIT
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"no answer within {READ_LIMIT} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"worker ended: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        obj: dict[str, Any] = json.loads(line)
        return obj

    def initialize(self, **extra: Any) -> bytes:
        return protocol.encode(Request(1, "initialize", {"worker_id": "raw", "plan": self.plan, **extra}))

    def close(self) -> int:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            return self.proc.wait(READ_LIMIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()


@pytest.fixture
def raw(workspace_root: Path) -> Any:
    worker = RawWorker(workspace_root)
    yield worker
    worker.close()


def test_frames_sent_with_initialize_are_served_in_order(raw: RawWorker) -> None:
    """What the handshake read past its own frames is served by the loop, answered as always."""
    raw.send(
        raw.initialize(),
        protocol.encode(Request(2, "ping", {"echo": "é"})),
        protocol.encode(Request(3, "no.such.method")),
        b"{not json\n",
        protocol.encode(Request(4, "ping")),
    )
    init = raw.answer()
    assert init["id"] == 1 and init["result"]["protocol"] == protocol.PROTOCOL_VERSION
    assert init["result"]["layers"]["umask"] == "077"
    answers = {a["id"]: a for a in (raw.answer() for _ in range(4))}  # the loop answers in any order
    assert answers[2]["result"]["echo"] == "é"
    assert answers[3]["error"]["code"] == codes.METHOD_NOT_FOUND
    assert answers[None]["error"]["code"] == codes.PARSE_ERROR
    assert answers[4]["result"]["pong"] is True
    assert raw.close() == 0


def test_bind_and_pings_are_answered_in_the_handshake_then_exec_runs(raw: RawWorker) -> None:
    raw.send(raw.initialize(bind_follows=True))
    assert raw.answer()["result"]["pid"] == raw.proc.pid
    raw.send(protocol.encode(Request(2, "ping")))
    assert raw.answer()["result"]["pong"] is True
    raw.send(protocol.encode(Request(3, "bind", {"user_id": "u", "workspace": str(raw.workspace)})))
    assert raw.answer()["result"] == {"user_id": "u", "workspace": str(raw.workspace), "preload": {"state": "none"}}
    raw.send(protocol.encode(Request(4, "exec", {"argv": ["sh", "-c", "pwd; echo $HOME"]})))
    out = b""
    while True:
        msg = raw.answer()
        if msg.get("method") == "event" and msg["params"]["type"] == "stdout":
            out += msg["params"]["data"]["data"].encode()
        elif msg.get("id") == 4:
            assert msg["result"]["exit_code"] == 0
            break
    assert out.decode().split() == [str(raw.workspace), str(raw.workspace)]
    raw.send(protocol.encode(Request(5, "bind", {"user_id": "other", "workspace": str(raw.workspace)})))
    assert "already bound" in raw.answer()["error"]["message"]


def test_before_initialize_and_twice(raw: RawWorker) -> None:
    """A request before ``initialize`` is refused as before; a second ``initialize`` too."""
    raw.send(protocol.encode(Request(1, "ping")))
    refused = raw.answer()
    assert refused["error"] == {"code": codes.INVALID_REQUEST, "message": "initialize first"}
    raw.send(protocol.encode(Request(2, "initialize", {"worker_id": "raw", "plan": raw.plan})))
    assert raw.answer()["result"]["protocol"] == protocol.PROTOCOL_VERSION
    raw.send(protocol.encode(Request(3, "initialize", {"worker_id": "raw", "plan": raw.plan})))
    assert raw.answer()["error"]["message"] == "already initialized"


def test_a_layer_that_fails_fails_initialize_in_the_handshake(raw: RawWorker) -> None:
    plan = {**raw.plan, "rlimits": {"no-such-limit": 1}}
    raw.send(protocol.encode(Request(1, "initialize", {"worker_id": "raw", "plan": plan})))
    error = raw.answer()["error"]
    assert error["code"] == codes.ISOLATION_UNAVAILABLE and "no-such-limit" in error["message"]
    raw.send(protocol.encode(Request(2, "exec", {"argv": ["true"]})))
    assert raw.answer()["error"]["message"] == "initialize first"


def test_oversized_first_frame_is_refused_by_the_loop(workspace_root: Path) -> None:
    worker = RawWorker(workspace_root)
    try:
        huge = protocol.encode(Request(7, "initialize", {"pad": "x" * (protocol.DEFAULT_MAX_FRAME + 10)}))
        worker.send(huge, worker.initialize())
        assert worker.answer() == {"jsonrpc": "2.0", "id": 7, "error": {
            "code": codes.FRAME_TOO_LARGE, "message": f"frame larger than {protocol.DEFAULT_MAX_FRAME} bytes dropped"}}
        assert worker.answer()["result"]["protocol"] == protocol.PROTOCOL_VERSION
    finally:
        worker.close()


def test_end_of_input_during_the_handshake_ends_the_worker(raw: RawWorker) -> None:
    raw.send(raw.initialize(bind_follows=True))
    raw.answer()
    assert raw.close() == 0


_PROBE = r"""
import os, sys
sys.path.insert(0, {root!r})
from sandbox_core.inside import handshake
r, w = os.pipe()
out_r, out_w = os.pipe()
os.write(w, sys.stdin.buffer.read())
os.close(w)
booted = handshake.serve_handshake(r, out_w, 1 << 20)
heavy = sorted(m for m in ("asyncio", "dataclasses", "json", "re", "enum", "typing", "sandbox_core.protocol",
                          "sandbox_core.inside.worker_main")
               if m in sys.modules)
sys.stdout.write(repr((heavy, booted.user_id, booted.pending)) + "\n")
sys.stdout.write(os.read(out_r, 1 << 20).decode())
"""


def test_the_handshake_imports_neither_asyncio_nor_json_nor_the_protocol_module(workspace_root: Path) -> None:
    workspace = workspace_root / "u"
    workspace.mkdir()
    frames = (
        protocol.encode(Request(1, "initialize", {"worker_id": "p", "plan": {"umask": 0o077}, "bind_follows": True}))
        + protocol.encode(Request(2, "ping"))
        + protocol.encode(Request(3, "bind", {"user_id": "u", "workspace": str(workspace)}))
        + protocol.encode(Request(4, "exec", {"argv": ["true"]}))
    )
    probe = subprocess.run([sys.executable, "-I", "-S", "-c", _PROBE.format(root=PACKAGE_ROOT)], input=frames,
                           capture_output=True, timeout=READ_LIMIT, check=True, cwd=workspace_root)  # fmt: skip
    first, *answers = probe.stdout.decode().splitlines()
    heavy, user, pending = ast.literal_eval(first)
    assert heavy == [] and user == "u"
    assert pending == protocol.encode(Request(4, "exec", {"argv": ["true"]}))
    assert [json.loads(a)["id"] for a in answers] == [1, 2, 3]


def test_handshake_frames_are_the_protocol_encoding() -> None:
    assert handshake.PROTOCOL_VERSION == protocol.PROTOCOL_VERSION
    assert handshake.DEFAULT_MAX_FRAME == protocol.DEFAULT_MAX_FRAME
    assert handshake.MAX_NESTING == protocol.MAX_NESTING
    for result in ({"a": "é\u2028", "n": [1, 2.5, None]}, None, "x"):
        assert handshake.answer(3, result) == protocol.encode(Response(3, result=result))
    refused = handshake.refusal("w1", ProtocolError("bad"))
    assert refused == protocol.encode(Response("w1", error={"code": codes.INVALID_REQUEST, "message": "bad"}))
    for line in (protocol.encode(Request(1, "m", {"k": 1})), protocol.encode(Request("s", "m"))):
        decoded = protocol.decode(line)
        assert isinstance(decoded, Request)
        assert handshake.request(line.rstrip(b"\n")) == (decoded.id, decoded.method, decoded.params)
    deep: dict[str, Any] = {"k": 1}
    for _ in range(protocol.MAX_NESTING):
        deep = {"k": deep}
    for bad in (protocol.encode(Notification("cancel", {"id": 1})), b'{"jsonrpc":"2.0","id":true,"method":"m"}',
                b"[" * 70 + b"]" * 70, b'{"jsonrpc":"1.0","id":1,"method":"m"}', b"[" * 100_000 + b"]" * 100_000,
                protocol.encode(Request(1, "initialize", deep))):
        assert handshake.request(bad.rstrip(b"\n")) is None
    wide = protocol.encode(Request(1, "initialize", {"plan": {"expect_mounts": [[f"/p{i}", "ro"] for i in range(99)]}}))
    assert protocol.too_deep(wide) is False and wide.count(b"[") > protocol.MAX_NESTING
    assert handshake.request(wide.rstrip(b"\n")) is not None  # many brackets, shallow: the handshake serves it
