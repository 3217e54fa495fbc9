from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import SOCKET_DIRS

os.environ.setdefault("NO_COLOR", "1")


@pytest.fixture(scope="session", autouse=True)
def tenant_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One uid map for the whole session (CLI subprocesses inherit it), not the host's
    /var/lib/sandbox: test users and audit users would otherwise hold host uids for good."""
    state = tmp_path_factory.mktemp("state")
    old = os.environ.get("SANDBOX_STATE_DIR")
    os.environ["SANDBOX_STATE_DIR"] = str(state)
    yield state
    if old is None:
        os.environ.pop("SANDBOX_STATE_DIR", None)
    else:
        os.environ["SANDBOX_STATE_DIR"] = old


@pytest.fixture(scope="session", autouse=True)
def short_socket_dirs() -> Iterator[None]:
    """The /tmp directories of the session's service sockets go when it ends (they piled up)."""
    yield
    for folder in SOCKET_DIRS:
        shutil.rmtree(folder, ignore_errors=True)


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
