"""The terminal crossing from Python: a pty made inside a real strict sandbox.

``pool.terminal()`` runs a program on a pseudo-terminal the worker opens in the sandbox's
own ``/dev/pts``; keys go in, the terminal's bytes come out, the window size follows
``resize()``, the exit code is the program's, and nothing outlives the session.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import RequestTimeout
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.process_tree import descendants
from sandbox_core.requests import ExecRequest
from sandbox_core.terminal import Terminal
from tests.helpers import pid_alive, process_config, wait_for

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")

PROMPT = b"READY> "
SHELL = ("/bin/sh", "-c", "PS1='READY> ' exec bash --norc --noprofile -i")


def commands_below(pid: int) -> list[str]:
    """The command names of the live processes below ``pid``."""
    names = []
    for child in descendants(pid):
        try:
            with open(f"/proc/{child}/comm") as fh:
                names.append(fh.read().strip())
        except OSError:
            continue
    return names


def strict(root: Path, **changes: object) -> ProcessSandboxConfig:
    return process_config(root, **changes).replace(profile="strict")


async def expect(term: Terminal, pattern: bytes, seen: bytearray, timeout: float = 10.0) -> bytes:
    """Read until ``pattern`` appears after what ``seen`` held; what was read (kept in ``seen``)."""
    start = len(seen)
    deadline = time.monotonic() + timeout
    while pattern not in seen[start:]:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} in {bytes(seen[start:])[-400:]!r}")
        try:
            chunk = await asyncio.wait_for(term.read(), max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            continue
        if not chunk:
            raise AssertionError(f"the terminal ended before {pattern!r}: {bytes(seen[start:])[-400:]!r}")
        seen += chunk
    return bytes(seen[start:])


async def test_shell_on_a_sandbox_pty_with_its_size_and_exit_code(workspace_root: Path) -> None:
    async with (
        SandboxOrchestrator(strict(workspace_root)) as pool,
        pool.terminal("alice", SHELL, rows=31, cols=97, term="xterm-256color") as term,
    ):
        seen = bytearray()
        await expect(term, PROMPT, seen)
        await term.write(b"tty; stty size; echo $TERM; pwd; ls /dev/pts; id -u\r")
        out = (await expect(term, PROMPT, seen)).decode()
        assert "/dev/pts/0" in out and "31 97" in out and "xterm-256color" in out
        assert "/workspace" in out
        assert "\n0  ptmx" in out.replace("\r", "") or "\n0\nptmx" in out.replace("\r", "")
        await term.resize(42, 133)
        await term.write(b"stty size\r")
        await expect(term, b"42 133", seen)  # the shell redraws its prompt on SIGWINCH first
        await term.write(b"exit 3\r")
        assert await term.wait() == 3
        assert term.exit_code == 3


async def test_ctrl_c_interrupts_the_foreground_program_and_the_shell_goes_on(workspace_root: Path) -> None:
    async with SandboxOrchestrator(strict(workspace_root)) as pool, pool.terminal("bob", SHELL) as term:
        seen = bytearray()
        await expect(term, PROMPT, seen)
        await term.write(b"sleep 100; echo slept\r")
        bwrap_pid = pool.list_workers()[0]["pid"]
        await wait_for(lambda: "sleep" in commands_below(bwrap_pid), 10, "sleep running")
        await term.write(b"\x03")
        after_c = (await expect(term, PROMPT, seen)).partition(b"^C")[2]
        assert after_c and b"slept" not in after_c
        await term.write(b"echo after$((40+2))\r")
        assert b"after42" in await expect(term, PROMPT, seen)
        await term.write(b"exit\r")
        assert await term.wait() == 0


async def test_tiocsti_stays_refused_on_the_sandbox_terminal(workspace_root: Path) -> None:
    script = (
        "import errno, fcntl, termios\n"
        "try:\n"
        "    fcntl.ioctl(0, termios.TIOCSTI, b'x')\n"
        "    print('INJECTED')\n"
        "except OSError as e:\n"
        "    print('refused', errno.errorcode[e.errno])\n"
    )
    async with (
        SandboxOrchestrator(strict(workspace_root)) as pool,
        pool.terminal("carol", ("python3", "-I", "-c", script), stdin=False) as term,
    ):
        out = bytearray()
        while chunk := await term.read():
            out += chunk
        assert term.exit_code == 0, bytes(out)
        assert b"refused EPERM" in out and b"INJECTED" not in out


async def test_python_repl_on_the_terminal(workspace_root: Path) -> None:
    async with (
        SandboxOrchestrator(strict(workspace_root)) as pool,
        pool.terminal("dave", ("python3", "-I", "-q")) as term,
    ):
        seen = bytearray()
        await expect(term, b">>> ", seen)
        await term.write(b"import os; os.isatty(0), 6*7\r")
        assert b"(True, 42)" in await expect(term, b">>> ", seen)
        await term.write(b"\x04")
        assert await term.wait() == 0


async def test_leaving_early_and_timeouts_leave_no_process(workspace_root: Path) -> None:
    async with SandboxOrchestrator(strict(workspace_root)) as pool:
        await pool.execute("erin", ExecRequest(argv=("true",)))
        bwrap_pid = pool.list_workers()[0]["pid"]
        before = {p for p in descendants(bwrap_pid) if pid_alive(p)}
        async with pool.terminal("erin", SHELL) as term:
            seen = bytearray()
            await expect(term, PROMPT, seen)
            await term.write(b"sleep 300 & sleep 301\r")
            await wait_for(lambda: len([p for p in descendants(bwrap_pid) if pid_alive(p)]) > len(before) + 2,
                           10, "the shell and its sleeps")
        await wait_for(lambda: {p for p in descendants(bwrap_pid) if pid_alive(p)} <= before, 10,
                       "the session's processes gone")
        with pytest.raises(RequestTimeout) as ended:
            async with pool.terminal("erin", SHELL, timeout=1.0) as term:
                await term.wait()
        assert ended.value.data["timeout"] == 1.0
        await wait_for(lambda: {p for p in descendants(bwrap_pid) if pid_alive(p)} <= before, 10,
                       "the timed-out session's processes gone")
        assert (await pool.execute("erin", ExecRequest(shell="echo alive"))).stdout == b"alive\n"
        stats = pool.get_pool_stats()
        assert stats["requests"]["timed_out"] == 1


async def test_terminal_timeout_is_the_default_deadline_of_a_session(workspace_root: Path) -> None:
    async with SandboxOrchestrator(strict(workspace_root, terminal_timeout=0.5, request_timeout=60.0)) as pool:
        with pytest.raises(RequestTimeout) as ended:
            async with pool.terminal("gil", SHELL) as term:
                await term.wait()
        assert ended.value.data["timeout"] == 0.5


async def test_the_output_limit_ends_a_flooding_session_exactly_there(workspace_root: Path) -> None:
    from dataclasses import replace

    config = strict(workspace_root)
    config = config.replace(limits=replace(config.limits, output_mb=1))
    async with SandboxOrchestrator(config) as pool, pool.terminal("hal", SHELL) as term:
        seen = bytearray()
        await expect(term, PROMPT, seen)
        await term.write(b"yes flood\r")  # a job of its own (job control): the limit ends it too
        while await term.read():
            pass
        assert term.result is not None and term.result["kill_reason"] == "output limit 1 MB"
        assert pool.get_pool_stats()["workers"]["busy"] == 0


async def test_a_terminal_counts_as_a_busy_worker(workspace_root: Path) -> None:
    config = strict(workspace_root, max_workers_per_user=1, acquire_timeout=0.5)
    async with SandboxOrchestrator(config) as pool, pool.terminal("fay", SHELL) as term:
        seen = bytearray()
        await expect(term, PROMPT, seen)
        workers = pool.list_workers()
        assert [w["state"] for w in workers] == ["busy"]
        from sandbox_core.errors import PoolExhausted

        with pytest.raises(PoolExhausted):
            await pool.execute("fay", ExecRequest(argv=("true",)))


def test_bad_window_sizes_are_refused() -> None:
    for rows, cols in ((0, 80), (24, 0), (24, 10_001), (True, 80)):
        with pytest.raises(ValueError):
            ExecRequest(argv=("sh",), tty=(rows, cols))
    with pytest.raises(ValueError):
        ExecRequest(argv=("sh",), term="xterm")
    with pytest.raises(ValueError):
        ExecRequest(argv=("sh",), tty=(24, 80), term="xterm; rm -rf /")


async def test_the_keystroke_echo_benchmark_measures_both_sides(workspace_root: Path) -> None:
    from sandbox_core.bench import keystroke_echo

    figure = await keystroke_echo(strict(workspace_root), 5)
    assert figure.value > 0 and figure.baseline is not None and figure.baseline > 0
    assert figure.ratio is not None and figure.detail["n"] == 5
