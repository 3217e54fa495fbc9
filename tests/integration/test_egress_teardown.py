"""Relayed connections leave nothing behind: after many connections, ended every way a
connection ends, the host's and the worker's descriptors are back where they were."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_core.bench import _worker_python_pid
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.requests import ExecRequest
from sandbox_core.shared import EGRESS_PROXY_PORT
from tests.helpers import wait_for
from tests.integration.test_egress import Servers, config, py

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")

MANY = """
import socket, urllib.request
P = {proxy}
def connect(port):
    s = socket.create_connection(("127.0.0.1", P))
    s.sendall(b"CONNECT registry.test:%d HTTP/1.1\\r\\n\\r\\n" % port)
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    return s
for i in range({rounds}):
    with urllib.request.urlopen("http://registry.test:{port}/bytes/300000") as r:   # read to the end
        assert len(r.read()) == 300000
    r = urllib.request.urlopen("http://registry.test:{port}/bytes/20000000")       # dropped mid-download
    r.read(100000)
    r.close()
    s = connect({echo})                                                             # half closes both ways
    s.sendall(b"x" * 100000)
    s.shutdown(socket.SHUT_WR)
    got = 0
    while chunk := s.recv(65536):
        got += len(chunk)
    assert got == 100000
    s.close()
    s = connect({echo})                                                             # reset by the client
    s.sendall(b"y" * 1000)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\\1\\0\\0\\0\\0\\0\\0\\0")
    s.close()
print("ok")
"""


@pytest.fixture
def servers() -> Iterator[Servers]:
    s = Servers()
    yield s
    s.close()


def _fds(pid: int | str) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_descriptors_return_to_baseline_after_many_connections(workspace_root: Path, servers: Servers) -> None:
    async with SandboxOrchestrator(config(workspace_root)) as pool:
        def many(rounds: int) -> ExecRequest:
            return py(MANY.format(proxy=EGRESS_PROXY_PORT, port=servers.port, echo=servers.echo_port, rounds=rounds))

        warm = await pool.execute("alice", many(1))  # what is made once (the proxy, its first tasks) is made
        assert warm.stdout_text.strip() == "ok", warm.stderr_text
        worker = _worker_python_pid(pool.list_workers()[0]["pid"])
        host_before, worker_before = _fds("self"), _fds(worker)
        result = await pool.execute("alice", many(10))
        assert result.stdout_text.strip() == "ok", result.stderr_text
        await wait_for(lambda: _fds("self") <= host_before and _fds(worker) <= worker_before, 20,
                       "the host's and the worker's descriptors back to where they were")  # fmt: skip
