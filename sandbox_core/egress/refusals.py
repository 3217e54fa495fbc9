"""How many of one worker's refused connections reach the host's log: a burst, then a count.

A sandbox can loop on a denied connect as fast as the proxy answers; each refusal is still
answered (the client must hear why), but only the first ``network.log_refusals`` of each
:data:`WINDOW` seconds are logged and journalled one by one. The rest are counted, and the
count is said once (``N more refusals suppressed``) when the window ends or the worker goes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

WINDOW = 60.0
"""Seconds over which ``network.log_refusals`` refusals of one worker are logged one by one."""


class RefusalLog:
    """The per-worker gate: :meth:`admit` says whether to log this refusal; :meth:`flush` says the rest."""

    def __init__(
        self, burst: int, summary: Callable[[int, float], None], *, window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.burst = burst
        """Refusals logged per window (0 = every one)."""
        self.window = window
        self._summary = summary
        """Told (suppressed count, window seconds) once per window that suppressed any."""
        self._clock = clock
        self._began = clock()
        self._logged = 0
        self.suppressed = 0
        """Refusals counted, not logged, in the current window."""

    def admit(self) -> bool:
        """Whether to log the refusal that just happened (else it is counted)."""
        now = self._clock()
        if now - self._began >= self.window:
            self.flush()
            self._began, self._logged = now, 0
        if not self.burst or self._logged < self.burst:
            self._logged += 1
            return True
        self.suppressed += 1
        return False

    def remaining(self) -> float:
        """Seconds until the current window ends."""
        return max(0.0, self.window - (self._clock() - self._began))

    def flush(self) -> None:
        """Say the suppressed count, if any (the window ended, or the worker is going)."""
        if self.suppressed:
            count, self.suppressed = self.suppressed, 0
            self._summary(count, self.window)
