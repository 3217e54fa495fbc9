"""SandboxWorker against real worker processes (process profile)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import RequestTimeout, WorkerCrashed, WorkerStartError
from sandbox_core.events import Event
from sandbox_core.isolation.spec import PACKAGE_ROOT, LaunchSpec, process_launch, python_argv
from sandbox_core.requests import ExecRequest
from sandbox_core.worker import SandboxWorker, WorkerState
from tests.helpers import live_session_members, pid_alive, process_config, wait_for

FAKES = Path(__file__).resolve().parents[1] / "fakes"


async def _bound(root: Path, **changes: object) -> SandboxWorker:
    config = process_config(root, **changes)
    worker = SandboxWorker(config, "wt")
    await worker.start()
    ws = root / "u"
    ws.mkdir(exist_ok=True)
    await worker.bind("u", ws)
    return worker


async def test_handshake_reports_layers(workspace_root: Path) -> None:
    worker = await _bound(workspace_root)
    try:
        assert worker.state is WorkerState.IDLE
        report = worker.report
        assert report["profile"] == "process"
        assert report["env_allowlist"] is True and report["new_session"] is True
        assert report["umask"] == "077"
        assert report["rlimits"]["core"] == 0 and report["rlimits"]["nofile"] == 256
        assert os.getsid(worker.pid or 0) == worker.pid
    finally:
        await worker.stop()


async def test_exec_streams_output_as_it_happens(workspace_root: Path) -> None:
    worker = await _bound(workspace_root)
    gate = workspace_root / "u" / "go"
    script = "echo first; while [ ! -e go ]; do sleep 0.01; done; echo second >&2; exit 3"
    events: list[Event] = []
    try:
        async for event in worker.execute_stream("exec", ExecRequest(shell=script).params()):
            events.append(event)
            if event.type == "stdout" and b"first" in event.chunk():
                assert not gate.exists()
                gate.touch()  # the command can only finish after we saw its first line
        kinds = [e.type for e in events]
        assert kinds[0] == "started" and kinds[-1] == "done"
        assert events[-1].data["exit_code"] == 3
        assert b"".join(e.chunk() for e in events if e.type == "stderr") == b"second\n"
        seqs = [e.seq for e in events]
        assert seqs == sorted(seqs)
    finally:
        await worker.stop()


async def test_exec_stdin_argv_and_missing_command(workspace_root: Path) -> None:
    worker = await _bound(workspace_root)
    try:
        result = await worker.execute("exec", ExecRequest(argv=("cat",), stdin=b"hello\x00world").params())
        assert result.stdout_text == "hello\x00world" and result.exit_code == 0
        missing = await worker.execute("exec", ExecRequest(argv=("no-such-cmd-xyz",)).params())
        assert missing.exit_code == 127
        result = await worker.execute("exec", ExecRequest(shell="pwd; echo $HOME").params())
        ws = str(workspace_root / "u")
        assert result.stdout_text == f"{ws}\n{ws}\n"
    finally:
        await worker.stop()


async def test_a_command_exit_is_watched_by_pidfd_not_by_a_thread(workspace_root: Path) -> None:
    """The worker learns of a command's exit from a pidfd on its loop: while the command runs,
    the worker has no waiter thread (asyncio's default starts one per command)."""
    if not hasattr(os, "pidfd_open"):
        pytest.skip("os.pidfd_open is missing here")
    worker = await _bound(workspace_root)
    try:
        for _ in range(2):
            result = await worker.execute("exec", ExecRequest(shell="grep -E '^Threads:' /proc/$PPID/status").params())
            assert result.exit_code == 0, result.stderr_text
            assert result.stdout_text.split() == ["Threads:", "1"]
    finally:
        await worker.stop()


async def test_env_is_built_from_allowlist(workspace_root: Path, host_canary: str) -> None:
    worker = await _bound(workspace_root)
    try:
        result = await worker.execute("exec", ExecRequest(argv=("env",)).params())
        names = {line.split("=", 1)[0] for line in result.stdout_text.splitlines()}
        assert host_canary not in result.stdout_text
        assert "TEST_HOST_SECRET_OF_SANDBOX" not in names
        assert names <= {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TERM", "TZ", "HOME", "PWD", "SHLVL", "_"}
        environ = Path(f"/proc/{worker.pid}/environ").read_bytes()
        assert host_canary.encode() not in environ
    finally:
        await worker.stop()


async def test_timeout_kills_the_whole_process_group(workspace_root: Path) -> None:
    worker = await _bound(workspace_root)
    try:
        script = "sleep 300 & echo $! > bg.pid; sleep 300"
        with pytest.raises(RequestTimeout):
            await worker.execute("exec", ExecRequest(shell=script).params(), timeout=1.0)
        bg = int((workspace_root / "u" / "bg.pid").read_text())
        await wait_for(lambda: not pid_alive(bg), 5, "background child to die")
        assert worker.alive and await worker.ping() < 1.0  # the worker itself survives
    finally:
        await worker.stop()


async def test_crash_mid_request_fails_pending_calls_at_once(workspace_root: Path) -> None:
    worker = await _bound(workspace_root)
    pid = worker.pid
    assert pid is not None

    async def kill_when_running() -> None:
        await wait_for(lambda: (workspace_root / "u" / "running").exists(), 10, "command start")
        os.kill(pid, signal.SIGKILL)

    killer = asyncio.create_task(kill_when_running())
    with pytest.raises(WorkerCrashed) as info:
        await worker.execute("exec", ExecRequest(shell="touch running; sleep 300").params(), timeout=60)
    await killer
    assert info.value.data["signal"] == signal.SIGKILL
    assert worker.state is WorkerState.CRASHED
    assert worker.exit_signal == signal.SIGKILL
    await wait_for(lambda: not live_session_members(pid), 5, "the session to be gone")
    with pytest.raises(WorkerCrashed):
        await worker.ping()
    await worker.stop()


async def test_stderr_is_kept_for_diagnostics(workspace_root: Path) -> None:
    config = process_config(workspace_root)

    def launcher(cfg: ProcessSandboxConfig, wid: str, ws: Path | None) -> LaunchSpec:
        spec = process_launch(cfg, ws)
        return LaunchSpec([sys.executable, "-c", "import sys; sys.stderr.write('boom: bad thing\\n'); sys.exit(3)"],
                          spec.env, spec.cwd, spec.plan)

    worker = SandboxWorker(config, "wbad", launcher=launcher)
    with pytest.raises(WorkerStartError) as info:
        await worker.start()
    assert "boom: bad thing" in str(info.value)
    assert worker.exit_status == 3


async def test_handshake_timeout_kills_the_process(workspace_root: Path) -> None:
    config = process_config(workspace_root, startup_timeout=0.5)

    def launcher(cfg: ProcessSandboxConfig, wid: str, ws: Path | None) -> LaunchSpec:
        spec = process_launch(cfg, ws)
        return LaunchSpec(["sleep", "300"], spec.env, spec.cwd, spec.plan)

    worker = SandboxWorker(config, "wslow", launcher=launcher)
    with pytest.raises(WorkerStartError, match="handshake"):
        await worker.start()
    assert worker.pid is not None
    await wait_for(lambda: not pid_alive(worker.pid or 0), 5, "hung worker to be killed")


_STRAY = """
import os, sys, time
if os.fork() == 0:  # a child in a session of its own, holding the pipes, bound to nothing
    os.setsid()
    with open(sys.argv[1] + ".tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(300)
"""


async def test_a_start_cancelled_while_its_process_is_spawned_leaves_nothing(
    workspace_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start is cancelled after the fork, while the process's pipes are being connected.

    The process stands in for bwrap in the moment after its ``clone()``: a child in a session
    of its own, not yet bound to die with its parent, holding stdout and stderr. asyncio's own
    clean-up of a cancelled ``subprocess_exec`` killed only the parent and then waited for the
    pipes for good (a suite run hung so, its sandbox left running); the worker now spawns the
    process itself, lets the attach finish and kills what it started, child included.
    """
    marker = workspace_root / "stray.pid"

    def launcher(cfg: ProcessSandboxConfig, wid: str, ws: Path | None) -> LaunchSpec:
        spec = process_launch(cfg, ws)
        return LaunchSpec([sys.executable, "-c", _STRAY, str(marker)], spec.env, spec.cwd, spec.plan)

    loop = asyncio.get_running_loop()
    connect, gate = loop.connect_read_pipe, asyncio.Event()

    async def gated(*args: Any, **kwargs: Any) -> Any:  # holds the attach between fork and its pipes
        await gate.wait()
        return await connect(*args, **kwargs)

    monkeypatch.setattr(loop, "connect_read_pipe", gated)
    worker = SandboxWorker(process_config(workspace_root), "wcancel", launcher=launcher)
    start = asyncio.ensure_future(worker.start())
    await wait_for(marker.exists, 10, "the stray child to start")
    stray = int(marker.read_text())
    try:
        start.cancel()
        gate.set()
        done, _ = await asyncio.wait([start], timeout=10)
        assert start in done, "the cancelled start never returned"
        assert start.cancelled()
        assert worker.pid is not None
        await wait_for(lambda: not pid_alive(stray), 5, "the stray child to be killed")
        assert not pid_alive(worker.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stray, signal.SIGKILL)


async def test_garbage_on_the_channel_is_survived_and_counted(workspace_root: Path) -> None:
    config = process_config(workspace_root)

    def launcher(cfg: ProcessSandboxConfig, wid: str, ws: Path | None) -> LaunchSpec:
        spec = process_launch(cfg, ws)
        argv = [sys.executable, str(FAKES / "hostile_worker.py"), "garbage", "20"]
        return LaunchSpec(argv, spec.env, spec.cwd, spec.plan)

    worker = SandboxWorker(config.replace(max_frame_bytes=4096), "wg", launcher=launcher)
    await worker.start()
    try:
        assert await worker.ping() < 5
        assert worker.garbage_frames == 21  # 20 malformed + 1 oversized
        assert not worker.healthy  # so an orchestrator recycles it
    finally:
        await worker.stop()


async def test_stop_closes_stdin_and_leaves_nothing(workspace_root: Path) -> None:
    worker = await _bound(workspace_root)
    pid = worker.pid
    assert pid is not None
    await worker.stop()
    assert worker.state is WorkerState.STOPPED and worker.exit_status == 0
    assert not pid_alive(pid) and not live_session_members(pid)
    await worker.stop()  # idempotent


async def test_background_job_holding_stdout_does_not_block_the_answer(workspace_root: Path) -> None:
    worker = await _bound(workspace_root)
    try:
        # the background sleep inherits stdout; the answer must not wait for it (nor time out)
        result = await worker.execute("exec", ExecRequest(shell="sleep 99 & echo started").params(), timeout=20)
        assert result.stdout_text == "started\n" and result.exit_code == 0
    finally:
        await worker.stop()


async def test_processes_that_leave_the_group_are_killed_too(workspace_root: Path) -> None:
    worker = await _bound(workspace_root)
    try:
        script = "setsid -f sh -c 'echo $$ > stray.pid; exec sleep 300' >/dev/null 2>&1; " \
                 "while [ ! -s stray.pid ]; do sleep 0.01; done"
        await worker.execute("exec", ExecRequest(shell=script).params(), timeout=20)
        stray = int((workspace_root / "u" / "stray.pid").read_text())
        await wait_for(lambda: not pid_alive(stray), 5, "the setsid escapee to die")
    finally:
        await worker.stop()


async def test_a_slow_consumer_slows_the_worker_instead_of_growing_the_host(workspace_root: Path) -> None:
    worker = await _bound(workspace_root)
    size = 30 * 1024 * 1024
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: measure the peak from here
        before = _status_kib("VmRSS")
        received = 0
        request = ExecRequest(shell=f"yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {size}")
        async for event in worker.execute_stream("exec", request.params()):
            received += len(event.chunk())
            await asyncio.sleep(0.002)  # a consumer slower than the command (a slow client, say)
        growth = (_status_kib("VmHWM") - before) * 1024
        assert received == size
        assert growth < size / 5, f"the host's peak memory grew by {growth >> 10} KiB for {size} bytes"
    finally:
        await worker.stop()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal is for a host running as root")
async def test_process_profile_as_root_refuses_without_the_explicit_opt_in(workspace_root: Path) -> None:
    from sandbox_core.errors import IsolationUnavailable
    from sandbox_core.orchestrator import SandboxOrchestrator

    config = process_config(workspace_root, allow_root_process=False)
    async with SandboxOrchestrator(config) as pool:
        with pytest.raises(IsolationUnavailable, match="would run every command as root") as info:
            await pool.execute("rooty", ExecRequest(argv=("id", "-u")))
        assert info.value.data["reason"] == "process_as_root"
    async with SandboxOrchestrator(config.replace(allow_root_process=True)) as pool:
        assert (await pool.execute("rooty", ExecRequest(argv=("id", "-u")))).stdout == b"0\n"  # what it lets in


async def test_without_pidfds_a_thread_waits_for_the_worker_and_its_exit_is_heard(
    workspace_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel before 5.3 has no pidfd_open: the process's exit is then waited for by a thread."""
    def no_pidfds(pid: int, flags: int = 0) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfds)
    worker = await _bound(workspace_root)
    pid = worker.pid
    assert pid is not None
    assert any(t.name == f"sandbox-reap-{pid}" for t in threading.enumerate())
    result = await worker.execute("exec", {"argv": ["sh", "-c", "echo ok"]})
    assert result.stdout == b"ok\n"
    await worker.stop()
    assert worker.state is WorkerState.STOPPED and worker.exit_status == 0
    assert not pid_alive(pid)
    await wait_for(lambda: not any(t.name == f"sandbox-reap-{pid}" for t in threading.enumerate()), 5,
                   "the waiting thread to end")


async def test_the_worker_writes_no_bytecode_into_the_tree_it_runs_from(workspace_root: Path) -> None:
    """A ``process`` worker runs the host's own tree with umask 077: a ``.pyc`` it wrote there was
    0600, unreadable to strict workers (another uid), which then compiled that module at every boot."""
    tree = workspace_root.parent / "tree"
    shutil.copytree(Path(PACKAGE_ROOT) / "sandbox_core", tree / "sandbox_core",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip

    def launcher(cfg: ProcessSandboxConfig, wid: str, ws: Path | None) -> LaunchSpec:
        spec = process_launch(cfg, ws)
        return LaunchSpec(python_argv(cfg, root=str(tree)), spec.env, spec.cwd, spec.plan)

    worker = SandboxWorker(process_config(workspace_root), "wbytes", launcher=launcher)
    await worker.start()
    try:
        ws = workspace_root / "u"
        ws.mkdir(exist_ok=True)
        await worker.bind("u", ws)
        result = await worker.execute("exec", {"argv": ["sh", "-c", "echo ok"]})
        assert result.stdout == b"ok\n"  # the serving loop and the runner were imported from the copy
    finally:
        await worker.stop()
    assert sorted(tree.rglob("*.pyc")) == []
