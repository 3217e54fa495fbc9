"""Each command through typer's runner (in process) and through the real console script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.conftest import Invoke, Run, assert_plain

# ---------------------------------------------------------------- exec


def test_exec_in_process(invoke: Invoke) -> None:
    result = invoke("exec", "--", "sh", "-c", "echo in-process; exit 3")
    assert result.exit_code == 3 and result.stdout == "in-process\n"


# ---------------------------------------------------------------- stats


def test_stats_table_in_process(invoke: Invoke, profile: str) -> None:
    result = invoke("stats")
    assert result.exit_code == 0, result.output
    for label in (f"{profile} profile", "workers", "requests", "lifecycle", "spawn latency", "per user"):
        assert label in result.stdout
    assert_plain(result.stdout)


def test_stats_table_piped(run_cli: Run) -> None:
    result = run_cli("stats")
    assert result.returncode == 0, result.stderr
    assert "spawn latency" in result.stdout and "queue depth" in result.stdout
    assert_plain(result.stdout + result.stderr)


def test_global_json_flag(run_cli: Run) -> None:
    result = run_cli("--json", "stats")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["requests"]["ok"] == 2


# ---------------------------------------------------------------- config show


def _write_config(tmp_path: Path) -> Path:
    path = tmp_path / "sandbox.toml"
    path.write_text('max_workers_per_user = 3\n[model]\napi_key = "sk-from-file-123"\n')
    return path


def test_config_show_json_sources_and_redaction(invoke: Invoke, tmp_path: Path) -> None:
    path = _write_config(tmp_path)
    result = invoke("--config", str(path), "--profile", "process", "config", "show", "--json",
                    env={"SANDBOX_MAX_WORKERS": "5", "ANTHROPIC_API_KEY": "sk-from-env-456"})
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    values = info["values"]
    assert info["path"] == str(path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("max_workers_per_user"))
    assert values["max_workers_per_user"] == {"value": 3, "source": "file", "origin": f"{path} line {line}"}
    assert values["max_workers"] == {"value": 5, "source": "env", "origin": "SANDBOX_MAX_WORKERS"}
    assert values["profile"] == {"value": "process", "source": "flag", "origin": "flag"}
    assert values["startup_timeout"] == {"value": 10.0, "source": "default"}
    assert values["model.api_key"] == {"value": "***", "source": "env", "origin": "ANTHROPIC_API_KEY"}
    assert info["effective_provider"] == "anthropic"
    assert "sk-from" not in result.output


def test_config_show_table_piped(run_cli: Run, tmp_path: Path) -> None:
    result = run_cli("--config", str(_write_config(tmp_path)), "config", "show")
    assert result.returncode == 0, result.stderr
    assert "max_workers_per_user" in result.stdout and "file" in result.stdout
    assert "model.api_key" in result.stdout and "***" in result.stdout
    assert "sk-from-file" not in result.stdout + result.stderr
    assert_plain(result.stdout + result.stderr)


def test_config_show_bad_value_is_a_usage_error(run_cli: Run) -> None:
    result = run_cli("config", "show", env={"SANDBOX_MAX_WORKERS": "many"})
    assert result.returncode == 2
    assert result.stderr.startswith("error: max_workers") and "Traceback" not in result.stderr


def test_missing_config_file_is_a_usage_error(run_cli: Run, tmp_path: Path) -> None:
    result = run_cli("--config", str(tmp_path / "nope.toml"), "config", "show")
    assert result.returncode == 2 and "config file not found" in result.stderr


# ---------------------------------------------------------------- workers


def test_workers_launch_in_process(invoke: Invoke, profile: str) -> None:
    result = invoke("workers", "launch", "2", "--json")
    if profile == "strict":  # strict binds the workspace at spawn: nothing to pre-warm
        assert result.exit_code == 125 and "first request" in result.stderr
        return
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 2
    assert all(row["state"] == "idle" and row["user_id"] is None and row["pid"] for row in rows)


def test_workers_list_and_stop_piped(run_cli: Run, profile: str) -> None:
    listed = run_cli("workers", "list", env={"SANDBOX_MIN_IDLE": "2"})
    assert listed.returncode == 0, listed.stderr
    assert_plain(listed.stdout + listed.stderr)
    if profile == "process":
        assert listed.stdout.count("│ idle ") == 2 and "w1-" in listed.stdout and "w2-" in listed.stdout
    stopped = run_cli("workers", "stop", "--all", "--json", env={"SANDBOX_MIN_IDLE": "1"})
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout)["stopped"] == (1 if profile == "process" else 0)


def test_workers_stop_errors(run_cli: Run) -> None:
    unknown = run_cli("workers", "stop", "w99-none")
    assert unknown.returncode == 1 and "no such worker: w99-none" in unknown.stderr
    neither = run_cli("workers", "stop")
    assert neither.returncode == 2 and "exactly one" in neither.stderr


# ---------------------------------------------------------------- bench


def test_bench_in_process_with_a_fake_suite(invoke: Invoke, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox_core import bench

    async def fake_suite(config: object, quick: bool = False, progress: object = None) -> list[bench.Figure]:
        assert quick and callable(progress)
        progress("cold start")
        return [bench.Figure("cold start (process)", 12.5, "ms p50", "< 300 ms", True, detail={"n": 5}),
                bench.Figure("ping round trip", 0.4, "ms p50", "< 3x raw pipe echo", False, baseline=0.1, ratio=4.0)]

    monkeypatch.setattr(bench, "run_suite", fake_suite)
    table = invoke("bench", "--quick")
    assert table.exit_code == 0, table.output
    assert "cold start (process)" in table.stdout and "PASS" in table.stdout and "MISS" in table.stdout
    assert "4x" in table.stdout and "n=5" in table.stdout
    as_json = invoke("bench", "--quick", "--json")
    assert [f["name"] for f in json.loads(as_json.stdout)] == ["cold start (process)", "ping round trip"]


@pytest.mark.slow
def test_bench_quick_json_piped(run_cli: Run) -> None:
    result = run_cli("bench", "--quick", "--json", timeout=90)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    names = " ".join(f["name"] for f in figures)
    for name in ("cold start", "warm claim", "ping round trip", "exec true", "idle worker memory",
                 "machine during the run"):
        assert name in names
    assert "bench: cold start" in result.stderr  # plain progress lines when piped, no bar
    assert_plain(result.stdout + result.stderr)


# ---------------------------------------------------------------- usage errors


def test_bad_flag_is_a_usage_error(run_cli: Run) -> None:
    result = run_cli("stats", "--no-such-flag")
    assert result.returncode == 2 and "No such option" in result.stderr and "Traceback" not in result.stderr


def test_bad_profile_value_is_a_usage_error(run_cli: Run) -> None:
    result = run_cli("--profile", "loose", "stats")
    assert result.returncode == 2 and "loose" in result.stderr
