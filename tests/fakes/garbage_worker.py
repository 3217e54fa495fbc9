"""A broken worker for tests: completes the handshake, then mixes garbage into its answers.

For ``ping`` it writes ``GARBAGE`` malformed lines (and one oversized line) before the
real answer; every other method gets a proper answer too. ``GARBAGE`` is argv[1] (the
environment is the allowlisted one: the host checks it).
"""

import json
import os
import resource
import sys
from typing import Any

GARBAGE = int(sys.argv[1]) if len(sys.argv) > 1 else 3


def comply(plan: dict[str, Any]) -> None:
    """Apply the plan's umask and rlimits, as the real worker does: the host checks them."""
    os.umask(int(plan.get("umask", 0o077)))
    for name, value in (plan.get("rlimits") or {}).items():
        soft, hard = (value, value) if isinstance(value, int) else value
        resource.setrlimit(getattr(resource, f"RLIMIT_{name.upper()}"), (soft, hard))


def send(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg or "method" not in msg:
        continue
    if msg["method"] == "initialize":
        comply(msg["params"]["plan"])
        send({"jsonrpc": "2.0", "id": msg["id"], "result": {"protocol": "1", "pid": os.getpid(), "layers": {}}})
    elif msg["method"] == "ping":
        for i in range(GARBAGE):
            sys.stdout.write(f"garbage {i} {{not json\n")
        sys.stdout.write("x" * 5000 + "\n")
        send({"jsonrpc": "2.0", "id": msg["id"], "result": {"pong": True}})
    else:
        send({"jsonrpc": "2.0", "id": msg["id"], "result": {}})
