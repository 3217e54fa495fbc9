"""The bash tool's shell and call ledger in process: live output, the end marker, ids by input."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from anthropic.lib.tools import ToolError

from sandbox_core.inside.agent import tools
from sandbox_core.inside.agent.tools import OUTPUT_LIMIT, BashCalls, WorkspaceShell, shell_env


@pytest.fixture
async def shell(tmp_path: Path) -> AsyncIterator[WorkspaceShell]:
    sh = WorkspaceShell(tmp_path, shell_env({"PATH": "/usr/bin:/bin"}))
    yield sh
    await sh.close()


class Sink:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    async def __call__(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    @property
    def joined(self) -> bytes:
        return b"".join(self.chunks)


async def test_live_output_is_the_output_byte_for_byte_when_reads_split_the_marker(
    shell: WorkspaceShell, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tools, "_READ", 7)  # every end marker (49 bytes) is split over several reads
    sinks = [Sink(), Sink(), Sink()]
    output, code = await shell.run("echo one; printf 'x__SANDBOX_DONE_y\\n__SANDBOX_DONE_'; (exit 3)", 10, sinks[0])
    assert sinks[0].joined == b"one\nx__SANDBOX_DONE_y\n__SANDBOX_DONE_" and code == 3
    assert output == "one\nx__SANDBOX_DONE_y\n__SANDBOX_DONE_"
    assert max(map(len, sinks[0].chunks)) <= 7 + 48  # a read, plus what was held back as a possible marker start
    output, code = await shell.run("printf 'é\\n\\n'; false", 10, sinks[1])
    assert sinks[1].joined == "é\n\n".encode() and (output, code) == ("é", 1)
    output, code = await shell.run("printf 'bye__SANDBOX'; exit 4", 10, sinks[2])
    assert sinks[2].joined == b"bye__SANDBOX" and (output, code) == ("bye__SANDBOX", 4)  # the shell itself ended


async def test_live_output_is_bounded_per_chunk_and_the_model_gets_the_tail(shell: WorkspaceShell) -> None:
    sink = Sink()
    size = 3 * OUTPUT_LIMIT
    output, code = await shell.run(f"head -c {size} /dev/zero | tr '\\0' x; echo end", on_output=sink)
    assert code == 0 and sink.joined == b"x" * size + b"end\n"
    assert max(map(len, sink.chunks)) <= 64 * 1024 + 64 and len(sink.chunks) >= size // (64 * 1024)
    assert output.startswith("[output truncated]\nxxx") and output.endswith("xend")
    assert len(output) == len("[output truncated]\n") + OUTPUT_LIMIT - 1  # the last 100 KiB, newline stripped


async def test_a_timeout_still_streams_what_came_before_it(shell: WorkspaceShell) -> None:
    sink = Sink()
    with pytest.raises(ToolError, match=r"timed out after 0\.3s"):
        await shell.run("printf 'before__SANDBOX'; sleep 30", 0.3, on_output=sink)
    assert sink.joined == b"before__SANDBOX"  # held back as a possible marker start, then let go
    output, code = await shell.run("echo again")
    assert (output, code) == ("again", 0)


def test_bash_calls_are_claimed_by_input_in_the_models_order() -> None:
    calls = BashCalls()
    calls.expect("bad", {"command": "ls", "timeout_ms": "soon"})  # never reaches the tool: it does not validate
    calls.expect("a", {"command": "ls"})
    calls.expect("b", {"command": "ls", "timeout_ms": None})
    calls.expect("c", {"command": "pwd", "timeout_ms": "5000"})
    assert calls.claim({"command": "pwd", "timeout_ms": 5000}) == "c"  # coerced by the SDK: same command
    assert [calls.claim({"command": "ls", "restart": None}) for _ in range(2)] == ["a", "b"]
    assert calls.claim({"command": "date"}) is None
    calls.clear()
    assert calls.claim({"command": "ls", "timeout_ms": "soon"}) is None
