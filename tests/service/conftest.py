from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandbox_core.config import ProcessSandboxConfig, ServiceConfig
from sandbox_core.service.server import serve
from tests.helpers import process_config, short_socket_path, wait_for


@dataclass
class Live:
    """A running service: where it listens and the tokens of its users."""

    target: str
    config: ProcessSandboxConfig
    tokens: dict[str, str]
    socket_path: Path | None = None


def write_tokens(path: Path, users: list[str], operators: list[str]) -> dict[str, str]:
    tokens: dict[str, str] = {}
    lines = []
    for user in users + operators:
        token = secrets.token_hex(16)
        tokens[user] = token
        role = "operator" if user in operators else "user"
        lines.append(f'[[token]]\ntoken = "{token}"\nuser = "{user}"\nrole = "{role}"\n')
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return tokens


def service_config(tmp_path: Path, profile: str = "process", **service: object) -> ProcessSandboxConfig:
    root = tmp_path / "ws"
    root.mkdir(exist_ok=True)
    config = process_config(root, max_workers=8, max_workers_per_user=1, acquire_timeout=60.0, profile=profile,
                            state_dir=tmp_path / "state")  # fmt: skip
    return config.replace(service=ServiceConfig(keepalive_seconds=0.5, drain_grace=5.0, **service))  # type: ignore[arg-type]


async def _run(config: ProcessSandboxConfig, listen: str | None) -> AsyncIterator[str]:
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(config, listen=listen, on_ready=ready.set_result))
    waiters: set[asyncio.Future[object]] = {task, ready}  # type: ignore[arg-type]
    done, _ = await asyncio.wait(waiters, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    where = await ready
    try:
        yield where
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def unix_service_with(tmp_path: Path, **service: object) -> AsyncIterator[Live]:
    """A service on a private Unix socket, with ``service`` settings over the test defaults
    (and ``profile``, default process)."""
    profile = str(service.pop("profile", "process"))
    sock = short_socket_path("test")
    config = service_config(tmp_path, profile, socket_path=sock, **service)
    async for where in _run(config, None):
        await wait_for(sock.exists, 5, "socket")
        yield Live(where, config, {}, sock)


@contextlib.asynccontextmanager
async def tcp_service_with(tmp_path: Path, **service: object) -> AsyncIterator[Live]:
    """A service on a loopback TCP port with a token per user in ``USERS`` (and ``ops``)."""
    profile = str(service.pop("profile", "process"))
    tokens_file = tmp_path / "tokens.toml"
    tokens = write_tokens(tokens_file, USERS, ["ops"])
    config = service_config(tmp_path, profile, tokens_file=tokens_file, **service)
    async for where in _run(config, "127.0.0.1:0"):
        yield Live(where, config, tokens)


@pytest.fixture
async def unix_service(tmp_path: Path) -> AsyncIterator[Live]:
    async with unix_service_with(tmp_path) as live:
        yield live


USERS = [f"user{i:02d}" for i in range(20)]


@pytest.fixture
async def tcp_service(tmp_path: Path) -> AsyncIterator[Live]:
    async with tcp_service_with(tmp_path) as live:
        yield live
