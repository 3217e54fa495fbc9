"""``sandbox completions bash|zsh|fish``: print the shell completion script.

The scripts come from the shell-completion classes that typer ships (on click's
machinery), always for the program name ``sandbox``. When the shell asks for
completions it runs ``sandbox`` with ``_SANDBOX_COMPLETE`` set; :func:`activate` must have
registered the same classes by then (``cli.app.main`` does).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from typer._click import Command

PROG_NAME = "sandbox"
COMPLETE_VAR = "_SANDBOX_COMPLETE"
FILES = {"bash": "sandbox.bash", "zsh": "_sandbox", "fish": "sandbox.fish"}
"""File name of each shell's script under ``completions/``."""


class Shell(enum.StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def activate() -> None:
    """Register typer's completion classes (they answer the scripts this module prints)."""
    from typer._completion_classes import completion_init

    completion_init()


def script(command: Command, shell: str) -> str:
    """The completion script of ``shell`` for ``command`` under the name ``sandbox``."""
    from typer._click.shell_completion import get_completion_class

    activate()
    cls = get_completion_class(shell)
    if cls is None:
        raise ValueError(f"unsupported shell: {shell}")
    return cls(command, {}, PROG_NAME, COMPLETE_VAR).source().strip() + "\n"


def completions_command(
    ctx: typer.Context,
    shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.")],
) -> None:
    """Print the completion script for SHELL.

    bash: `sandbox completions bash > ~/.local/share/bash-completion/completions/sandbox`;
    zsh: `sandbox completions zsh > "${fpath[1]}/_sandbox"`;
    fish: `sandbox completions fish > ~/.config/fish/completions/sandbox.fish`.
    The same scripts are in the repository's completions/ directory.
    """
    typer.echo(script(ctx.find_root().command, shell.value), nl=False)


def register(app: typer.Typer) -> None:
    app.command("completions")(completions_command)
