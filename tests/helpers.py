"""Shared test helpers: polling with a deadline (never sleeping for state), process checks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.process_tree import session_members


def process_config(root: Path, **changes: object) -> ProcessSandboxConfig:
    """A ``process``-profile config with a private workspace root and short limits."""
    base = ProcessSandboxConfig(
        profile="process",
        workspace_root=root,
        min_idle=0,
        startup_timeout=15.0,
        request_timeout=30.0,
        acquire_timeout=5.0,
        cleanup_interval=0.1,
        shutdown_grace=2.0,
        cancel_grace=1.0,
        allow_root_process=True,  # the suite runs as root in CI
    )
    return base.replace(**changes)


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def wait_for_async(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "x") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def live_session_members(sid: int) -> list[int]:
    return [p for p in session_members(sid) if pid_alive(p) and p != os.getpid()]


SOCKET_DIRS: list[Path] = []
"""The directories :func:`short_socket_path` named; the session removes them at its end (conftest)."""


def short_socket_path(kind: str) -> Path:
    """A Unix socket path short enough for ``sun_path`` (pytest's ``tmp_path`` is not), in a
    directory of its own under /tmp that the service makes; removed when the session ends."""
    folder = Path(f"/tmp/sbx-{kind}-{os.getpid()}-{secrets.token_hex(3)}")
    SOCKET_DIRS.append(folder)
    return folder / "s.sock"


class KeptLog(logging.Handler):
    """The messages of WARNING and above a logger gave while it was watched (:func:`watched_log`)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def text(self) -> str:
        return "\n".join(self.lines)


@contextlib.contextmanager
def watched_log(name: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[KeptLog]:
    """What the logger ``name`` says at WARNING and above, kept on the logger itself: the
    service's log set-up in an earlier test may have stopped propagation to the root, disabled
    it or raised its level, so pytest's ``caplog`` may see nothing."""
    kept = KeptLog()
    logger = logging.getLogger(name)
    logger.addHandler(kept)
    monkeypatch.setattr(logger, "disabled", False)
    monkeypatch.setattr(logger, "level", logging.WARNING)
    try:
        yield kept
    finally:
        logger.removeHandler(kept)
