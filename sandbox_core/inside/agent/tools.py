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
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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

from sandbox_core.inside.runner import kill_group, kill_strays
from sandbox_core.process_tree import boot_ticks

TOOL_NAMES = ("bash", "read", "write", "edit", "glob", "grep")
OUTPUT_LIMIT = 100 * 1024
"""Bytes of a command's output the model gets (the tail, like the SDK's bash tool)."""
DEFAULT_TIMEOUT = 120.0
EXIT_TRAILER = re.compile(r"\n?\[exit code (-?\d+)\]$")
_READ = 64 * 1024
SHELL = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"


def shell_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The worker's (already scrubbed) environment minus any ``ANTHROPIC_*``, as the SDK does."""
    env = {k: v for k, v in environ.items() if not k.startswith("ANTHROPIC_")}
    env.update(PS1="", PS2="", TERM="dumb")
    return env


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

    async def run(self, command: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[str, int]:
        """Run ``command``; its combined output (tail-truncated) and exit status."""
        proc = await self._ensure()
        assert proc.stdin is not None and proc.stdout is not None
        nonce = uuid.uuid4().hex
        marker = f"__SANDBOX_DONE_{nonce}__".encode()
        # The marker is printed in two pieces, so it never appears whole in what bash reads.
        script = f"{{ {command}\n}} </dev/null 2>&1; printf '\\n%s%s %d\\n' __SANDBOX_DONE_ {nonce}__ $?\n"
        proc.stdin.write(script.encode())
        buf = bytearray()
        truncated = False
        try:
            await proc.stdin.drain()
            async with asyncio.timeout(timeout):
                while marker not in buf:
                    chunk = await proc.stdout.read(_READ)
                    if not chunk:
                        break
                    buf += chunk
                    if len(buf) > OUTPUT_LIMIT + len(marker) + 32:
                        del buf[: len(buf) - OUTPUT_LIMIT - len(marker) - 32]
                        truncated = True
        except TimeoutError:
            await self.close()
            raise ToolError(f"bash: command timed out after {timeout:g}s; the shell was restarted") from None
        except BaseException:
            await self.close()
            raise
        text = buf.decode(errors="replace")
        head, found, tail = text.rpartition(marker.decode())
        if not found:  # the shell itself exited (``exit``, killed)
            await self.close()
            code = proc.returncode if proc.returncode is not None else -1
            return _clip(text, truncated), code
        status = tail.strip().split()
        code = int(status[0]) if status and status[0].lstrip("-").isdigit() else -1
        return _clip(head.rstrip("\n"), truncated), code

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


def _clip(text: str, truncated: bool) -> str:
    return "[output truncated]\n" + text if truncated else text


def bash_tool(shell: WorkspaceShell) -> BetaAsyncFunctionTool[Any]:
    """The ``bash`` tool of the reference toolset, on ``shell``."""

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
        output, code = await shell.run(command, timeout_ms / 1000 if timeout_ms else DEFAULT_TIMEOUT)
        if code != 0:
            raise ToolError(f"{output}\n[exit code {code}]")
        return output or "(no output)"

    return bash


def workspace_tools(workspace: Path, shell: WorkspaceShell, names: tuple[str, ...]) -> list[BetaAsyncFunctionTool[Any]]:
    """The tools called ``names``, confined to ``workspace``."""
    ctx = AgentToolContext(workdir=str(workspace), env=shell_env(os.environ))
    makers = {
        "bash": lambda: bash_tool(shell),
        "read": lambda: beta_read_tool(ctx),
        "write": lambda: beta_write_tool(ctx),
        "edit": lambda: beta_edit_tool(ctx),
        "glob": lambda: beta_glob_tool(ctx),
        "grep": lambda: beta_grep_tool(ctx),
    }
    return [makers[name]() for name in names]
