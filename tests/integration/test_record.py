"""The durable record: real workers, a real SQLite file, what it keeps and what it never does."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from sandbox_core.config import ModelConfig, RecordConfig, Secret
from sandbox_core.errors import RequestTimeout, WorkerCrashed
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.record import Record, open_record, parse_duration, record_path
from sandbox_core.record import store as store_module
from sandbox_core.requests import AgentRequest, ExecRequest
from tests.helpers import process_config, wait_for

KEY = "sk-ant-api03-PLANTED-record-key-0123456789abcdef"


def config(tmp_path: Path, **record: object):  # type: ignore[no-untyped-def]
    return process_config(tmp_path / "ws").replace(
        state_dir=tmp_path / "state",
        record=RecordConfig(**record),  # type: ignore[arg-type]
        model=ModelConfig(provider="offline", api_key=Secret(KEY)),
    )


def file_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


async def test_execs_agent_runs_and_failures_are_recorded(tmp_path: Path, host_canary: str) -> None:
    cfg = config(tmp_path)
    record = open_record(cfg)
    assert record is not None
    async with SandboxOrchestrator(cfg, record=record, origin="cli") as pool:
        ok = await pool.execute("alice", ExecRequest(argv=("sh", "-c", f"echo {KEY}; env; exit 3")))
        assert ok.exit_code == 3
        with pytest.raises(RequestTimeout):
            await pool.execute("alice", ExecRequest(shell="sleep 30", timeout=0.5))
        agent = await pool.execute("bob", AgentRequest(prompt="run: echo from-the-agent", model="claude-sonnet-5-5"))
        assert agent.result.get("stop_reason")

        async def crash() -> None:
            await wait_for(lambda: any(w["state"] == "busy" for w in pool.list_workers()), 10, "busy")
            os.kill(next(w["pid"] for w in pool.list_workers() if w["state"] == "busy"), signal.SIGKILL)

        killer = asyncio.create_task(crash())
        with pytest.raises(WorkerCrashed):
            await pool.execute("carol", ExecRequest(shell="sleep 30"))
        await killer
    assert record.flush()
    runs = {(r["user_id"], r["outcome"]): r for r in record.runs()}
    exec_row = runs[("alice", "ok")]
    assert exec_row["kind"] == "exec" and exec_row["origin"] == "cli" and exec_row["exit_code"] == 3
    assert exec_row["summary"]["argv"][:2] == ["sh", "-c"] and "[redacted]" in exec_row["summary"]["argv"][2]
    assert exec_row["worker_id"] == ok.worker_id and exec_row["ended"] >= exec_row["started"]
    assert runs[("alice", "timed_out")]["error"]["error"] == "RequestTimeout"
    bob = runs[("bob", "ok")]
    assert bob["kind"] == "agent" and bob["input_tokens"] > 0 and bob["output_tokens"] > 0
    assert runs[("carol", "failed")]["error"]["error"] == "WorkerCrashed"

    entries = record.entries()
    kinds = [e["kind"] for e in entries]
    assert kinds.count("exec") == 3 and "agent" in kinds and "crash" in kinds and "limit" in kinds
    tools = [e["detail"] for e in entries if e["kind"] == "tool" and e["run_id"] == bob["run_id"]]
    assert any(t.get("name") == "bash" and "from-the-agent" in str(t.get("input")) for t in tools)
    assert any("result" in t for t in tools)
    model = [e["detail"] for e in entries if e["kind"] == "model" and e["run_id"] == bob["run_id"]]
    assert sum(m["input_tokens"] for m in model) == bob["input_tokens"]
    record.close()
    raw = file_bytes(record_path(cfg))
    assert KEY.encode() not in raw and b"PLANTED-record-key" not in raw
    assert host_canary.encode() not in raw  # a host secret in the environment never reaches the record
    assert oct(record_path(cfg).stat().st_mode & 0o777) == "0o600"


def test_strings_are_cut_to_the_preview_and_the_queue_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = Record(tmp_path / "r.sqlite3", preview_bytes=32, secrets=[KEY])
    try:
        cleaned = record.clean({"argv": ["x" * 100, KEY, b"\xff\xfe bytes"], "n": 3, "deep": {"a": [1, None]}})
        assert cleaned["argv"][0] == "x" * 32 + "…" and cleaned["argv"][1] == "[redacted]"
        assert cleaned["n"] == 3 and cleaned["deep"] == {"a": [1, None]}
    finally:
        record.close()
    monkeypatch.setattr(store_module, "QUEUE_MAX", 5)
    slow = Record(tmp_path / "s.sqlite3")
    try:
        monkeypatch.setattr(slow, "_commit", lambda db, batch: time.sleep(0.5))
        for i in range(200):
            slow.journal("exec", {"i": i})
        assert slow.dropped > 0  # the writer was behind: rows were dropped, nothing blocked
    finally:
        monkeypatch.undo()
        slow.close()


def test_retention_by_age_and_by_size(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    record = Record(path, retention_days=1)
    record.journal("exec", {"old": True})
    record.run_started("run_old", "alice", "exec", "cli", {"argv": ["true"]})
    record.run_updated("run_old", outcome="ok")
    assert record.flush()
    record.close()
    with sqlite3.connect(path) as db:  # age them
        db.execute("UPDATE journal SET at = at - 3 * 86400")
        db.execute("UPDATE runs SET started = started - 3 * 86400")
    record = Record(path, retention_days=1)
    assert record.entries() == [] and record.runs() == []
    record.close()

    big = Record(tmp_path / "big.sqlite3", max_mb=1, preview_bytes=2048)
    try:
        for i in range(3000):
            big.journal("exec", {"i": i, "pad": "p" * 2000})
        assert big.flush(30)
        with sqlite3.connect(big.path) as db:
            big._prune(db)
        rows = big.entries(limit=10_000)
        assert 0 < len(rows) < 3000 and rows[-1]["detail"]["i"] == 2999  # the newest stay
    finally:
        big.close()


async def test_the_record_survives_the_process_and_is_read_back(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    first = open_record(cfg)
    assert first is not None
    async with SandboxOrchestrator(cfg, record=first) as pool:
        await pool.execute("dave", ExecRequest(argv=("true",)))
    first.close()
    second = open_record(cfg)
    assert second is not None
    try:
        (row,) = second.runs(user_id="dave")
        assert row["outcome"] == "ok" and row["exit_code"] == 0 and row["origin"] == "library"
        assert second.runs(user_id="dave", since=time.time() + 60) == []
    finally:
        second.close()


def test_disabled_record_opens_nothing(tmp_path: Path) -> None:
    assert open_record(config(tmp_path, enabled=False)) is None
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 172800)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "-1h", "1y", "inf"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_rows_of_a_burst_share_a_commit_and_a_read_sees_them_at_once(tmp_path: Path) -> None:
    record = Record(tmp_path / "r.sqlite3")
    try:
        commits: list[int] = []
        commit = record._commit

        def counted(db: sqlite3.Connection, batch: list[Any]) -> None:
            commits.append(sum(1 for item in batch if item[0] is not None))  # (None, waiter): a flush
            commit(db, batch)

        record._commit = counted  # type: ignore[method-assign]
        for i in range(20):
            record.journal("exec", {"i": i})
        # read without a flush: the read itself commits what was written before it
        assert [e["detail"]["i"] for e in record.entries()] == list(range(20))
        assert sum(commits) == 20 and len(commits) <= 2  # gathered, not one transaction a row
    finally:
        record.close()
