"""The pipe between host and worker is faithful and bounded (real worker processes).

Bytes arrive as sent in both directions, stdin of any size streams with backpressure,
every frame gets an answer, and a compromised worker (tests/fakes/hostile_worker.py) can
neither hang nor grow the host: its calls fail with a typed error and it is retired.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_core import worker as worker_module
from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import ProtocolError, SandboxError, WorkerCrashed
from sandbox_core.isolation.spec import LaunchSpec, process_launch
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.process_tree import alive, descendants
from sandbox_core.requests import AgentRequest, ExecRequest, RawRequest
from sandbox_core.worker import SandboxWorker
from tests.helpers import process_config, wait_for

FAKES = Path(__file__).resolve().parents[1] / "fakes"
ALL_BYTES = bytes(range(256)) * 64 + os.urandom(256 * 1024)


def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _sh(script: str, **kw: Any) -> ExecRequest:
    return ExecRequest(shell=script, **kw)


# ----------------------------------------------------------------- bytes, both ways


async def test_binary_output_and_stdin_arrive_byte_for_byte(workspace_root: Path) -> None:
    (workspace_root / "u").mkdir()
    (workspace_root / "u" / "blob").write_bytes(ALL_BYTES)
    async with SandboxOrchestrator(process_config(workspace_root)) as pool:
        out = await pool.execute("u", ExecRequest(argv=("cat", "blob")))
        assert out.stdout == ALL_BYTES and out.exit_code == 0
        err = await pool.execute("u", _sh("cat blob >&2"))
        assert err.stderr == ALL_BYTES and err.stdout == b""
        echoed = await pool.execute("u", ExecRequest(argv=("cat",), stdin=ALL_BYTES))
        assert hashlib.md5(echoed.stdout).digest() == hashlib.md5(ALL_BYTES).digest()
        zipped = await pool.execute("u", _sh("gzip -c blob | gunzip | sha256sum"))
        assert zipped.stdout_text.split()[0] == hashlib.sha256(ALL_BYTES).hexdigest()


async def test_text_output_stays_text_in_json(workspace_root: Path) -> None:
    """Output is bytes, but UTF-8 text still reads as text in the JSON form of events."""
    async with SandboxOrchestrator(process_config(workspace_root)) as pool:
        result = await pool.execute("u", _sh("printf 'héllo €\\n'"))
        (event,) = [e for e in result.events if e.type == "stdout"]
        assert event.to_dict()["data"] == {"data": "héllo €\n"}
        binary = await pool.execute("u", _sh("printf '\\377\\000'"))
        (event,) = [e for e in binary.events if e.type == "stdout"]
        assert event.to_dict()["data"] == {"b64": "/wA="} and event.chunk() == b"\xff\x00"


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at : at + size]


async def test_hundred_megabytes_of_stdin_stream_with_bounded_host_memory(workspace_root: Path) -> None:
    block = os.urandom(1024 * 1024)
    total = 100
    digest = hashlib.sha256(block * total).hexdigest()

    async def produce() -> AsyncIterator[bytes]:
        for _ in range(total):
            yield block

    async with SandboxOrchestrator(process_config(workspace_root, request_timeout=120)) as pool:
        await pool.execute("u", _sh("true"))  # the worker is up before we measure
        before = _rss_kb()
        result = await pool.execute("u", ExecRequest(argv=("sha256sum",), stdin=produce()))
        grown_mb = (_rss_kb() - before) / 1024
    assert result.stdout_text.split()[0] == digest
    assert grown_mb < 40, f"host RSS grew {grown_mb:.0f} MB for 100 MB of stdin"


async def test_stdin_reaches_the_command_before_it_ends(workspace_root: Path) -> None:
    """The first half is seen (and acted on) while the second has not been written yet."""
    ws = workspace_root / "u"
    ws.mkdir()
    seen = ws / "seen"

    async def halves() -> AsyncIterator[bytes]:
        yield b"first\n"
        await wait_for(seen.exists, 10, "the command to read the first half")
        yield b"second\n"

    script = "read a; echo \"$a\" > seen; read b; echo \"$a $b\""
    async with SandboxOrchestrator(process_config(workspace_root)) as pool:
        result = await pool.execute("u", _sh(script, stdin=halves()))
    assert result.stdout_text == "first second\n" and seen.read_text() == "first\n"


async def test_a_command_that_never_reads_stdin_does_not_hang_the_sender(workspace_root: Path) -> None:
    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 65536

    async with SandboxOrchestrator(process_config(workspace_root)) as pool:
        began = time.monotonic()
        result = await pool.execute("u", _sh("exec 0<&-; echo done", stdin=endless()))
        assert result.stdout_text == "done\n" and time.monotonic() - began < 10
        follow = await pool.execute("u", _sh("echo next"))  # the worker is still usable
        assert follow.stdout_text == "next\n" and follow.worker_id == result.worker_id


async def test_a_failing_stdin_source_also_ends_the_command_in_the_worker(workspace_root: Path) -> None:
    """The request fails with the source's error, and its command is cancelled, not left waiting
    for stdin (where it would end later and kill what a later request had started)."""

    got = workspace_root / "u" / "got"

    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * 200_000
        await wait_for(lambda: got.exists() and got.stat().st_size == 200_000, what="cat took the first chunk")
        raise RuntimeError("the source broke")

    async with SandboxOrchestrator(process_config(workspace_root)) as pool:
        warm = await pool.execute("u", _sh("true"))
        worker = pool._workers[warm.worker_id]
        with pytest.raises(SandboxError, match="the source broke"):
            await pool.execute("u", _sh("exec cat > got", stdin=broken()))
        def cats() -> list[int]:
            return [p for p in descendants(worker.pid or 0) if alive(p) and _comm(p) == "cat"]

        await wait_for(lambda: not cats(), timeout=5, what="the failed request's cat gone (not waiting for stdin)")
        follow = await pool.execute("u", _sh("echo next"))
        assert follow.stdout_text == "next\n" and follow.worker_id == worker.worker_id


async def test_a_command_that_closes_stdin_stops_the_sender(workspace_root: Path) -> None:
    """The worker tells the host the command closed its stdin; the host stops pulling the source."""
    ws = workspace_root / "u"
    ws.mkdir()
    sent = 0
    stopped = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        try:
            while True:
                sent += 65536
                yield b"x" * 65536
        finally:
            stopped.set()

    script = "head -c 1000 >/dev/null; exec 0<&-; while [ ! -e go ]; do sleep 0.02; done; echo done"
    async with SandboxOrchestrator(process_config(workspace_root)) as pool:
        run = asyncio.create_task(pool.execute("u", _sh(script, stdin=endless())))
        async with asyncio.timeout(10):
            await stopped.wait()
        assert sent < 64 * 1024 * 1024  # bounded by the pipes, not by the source
        (ws / "go").touch()
        assert (await run).stdout == b"done\n"


# ----------------------------------------------------------------- every frame answered


async def test_a_request_over_the_frame_limit_fails_at_once(workspace_root: Path) -> None:
    config = process_config(workspace_root, max_frame_bytes=64 * 1024)
    async with SandboxOrchestrator(config) as pool:
        began = time.monotonic()
        with pytest.raises(ProtocolError, match="frame limit") as info:
            await pool.execute("u", AgentRequest(prompt="x" * 100_000))
        assert time.monotonic() - began < 5 and info.value.data["frame_bytes"] > 64 * 1024
        big = os.urandom(300_000)  # stdin over the limit streams instead
        result = await pool.execute("u", ExecRequest(argv=("wc", "-c"), stdin=big))
        assert result.stdout_text.strip() == "300000"


async def test_the_worker_answers_an_oversized_frame_with_its_id(tmp_path: Path) -> None:
    """The inside salvages the id from the frame's head and answers at once."""
    from sandbox_core.isolation.spec import python_argv
    from sandbox_core.protocol import FrameSplitter, Request, Response, encode

    argv = [*python_argv(process_config(tmp_path))[:-1], "4096"]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(encode(Request(1, "initialize", {"worker_id": "t", "plan": {}})))
        proc.stdin.write(encode(Request(7, "exec", {"argv": ["true"], "pad": "p" * 10_000})))
        await proc.stdin.drain()
        splitter, answers = FrameSplitter(), list[Response]()
        async with asyncio.timeout(10):
            while len(answers) < 2:
                answers += [m for m in splitter.feed(await proc.stdout.read(65536)) if isinstance(m, Response)]
        late = next(a for a in answers if a.id == 7)
        assert late.error is not None and late.error["code"] == -32005  # FRAME_TOO_LARGE
    finally:
        proc.kill()
        await proc.wait()


# ----------------------------------------------------------------- a compromised worker


def _hostile(mode: str) -> Any:
    def launcher(cfg: ProcessSandboxConfig, wid: str, ws: Path | None) -> LaunchSpec:
        spec = process_launch(cfg, ws)
        return LaunchSpec([sys.executable, str(FAKES / "hostile_worker.py"), mode], spec.env, spec.cwd, spec.plan)

    return launcher


async def _hostile_worker(root: Path, mode: str, **kw: Any) -> SandboxWorker:
    worker = SandboxWorker(process_config(root), f"hostile-{mode}", launcher=_hostile(mode), **kw)
    await worker.start()
    return worker


@pytest.mark.parametrize(
    ("mode", "error", "killed"),
    [("deep", ProtocolError, False), ("unknown", ProtocolError, True), ("binary", ProtocolError, True),
     ("flood", ProtocolError, True), ("nonewline", WorkerCrashed, True)],
)  # fmt: skip
async def test_hostile_frames_fail_the_call_typed_and_retire_the_worker(
    workspace_root: Path, mode: str, error: type[Exception], killed: bool
) -> None:
    """One bad frame retires the worker (no further request); a flood of them kills it at once."""
    worker = await _hostile_worker(workspace_root, mode)
    before = _rss_kb()
    began = time.monotonic()
    try:
        with pytest.raises(error):
            await worker.call("ping", {}, timeout=20)
        assert time.monotonic() - began < 10, "failed at once, not at a timeout"
        assert not worker.healthy
        if killed:
            await wait_for(lambda: not worker.alive, 10, "the hostile worker to be gone")
    finally:
        await worker.stop(grace=0)
    assert (_rss_kb() - before) / 1024 < 50


async def test_an_event_of_the_wrong_shape_is_dropped_and_the_answer_still_arrives(workspace_root: Path) -> None:
    worker = await _hostile_worker(workspace_root, "badtype")
    try:
        assert await worker.call("ping", {}, timeout=10) == {"pong": True}
        assert worker.garbage_frames == 1 and worker.alive and not worker.healthy  # retired, not killed
    finally:
        await worker.stop(grace=0)


async def test_an_answer_written_just_before_the_exit_is_delivered_and_the_exit_is_seen(workspace_root: Path) -> None:
    """The control pipe's frames reach the caller in the read's own callback, its end still
    reaches the process's exit handling: the answer comes first, then the worker is gone."""
    worker = await _hostile_worker(workspace_root, "lastword")
    try:
        assert await worker.call("ping", {}, timeout=10) == {"pong": True}
        await wait_for(lambda: not worker.alive, 10, "the exit to be seen")
        with pytest.raises(WorkerCrashed):
            await worker.call("ping", {}, timeout=10)
    finally:
        await worker.stop(grace=0)


async def test_host_calls_from_one_worker_are_capped(workspace_root: Path) -> None:
    running = 0
    most = 0
    release = asyncio.Event()

    async def handler(_w: SandboxWorker, method: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await release.wait()
            yield {"ok": True}
        finally:
            running -= 1

    worker = await _hostile_worker(workspace_root, "hostcalls", host_handler=handler)
    answered: list[Any] = []  # what the host answers at once (the refusals), seen before release
    answer_nowait = worker._answer_nowait

    def spy(response: Any) -> None:
        answered.append(response)
        answer_nowait(response)

    worker._answer_nowait = spy  # type: ignore[method-assign]
    try:
        call = asyncio.create_task(worker.call("ping", {}, timeout=20))
        # all ten frames read: four served and held, six refused (else a late one finds a free slot)
        await wait_for(lambda: running == worker_module.MAX_HOST_CALLS
                       and len(answered) == 10 - worker_module.MAX_HOST_CALLS, 10, "the calls to be sorted")
        release.set()
        answers = (await call)["answers"]
    finally:
        await worker.stop(grace=0)
    refused = [a for a in answers.values() if a != "ok"]
    assert most == worker_module.MAX_HOST_CALLS
    assert len(refused) == 10 - worker_module.MAX_HOST_CALLS and all("refused" in str(a) for a in refused)


async def test_a_retired_worker_is_replaced_for_the_next_request(workspace_root: Path) -> None:
    async with SandboxOrchestrator(process_config(workspace_root), launcher=_hostile("flood")) as pool:
        with pytest.raises(ProtocolError):
            await pool.execute("u", RawRequest("ping"))
        await wait_for(lambda: not pool.list_workers(), 10, "the flooding worker to be removed")


async def test_a_worker_that_stops_reading_is_killed_not_waited_for(
    workspace_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopped worker (a command can SIGSTOP its own worker) fails the call typed, at the write deadline."""
    import signal

    monkeypatch.setattr(worker_module, "WRITE_TIMEOUT", 0.5)
    worker = SandboxWorker(process_config(workspace_root), "stopped")
    await worker.start()
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGSTOP)
    began = time.monotonic()
    try:
        with pytest.raises(WorkerCrashed, match="stopped reading"):
            await worker.call("ping", {"pad": "x" * 2_000_000}, timeout=60)
        assert time.monotonic() - began < 10
        await wait_for(lambda: not worker.alive, 10, "the stopped worker to be killed")
    finally:
        await worker.stop(grace=0)


async def test_a_worker_cannot_forge_host_side_errors(workspace_root: Path) -> None:
    """POOL_CLOSED from a worker is a RemoteError: only the host says the pool closed."""
    from sandbox_core.errors import PoolClosed, RemoteError

    worker = await _hostile_worker(workspace_root, "forge")
    try:
        with pytest.raises(RemoteError) as info:
            await worker.call("ping", {}, timeout=10)
        assert not isinstance(info.value, PoolClosed) and info.value.remote_code == -32007
    finally:
        await worker.stop(grace=0)
