"""Walking a process tree below a root, with subtrees left out (:func:`process_tree.descendants`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from sandbox_core import process_tree
from tests.helpers import wait_for

TREE = r"""
import os, sys, time
def child(then):
    pid = os.fork()
    if pid == 0:
        then(); os._exit(0)
    return pid
def sleeper():
    time.sleep(300)
def parent_of_one():
    child(sleeper); time.sleep(300)
kept = child(parent_of_one)
pruned = child(parent_of_one)
print(kept, pruned, flush=True)
time.sleep(300)
"""


@pytest.fixture
def tree() -> Iterator[tuple[int, int, int]]:
    """A process with two children, each with one child of its own: (root, kept, pruned)."""
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        kept, pruned = (int(p) for p in proc.stdout.readline().split())
        yield proc.pid, kept, pruned
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole tree: its own group
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def test_a_pruned_subtree_is_left_out_of_both_walks(tree: tuple[int, int, int]) -> None:
    root, kept, pruned = tree
    await wait_for(lambda: len(process_tree.descendants(root)) == 4, 10, "the grandchildren to start")
    everything = set(process_tree.descendants(root))
    kept_child = set(process_tree.children(kept))
    assert len(kept_child) == 1 and kept in everything and pruned in everything
    walk = set(process_tree.descendants(root, pruned=frozenset({pruned})))
    scan = set(process_tree._descendants_by_scan(root, None, frozenset({pruned})))  # kernels without children files
    assert walk == scan == {kept, *kept_child}  # the pruned child and its own child are both gone
