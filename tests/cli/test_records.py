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


def _done(stdout: str) -> dict[str, object]:
    events = [json.loads(line) for line in stdout.splitlines()]
    done: dict[str, object] = next(e["data"] for e in events if e["type"] == "done")
    return done


def test_run_continue_carries_the_conversation_across_processes(run_cli: Run) -> None:
    first = run_cli("run", "--json", "--user", "tess", "run: echo first-turn-marker")
    assert first.returncode == 0, first.stderr
    done = _done(first.stdout)
    conversation = str(done["conversation_id"])
    assert done["model"] == "offline" and done["requested_model"] and "history" not in done
    fresh = _done(run_cli("run", "--json", "--user", "tess", "hello").stdout)
    assert fresh["conversation_id"] != conversation
    by_id = run_cli("run", "--json", "--user", "tess", "--conversation", conversation, "hello")
    assert by_id.returncode == 0, by_id.stderr
    continued = _done(by_id.stdout)
    assert continued["conversation_id"] == conversation
    # the same prompt costs more input when the earlier turns ride along with it
    assert continued["usage"]["input_tokens"] > fresh["usage"]["input_tokens"]  # type: ignore[index]
    latest = _done(run_cli("run", "--json", "--user", "tess", "--continue", "hello").stdout)
    assert latest["conversation_id"] == conversation  # the one used last
    assert latest["usage"]["input_tokens"] > continued["usage"]["input_tokens"]  # type: ignore[index]
    said = run_cli("run", "--user", "tess", "hello")
    assert "continue it with `sandbox run --conversation run-" in said.stderr
    unknown = run_cli("run", "--user", "tess", "--conversation", "no-such", "hello")
    assert unknown.returncode == 2 and "no conversation 'no-such'" in unknown.stderr
    nobody = run_cli("run", "--user", "ursula", "--continue", "hello")
    assert nobody.returncode == 2 and "has no conversation to continue" in nobody.stderr
