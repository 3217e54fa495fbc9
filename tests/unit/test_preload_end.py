"""An unbound worker's bind waits for its preload thread to be gone, and fails closed if it is not."""

from __future__ import annotations

import threading

import pytest

from sandbox_core.errors import IsolationUnavailable
from sandbox_core.inside.agent.preload import Preload


async def test_a_preload_thread_still_running_after_its_end_fails_the_bind() -> None:
    release = threading.Event()
    preload = Preload({"before_bind": "test"})
    preload.thread = threading.Thread(target=release.wait, daemon=True)
    preload.thread.start()
    preload.done.set()  # the outcome is in, but the thread lives on
    try:
        with pytest.raises(IsolationUnavailable, match="still running"):
            await preload.ended(0.2)
    finally:
        release.set()
        preload.thread.join()


async def test_a_preload_that_never_ends_fails_the_bind_at_its_limit() -> None:
    preload = Preload({"before_bind": "test"})
    with pytest.raises(IsolationUnavailable, match="did not end"):
        await preload.ended(0.05)


async def test_a_finished_preload_lets_the_bind_go_on_single_threaded() -> None:
    preload = Preload({"before_bind": "test"})
    preload.thread = threading.Thread(target=lambda: None)
    preload.thread.start()
    preload.done.set()
    await preload.ended(5.0)
    assert not preload.thread.is_alive()
