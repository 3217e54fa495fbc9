"""``sandbox runs`` and ``sandbox log`` on the record the in-process CLI writes (real CLI, real SQLite)."""

from __future__ import annotations

import json

from tests.cli.conftest import Run, assert_plain


def test_exec_is_recorded_and_read_back_as_ndjson(run_cli: Run) -> None:
    first = run_cli("exec", "--user", "rita", "--", "sh", "-c", "printf %s%s OUT PUT; exit 2")
    assert first.returncode == 2, first.stderr
    assert run_cli("exec", "--user", "sam", "--", "true").returncode == 0

    runs = run_cli("runs")
    assert runs.returncode == 0, runs.stderr
    assert_plain(runs.stdout)
    rows = [json.loads(line) for line in runs.stdout.splitlines()]
    assert [r["user_id"] for r in rows] == ["sam", "rita"]  # newest first
    rita = rows[1]
    assert rita["exit_code"] == 2 and rita["outcome"] == "ok" and rita["origin"] == "cli"
    assert rita["summary"]["argv"] == ["sh", "-c", "printf %s%s OUT PUT; exit 2"]
    assert "OUTPUT" not in json.dumps(rita)  # no command output in the record

    only = [json.loads(line) for line in run_cli("runs", "--user", "rita").stdout.splitlines()]
    assert [r["user_id"] for r in only] == ["rita"]

    log = run_cli("log", "--kind", "exec")
    entries = [json.loads(line) for line in log.stdout.splitlines()]
    assert [e["user_id"] for e in entries] == ["rita", "sam"]  # oldest first
    assert entries[0]["detail"]["argv"] == ["sh", "-c", "printf %s%s OUT PUT; exit 2"]
    assert entries[0]["detail"]["origin"] == "cli"
    assert run_cli("log", "--since", "1h").stdout.count("\n") >= 2
    assert run_cli("log", "--since", "soon").returncode == 2


def test_log_refuses_an_unknown_kind_and_says_when_there_is_no_record(run_cli: Run) -> None:
    bad = run_cli("log", "--kind", "everything")
    assert bad.returncode == 2 and "--kind must be one of" in bad.stderr
    missing = run_cli("runs")
    assert missing.returncode == 1 and "no record at" in missing.stderr
