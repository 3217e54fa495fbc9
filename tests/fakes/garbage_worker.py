"""A broken worker for tests: completes the handshake, then mixes garbage into its answers.

For ``ping`` it writes ``GARBAGE`` malformed lines (and one oversized line) before the
real answer; every other method gets a proper answer too.
"""

import json
import os
import sys

GARBAGE = int(os.environ.get("GARBAGE_LINES", "3"))


def send(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg or "method" not in msg:
        continue
    if msg["method"] == "initialize":
        send({"jsonrpc": "2.0", "id": msg["id"], "result": {"protocol": "1", "pid": os.getpid(), "layers": {}}})
    elif msg["method"] == "ping":
        for i in range(GARBAGE):
            sys.stdout.write(f"garbage {i} {{not json\n")
        sys.stdout.write("x" * 5000 + "\n")
        send({"jsonrpc": "2.0", "id": msg["id"], "result": {"pong": True}})
    else:
        send({"jsonrpc": "2.0", "id": msg["id"], "result": {}})
