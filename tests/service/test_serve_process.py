"""``sandbox serve`` as a real process: SIGTERM drains, then exits with no worker left."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox_core.service.client import ServiceClient, ServiceError
from tests.helpers import live_session_members, short_socket_path, wait_for

SANDBOX = str(Path(sys.executable).with_name("sandbox"))


def start_serve(tmp_path: Path, **settings: str) -> tuple[subprocess.Popen[str], Path, Path]:
    """``sandbox serve`` (process profile) on a private socket; ``settings`` are SANDBOX_* variables."""
    sock = short_socket_path("serve")
    ws = tmp_path / "ws"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")}
    env.update(SANDBOX_WORKSPACE_ROOT=str(ws), SANDBOX_STATE_DIR=str(tmp_path / "state"), SANDBOX_MIN_IDLE="0",
               SANDBOX_ALLOW_ROOT_PROCESS="1", SANDBOX_SERVICE__DRAIN_GRACE="20", XDG_CONFIG_HOME=str(tmp_path / "cfg"),
               NO_COLOR="1")
    env.update({f"SANDBOX_{k.upper()}": v for k, v in settings.items()})
    proc = subprocess.Popen([SANDBOX, "--profile", "process", "serve", "--socket", str(sock)],
                            env=env, stderr=subprocess.PIPE, text=True)
    return proc, sock, ws


def end_serve(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, Path]]:
    proc, sock, ws = start_serve(tmp_path)
    try:
        yield proc, sock, ws
    finally:
        end_serve(proc)


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


async def test_runs_past_the_drain_end_with_a_shutting_down_event_and_one_log_line(tmp_path: Path) -> None:
    """SIGTERM with runs that outlast ``drain_grace``: each stream's last event is the typed
    ServerShuttingDown (not a cut body), and the log says one line per run, no traceback."""
    from sandbox_core import codes
    from sandbox_core.errors import ServerShuttingDown

    proc, sock, _ws = start_serve(tmp_path, service__drain_grace="1", max_workers_per_user="3")
    runs = 3
    try:
        await wait_for(sock.exists, 20, "the socket")
        async with ServiceClient(f"unix:{sock}") as client:
            streams = [client.stream("exec", {"shell": f"echo started {i}; sleep 300"}) for i in range(runs)]
            pids = []
            for i, stream in enumerate(streams):
                pids.append((await anext(stream)).data["pid"])
                assert (await anext(stream)).data["data"] == f"started {i}\n"
            proc.send_signal(signal.SIGTERM)
            for stream in streams:
                with pytest.raises(ServerShuttingDown, match="shutting down") as info:
                    async for event in stream:
                        raise AssertionError(f"an event after the drain: {event}")
                assert info.value.code == codes.SERVER_SHUTTING_DOWN
                assert info.value.data["setting"] == "service.drain_grace"
        code = await asyncio.to_thread(proc.wait, 30)
        log = proc.stderr.read() if proc.stderr else ""
        assert code == 0, log
        assert "Traceback" not in log and "Exception in ASGI" not in log, log
        stopped = [line for line in log.splitlines() if "stopped run" in line]
        assert len(stopped) == runs and all("the server is shutting down" in line for line in stopped), log
        for pid in pids:
            assert not live_session_members(pid)
    finally:
        end_serve(proc)


async def test_a_log_nobody_reads_does_not_stop_the_service(tmp_path: Path) -> None:
    """The service's stderr is a pipe that nobody reads (shrunk to one page: some twenty log
    lines fill it). It goes on answering, every line is still written once the pipe is read,
    and it exits cleanly. Before, its event loop waited on the full pipe: the first request past
    the twentieth line never got an answer, nor did any after it."""
    proc, sock, _ws = start_serve(tmp_path)
    try:
        assert proc.stderr is not None
        fcntl.fcntl(proc.stderr.fileno(), fcntl.F_SETPIPE_SZ, 4096)
        await wait_for(sock.exists, 20, "the socket")
        requests = 200  # each one an access line (~170 bytes): eight times the pipe
        async with ServiceClient(f"unix:{sock}") as client:
            for _ in range(requests):
                async with asyncio.timeout(20):
                    assert (await client.health())["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        log = await asyncio.to_thread(proc.stderr.read)  # read at last: the writer thread catches up
        assert await asyncio.to_thread(proc.wait, 30) == 0, log
        assert log.count("GET /v1/health") == requests, log[-2000:]
        assert "dropped" not in log  # the queue holds far more than this
    finally:
        end_serve(proc)


def test_a_full_log_queue_drops_and_counts_instead_of_waiting() -> None:
    """The writer is stuck on its stream; the loggers' handler neither waits nor grows: past the
    queue's limit records are dropped, and the next line written says how many."""
    from sandbox_core.service.logs import _Queued

    written: list[str] = []
    release = threading.Event()

    class Stuck(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            release.wait(30)
            written.append(record.getMessage())

    handler = _Queued(Stuck(), limit=2)
    log = logging.getLogger("test.full-log-queue")
    log.handlers, log.propagate = [handler], False
    try:
        log.warning("first")  # taken by the writer, which is stuck on it
        assert wait_until(lambda: handler._queue.empty(), 10)
        for i in range(10):
            log.warning("line %d", i)  # returns at once, whether queued or not
        release.set()
        assert handler.drain(10)
        assert written == ["first", "line 0", "line 1", "8 log lines were dropped: stderr was not read fast enough"]
        log.warning("after")  # room again: written as usual
        assert handler.drain(10) and written[-1] == "after"
    finally:
        release.set()
        handler.stop(10)


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` (from a thread that is not an event loop's) until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


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
