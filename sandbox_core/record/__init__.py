"""The durable record of what every request did (host side): see :mod:`.store` and :mod:`.observe`."""

from __future__ import annotations

from pathlib import Path

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.record.observe import RunLog, new_run_id
from sandbox_core.record.store import JOURNAL_KINDS, Record

__all__ = ["JOURNAL_KINDS", "Record", "RunLog", "new_run_id", "open_record", "parse_duration", "record_path"]

FILE_NAME = "record.sqlite3"
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``15m``, ``1h``, ``2d``, ``1w``; ValueError for anything else."""
    text = text.strip().lower()
    unit = _UNITS.get(text[-1:]) if text else None
    number = text[:-1] if unit is not None else text
    try:
        value = float(number) * (unit or 1.0)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (write 90s, 15m, 1h, 2d)") from None
    if not 0 <= value < float("inf"):
        raise ValueError(f"not a duration: {text!r} (write 90s, 15m, 1h, 2d)")
    return value


def record_path(config: ProcessSandboxConfig) -> Path:
    return config.state_dir / FILE_NAME


def open_record(config: ProcessSandboxConfig, extra_secrets: tuple[str, ...] = ()) -> Record | None:
    """The record ``config`` asks for (None when ``record.enabled`` is off), scrubbing the API key."""
    if not config.record.enabled:
        return None
    key = config.model.api_key
    return Record(
        record_path(config),
        retention_days=config.record.retention_days,
        max_mb=config.record.max_mb,
        preview_bytes=config.record.preview_bytes,
        secrets=(*([str(key)] if key else []), *extra_secrets),
    )
