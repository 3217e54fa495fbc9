"""The durable record: one SQLite file (WAL) of runs and a journal of security-relevant events.

Tables:

* ``runs``: one row per request (exec, agent run, terminal, file transfer): who, what (a
  bounded summary), on which worker, when, how it ended (outcome, exit code, kill reason,
  error), tokens.
* ``journal``: what an incident review needs, in order: exec argv, agent prompts, tool calls
  and their results, model calls with token counts, egress decisions, worker crashes, limit
  kills, auth failures. ``detail`` is JSON.
* ``conversations``: the message history of ``sandbox run --conversation``, per user.

Nothing written is a secret or command output beyond a bounded preview: every string is cut
to ``preview_bytes`` and scrubbed of the secrets the record is given (the API key, service
tokens) before it is queued.

Writes never block the event loop: they go on a bounded queue to one writer thread, which
commits them in batches: the rows that come within :data:`COMMIT_EVERY` of the first one
together (a flush, a read or close commits at once). A full queue drops the row and counts
it (``dropped``): the record never grows the host without bound and never slows a request.
Reads commit what is queued first, then use their own connection (call them in a thread
from async code), so they see every row written before them. Retention: rows older than
``retention_days`` go, and when the file outgrows ``max_mb`` the oldest journal rows and runs
go first; both checked at open and every :data:`PRUNE_EVERY` writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    origin TEXT NOT NULL,
    summary TEXT NOT NULL,
    worker_id TEXT,
    started REAL NOT NULL,
    ended REAL,
    outcome TEXT NOT NULL DEFAULT 'running',
    exit_code INTEGER,
    kill_reason TEXT,
    error TEXT,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    conversation_id TEXT
);
CREATE INDEX IF NOT EXISTS runs_started ON runs (started);
CREATE INDEX IF NOT EXISTS runs_user ON runs (user_id, started);
CREATE TABLE IF NOT EXISTS journal (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    user_id TEXT,
    run_id TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_at ON journal (at);
CREATE INDEX IF NOT EXISTS journal_user ON journal (user_id, id);
CREATE TABLE IF NOT EXISTS conversations (
    user_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    updated REAL NOT NULL,
    history TEXT NOT NULL,
    PRIMARY KEY (user_id, conversation_id)
);
"""
JOURNAL_KINDS = ("exec", "agent", "tool", "model", "egress", "crash", "limit", "auth", "terminal", "files")
RUN_COLUMNS = ("run_id", "user_id", "kind", "origin", "summary", "worker_id", "started", "ended", "outcome",
               "exit_code", "kill_reason", "error", "input_tokens", "output_tokens", "conversation_id")  # fmt: skip
QUEUE_MAX = 10_000
"""Rows waiting for the writer; beyond it new rows are dropped (and counted)."""
BATCH = 500
COMMIT_EVERY = 0.05
"""Seconds the writer gathers rows after the first of a burst before it commits them. A
commit per row woke the writer thread and ran it (a transaction, a WAL write) inside every
request: the record cost 1.2-1.35x on a warm ``exec true``; gathered, a burst of requests
shares one commit. A host that dies loses at most this much of the record."""
PRUNE_EVERY = 2_000
REDACTED = "[redacted]"
_STOP = object()


class Record:
    """The record file, its writer thread, and the queries ``sandbox runs``/``sandbox log`` use."""

    def __init__(
        self,
        path: Path,
        *,
        retention_days: float = 30.0,
        max_mb: int = 256,
        preview_bytes: int = 512,
        secrets: Iterable[str] = (),
    ) -> None:
        self.path = path
        self.retention_days = retention_days
        self.max_mb = max_mb
        self.preview_bytes = preview_bytes
        self._secrets = sorted({s for s in secrets if s and len(s) >= 8}, key=len, reverse=True)
        self.dropped = 0
        """Rows refused because the writer was behind (the queue was full)."""
        self._queue: queue.Queue[Any] = queue.Queue(QUEUE_MAX)
        self._urgent = threading.Event()
        """Set by a flush or close: the writer commits what is queued without gathering more."""
        self._since_prune = 0
        self._closed = False
        _create(path)
        with self._connect() as db:
            self._prune(db)
        self._writer = threading.Thread(target=self._write_loop, name="sandbox-record", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ writing

    def clean(self, value: Any) -> Any:
        """``value`` with every string cut to the preview size and scrubbed of the secrets."""
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            encoded = value.encode(errors="replace")
            if len(encoded) > self.preview_bytes:
                value = encoded[: self.preview_bytes].decode(errors="ignore") + "…"
            return value
        if isinstance(value, bytes):
            return self.clean(value.decode(errors="replace"))
        if isinstance(value, dict):
            return {str(k): self.clean(v) for k, v in list(value.items())[:64]}
        if isinstance(value, list | tuple):
            return [self.clean(v) for v in list(value)[:64]]
        if value is None or isinstance(value, bool | int | float):
            return value
        return self.clean(repr(value))

    def run_started(self, run_id: str, user_id: str, kind: str, origin: str, summary: dict[str, Any],
                    conversation_id: str | None = None) -> None:  # fmt: skip
        row = (run_id, user_id, kind, origin, _dumps(self.clean(summary)), time.time(), conversation_id)
        self._put("INSERT OR REPLACE INTO runs (run_id, user_id, kind, origin, summary, started, conversation_id) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?)", row)  # fmt: skip

    def run_updated(self, run_id: str, **fields: Any) -> None:
        """Set columns of a run (``worker_id``, ``outcome``, ``exit_code``, ``kill_reason``, ``error``, tokens)."""
        allowed = {k: v for k, v in fields.items() if k in RUN_COLUMNS and k not in ("run_id", "started")}
        if not allowed:
            return
        values = [_dumps(self.clean(v)) if k == "error" and v is not None and not isinstance(v, str)
                  else self.clean(v) if isinstance(v, str) else v for k, v in allowed.items()]  # fmt: skip
        sets = ", ".join(f"{k} = ?" for k in allowed)
        self._put(f"UPDATE runs SET {sets} WHERE run_id = ?", (*values, run_id))

    def run_tokens(self, run_id: str, input_tokens: int, output_tokens: int) -> None:
        self._put("UPDATE runs SET input_tokens = input_tokens + ?, output_tokens = output_tokens + ? "
                  "WHERE run_id = ?", (int(input_tokens), int(output_tokens), run_id))  # fmt: skip

    def journal(self, kind: str, detail: dict[str, Any], *, user_id: str | None = None,
                run_id: str | None = None) -> None:  # fmt: skip
        self._put("INSERT INTO journal (at, kind, user_id, run_id, detail) VALUES (?, ?, ?, ?, ?)",
                  (time.time(), kind, user_id, run_id, _dumps(self.clean(detail))))  # fmt: skip

    def save_conversation(self, user_id: str, conversation_id: str, history: list[Any]) -> None:
        """Keep a conversation's messages (scrubbed of secrets, not cut: the model needs them whole)."""
        text = json.dumps(history, separators=(",", ":"), default=str)
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        self._put("INSERT OR REPLACE INTO conversations (user_id, conversation_id, updated, history) "
                  "VALUES (?, ?, ?, ?)", (user_id, conversation_id, time.time(), text))  # fmt: skip

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued row is committed (True) or ``timeout`` passes (False)."""
        done = threading.Event()
        try:
            self._queue.put((None, done), timeout=timeout)
        except queue.Full:
            return False
        self._urgent.set()
        return done.wait(timeout)

    def close(self) -> None:
        """Commit what is queued and stop the writer (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.flush()
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=5)
        self._urgent.set()
        self._writer.join(10)

    def _put(self, sql: str, params: tuple[Any, ...]) -> None:
        if self._closed:
            return
        try:
            self._queue.put_nowait((sql, params))
        except queue.Full:
            self.dropped += 1

    def _write_loop(self) -> None:
        db = self._connect()
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                if item[0] is not None and self._queue.qsize() < BATCH:  # a row: gather its burst
                    self._urgent.wait(COMMIT_EVERY)
                self._urgent.clear()  # a flush that set it put its waiter before: it is in this batch
                batch = [item]
                while len(batch) < BATCH:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = _STOP in batch
                self._commit(db, [b for b in batch if b is not _STOP])
                if stop:
                    return
        finally:
            db.close()

    def _commit(self, db: sqlite3.Connection, batch: list[Any]) -> None:
        waiters: list[threading.Event] = []
        rows = 0
        try:
            with db:
                for sql, params in batch:
                    if sql is None:
                        waiters.append(params)
                        continue
                    db.execute(sql, params)
                    rows += 1
        except sqlite3.Error:
            self.dropped += rows  # a full disk or a broken file must not stop the host
        self._since_prune += rows
        if self._since_prune >= PRUNE_EVERY:
            self._since_prune = 0
            with contextlib.suppress(sqlite3.Error):
                self._prune(db)
        for waiter in waiters:
            waiter.set()

    # ------------------------------------------------------------------ retention

    def _prune(self, db: sqlite3.Connection) -> None:
        cutoff = time.time() - self.retention_days * 86400
        with db:
            db.execute("DELETE FROM journal WHERE at < ?", (cutoff,))
            db.execute("DELETE FROM runs WHERE started < ? AND outcome != 'running'", (cutoff,))
            db.execute("DELETE FROM conversations WHERE updated < ?", (cutoff,))
        for _ in range(20):  # the oldest tenth of what is left, until the file fits
            if _used_bytes(db) <= self.max_mb * 1024 * 1024:
                break
            with db:
                (journal_rows,) = db.execute("SELECT COUNT(*) FROM journal").fetchone()
                (run_rows,) = db.execute("SELECT COUNT(*) FROM runs").fetchone()
                if journal_rows:
                    db.execute("DELETE FROM journal WHERE id IN (SELECT id FROM journal ORDER BY id LIMIT ?)",
                               (max(1, journal_rows // 10),))  # fmt: skip
                elif run_rows:
                    db.execute("DELETE FROM runs WHERE run_id IN (SELECT run_id FROM runs ORDER BY started LIMIT ?)",
                               (max(1, run_rows // 10),))  # fmt: skip
                else:
                    break
        db.execute("PRAGMA incremental_vacuum")

    # ------------------------------------------------------------------ reading

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10, isolation_level="DEFERRED", check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        if not self._closed:
            self.flush()  # what was written before this read is read back
        db = self._connect()
        db.row_factory = sqlite3.Row
        try:
            yield db
        finally:
            db.close()

    def runs(self, *, user_id: str | None = None, since: float | None = None, limit: int = 100,
             run_id: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """Runs, newest first (``summary`` and ``error`` decoded)."""
        where, args = _filters(user_id=user_id, since=("started", since), run_id=run_id)
        with self._reader() as db:
            rows = db.execute(f"SELECT * FROM runs {where} ORDER BY started DESC LIMIT ?", (*args, limit)).fetchall()
        return [_run_row(r) for r in rows]

    def entries(self, *, user_id: str | None = None, kind: str | None = None, since: float | None = None,
                after: int = 0, limit: int = 200) -> list[dict[str, Any]]:  # fmt: skip
        """Journal entries in order (oldest first), after id ``after``."""
        where, args = _filters(user_id=user_id, kind=kind, since=("at", since), after=after)
        with self._reader() as db:
            rows = db.execute(f"SELECT * FROM journal {where} ORDER BY id LIMIT ?", (*args, limit)).fetchall()
        return [{**dict(r), "detail": _loads(r["detail"])} for r in rows]

    def conversation(self, user_id: str, conversation_id: str) -> list[Any] | None:
        with self._reader() as db:
            row = db.execute("SELECT history FROM conversations WHERE user_id = ? AND conversation_id = ?",
                             (user_id, conversation_id)).fetchone()  # fmt: skip
        return None if row is None else list(json.loads(row["history"]))

    def last_conversation(self, user_id: str) -> str | None:
        with self._reader() as db:
            row = db.execute("SELECT conversation_id FROM conversations WHERE user_id = ? ORDER BY updated DESC "
                             "LIMIT 1", (user_id,)).fetchone()  # fmt: skip
        return None if row is None else str(row["conversation_id"])


def _create(path: Path) -> None:
    """The file (0600, in a 0700 directory) with its schema; auto_vacuum set before any table."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.close(fd)
    db = sqlite3.connect(path, timeout=10)
    try:
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        db.commit()
    finally:
        db.close()


def _used_bytes(db: sqlite3.Connection) -> int:
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    (free,) = db.execute("PRAGMA freelist_count").fetchone()
    (size,) = db.execute("PRAGMA page_size").fetchone()
    return int((pages - free) * size)


def _filters(**conditions: Any) -> tuple[str, tuple[Any, ...]]:
    clauses: list[str] = []
    args: list[Any] = []
    for name, value in conditions.items():
        if isinstance(value, tuple):
            column, bound = value
            if bound is not None:
                clauses.append(f"{column} >= ?")
                args.append(bound)
        elif name == "after":
            if value:
                clauses.append("id > ?")
                args.append(value)
        elif value is not None:
            clauses.append(f"{name} = ?")
            args.append(value)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", tuple(args)


def _run_row(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["summary"] = _loads(out["summary"])
    out["error"] = _loads(out["error"]) if out["error"] else None
    return out


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
