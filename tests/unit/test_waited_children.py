"""The clean-up after one request (:func:`sandbox_core.inside.runner.kill_strays`) leaves the
commands other requests are still waiting for alone: it neither kills nor reaps them, so
their exit status stays theirs (reaped by another, a command reported 255).

Run in a child process that is a child subreaper, as a worker is (the clean-up does
nothing elsewhere), with the worker's pidfd watcher. The two commands have exited, and
are zombies, before the loop has run their watchers: the clean-up then runs first, the
moment that decides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import asyncio, json, os, time
from sandbox_core.inside import children, identity, runner
from sandbox_core.process_tree import boot_ticks

identity.become_subreaper()
assert children.watch_with_pidfds()


def zombie(pid):
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] == "Z"


async def main():
    since = boot_ticks()
    fifos = [os.path.join(os.environ["WORK"], name) for name in ("go3", "go4")]
    for fifo in fifos:
        os.mkfifo(fifo)
    # each waits for its FIFO: nothing exits while the loop runs
    plain = runner._PlainCommand(["sh", "-c", f"read x < {fifos[0]}; exit 3"], "/")  # exec without stdin
    streamed = await asyncio.create_subprocess_exec("sh", "-c", f"read x < {fifos[1]}; exit 4")  # asyncio's own
    for fifo in fifos:  # from here on the loop does not run until the clean-up has
        with open(fifo, "w") as go:
            go.write("now\n")
    deadline = time.monotonic() + 10
    while not (zombie(plain.pid) and zombie(streamed.pid)):  # blocking: their watchers must not run yet
        assert time.monotonic() < deadline, "commands did not exit"
        time.sleep(0.001)
    waited = sorted(children.waited())
    runner.kill_strays(since, frozenset(), alone=False)  # another request's clean-up, right then
    print(json.dumps({"waited": waited, "pids": sorted([plain.pid, streamed.pid]),
                      "codes": [await plain.exit(), await streamed.wait()], "after": sorted(children.waited())}))


asyncio.run(main())
"""


def test_a_clean_up_leaves_the_commands_others_wait_for(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "WORK": str(tmp_path)})  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["waited"] == got["pids"]  # both were known as waited for
    assert got["codes"] == [3, 4]  # reaped by their own watchers: their own status, not 255
    assert got["after"] == []  # and forgotten once reaped
