"""The audit's memory probe: each wait around the hog outlasts the one inside it.

The hog's budget was raised (a loaded machine's reclaim near the limit outlasted 15 s, and
a hog that gives up reads as a limit not enforced); the probe that waits for it and the
request that carries the probe must then wait longer still, or they cut the hog off first
and report a timeout instead of the kill.
"""

from __future__ import annotations

from sandbox_core.audit.run import MEMORY_HOG_PHASE
from sandbox_core.inside.probes import _HOG_CODE, HOG_WAIT
from sandbox_core.shared import MEMORY_HOG_SECONDS


def test_each_wait_around_the_memory_hog_is_longer_than_what_it_waits_for() -> None:
    assert MEMORY_HOG_SECONDS >= 30
    assert "signal.alarm(int(seconds) + 5)" in _HOG_CODE  # the hog's own hard stop, past its budget
    assert HOG_WAIT > MEMORY_HOG_SECONDS + 5
    assert MEMORY_HOG_PHASE > HOG_WAIT + 10  # room for the probe's start and its report
