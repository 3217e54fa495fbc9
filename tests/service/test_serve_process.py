"""``sandbox serve`` as a real process: SIGTERM drains, then exits with no worker left."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_core.service.client import ServiceClient, ServiceError
from tests.helpers import live_session_members, wait_for

SANDBOX = str(Path(sys.executable).with_name("sandbox"))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, Path]]:
    sock = Path(f"/tmp/sbx-serve-{os.getpid()}-{secrets.token_hex(3)}") / "s.sock"
    ws = tmp_path / "ws"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")}
    env.update(SANDBOX_WORKSPACE_ROOT=str(ws), SANDBOX_STATE_DIR=str(tmp_path / "state"), SANDBOX_MIN_IDLE="0",
               SANDBOX_SERVICE__DRAIN_GRACE="20",
               XDG_CONFIG_HOME=str(tmp_path / "cfg"), NO_COLOR="1")
    proc = subprocess.Popen([SANDBOX, "--profile", "process", "serve", "--socket", str(sock)],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        yield proc, sock, ws
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


async def test_sigterm_drains_in_flight_runs(served: tuple[subprocess.Popen[str], Path, Path]) -> None:
    proc, sock, ws = served
    try:
        await wait_for(sock.exists, 20, "the socket")
        client = ServiceClient(f"unix:{sock}")
        stream = client.stream("exec", {"shell": "echo started; while [ ! -e go ]; do sleep 0.01; done; echo fin"})
        started = await anext(stream)
        worker_pid = started.data["pid"]
        assert (await anext(stream)).data["data"] == "started\n"
        proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: not sock.exists() or _refused(sock), 10, "listener closed")
        async with ServiceClient(f"unix:{sock}") as late:
            with pytest.raises(ServiceError):
                await late.health()
        user = next(p.name for p in ws.iterdir())
        (ws / user / "go").touch()
        rest = [e async for e in stream]
        assert rest[-1].type == "done" and rest[-2].data["data"] == "fin\n"
        await client.aclose()
        code = await asyncio.to_thread(proc.wait, 30)
        assert code == 0, proc.stderr.read() if proc.stderr else ""
        assert not live_session_members(worker_pid)
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _refused(sock: Path) -> bool:
    import socket

    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(sock))
    except OSError:
        return True
    finally:
        s.close()
    return False


async def test_second_sigint_stops_at_once(served: tuple[subprocess.Popen[str], Path, Path]) -> None:
    proc, sock, _ws = served
    try:
        await wait_for(sock.exists, 20, "the socket")
        client = ServiceClient(f"unix:{sock}")
        stream = client.stream("exec", {"shell": "echo started; sleep 300"})
        worker_pid = (await anext(stream)).data["pid"]
        await anext(stream)
        proc.send_signal(signal.SIGINT)
        await wait_for(lambda: _refused(sock), 10, "draining")
        proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(proc.wait, 15)
        with pytest.raises(Exception):  # noqa: B017 - the stream is cut, however the transport reports it
            async for _ in stream:
                pass
        await client.aclose()
        assert not live_session_members(worker_pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
