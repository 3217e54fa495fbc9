"""RefusalLog: a burst of refusals logged per window, the rest counted and said once."""

from __future__ import annotations

from sandbox_core.egress.refusals import RefusalLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_first_burst_is_logged_then_counted_and_summarised_when_the_window_ends() -> None:
    clock, said = Clock(), []
    gate = RefusalLog(3, lambda n, w: said.append((n, w)), window=60.0, clock=clock)
    assert [gate.admit() for _ in range(10)] == [True] * 3 + [False] * 7
    assert gate.suppressed == 7 and said == []
    clock.now += 59.0
    assert gate.remaining() == 1.0 and not gate.admit()
    clock.now += 1.0
    assert gate.admit()  # a new window: its own burst, and the old count said first
    assert said == [(8, 60.0)] and gate.suppressed == 0
    gate.flush()
    assert said == [(8, 60.0)]  # nothing suppressed since: nothing more said


def test_flush_says_the_count_at_once_and_zero_logs_every_refusal() -> None:
    said: list[tuple[int, float]] = []
    gate = RefusalLog(1, lambda n, w: said.append((n, w)), clock=Clock())
    assert gate.admit() and not gate.admit() and not gate.admit()
    gate.flush()
    assert said == [(2, 60.0)]
    every = RefusalLog(0, lambda n, w: said.append((n, w)), clock=Clock())
    assert all(every.admit() for _ in range(1000)) and every.suppressed == 0
