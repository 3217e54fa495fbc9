"""The bench's last figure: the hypervisor's steal time and the load during the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox_core.bench import cpu_ticks, machine_figure, new_users, suite
from sandbox_core.errors import ConfigError
from sandbox_core.names import validate_user_id
from tests.helpers import process_config

LINE = "cpu  89471 19710 34407 455287 1711 0 991 715 0 0\n"


def test_steal_and_all_ticks_are_read_from_the_cpu_line() -> None:
    assert cpu_ticks(LINE) == (715, 89471 + 19710 + 34407 + 455287 + 1711 + 0 + 991 + 715)
    assert cpu_ticks("cpu0 1 2 3 4 5 6 7 8\n") is None  # one CPU's line, not the sum
    assert cpu_ticks("cpu 1 2 x\n") is None
    steal, total = cpu_ticks() or (0, 0)  # this machine's own
    assert 0 <= steal <= total


def test_the_share_is_the_steal_of_the_run_over_all_of_its_cpu_time() -> None:
    figure = machine_figure((700, 10_000), (750, 12_000), (0.5, 1.25))
    assert (figure.name, figure.value, figure.unit) == ("machine during the run", 2.5, "% steal")
    assert figure.detail["load_start"] == 0.5 and figure.detail["load_end"] == 1.25
    unknown = machine_figure(None, (750, 12_000), (0.5, 1.25))
    assert unknown.value == -1.0 and "unknown" in unknown.detail["steal"]
    idle = machine_figure((700, 10_000), (700, 10_000), (0.5, 0.5))  # nothing ran: not "no /proc/stat"
    assert idle.value == -1.0 and idle.detail["steal"] == "unknown (no CPU time passed)"


def test_a_step_name_that_is_no_step_is_a_config_error_naming_the_steps(tmp_path: Path) -> None:
    config = process_config(tmp_path)
    assert [name for name, _ in suite(config, only=("ping vs pipe",))] == ["ping vs pipe"]
    with pytest.raises(ConfigError) as caught:
        suite(config, only=("ping",))
    assert "'ping'" in caught.value.message and "ping vs pipe" in caught.value.message


def test_each_new_user_step_gets_users_no_earlier_run_had() -> None:
    """claim_new_user measures a user's first request: a second run in the same process (a
    REPL, a test) named its users by pid alone, met the first run's users and took no spares."""
    first, second = new_users("claim-new", 5), new_users("claim-new", 5)
    assert len(set(first)) == 5 and not set(first) & set(second)
    for user in first + second:
        validate_user_id(user)  # a name the pool takes
