"""The service's log: uvicorn's access and error logs and our own, one configuration.

Every line goes to stderr: human-readable on a terminal, one JSON object per line otherwise
(for journald, a log shipper, ``jq``). A filter on the handler redacts bearer tokens and the
configured API key from every message and argument before it is formatted, whoever logs it.
The level is ``service.log_level``.

**A log nobody reads never stops the service.** A write to a pipe whose reader stalled blocks
once the pipe is full (64 KiB: a few hundred lines), and the service logs from its event loop,
so a blocking write stopped every run, stream and health check at once. Records are handed to
one writer thread instead, through a queue of :data:`QUEUE_LIMIT` records that the event loop
puts into without ever waiting: the thread alone waits on stderr. When the queue is full the
record is dropped and counted, and the next line written says how many were dropped (the
durable record of runs is the record database, not this log). :func:`close` writes what is
queued, for at most the time given, when the service stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

LOGGER = "sandbox.service"
REDACTED = "[redacted]"
QUEUE_LIMIT = 10_000
"""Records waiting for the writer thread at most (a few MB); more are dropped and counted."""
CLOSE_LIMIT = 5.0
"""Seconds :func:`close` waits for the queued lines to be written (stderr may not be read at all)."""
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "color_message"}


class Redact(logging.Filter):
    """Replace bearer tokens and the given secrets in a record's message and arguments."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = sorted({s for s in secrets if s and len(s) >= 8}, key=len, reverse=True)

    def scrub(self, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        for secret in self._secrets:
            value = value.replace(secret, REDACTED)
        return _BEARER.sub(lambda m: m.group(1) + REDACTED, value)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.scrub(record.getMessage() if record.args else record.msg)
        record.args = None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD:
                setattr(record, key, self.scrub(value))
        return True


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # rendered where it was logged (see _Queued)
            out["exc"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler on whatever ``sys.stderr`` is when a line is written (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _Queued(logging.Handler):
    """The loggers' handler: a record is redacted, its message and traceback rendered to text
    (nothing of the caller's is held after), and queued for :attr:`writer`, never waited for."""

    def __init__(self, writer: logging.Handler, limit: int = QUEUE_LIMIT) -> None:
        super().__init__()
        self.writer = writer
        self._queue: queue.Queue[logging.LogRecord | threading.Event | None] = queue.Queue(limit)
        self._dropped = 0
        self._counting = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._write_loop, name="sandbox-log", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if self._stopped:  # the last lines of a stopping service: written here once the writer is done
            if self._thread.is_alive():  # still stuck on a stderr nobody reads: this one waits for nothing
                with self._counting:
                    self._dropped += 1
            else:
                self.writer.handle(record)
            return
        with self._counting:  # the lines dropped before this one are said where they were
            try:
                if self._dropped:
                    self._queue.put_nowait(_dropped_line(self._dropped))
                    self._dropped = 0
                self._queue.put_nowait(record)
            except queue.Full:
                self._dropped += 1

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, threading.Event):  # a drain: what came before it is written
                with self._counting:
                    dropped, self._dropped = self._dropped, 0
                if dropped:
                    self.writer.handle(_dropped_line(dropped))
                item.set()
                continue
            self.writer.handle(item)

    def flush(self) -> None:
        """What :func:`logging.shutdown` calls at exit: the queued lines are written (bounded)."""
        self.drain(CLOSE_LIMIT)

    def drain(self, timeout: float) -> bool:
        """Wait until what is queued now is written; False if that took longer than ``timeout``."""
        if self._stopped:
            return True
        written = threading.Event()
        try:
            self._queue.put(written, timeout=timeout)
        except queue.Full:
            return False
        return written.wait(timeout)

    def stop(self, timeout: float) -> None:
        """Write what is queued (for at most ``timeout``), then stop the writer: later lines are written at once."""
        if not self._stopped:
            deadline = time.monotonic() + timeout
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=timeout)
            self._thread.join(max(0.0, deadline - time.monotonic()))
            self._stopped = True


def _dropped_line(count: int) -> logging.LogRecord:
    return logging.makeLogRecord({"name": LOGGER, "levelno": logging.WARNING, "levelname": "WARNING",
                                  "msg": f"{count} log lines were dropped: stderr was not read fast enough"})


_current: _Queued | None = None


def configure(level: str, secrets: Iterable[str] = (), *, json_lines: bool | None = None) -> dict[str, Any]:
    """Set up logging for the service and return the dict config uvicorn should use too."""
    global _current
    as_json = not sys.stderr.isatty() if json_lines is None else json_lines
    writer = _Stderr(sys.stderr)
    text = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    writer.setFormatter(JsonLines() if as_json else text)
    handler = _Queued(writer)
    handler.addFilter(Redact(secrets))
    numeric = logging.getLevelName(level.upper())
    for name in (LOGGER, "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(numeric)
        logger.propagate = False
    previous, _current = _current, handler
    if previous is not None:
        previous.stop(CLOSE_LIMIT)
    # uvicorn must not install its own handlers over ours
    return {"version": 1, "disable_existing_loggers": False}


def flush(timeout: float = CLOSE_LIMIT) -> bool:
    """Wait until the lines logged so far are written (tests; :func:`close` when stopping)."""
    return _current.drain(timeout) if _current is not None else True


def close(timeout: float = CLOSE_LIMIT) -> None:
    """Write the queued lines, for at most ``timeout`` seconds, and stop the writer thread."""
    if _current is not None:
        _current.stop(timeout)


def log() -> logging.Logger:
    return logging.getLogger(LOGGER)
