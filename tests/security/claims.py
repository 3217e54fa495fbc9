"""What the tests of claimed pre-warmed strict workers share: their skips, config and leftovers check."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from sandbox_core.isolation import slots, tenants
from tests.helpers import process_config

NEEDS_UNBOUND_STRICT = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="unbound strict workers need a root host (slots mount on the host)"),
]


@pytest.fixture(autouse=True)
def fresh_uid_maps() -> None:
    """Each test reads the uid map of its own state directory, not one an earlier test left open."""
    tenants.close_maps()


def claim_config(tmp_path: Path, **changes: Any) -> Any:
    """A strict pool keeping one pre-warmed worker (up to 6), its workspaces and state in ``tmp_path``."""
    base = process_config(tmp_path / "ws", state_dir=tmp_path / "state", min_idle=1, max_workers=6)
    return base.replace(profile="strict", **changes)


def slot_mounts(tmp_path: Path) -> list[str]:
    """The slot mounts of the host that belong to this test (none may outlive its pool)."""
    return [m for m in slots.mounted_slots() if m.startswith(str(tmp_path))]
