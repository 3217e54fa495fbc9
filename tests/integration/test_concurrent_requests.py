"""Two requests at once on one worker (a library caller's :class:`SandboxWorker`; the pool never
gives a worker two): the clean-up after one request ends what that request started, and leaves
the other request's command and its children running.

Each command waits for a file the test makes (polling inside the sandbox), so the order in
which they start and end is fixed, not timed.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.isolation.launch import prepare_workspace
from sandbox_core.requests import ExecRequest, RequestResult
from sandbox_core.worker import SandboxWorker
from tests.helpers import process_config, wait_for

WAIT_FOR_GO = "while [ ! -e go ]; do sleep 0.01; done"
B_WITH_A_CHILD = ("touch b_started; while [ ! -e a_started ]; do sleep 0.01; done; "
                  f"sh -c '{WAIT_FOR_GO}'; echo inner=$?")
"""Request B: once A runs, its command starts a child (a shell of its own) that waits for ``go``,
then B says how that child ended (137: killed)."""


async def _worker(config: ProcessSandboxConfig, user: str) -> tuple[SandboxWorker, Path]:
    workspace = prepare_workspace(config, user)
    worker = SandboxWorker(config, "wc", user_id=user, workspace=workspace)
    await worker.start()
    if not worker.bound_at_spawn:
        await worker.bind(user, workspace)
    return worker, workspace


def _exec(worker: SandboxWorker, script: str) -> asyncio.Future[RequestResult]:
    return asyncio.ensure_future(worker.execute("exec", ExecRequest(shell=script).params(), timeout=60))


async def _a_while_b_runs(config: ProcessSandboxConfig) -> tuple[RequestResult, RequestResult, bool]:
    """B starts first and keeps running; A starts beside it, leaves a stray that left its process
    group and ends. Returns A's and B's results, and whether A's stray was gone by A's answer."""
    worker, ws = await _worker(config, "conc")
    try:
        b = _exec(worker, B_WITH_A_CHILD)
        await wait_for((ws / "b_started").exists, 20, "request B to start")
        a_script = ("touch a_started; setsid -f sh -c 'echo $$ > a_stray.pid; exec sleep 300' >/dev/null 2>&1; "
                    "while [ ! -s a_stray.pid ]; do sleep 0.01; done")  # fmt: skip
        a = await _exec(worker, a_script)
        stray = (ws / "a_stray.pid").read_text().strip()
        check = await _exec(worker, f"kill -0 {stray} 2>/dev/null && echo alive || echo gone")
        (ws / "go").touch()
        return a, await b, check.stdout_text == "gone\n"
    finally:
        await worker.stop()


async def test_a_clean_up_beside_another_request_leaves_its_children(workspace_root: Path) -> None:
    a, b, stray_gone = await _a_while_b_runs(process_config(workspace_root))
    assert a.exit_code == 0
    assert stray_gone  # what A started is still ended, though it left A's process group
    # B's command's child was started after A began, below a command A's clean-up must not touch
    assert b.stdout_text == "inner=0\n" and b.exit_code == 0


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")
async def test_strict_a_clean_up_beside_another_request_leaves_its_children(workspace_root: Path) -> None:
    a, b, stray_gone = await _a_while_b_runs(process_config(workspace_root).replace(profile="strict"))
    assert a.exit_code == 0 and stray_gone
    assert b.stdout_text == "inner=0\n" and b.exit_code == 0


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")
async def test_strict_a_request_that_began_alone_spares_one_that_came_later(workspace_root: Path) -> None:
    """A starts alone in the sandbox's pid namespace (its clean-up could kill every process
    there); B starts while A runs. When A ends, B is still running: A must not kill it."""
    worker, ws = await _worker(process_config(workspace_root).replace(profile="strict"), "late")
    try:
        a = _exec(worker, "touch a_started; while [ ! -e b_started ]; do sleep 0.01; done")
        await wait_for((ws / "a_started").exists, 20, "request A to run")
        b = _exec(worker, f"touch b_started; {WAIT_FOR_GO}; echo b-done")
        first = await a
        (ws / "go").touch()
        second = await b
    finally:
        await worker.stop()
    assert first.exit_code == 0
    assert second.stdout_text == "b-done\n" and second.exit_code == 0
