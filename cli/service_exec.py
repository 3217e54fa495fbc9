"""``sandbox exec`` on a running service at a Unix socket, in a process that loads almost nothing.

Against a warm service, running ``true`` takes the service a few milliseconds; a fresh
Python process takes ~20 ms to start, and every module it imports on the way adds to
that (on these machines ``typing``, ``dataclasses``, ``pathlib``, ``json`` and ``socket``
each cost 5-15 ms). So this module, and everything it imports before the run's answer
is printed, loads only the interpreter's C modules and the light modules of the wire
(:mod:`sandbox_core.service.blocking`, :mod:`sandbox_core.client_config`): no AppState,
no typer, no event model. A test lists what it loads.

:func:`exec_fast` is the console script's first try (:mod:`cli.main`): it takes the plain
case (no terminal, no ``--profile``/``--user``/``-v`` to warn about, a Unix socket that
answers) and declines anything else before a byte is sent, so the full command
(:func:`cli.commands.exec_impl.exec_main`) decides it, with its own messages. Both run a
command on the service with :func:`run_on_service`.
"""

from __future__ import annotations

import os
import sys

from cli import output
from sandbox_core.chunks import output_bytes

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any, BinaryIO

    from cli.termfilter import TerminalFilter
    from sandbox_core.client_config import ClientSettings
    from sandbox_core.service.blocking import BlockingClient

CANCEL_TIMEOUT = 10.0
"""Seconds to wait for the service to confirm a cancelled run has stopped."""
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "fish", "csh", "tcsh", "busybox"})
"""Commands that get a terminal by default when the CLI runs on one (``exec`` without -t)."""


def is_shell(argv: list[str]) -> bool:
    """Whether ``argv`` starts an interactive shell (``bash``, ``/bin/sh``, ... without a script)."""
    return bool(argv) and os.path.basename(argv[0]) in SHELLS and not any(a in ("-c",) for a in argv[1:])


def shell_at_terminal(command: list[str], *, tty: bool | None, shell: bool) -> bool:
    """``sandbox exec -- bash`` at a terminal, no ``-t``/``--no-tty`` given: it gets a terminal."""
    return (tty is None and not shell and output.is_tty(sys.stdin) and output.is_tty(sys.stdout)
            and is_shell(command))  # fmt: skip


def exec_fast(options: dict[str, Any], arguments: dict[str, Any]) -> int | None:
    """Run ``sandbox exec`` on the service when it goes to one and nothing needs the full command.

    ``options`` are the global options and ``arguments`` the command's, as the fast parser
    of :mod:`cli.main` gives them. None: not taken (in-process, a TCP service, a case with
    something to warn about or to report), and nothing was sent.
    """
    command: list[str] = arguments["command"]
    if arguments.get("tty") or arguments.get("interactive") or arguments.get("profile") is not None:
        return None
    if shell_at_terminal(command, tty=arguments.get("tty"), shell=bool(arguments.get("shell"))):
        return None
    timeout = arguments.get("timeout")
    if timeout is not None and not 0 < timeout < float("inf"):
        return None
    connected = service_connection(options, arguments)
    if connected is None:
        return None
    client, sock, settings = connected
    body = exec_body(command, shell=bool(arguments.get("shell")), timeout=timeout, network=arguments.get("network"))
    return run_on_service(client, body, raw=bool(arguments.get("raw")), processes=settings.processes, sock=sock)


def service_connection(options: dict[str, Any], arguments: dict[str, Any],
                       ) -> tuple[BlockingClient, Any, ClientSettings] | None:  # fmt: skip
    """A checked connection to the service the command goes to, when it is on a Unix socket that
    answers and nothing needs the full command first: ``(client, socket, settings)``, else None
    (in-process, ``-v``, a ``--user`` to compare, a TCP service, a setting this reader is unsure
    of, nothing or no one to trust at the socket). Nothing is sent on the connection yet.
    """
    if options.get("local") or options.get("verbose") or options.get("user") or arguments.get("user"):
        return None  # in-process, or something to say first: nothing of the client is loaded
    from sandbox_core.client_config import read_client_settings
    from sandbox_core.errors import ConfigError, SandboxError
    from sandbox_core.service.blocking import BlockingClient
    from sandbox_core.service.paths import normalize_address, socket_file

    overrides: dict[str, Any] = {"profile": options.get("profile")}
    if options.get("allow_root_process"):
        overrides["allow_root_process"] = True
    config = options.get("config") or os.environ.get("SANDBOX_CONFIG") or None
    settings = read_client_settings(config, overrides=overrides)
    if settings is None:
        return None  # the full config names what is wrong
    connect = options.get("connect") or os.environ.get("SANDBOX_URL") or None
    try:
        address = normalize_address(connect) if connect is not None else f"unix:{socket_file(settings.socket_path)}"
    except ConfigError:  # a usage error the full command reports
        return None
    if not address.startswith("unix:"):
        return None
    client = BlockingClient(address.removeprefix("unix:"), server_uids=settings.server_uids)
    try:
        sock = client.connect()
    except SandboxError:  # nothing answers there, or not one to trust: the full command decides
        return None
    return client, sock, settings


def exec_body(command: list[str], *, shell: bool, timeout: float | None,
              network: tuple[str, ...] | None) -> dict[str, Any]:  # fmt: skip
    """The JSON body of ``POST /v1/runs/exec`` for ``command`` (joined into one ``shell`` line with ``shell``).

    The body's stdin fields are added by whoever passes stdin (:func:`run_on_service`,
    :func:`cli.remote.request_body`).
    """
    body: dict[str, Any] = {"shell": " ".join(command)} if shell else {"argv": list(command)}
    if timeout is not None:
        body["timeout"] = timeout
    if network is not None:
        body["network"] = network_body(network)
    return body


def run_on_service(client: BlockingClient, body: dict[str, Any], *, raw: bool, processes: int,
                   verbose: bool = False, sock: Any = None) -> int:  # fmt: skip
    """Run the exec ``body`` on the service and print it as ``sandbox exec`` does; its exit code.

    Piped stdin (:func:`stdin_to_stream`) streams in a second request once the run has started; Ctrl-C cancels
    the run on the service and waits (up to :data:`CANCEL_TIMEOUT`) for it to stop.
    ``sock``: a connection from ``client.connect()`` to send the run on.
    """
    from sandbox_core.errors import SandboxError

    piped = stdin_to_stream()
    if piped:
        body = {**body, "stdin_stream": True}
    run = ServiceRun(client)
    printer = Printer(raw, processes)
    try:
        for _, kind, data in run.events("exec", body, sock):
            if kind == "started" and run.run_id is not None and piped:
                _send_stdin(client, run.run_id)
            printer.show(kind, data)
    except SandboxError as exc:
        printer.close()
        from cli.runtime import report

        return report(exc, verbose=verbose)
    except KeyboardInterrupt:
        printer.close()
        return run.interrupted()
    except BaseException:  # our stdout went away (EPIPE), say: the run must not go on without us
        run.stop()
        raise
    finally:
        printer.close()
    return printer.code


class ServiceRun:
    """One run on the service, as a command follows it: its events, and its cancel if we stop first."""

    def __init__(self, client: BlockingClient) -> None:
        self.client = client
        self.run_id: str | None = None
        """Known from the ``started`` event on."""

    def events(self, kind: str, body: dict[str, Any], sock: Any = None) -> Iterator[tuple[int, str, dict[str, Any]]]:
        for seq, event, data in self.client.events(kind, body, sock=sock):
            if event == "started" and self.run_id is None:
                self.run_id = str(data.get("run_id") or "") or None
            yield seq, event, data

    def stop(self) -> None:
        """Cancel the run on the service (if it started) and wait, up to :data:`CANCEL_TIMEOUT`, for it to end."""
        if self.run_id is not None:
            cancel_quietly(self.client, self.run_id, CANCEL_TIMEOUT)

    def interrupted(self) -> int:
        """Ctrl-C: the run is stopped, the user told; the exit code to leave with."""
        self.stop()
        output.note("interrupted")
        return output.EXIT_INTERRUPTED


def network_body(network: tuple[str, ...]) -> dict[str, Any]:
    """A request's network narrowing as the service's JSON takes it (``()``: no network at all)."""
    return {"allow": list(network)} if network else {"mode": "none"}


def stdin_to_stream() -> bool:
    """Whether this process's stdin is a pipe, file or socket to pass on (not a terminal, not ``/dev/null``).

    ``/dev/null`` is passed on as no stdin: the command then gets ``/dev/null`` in the sandbox.
    """
    stdin = sys.stdin
    if stdin is None or output.is_tty(stdin):
        return False
    try:
        mine, null = os.fstat(stdin.fileno()), os.stat(os.devnull)
    except (OSError, ValueError):  # not a real descriptor (an embedding program's stream)
        return True
    return (mine.st_rdev, mine.st_mode & 0o170000) != (null.st_rdev, null.st_mode & 0o170000)


def cancel_quietly(client: BlockingClient, run_id: str, timeout: float) -> None:
    try:
        client.cancel(run_id, timeout)
    except Exception:  # noqa: BLE001 - the run ends with the connection anyway; Ctrl-C must not raise
        pass


def _send_stdin(client: BlockingClient, run_id: str, size: int = 256 * 1024) -> None:
    """Stream this process's stdin to the run from a daemon thread (a writer that never closes it
    cannot keep the CLI from exiting; a failure here shows as the command's own end)."""
    import threading

    def chunks() -> Iterator[bytes]:
        try:
            fd = sys.stdin.fileno()
        except (OSError, ValueError):  # not a real descriptor (an embedding program's stream)
            while chunk := sys.stdin.buffer.read(size):
                yield chunk
            return
        while True:
            try:
                chunk = os.read(fd, size)
            except OSError:
                return
            if not chunk:
                return
            yield chunk

    def send() -> None:
        try:
            client.send_stdin(run_id, chunks())
        except Exception:  # noqa: BLE001 - shows as the command's own end (its stdin closes)
            pass

    threading.Thread(target=send, name="sandbox-stdin", daemon=True).start()


class Printer:
    """A command's events on our stdout and stderr; its exit code once ``done`` came."""

    def __init__(self, raw: bool, processes: int) -> None:
        self.code = output.EXIT_FAILURE
        self._out, self._err = Sink(sys.stdout.buffer, raw), Sink(sys.stderr.buffer, raw)
        self._processes = processes

    def show(self, kind: str, data: dict[str, Any]) -> None:
        """One event, by its type and data."""
        if kind == "stdout":
            self._out.write(output_bytes(data))
        elif kind == "stderr":
            self._err.write(output_bytes(data))
        elif kind == "done":
            self.close()
            self.code = int(data.get("exit_code", output.EXIT_FAILURE))
            for line in limit_notes(data, self._processes):
                output.error(line)

    def close(self) -> None:
        self._out.close()
        self._err.close()


class Sink:
    """One of our output streams: the command's bytes as they are, or filtered for a terminal.

    A terminal acts on escape sequences (see :mod:`cli.termfilter`); a pipe or a file gets
    the bytes unchanged, and so does a terminal with ``--raw``.
    """

    def __init__(self, stream: BinaryIO, raw: bool) -> None:
        self._stream = stream
        self._filter: TerminalFilter | None = None
        if not raw and output.is_tty(stream):
            from cli.termfilter import TerminalFilter

            self._filter = TerminalFilter()

    def write(self, chunk: bytes) -> None:
        self._stream.write(chunk if self._filter is None else self._filter.feed(chunk))
        self._stream.flush()

    def close(self) -> None:
        """Write what the filter still holds (an unfinished sequence is dropped); idempotent."""
        if self._filter is not None:
            self._stream.write(self._filter.flush())
            self._stream.flush()


def limit_notes(done: dict[str, object], processes: int) -> list[str]:
    """What to tell the user about limits a command struck (from its ``done`` data)."""
    notes: list[str] = []
    reason = done.get("kill_reason")
    if isinstance(reason, str):
        notes.append(f"killed: {reason}")
    hit = done.get("limits_hit")
    if isinstance(hit, list) and "processes" in hit:
        notes.append(f"process limit {processes} reached: the sandbox refused to start more processes")
    return notes
