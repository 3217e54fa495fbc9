"""The console script's entry point: ``sandbox exec`` and ``sandbox run`` without typer.

Importing typer (with the click, rich and pydantic it brings) costs more than running a
command in a warm sandbox. So the common forms of the two commands people run all day,
``sandbox [GLOBAL] exec [OPTIONS] -- CMD...`` and ``sandbox [GLOBAL] run [OPTIONS] PROMPT``,
are parsed here and run by the same code the typer commands call
(:func:`cli.commands.exec_impl.exec_main`, :func:`cli.commands.run_impl.run_main`).
Anything else, or anything this parser is unsure of (``--help``, an unknown or repeated
option, a bad value, shell completion), goes to the typer app (:mod:`cli.app`) untouched,
so the errors and help stay typer's.
"""

from __future__ import annotations

import errno
import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: `exec` on a service loads little else
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    Value = Callable[[str], Any]
    """How an option's value is parsed; one that raises ``ValueError`` sends argv to typer."""


class _Unsure(Exception):
    """This argv is not one the fast path takes: typer parses it."""


def _choice(value: str, *choices: str) -> str:
    if value not in choices:
        raise ValueError(value)
    return value


def _nonempty(value: str) -> str:
    if not value:
        raise ValueError(value)
    return value


def _at_least(value: Any, low: float) -> Any:
    if value < low:
        raise ValueError(value)
    return value


_GLOBAL_FLAGS = {"--allow-root-process": ("allow_root_process", True), "--json": ("json", True),
                 "-v": ("verbose", True), "--verbose": ("verbose", True), "--local": ("local", True)}
_GLOBAL_VALUES: dict[str, tuple[str, Value]] = {
    "--config": ("config", _nonempty), "--profile": ("profile", lambda v: _choice(v, "strict", "process")),
    "--user": ("user", str), "--connect": ("connect", _nonempty),
}
_EXEC_FLAGS = {"--shell": ("shell", True), "--raw": ("raw", True), "-t": ("tty", True), "--tty": ("tty", True),
               "--no-tty": ("tty", False), "-i": ("interactive", True), "--interactive": ("interactive", True)}
def _host_entry(value: str) -> str:
    from sandbox_core.names import parse_host_entry

    parse_host_entry(value)  # ValueError for a bad entry: typer's command says what is wrong
    return value


_NETWORK_VALUES: dict[str, tuple[str, Value]] = {
    "--network": ("network", lambda v: _choice(v, "none")), "--allow": ("allow", _host_entry),
}
_REPEATABLE = frozenset({"allow"})
"""Options that may be given more than once (their values are collected in order)."""
_EXEC_VALUES: dict[str, tuple[str, Value]] = {
    "--user": ("user", str), "--timeout": ("timeout", float),
    "--profile": ("profile", lambda v: _choice(v, "strict", "process")), **_NETWORK_VALUES,
}
_RUN_FLAGS = {"--json": ("as_json", True), "--continue": ("resume_last", True)}
_RUN_VALUES: dict[str, tuple[str, Value]] = {
    "--user": ("user", str), "--provider": ("provider", lambda v: _choice(v, "auto", "anthropic", "offline")),
    "--model": ("model", str), "--max-turns": ("max_turns", lambda v: _at_least(int(v), 1)),
    "--system": ("system", str), "--timeout": ("timeout", lambda v: _at_least(float(v), 0.001)),
    "--profile": ("profile", lambda v: _choice(v, "strict", "process")), "--conversation": ("conversation", str),
    **_NETWORK_VALUES,
}


def _options(
    args: Sequence[str], flags: dict[str, tuple[str, Any]], values: dict[str, tuple[str, Value]], *, interspersed: bool
) -> tuple[dict[str, Any], list[str]]:
    """Click's reading of ``args`` for these options: (options, positional arguments).

    ``--`` ends the options; without ``interspersed`` so does the first positional argument.
    An unknown option, a repeated one (but those of :data:`_REPEATABLE`, collected in a list),
    a bad value or a missing one is :class:`_Unsure`.
    """
    options: dict[str, Any] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            positional.extend(args[i:])
            break
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            if not interspersed:
                positional.extend(args[i:])
                break
            continue
        name, eq, inline = arg.partition("=")
        if name in values and (eq or i < len(args)):
            key, parse = values[name]
            if not eq:
                inline, i = args[i], i + 1
            try:
                value = parse(inline)
            except ValueError:
                raise _Unsure from None
        elif arg in flags:
            key, value = flags[arg]
        else:
            raise _Unsure
        if key in _REPEATABLE:
            options.setdefault(key, []).append(value)
            continue
        if key in options:
            raise _Unsure
        options[key] = value
    return options, positional


def _state(options: dict[str, Any]) -> Any:
    """The :class:`~cli.state.AppState` the typer callback would build from these global options."""
    from pathlib import Path

    from cli.state import AppState

    config = options.get("config") or os.environ.get("SANDBOX_CONFIG") or None
    connect = options.get("connect") or os.environ.get("SANDBOX_URL") or None
    state = AppState(
        config_path=Path(config) if config is not None else None,
        profile=options.get("profile"),
        user=options.get("user"),
        verbose=bool(options.get("verbose")),
        json=bool(options.get("json")),
        connect=connect,
        local=bool(options.get("local")),
    )
    if options.get("allow_root_process"):
        state.overrides["allow_root_process"] = True
    return state


def _network(options: dict[str, Any]) -> dict[str, Any]:
    """``--network none`` / ``--allow`` as the request's narrowing (``network``), as typer's command does."""
    network, allow = options.pop("network", None), options.pop("allow", None)
    if network is not None and allow:
        raise _Unsure  # the two contradict: typer's command says so
    if network is not None:
        options["network"] = ()
    elif allow:
        options["network"] = tuple(allow)
    return options


def _exec_args(args: Sequence[str]) -> dict[str, Any]:
    options, command = _options(args, _EXEC_FLAGS, _EXEC_VALUES, interspersed=False)
    if not command:
        raise _Unsure
    return {"command": command, **_network(options)}


def _run_args(args: Sequence[str]) -> dict[str, Any]:
    """``run``'s arguments (``provider`` and ``profile`` as strings: their enums are the full command's)."""
    options, prompt = _options(args, _RUN_FLAGS, _RUN_VALUES, interspersed=True)
    if len(prompt) != 1:
        raise _Unsure
    return {"prompt": prompt[0], **_network(options)}


_COMMANDS: dict[str, Callable[[Sequence[str]], dict[str, Any]]] = {"exec": _exec_args, "run": _run_args}


def fast_command(argv: Sequence[str]) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Global options, the command and its arguments, when the fast path takes ``argv`` (else :class:`_Unsure`)."""
    i = 0
    while i < len(argv) and argv[i] not in _COMMANDS:
        name = argv[i].partition("=")[0]
        if name not in _GLOBAL_VALUES and argv[i] not in _GLOBAL_FLAGS:
            raise _Unsure  # another command, --help, --version, a typo: typer's to answer
        i += 2 if argv[i] in _GLOBAL_VALUES else 1
    if i >= len(argv):
        raise _Unsure
    options, rest = _options(argv[:i], _GLOBAL_FLAGS, _GLOBAL_VALUES, interspersed=False)
    if rest or (options.get("local") and options.get("connect")):
        raise _Unsure  # typer says what is wrong
    return options, argv[i], _COMMANDS[argv[i]](argv[i + 1:])


def _run_command(name: str, options: dict[str, Any], arguments: dict[str, Any]) -> int:
    if name == "exec":
        from cli.service_exec import exec_fast

        code = exec_fast(options, arguments)  # on a running service, before anything heavy is loaded
        if code is not None:
            return code
        from cli.commands.exec_impl import exec_main

        return exec_main(_state(options), **arguments)
    from cli.service_run import run_fast

    code = run_fast(options, arguments)  # on a running service, without the event loop or the config
    if code is not None:
        return code
    from cli.commands.common import ProfileName, ProviderName
    from cli.commands.run_impl import run_main

    if "provider" in arguments:
        arguments["provider"] = ProviderName(arguments["provider"])
    if "profile" in arguments:
        arguments["profile"] = ProfileName(arguments["profile"])
    return run_main(_state(options), **arguments)


def main() -> None:
    """``sandbox``: the fast path for plain ``exec`` and ``run``, typer for everything else."""
    argv = sys.argv[1:]
    if os.environ.get("_SANDBOX_COMPLETE") is None and "_TYPER_COMPLETE_ARGS" not in os.environ:
        if argv == ["--version"]:  # typer's eager option prints the same, after ~90 ms of imports
            from sandbox_core import __version__

            print(f"sandbox {__version__}")
            _leave_now(0)
        from sandbox_core import standin

        standin.defer("inspect", standin.Inspect("inspect"))  # loaded by dataclasses and asyncio, used by neither here
        try:
            options, name, arguments = fast_command(argv)
            code = _run_command(name, options, arguments)
        except _Unsure:
            pass
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            _pacify()
            sys.exit(1)
        else:
            _leave_now(code)
    from cli.app import main as typer_main

    typer_main()


def _leave_now(code: int) -> None:
    """Exit with ``code`` once our output is flushed, skipping the interpreter's teardown.

    By now the command is over: the pool was shut down (workers stopped and their cgroups
    removed, the record closed) or the service's answer was read to its end, and every
    thread still alive is a daemon (a stdin reader). What is left for a normal exit is
    freeing every module and object one by one, 15-40 ms that nobody waits for; nothing in
    this process registers an exit hook that matters (the only finalizers close descriptors,
    which the kernel closes anyway).
    """
    try:
        sys.stdout.flush()
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
        code = code or 1
    try:
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(code)


def _pacify() -> None:
    """After EPIPE on stdout, as click does: no second error when the interpreter flushes at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
