"""``sandbox cp``: copy files into and out of a user's workspace, docker's way.

``sandbox cp ./project alice:src`` and ``sandbox cp alice:out/report.txt .``: exactly one side
is ``USER:PATH`` (a path relative to that user's workspace), directories are copied
recursively (symlinks as symlinks, modes kept), and ``-`` is a tar stream on stdin (unpacked
into the remote directory) or on stdout. The transfer runs inside the user's sandbox, as the
user's uid; what comes back is unpacked here without following any symlink it holds. With a
service (``--connect``, ``SANDBOX_URL`` or its default socket) it goes through ``/v1/files``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli import output
from cli.commands.common import ProfileName, effective_config, state_of
from cli.runtime import run_job, service_target, warn_ignored

if TYPE_CHECKING:
    from cli.runtime import Pool

_REMOTE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.@-]{0,63}):(.*)$")


def remote_spec(arg: str) -> tuple[str, str] | None:
    """``(user, path)`` for ``USER:PATH``, None for a local path (one with a ``/`` before any
    ``:``, like ``./a:b``, is local, as in docker)."""
    match = _REMOTE.match(arg)
    if match is None:
        return None
    return match.group(1), match.group(2) or "."


def cp_command(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(help="Local path, '-' (a tar stream on stdin) or USER:PATH.")],
    dest: Annotated[str, typer.Argument(help="Local path, '-' (a tar stream to stdout) or USER:PATH.")],
    profile: Annotated[ProfileName | None, typer.Option("--profile", help="Isolation profile.")] = None,
) -> None:
    """Copy SRC to DEST, one of them USER:PATH in a user's workspace (directories recursively)."""
    state = state_of(ctx)
    source, target = remote_spec(src), remote_spec(dest)
    if (source is None) == (target is None):
        output.fail("exactly one of SRC and DEST must be USER:PATH (e.g. `sandbox cp ./project alice:src`)",
                    code=output.EXIT_USAGE)
    target_service = service_target(state)
    warn_ignored(target_service, profile=profile)
    config = effective_config(state, profile, min_idle=0, warn=target_service is None)

    async def job(pool: Pool) -> int:
        from cli.commands.exec_cmd import read_stdin

        if target is not None:
            user, path = target
            if src == "-":
                summary = await pool.files.upload_tar(user, path, read_stdin(), into=True)
            else:
                summary = await pool.files.put(user, path, Path(src))
            output.console(stderr=True).print(f"copied {_size(summary)} to {user}:{path}", highlight=False)
            return output.EXIT_OK
        assert source is not None
        user, path = source
        if dest == "-":
            out = sys.stdout.buffer
            async for chunk in pool.files.download_tar(user, path):
                out.write(chunk)
            out.flush()
            return output.EXIT_OK
        summary = await pool.files.get_path(user, path, Path(dest))
        output.console(stderr=True).print(f"copied {_size(summary)} to {dest}", highlight=False)
        return output.EXIT_OK

    raise typer.Exit(run_job(config, job, verbose=state.verbose, target=target_service))


def _size(summary: dict[str, object]) -> str:
    files, size = summary.get("files", 0), summary.get("bytes", 0)
    return f"{files} file(s), {size} bytes"


def register(app: typer.Typer) -> None:
    app.command("cp")(cp_command)
