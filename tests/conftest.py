from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("NO_COLOR", "1")


@pytest.fixture
def workspace_root(tmp_path: Path) -> Path:
    root = tmp_path / "workspaces"
    root.mkdir()
    return root


@pytest.fixture
def host_canary(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A secret in the host environment that must never reach a worker."""
    value = "canary-" + os.urandom(8).hex()
    monkeypatch.setenv("TEST_HOST_SECRET_OF_SANDBOX", value)
    yield value
