"""``sandbox exec`` and ``sandbox stats`` through the real console script."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.cli.conftest import SANDBOX, Run


def test_help_is_instant_and_documents_exit_codes(run_cli: Run) -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "124 timeout" in result.stdout and "exec" in result.stdout
    probe = (
        "import sys; from typer.testing import CliRunner; from cli.app import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; "
        "print(sorted(m for m in ('sandbox_core.orchestrator', 'anthropic', 'sandbox_core.worker', "
        "'prompt_toolkit', 'cli.render') "
        "if m in sys.modules))"
    )
    heavy = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert heavy.stdout.strip() == "[]"


def test_exec_streams_and_passes_exit_code(run_cli: Run, profile: str) -> None:
    result = run_cli("exec", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert result.returncode == 7
    assert result.stdout == "out\n"
    assert "err\n" in result.stderr
    if profile == "process":
        assert "weaker than 'strict'" in result.stderr  # the process profile warns visibly
    assert "\x1b[" not in result.stdout + result.stderr  # piped: no ANSI codes


def test_exec_forwards_stdin(run_cli: Run) -> None:
    result = run_cli("exec", "--", "cat", input="x\n")
    assert result.returncode == 0 and result.stdout == "x\n"


def test_exec_timeout_exits_124(run_cli: Run) -> None:
    result = run_cli("exec", "--timeout", "0.5", "--", "sleep", "30")
    assert result.returncode == 124
    assert "timed out" in result.stderr and "Traceback" not in result.stderr


def test_exec_missing_command_exits_127(run_cli: Run) -> None:
    result = run_cli("exec", "--", "no-such-command-xyz")
    assert result.returncode == 127
    assert "command not found" in result.stderr


def test_exec_env_hides_host_variables(run_cli: Run) -> None:
    result = run_cli("exec", "--", "env", env={"DATABASE_PASSWORD": "pg-secret-1"})
    assert result.returncode == 0
    assert "pg-secret-1" not in result.stdout and "HOME=" in result.stdout


def test_bad_config_value_is_a_usage_error(run_cli: Run) -> None:
    result = run_cli("exec", "--", "true", env={"SANDBOX_MAX_WORKERS": "lots"})
    assert result.returncode == 2
    assert "max_workers" in result.stderr and "Traceback" not in result.stderr


def test_bad_user_is_a_usage_error(run_cli: Run) -> None:
    result = run_cli("--user", "../etc", "exec", "--", "true")
    assert result.returncode == 2 and "user_id" in result.stderr


def test_stats_json_after_self_check(run_cli: Run, profile: str) -> None:
    result = run_cli("stats", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["requests"]["ok"] == 2 and stats["profile"] == profile
    assert stats["spawn_latency_ms"]["count"] >= 1


BLOB = bytes(range(256)) * 512 + b"\xff\xfe\x00 tail"


def _raw(cli_env: dict[str, str], *args: str, data: bytes) -> subprocess.CompletedProcess[bytes]:

    return subprocess.run([SANDBOX, *args], input=data, capture_output=True, timeout=60, env=cli_env, check=False)


def test_exec_passes_binary_both_ways_byte_for_byte(cli_env: dict[str, str]) -> None:
    result = _raw(cli_env, "exec", "--", "cat", data=BLOB)
    assert result.returncode == 0 and result.stdout == BLOB
    result = _raw(cli_env, "exec", "--", "sh", "-c", "gzip -c | gunzip >&2", data=BLOB)
    assert result.returncode == 0 and result.stderr.endswith(BLOB)


def test_exec_says_which_limit_killed_the_command(run_cli: Run) -> None:
    result = run_cli("exec", "--", "yes", env={"SANDBOX_LIMITS__OUTPUT_MB": "1"})
    assert result.returncode == 137 and len(result.stdout) == 1024 * 1024
    assert "killed: output limit 1 MB" in result.stderr


def test_a_one_shot_exits_at_once_yet_whole_and_cleaned_up(cli_env: dict[str, str]) -> None:
    """The fast path leaves without the interpreter's teardown: output still arrives whole
    (flushed first), the exit code is the command's, and the pool was shut down before it
    (the worker's cgroups, named after this CLI's pid, are gone)."""
    import glob

    env = {**cli_env, "SANDBOX_PROFILE": "strict"}
    script = "head -c 3000000 /dev/zero; echo end >&2; exit 5"
    proc = subprocess.Popen([SANDBOX, "--local", "exec", "--", "sh", "-c", script], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 5, err
    assert out == bytes(3000000) and err.endswith(b"end\n")
    assert glob.glob(f"/sys/fs/cgroup/*/sandbox/o{proc.pid}.*") == []
    assert glob.glob(f"/sys/fs/cgroup/*/*/*/sandbox/o{proc.pid}.*") == []
