"""Which staged runtimes a new build collects: only stages nobody holds and nobody took lately."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from sandbox_core.isolation import runtime


def _stage(root: Path, name: str, *, taken_ago: float | None) -> Path:
    tree = root / name
    (tree / "python").mkdir(parents=True)
    if taken_ago is not None:
        lock = root / f"{name}.lock"
        lock.touch()
        then = time.time() - taken_ago
        os.utime(lock, (then, then))
    return tree


def test_garbage_spares_held_and_recently_taken_stages(tmp_path: Path) -> None:
    old = runtime.STAGE_KEEP_SECONDS + 60
    recent = _stage(tmp_path, "a" * 32, taken_ago=5)
    stale = _stage(tmp_path, "b" * 32, taken_ago=old)
    lockless = _stage(tmp_path, "c" * 32, taken_ago=None)
    held = _stage(tmp_path, "d" * 32, taken_ago=old)
    kept = _stage(tmp_path, "e" * 32, taken_ago=old)
    fd = os.open(tmp_path / f"{held.name}.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # a live process still runs on it
        runtime.collect_garbage(tmp_path, keep=kept.name)
    finally:
        os.close(fd)
    assert recent.is_dir() and held.is_dir() and kept.is_dir()
    assert not stale.exists() and not (tmp_path / f"{stale.name}.lock").exists()
    assert not lockless.exists()


def test_taking_a_stage_marks_it_recently_taken(tmp_path: Path) -> None:
    lock = tmp_path / "f.lock"
    lock.touch()
    then = time.time() - runtime.STAGE_KEEP_SECONDS - 60
    os.utime(lock, (then, then))
    held_before = list(runtime._held)
    try:
        runtime.hold(lock)
        assert time.time() - lock.stat().st_mtime < runtime.STAGE_KEEP_SECONDS
    finally:
        for fd in runtime._held[len(held_before):]:
            os.close(fd)
        del runtime._held[len(held_before):]


def test_a_remembered_plan_is_taken_while_what_it_read_is_unchanged(tmp_path: Path) -> None:
    """A new process takes the last plan's key instead of planning again (~0.1 s), and plans
    again once a directory it read changed."""
    source = tmp_path / "src"
    source.mkdir()
    stage = tmp_path / "stage"
    stage.mkdir()
    runtime._remember(stage, "f" * 32, [str(source)])
    assert runtime._unchanged_key(stage) == "f" * 32
    (source / "new.py").write_text("")
    os.utime(source, ns=(1, 10**9))  # a distinct mtime, whatever the clock's tick
    assert runtime._unchanged_key(stage) is None
