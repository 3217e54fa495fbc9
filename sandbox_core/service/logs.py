"""The service's log: uvicorn's access and error logs and our own, one configuration.

Every line goes to stderr: human-readable on a terminal, one JSON object per line otherwise
(for journald, a log shipper, ``jq``). A filter on the handler redacts bearer tokens and the
configured API key from every message and argument before it is formatted, whoever logs it.
The level is ``service.log_level``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

LOGGER = "sandbox.service"
REDACTED = "[redacted]"
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
        return json.dumps(out, default=str, ensure_ascii=False)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler on whatever ``sys.stderr`` is when a line is written (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure(level: str, secrets: Iterable[str] = (), *, json_lines: bool | None = None) -> dict[str, Any]:
    """Set up logging for the service and return the dict config uvicorn should use too."""
    as_json = not sys.stderr.isatty() if json_lines is None else json_lines
    redact = Redact(secrets)
    handler = _Stderr(sys.stderr)
    handler.addFilter(redact)
    text = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(JsonLines() if as_json else text)
    numeric = logging.getLevelName(level.upper())
    for name in (LOGGER, "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(numeric)
        logger.propagate = False
    # uvicorn must not install its own handlers over ours
    return {"version": 1, "disable_existing_loggers": False}


def log() -> logging.Logger:
    return logging.getLogger(LOGGER)
