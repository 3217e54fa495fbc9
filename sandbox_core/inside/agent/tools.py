"""The agent's tools: the SDK's reference agent toolset, confined to the user's workspace.

``read``, ``write``, ``edit``, ``glob`` and ``grep`` are the SDK's own
(``anthropic.lib.tools.agent_toolset``) bound to an ``AgentToolContext`` whose workdir is
the workspace and which has no other allowed roots: the SDK resolves every path, symlinks
included, and refuses anything that lands outside it.

``bash`` keeps the SDK's name and input schema (``agent_toolset_20260401``) but runs on
:class:`WorkspaceShell` rather than the SDK's ``BashSession``, for two reasons seen with
the installed SDK: ``BashSession`` starts bash in the caller's process group, so on a
timeout or a cancel it kills bash alone and the command's children live on (``sleep``
outlived a timed-out ``exec`` here); and the Messages tool runner never calls the bash
tool's close hook, so the shell would outlive the run. Here bash leads a process group of
its own (still inside the worker's session), a timeout or a cancel kills that whole group,
and :meth:`WorkspaceShell.close` is called by the runtime when the run ends.

While a command runs, its output streams as ``stdout`` events tagged with the call's
``tool_use_id``. The SDK's runner calls a tool with its input only, so the runtime tells
:class:`BashCalls` about each ``bash`` call as its ``tool_use`` block finishes streaming
(always before the runner runs it, eager runs included), and the tool claims the first
pending call with its input. The runner runs a reply's calls one at a time in the model's
order, so even identical calls get their own ids; the shell takes one command at a time
whatever the runner does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anthropic.lib.tools import BetaAsyncFunctionTool, ToolError, beta_async_tool
from anthropic.lib.tools.agent_toolset import (
    AgentToolContext,
    beta_edit_tool,
    beta_glob_tool,
    beta_grep_tool,
    beta_read_tool,
    beta_write_tool,
)
from anthropic.types.beta import BetaManagedAgentsAgentToolset20260401BashInput

from sandbox_core.chunks import OutputEncoder
from sandbox_core.inside.runner import kill_group, kill_strays
from sandbox_core.process_tree import boot_ticks
from sandbox_core.shared import MODEL_ENDPOINT_HOST, PLACEHOLDER_API_KEY

if TYPE_CHECKING:
    from sandbox_core.events import EventType

TOOL_NAMES = ("bash", "read", "write", "edit", "glob", "grep")
OUTPUT_LIMIT = 100 * 1024
"""Bytes of a command's output the model gets (the tail, like the SDK's bash tool)."""
DEFAULT_TIMEOUT = 120.0
EXIT_TRAILER = re.compile(r"\n?\[exit code (-?\d+)\]$")
_READ = 64 * 1024
"""Bytes read from the shell at a time: also the most one live output event carries."""
_DONE = "__SANDBOX_DONE_"
SHELL = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"


def shell_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The worker's (already scrubbed) environment minus any ``ANTHROPIC_*``, as the SDK does,
    except what the worker set for its model endpoint (a loopback address, the placeholder key)."""
    env = {k: v for k, v in environ.items() if not k.startswith("ANTHROPIC_") or _endpoint_setting(k, v)}
    env.update(PS1="", PS2="", TERM="dumb")
    return env


def _endpoint_setting(name: str, value: str) -> bool:
    if name == "ANTHROPIC_API_KEY":
        return value == PLACEHOLDER_API_KEY
    return name == "ANTHROPIC_BASE_URL" and value.startswith(f"http://{MODEL_ENDPOINT_HOST}:")


OutputSink = Callable[[bytes], Awaitable[None]]
Emit = Callable[["EventType", dict[str, Any]], Awaitable[None]]

_CLOSE_WAIT = 5.0
"""Seconds close() waits for the killed shell's pipes to close."""


class WorkspaceShell:
    """A persistent bash in the workspace; cwd, variables and functions survive between commands."""

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        self._workdir = workdir
        self._env = dict(env)
        self._proc: asyncio.subprocess.Process | None = None
        self.pgid: int | None = None
        self._since = boot_ticks()
        self._lock = asyncio.Lock()

    async def _ensure(self) -> asyncio.subprocess.Process:
        if self._proc is None or self._proc.returncode is not None:
            await self.close()
            self._since = boot_ticks()
            self._proc = await asyncio.create_subprocess_exec(
                SHELL, *(["--noprofile", "--norc"] if SHELL.endswith("bash") else []),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=self._workdir,
                env=self._env,
                process_group=0,
            )
            self.pgid = self._proc.pid
        return self._proc

    async def run(self, command: str, timeout: float = DEFAULT_TIMEOUT, on_output: OutputSink | None = None
                  ) -> tuple[str, int]:
        """Run ``command``; its combined output (tail-truncated) and exit status.

        ``on_output`` gets the output while it is read, in chunks of at most one read (64 KiB)
        and never a byte of the end marker: a tail that could be the marker's start is held
        back until the next read tells. One command runs at a time.
        """
        async with self._lock:
            return await self._run(command, timeout, on_output)

    async def _run(self, command: str, timeout: float, on_output: OutputSink | None) -> tuple[str, int]:
        proc = await self._ensure()
        assert proc.stdin is not None and proc.stdout is not None
        nonce = uuid.uuid4().hex
        marker = f"{_DONE}{nonce}__".encode()
        # The marker is printed in two pieces, so it never appears whole in what bash reads.
        script = f"{{ {command}\n}} </dev/null 2>&1; printf '%s%s %d\\n' {_DONE} {nonce}__ $?\n"
        proc.stdin.write(script.encode())
        kept = bytearray()
        truncated = False
        pending = b""  # read, not passed on (it may be the marker's start); emptied before each delivery
        status: bytes | None = None

        async def deliver(data: bytes) -> None:
            nonlocal truncated
            if not data:
                return
            kept.extend(data)
            if len(kept) > OUTPUT_LIMIT:
                del kept[: len(kept) - OUTPUT_LIMIT]
                truncated = True
            if on_output is not None:
                await on_output(data)

        try:
            await proc.stdin.drain()
            async with asyncio.timeout(timeout):
                while chunk := await proc.stdout.read(_READ):
                    pending += chunk
                    at = pending.find(marker)
                    if at >= 0:
                        ready, status, pending = pending[:at], pending[at + len(marker):], b""
                        await deliver(ready)
                        while b"\n" not in status and (more := await proc.stdout.read(_READ)):
                            status += more
                        break
                    cut = len(pending) - _marker_start(pending, marker)
                    ready, pending = pending[:cut], pending[cut:]
                    await deliver(ready)
                else:  # the shell exited: what was held back is output
                    ready, pending = pending, b""
                    await deliver(ready)
        except TimeoutError:
            await self.close()
            await deliver(pending)
            raise ToolError(f"bash: command timed out after {timeout:g}s; the shell was restarted") from None
        except BaseException:
            await self.close()
            raise
        text = kept.decode(errors="replace")
        if status is None:  # the shell itself exited (``exit``, killed)
            await self.close()
            code = proc.returncode if proc.returncode is not None else -1
            return _clip(text, truncated), code
        fields = status.split()
        code = int(fields[0]) if fields and fields[0].lstrip(b"-").isdigit() else -1
        return _clip(text.rstrip("\n"), truncated), code

    async def close(self) -> None:
        """Kill the shell and everything in its process group."""
        proc, self._proc = self._proc, None
        if self.pgid is not None:
            kill_group(self.pgid)
        kill_strays(self._since, frozenset({proc.pid}) if proc is not None else frozenset())
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            # No proc.kill(): the group kill above already reached bash, and Popen.kill() polls
            # (waitpid) first, which can reap bash before asyncio's watcher does and turn its
            # exit status into 255.
            with contextlib.suppress(TimeoutError):
                await asyncio.shield(asyncio.wait_for(proc.wait(), _CLOSE_WAIT))


def _marker_start(data: bytes, marker: bytes) -> int:
    """How many bytes at the end of ``data`` could be the start of ``marker``."""
    for size in range(min(len(marker) - 1, len(data)), 0, -1):
        if data.endswith(marker[:size]):
            return size
    return 0


def _clip(text: str, truncated: bool) -> str:
    return "[output truncated]\n" + text if truncated else text


class BashCalls:
    """The ``bash`` calls of the current reply that have not started, in the model's order.

    The runtime notes each call when its ``tool_use`` block finishes streaming; the tool
    claims one when the runner calls it. The runner runs the reply's calls in that order,
    so the first pending call with the same input is the one running, identical calls
    included; a call the runner could not start (its input did not validate) keeps its
    place and is matched by nothing. The same command is the fallback, for an input the
    SDK coerced (``"5000"`` for ``timeout_ms``).
    """

    def __init__(self) -> None:
        self._pending: list[tuple[str, dict[str, Any]]] = []

    def expect(self, tool_use_id: str, tool_input: object) -> None:
        self._pending.append((tool_use_id, _given(tool_input)))

    def claim(self, tool_input: Mapping[str, Any]) -> str | None:
        """The id of the call with ``tool_input`` (no longer pending), or None when none matches."""
        wanted = _given(tool_input)
        found = next((i for i, (_, seen) in enumerate(self._pending) if seen == wanted), None)
        if found is None:
            command = wanted.get("command")
            found = next((i for i, (_, seen) in enumerate(self._pending) if seen.get("command") == command), None)
        return None if found is None else self._pending.pop(found)[0]

    def clear(self) -> None:
        """Forget the calls of a reply whose results are in (those that never ran included)."""
        self._pending.clear()


def _given(tool_input: object) -> dict[str, Any]:
    return {k: v for k, v in tool_input.items() if v is not None} if isinstance(tool_input, Mapping) else {}


class _LiveOutput:
    """A command's output as ``stdout`` events of one tool call, cut by :class:`OutputEncoder`."""

    def __init__(self, emit: Emit, tool_use_id: str | None) -> None:
        self._emit = emit
        self._tool_use_id = tool_use_id
        self._encoder = OutputEncoder()

    async def write(self, chunk: bytes) -> None:
        await self._send(self._encoder.encode(chunk))

    async def flush(self) -> None:
        await self._send(self._encoder.flush())

    async def _send(self, data: dict[str, Any] | None) -> None:
        if data is not None:
            await self._emit("stdout", {"tool_use_id": self._tool_use_id, **data})


def bash_tool(shell: WorkspaceShell, calls: BashCalls | None = None, emit: Emit | None = None
              ) -> BetaAsyncFunctionTool[Any]:
    """The ``bash`` tool of the reference toolset, on ``shell``; its output streams to ``emit``.

    Each event carries the ``tool_use_id`` that ``calls`` gives the call (None when it knows none).
    """

    @beta_async_tool(
        name="bash",
        input_schema=BetaManagedAgentsAgentToolset20260401BashInput,
        description="Run a command in a persistent bash shell whose working directory is the user's workspace.",
    )
    async def bash(command: str | None = None, restart: bool | None = None, timeout_ms: int | None = None) -> str:
        if restart:
            await shell.close()
            return "bash session restarted"
        if not command:
            raise ToolError("bash: command is required")
        seconds = timeout_ms / 1000 if timeout_ms else DEFAULT_TIMEOUT
        if emit is None:
            output, code = await shell.run(command, seconds)
        else:
            tool_use_id = None if calls is None else calls.claim(
                {"command": command, "restart": restart, "timeout_ms": timeout_ms})
            live = _LiveOutput(emit, tool_use_id)
            try:
                output, code = await shell.run(command, seconds, live.write)
            except ToolError:
                await live.flush()
                raise
            await live.flush()
        if code != 0:
            raise ToolError(f"{output}\n[exit code {code}]")
        return output or "(no output)"

    return bash


def workspace_tools(
    workspace: Path, shell: WorkspaceShell, names: tuple[str, ...], calls: BashCalls | None = None,
    emit: Emit | None = None, cache: dict[Any, BetaAsyncFunctionTool[Any]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[BetaAsyncFunctionTool[Any]]:
    """The tools called ``names``, confined to ``workspace``; ``bash`` streams its output to ``emit``.

    The file tools hold nothing of a run (only the workspace and the environment), so with a
    ``cache`` they are built once per workspace and environment (building one costs ~1 ms).
    ``environ`` is the worker's environment they are for (default: the present one).
    """
    env = shell_env(os.environ if environ is None else environ)
    ctx = AgentToolContext(workdir=str(workspace), env=env)
    makers = {
        "read": lambda: beta_read_tool(ctx),
        "write": lambda: beta_write_tool(ctx),
        "edit": lambda: beta_edit_tool(ctx),
        "glob": lambda: beta_glob_tool(ctx),
        "grep": lambda: beta_grep_tool(ctx),
    }
    key = (str(workspace), tuple(sorted(env.items())))
    out: list[BetaAsyncFunctionTool[Any]] = []
    for name in names:
        if name == "bash":
            out.append(bash_tool(shell, calls, emit))
        elif cache is None:
            out.append(makers[name]())
        else:
            tool = cache.get((name, key))
            if tool is None:
                tool = cache[(name, key)] = makers[name]()
            out.append(tool)
    return out
