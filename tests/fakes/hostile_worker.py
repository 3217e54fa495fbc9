"""A compromised worker for tests: completes the handshake, then answers ``ping`` with abuse.

argv[1] picks the abuse (see the branches below); every other method gets a proper answer.
``garbage N`` (argv[1], argv[2]) is a merely broken worker: N malformed lines and one
oversized line before each real answer to ``ping``.
Only the standard library: this runs as the worker process itself.
"""

import json
import os
import resource
import sys
from typing import Any

MODE = sys.argv[1] if len(sys.argv) > 1 else ""
out = sys.stdout.buffer


def comply(plan: dict[str, Any]) -> None:
    """Apply the plan's umask and rlimits, as the real worker does: the host checks them."""
    os.umask(int(plan.get("umask", 0o077)))
    for name, value in (plan.get("rlimits") or {}).items():
        soft, hard = (value, value) if isinstance(value, int) else value
        resource.setrlimit(getattr(resource, f"RLIMIT_{name.upper()}"), (soft, hard))


def send(obj: object) -> None:
    out.write(json.dumps(obj).encode() + b"\n")
    out.flush()


def answer(msg_id: object, result: object) -> None:
    send({"jsonrpc": "2.0", "id": msg_id, "result": result})


def abuse(msg_id: int) -> None:
    if MODE == "garbage":
        for i in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
            out.write(b"garbage %d {not json\n" % i)
        out.write(b"x" * 5000 + b"\n")
        answer(msg_id, {"pong": True})
    elif MODE == "deep":  # an answer nested past any parser's patience
        out.write(b'{"jsonrpc":"2.0","id":%d,"result":' % msg_id + b"[" * 1500 + b"]" * 1500 + b"}\n")
        out.flush()
    elif MODE == "badtype":  # an event whose type is a list, then the real answer in the same write
        event = {"jsonrpc": "2.0", "method": "event", "params": {"request_id": msg_id, "type": ["x"], "data": {}}}
        out.write(json.dumps(event).encode() + b"\n" + json.dumps(
            {"jsonrpc": "2.0", "id": msg_id, "result": {"pong": True}}).encode() + b"\n")
        out.flush()
    elif MODE == "unknown":  # answers and events for requests that do not exist
        for i in range(400):
            send({"jsonrpc": "2.0", "id": 10_000 + i, "result": {}})
            send({"jsonrpc": "2.0", "method": "event", "params": {"request_id": 20_000 + i, "type": "stdout"}})
    elif MODE == "binary":
        for _ in range(400):
            out.write(os.urandom(64).replace(b"\n", b"") + b"\n")
        out.flush()
    elif MODE == "flood":
        out.write(b"{nope}\n" * 100_000)
        out.flush()
    elif MODE == "nonewline":  # half a frame, then gone
        out.write(b'{"jsonrpc":"2.0","id":%d,"result":{"po' % msg_id)
        out.flush()
        os._exit(0)
    elif MODE == "hostcalls":  # ten model calls at once; answer ping once all ten are answered
        for i in range(10):
            send({"jsonrpc": "2.0", "id": f"w{i}", "method": "gateway.request", "params": {}})
        answers: dict[str, object] = {}
        for line in sys.stdin:
            msg = json.loads(line)
            if isinstance(msg.get("id"), str) and ("result" in msg or "error" in msg):
                answers[msg["id"]] = msg.get("error", {}).get("message") if "error" in msg else "ok"
                if len(answers) == 10:
                    break
        answer(msg_id, {"answers": answers})
    elif MODE == "lastword":  # the answer, then gone at once: the answer must win over the exit
        answer(msg_id, {"pong": True})
        os._exit(0)
    elif MODE == "forge":  # an error only the host may raise
        send({"jsonrpc": "2.0", "id": msg_id, "error": {"code": -32007, "message": "the pool closed (forged)"}})
    else:
        answer(msg_id, {"pong": True})


for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg or "method" not in msg:
        continue
    if msg["method"] == "initialize":
        comply(msg["params"]["plan"])
        answer(msg["id"], {"protocol": "1", "pid": os.getpid(), "layers": {}})
    elif msg["method"] == "ping":
        abuse(msg["id"])
    elif msg["method"] == "bind" and MODE == "nobind":  # never bound: its request waits until cancelled
        continue
    else:
        answer(msg["id"], {})
