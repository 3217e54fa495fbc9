"""Runs one command inside the worker, streaming its output as events.

The command gets the worker's (already scrubbed) environment and the workspace as cwd,
in a process group of its own. On cancel, and after it exits, the whole group is
killed, so nothing it started in the background outlives the request.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import functools
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from sandbox_core.errors import ProtocolError
from sandbox_core.process_tree import boot_ticks, descendants

if TYPE_CHECKING:
    from sandbox_core.inside.channel import RequestContext

_READ = 64 * 1024
_DRAIN_AFTER_EXIT = 2.0
_REAP_WAIT = 1.0
"""Seconds to wait for killed strays to be reaped (a SIGKILLed process dies at once)."""
NOT_EXECUTABLE = 126
NOT_FOUND = 127


def command_argv(params: dict[str, Any]) -> list[str]:
    """The argv of an ``exec`` request (``argv`` list or ``shell`` string)."""
    argv, shell = params.get("argv"), params.get("shell")
    if argv is not None:
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ProtocolError("argv must be a non-empty list of strings")
        return argv
    if isinstance(shell, str) and shell:
        return ["/bin/sh", "-c", shell]
    raise ProtocolError("exec needs argv or shell")


def kill_group(pgid: int) -> None:
    """SIGKILL a process group, ignoring one that is already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class _ExitWatch(asyncio.subprocess.SubprocessStreamProtocol):
    """The stream protocol, plus a future that resolves when the process exits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=_READ, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


@functools.cache
def _in_worker() -> bool:
    from sandbox_core.inside.identity import is_subreaper

    return is_subreaper()


def kill_strays(since: int, exclude: frozenset[int] = frozenset()) -> None:
    """Kill what a request started that is still running, wherever it went (``setsid``,
    double fork), and reap the orphans among them.

    The worker is a child subreaper, so orphans are re-parented to it and stay its
    descendants; every descendant started since the request began dies. Those that end
    up as our children are reaped here (asyncio reaps only what it spawned, ``exclude``).
    """
    if not _in_worker():  # only a worker owns all of its descendants (tests run tools in-process)
        return
    strays = [pid for pid in descendants(os.getpid(), started_since=since) if pid not in exclude]
    for pid in strays:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + _REAP_WAIT
    pending = set(strays)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not (yet) ours: gone, or its parent reaps it
                if not os.path.exists(f"/proc/{pid}"):
                    pending.discard(pid)
                continue
            if done:
                pending.discard(pid)
        if pending:
            time.sleep(0.002)


async def _pump(stream: asyncio.StreamReader, ctx: RequestContext, kind: str) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := await stream.read(_READ):
        text = decoder.decode(chunk)
        if text:
            await ctx.emit("stdout" if kind == "stdout" else "stderr", {"data": text})
    tail = decoder.decode(b"", final=True)
    if tail:
        await ctx.emit("stdout" if kind == "stdout" else "stderr", {"data": tail})


async def _feed(proc: asyncio.subprocess.Process, data: bytes | None) -> None:
    if proc.stdin is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        if data:
            proc.stdin.write(data)
            await proc.stdin.drain()
    proc.stdin.close()


async def run_command(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    """Run the command of an ``exec`` request; the result carries ``exit_code``."""
    argv = command_argv(params)
    stdin_b64 = params.get("stdin_b64")
    data = base64.b64decode(stdin_b64) if isinstance(stdin_b64, str) else None
    started = time.monotonic()
    since = boot_ticks()
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.subprocess_exec(
            lambda: _ExitWatch(loop),
            *argv,
            stdin=asyncio.subprocess.PIPE if data is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ctx.workspace,
            process_group=0,
        )
    except FileNotFoundError:
        await ctx.emit("stderr", {"data": f"{argv[0]}: command not found\n"})
        return {"exit_code": NOT_FOUND, "duration_s": 0.0}
    except PermissionError:
        await ctx.emit("stderr", {"data": f"{argv[0]}: permission denied\n"})
        return {"exit_code": NOT_EXECUTABLE, "duration_s": 0.0}
    proc = asyncio.subprocess.Process(transport, protocol, loop)
    assert proc.stdout is not None and proc.stderr is not None
    pumps = [
        asyncio.create_task(_pump(proc.stdout, ctx, "stdout")),
        asyncio.create_task(_pump(proc.stderr, ctx, "stderr")),
        asyncio.create_task(_feed(proc, data)),
    ]
    try:
        await protocol.exited  # not proc.wait(): on 3.11 that also waits for every pipe to close
        returncode = transport.get_returncode()
        kill_group(proc.pid)  # background children must not outlive the request
        kill_strays(since, frozenset({proc.pid}))
        _done, pending = await asyncio.wait(pumps, timeout=_DRAIN_AFTER_EXIT)
        for task in pending:  # a process that left the group still holds the pipe
            task.cancel()
    except BaseException:
        kill_group(proc.pid)
        kill_strays(since, frozenset({proc.pid}))
        for task in pumps:
            task.cancel()
        transport.close()
        raise
    finally:
        if transport.get_returncode() is not None:
            transport.close()
    assert returncode is not None
    result: dict[str, Any] = {"duration_s": round(time.monotonic() - started, 6)}
    if returncode < 0:
        result["signal"] = -returncode
        result["exit_code"] = 128 - returncode
    else:
        result["exit_code"] = returncode
    return result
