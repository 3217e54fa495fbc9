"""The prompt-toolkit side of the REPL: history file, key bindings, completion, bottom toolbar."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

from cli.repl import slash

if TYPE_CHECKING:
    from cli.repl.session import Repl

TOOLBAR_REFRESH_S = 1.0


def history_path() -> Path:
    """``$XDG_STATE_HOME/sandbox/history`` (default ``~/.local/state/sandbox/history``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sandbox" / "history"


class SlashCompleter(Completer):
    """Completes slash command names, then each command's arguments."""

    def __init__(self, repl: Repl) -> None:
        self.repl = repl

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/") or "\n" in text:
            return
        words = text.split(" ")
        if len(words) == 1:
            for cmd in slash.COMMANDS.values():
                if cmd.name.startswith(text):
                    yield Completion(cmd.name, start_position=-len(text), display_meta=cmd.summary)
            return
        command = slash.lookup(words[0])
        if command is None or command.complete is None:
            return
        typed, current = [w for w in words[1:-1] if w], words[-1]
        for candidate in command.complete(self.repl, typed):
            if candidate.startswith(current):
                yield Completion(candidate, start_position=-len(current))


def key_bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("escape", "enter")
    def _newline(event: KeyPressEvent) -> None:
        """Esc Enter (what Alt+Enter sends): a new line inside the prompt."""
        event.current_buffer.insert_text("\n")

    @kb.add("c-c")
    def _clear(event: KeyPressEvent) -> None:
        """Ctrl-C: clear a non-empty line; on an empty one, tell the loop (it prints how to exit)."""
        buffer = event.current_buffer
        if buffer.text:
            buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt())

    return kb


def prompt_message(repl: Repl) -> FormattedText:
    return FormattedText([("class:user", repl.user_id), ("", "› ")])


def short_address(address: str, width: int = 24) -> str:
    """A service address that fits in the toolbar (the end of a long socket path)."""
    return address if len(address) <= width else "…" + address[-(width - 1):]


def toolbar(repl: Repl) -> FormattedText:
    """user, provider (or service), model, profile, and workers busy/idle of the live pool."""
    stats = repl.stats_snapshot()
    workers = stats["workers"] if stats is not None else None
    remote = repl.remote
    if workers is not None:
        pool = f"workers {workers['busy']} busy / {workers['idle']} idle" + (
            f" / {workers['starting']} starting" if workers["starting"] else "")
    elif remote is not None:
        pool = "" if remote.operator is False else "workers …"
    else:
        pool = "pool restarting"
    parts = [
        f"user {repl.user_id}",
        f"service {short_address(remote.target.address)}" if remote is not None else f"provider {repl.provider}",
        *([f"model {repl.model}"] if repl.model else []),  # none in client mode: the service's default
        f"profile {repl.profile}",
        *([pool] if pool else []),
    ]
    return FormattedText([("", " " + " │ ".join(parts) + " ")])


def build_session(repl: Repl) -> PromptSession[str]:
    path = history_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.touch(mode=0o600, exist_ok=True)  # prompts can be sensitive: owner-only from the start
    return PromptSession(
        history=FileHistory(str(path)),
        completer=SlashCompleter(repl),
        complete_while_typing=False,
        key_bindings=key_bindings(),
        bottom_toolbar=lambda: toolbar(repl),
        refresh_interval=TOOLBAR_REFRESH_S,
        prompt_continuation=lambda width, _line, _wrap: "… ".rjust(width),
        enable_open_in_editor=True,
        enable_history_search=False,
    )
