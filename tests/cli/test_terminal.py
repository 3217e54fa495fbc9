"""``sandbox shell`` and ``sandbox exec -t`` in a real pseudo-terminal (pexpect).

Each session runs under a small ``sh`` that records ``stty -g`` before and after the CLI,
so a test can check that the local terminal's mode came back whatever ended the session.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest

from tests.cli.conftest import SANDBOX, Run, find_process, poll, process_tree
from tests.cli.test_client_mode import Server
from tests.helpers import pid_alive

EXPECT_TIMEOUT = 20
ROWS, COLS = 40, 110
READY = "READY> "
SET_PROMPT = "PS1='READY''> '\r"


@pytest.fixture
def profile() -> str:
    """Strict where bubblewrap is installed (the sandbox's own /dev/pts), else the process profile."""
    return "strict" if shutil.which("bwrap") else os.environ.get("SANDBOX_CLI_TEST_PROFILE", "process")


class Session:
    """The CLI on a pty, under ``sh`` that saves ``stty -g`` before and after it and prints its exit code."""

    def __init__(self, child: pexpect.spawn, before: Path, after: Path) -> None:
        self.child = child
        self.before = before
        self.after = after
        self.seen: set[int] = set()

    def expect(self, pattern: str, timeout: float = EXPECT_TIMEOUT) -> str:
        self.child.expect(pattern, timeout=timeout)
        return str(self.child.after)

    def line(self, text: str) -> None:
        self.child.send(text + "\r")

    def ready(self) -> None:
        """Wait for the first prompt, then make it one a test can match."""
        self.expect(r"[$#] ")
        self.child.send(SET_PROMPT)
        self.expect(re.escape(READY))

    def cli_pid(self) -> int:
        return int(poll(lambda: find_process_named(self.child.pid, "sandbox"), 10, "the CLI"))

    def note_processes(self) -> None:
        self.seen.update(process_tree(self.child.pid)[1:])

    def finish(self) -> int:
        """Wait for the CLI's exit code (printed by the wrapper) and check the terminal's mode."""
        code = int(self.expect(r"CLI-EXIT=(\d+)").split("=")[1])
        self.child.expect(pexpect.EOF, timeout=EXPECT_TIMEOUT)
        assert self.before.read_text() == self.after.read_text(), "stty -g differs after the session"
        poll(lambda: not [p for p in self.seen if pid_alive(p)], 15, "every process of the session gone")
        return code


def find_process_named(root: int, name: str) -> int | None:
    from tests.cli.conftest import cmdline

    for pid in process_tree(root)[1:]:
        argv = cmdline(pid)
        if argv and any(os.path.basename(a) == name for a in argv[:2]):
            return pid
    return None


@pytest.fixture
def session(cli_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Session]]:
    opened: list[Session] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Session:
        before, after = tmp_path / f"stty-before-{len(opened)}", tmp_path / f"stty-after-{len(opened)}"
        script = 'stty -g > "$1"; shift; "$@"; rc=$?; stty -g > "$AFTER"; echo "CLI-EXIT=$rc"'
        child = pexpect.spawn(
            "/bin/sh", ["-c", script, "wrapper", str(before), SANDBOX, *args],
            env={**cli_env, "TERM": "xterm", "AFTER": str(after), **(env or {})},
            encoding="utf-8", dimensions=(ROWS, COLS), timeout=EXPECT_TIMEOUT,
        )
        child.logfile_read = (tmp_path / f"pty-{len(opened)}.log").open("w")
        new = Session(child, before, after)
        opened.append(new)
        return new

    yield start
    for each in opened:
        for pid in process_tree(each.child.pid)[1:]:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if each.child.isalive():
            each.child.terminate(force=True)
        each.child.close()
        each.child.logfile_read.close()


def test_shell_prompt_tty_window_keys_python_and_exit_code(session: Callable[..., Session]) -> None:
    s = session("shell", "--user", "alice")
    s.ready()
    s.line("tty; pwd")
    s.expect(r"/dev/pts/\d+\r\n/workspace")
    s.expect(re.escape(READY))
    s.line("stty size")
    s.expect(f"{ROWS} {COLS}")
    s.expect(re.escape(READY))
    s.child.setwinsize(50, 132)
    s.line("stty size")
    s.expect("50 132")
    s.expect(re.escape(READY))
    s.line("sleep 100; echo not-interrupted")
    s.note_processes()
    poll(lambda: find_process(["sleep", "100"], s.child.pid), 15, "sleep to start")
    s.note_processes()
    s.child.send("\x03")  # a byte on the terminal: the sandbox's line discipline makes it SIGINT
    s.expect(re.escape(READY))
    assert "not-interrupted" not in str(s.child.before).partition("^C")[2]
    s.line("echo after-$((40+2))")
    s.expect("after-42")
    s.line("sleep 101")
    poll(lambda: find_process(["sleep", "101"], s.child.pid), 15, "sleep 101 to start")
    s.child.send("\x1a")  # Ctrl-Z: job control in the sandbox's shell
    s.expect("Stopped")
    s.line("kill -9 %1")
    s.expect(re.escape(READY))
    s.line("sleep 102")
    poll(lambda: find_process(["sleep", "102"], s.child.pid), 15, "sleep 102 to start")
    s.child.send("\x1c")  # Ctrl-\: SIGQUIT to the foreground job
    s.expect("Quit")
    s.expect(re.escape(READY))
    s.line("python3 -q")
    s.expect(">>> ")
    s.line("import os; os.isatty(0), 6*7")
    s.expect(r"\(True, 42\)")
    s.child.send("\x04")
    s.expect(re.escape(READY))
    s.line("exit 3")
    assert s.finish() == 3


def test_exec_t_runs_on_a_terminal_and_passes_the_exit_code(session: Callable[..., Session]) -> None:
    s = session("exec", "-t", "--user", "alice", "--", "sh", "-c", "test -t 0 && test -t 1 && echo on-a-tty; exit 5")
    s.expect("on-a-tty")
    assert s.finish() == 5


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed: no egress proxy")
def test_terminals_take_network_narrowing(session: Callable[..., Session], tmp_path: Path) -> None:
    """``exec -t --allow`` narrows a terminal's network as it does a plain exec (refused with a
    usage error before): the program on the pty gets the narrowing's 403; ``--network none`` too,
    and ``sandbox shell --allow``."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = tmp_path / "sandbox.toml"
        config.write_text('[network]\nmode = "allowlist"\nallow = ["registry.test", "other.test"]\n'
                          'allow_private = ["127.0.0.1/32"]\n'
                          'hosts = { "registry.test" = "127.0.0.1", "other.test" = "127.0.0.1" }\n')
        url = f"http://registry.test:{server.server_address[1]}/"
        get = (f"import urllib.request as u, urllib.error as e\ntry: u.urlopen({url!r}, timeout=20)\n"
               "except e.HTTPError as x: print('STATUS', x.code, x.reason)")
        for flags, why in ((("--allow", "other.test"), "not in this request's network list"),
                           (("--network", "none"), "")):
            s = session("--config", str(config), "--profile", "strict", "exec", "-t", *flags, "--user", "alice",
                        "--", "python3", "-c", get)
            line = s.expect(r"STATUS \d+ [^\r\n]*")
            assert line.startswith("STATUS 403") and why in line, line
            assert s.finish() == 0
        s = session("--config", str(config), "--profile", "strict", "shell", "--allow", "other.test", "--user", "alice")
        s.ready()
        s.line("python3 - <<'EOF'")
        for code in get.splitlines():
            s.line(code)
        s.line("EOF")
        line = s.expect(r"STATUS \d+ [^\r\n]*")
        assert line.startswith("STATUS 403") and "not in this request's network list" in line, line
        s.line("exit")
        assert s.finish() == 0
    finally:
        server.shutdown()
        server.server_close()


def test_exec_of_a_shell_at_a_terminal_is_interactive_by_default(session: Callable[..., Session]) -> None:
    s = session("exec", "--user", "alice", "--", "sh")
    s.expect(r"[$#] ")
    s.line("tty")
    s.expect(r"/dev/pts/\d+")
    s.line("exit 7")
    assert s.finish() == 7


@pytest.mark.parametrize("ending", ["SIGTERM", "SIGHUP", "SIGINT", "crash"])
def test_the_terminal_is_restored_however_the_session_ends(session: Callable[..., Session], ending: str) -> None:
    s = session("shell", "--user", "alice")
    s.ready()
    s.note_processes()
    cli = s.cli_pid()
    if ending == "crash":
        worker = poll(lambda: [p for p in process_tree(cli)[1:] if os.getsid(p) == p], 10, "the worker")[0]
        os.kill(worker, signal.SIGKILL)
        s.expect("error: .*worker")
        assert s.finish() == 125
    else:
        os.kill(cli, getattr(signal, ending))
        assert s.finish() == 128 + getattr(signal, ending)


# ---------------------------------------------------------------- through `sandbox serve`


@pytest.fixture
def served(tmp_path: Path, profile: str) -> Iterator[Server]:
    """A ``sandbox serve`` on a private socket."""
    import tempfile

    from cli.remote import socket_answers
    from tests.cli.test_client_mode import base_env, start_server, stop_server

    runtime = Path(tempfile.mkdtemp(prefix="sbx-tty-", dir="/tmp"))
    root = tmp_path / "service"
    root.mkdir()
    env = {**base_env(root), "XDG_RUNTIME_DIR": str(runtime), "SANDBOX_WORKSPACE_ROOT": str(root / "ws"),
           "SANDBOX_PROFILE": profile}
    proc, log = start_server(root, env)
    sock = runtime / "sandbox" / "sandbox.sock"
    server = Server(proc, f"unix:{sock}", root / "ws", log, {})
    try:
        poll(lambda: socket_answers(sock) or proc.poll() is not None, 20, "the service's socket")
        assert proc.poll() is None, log.read_text()
        yield server
    finally:
        stop_server(server)
        shutil.rmtree(runtime, ignore_errors=True)


def test_shell_through_the_service_over_its_websocket(session: Callable[..., Session], served: Server) -> None:
    s = session("--connect", served.address, "shell")
    s.ready()
    s.line("tty")
    s.expect(r"/dev/pts/\d+")
    s.line("stty size")
    s.expect(f"{ROWS} {COLS}")
    s.child.setwinsize(45, 100)
    s.line("stty size")
    s.expect("45 100")
    s.expect(re.escape(READY))
    s.line("touch started; sleep 100; echo not-interrupted")
    s.expect("touch started; sleep 100; echo not-interrupted\r\n")
    poll(lambda: list(served.workspace.glob("*/started")), 15, "sleep to start")
    s.child.send("\x03")
    s.expect(re.escape(READY))
    assert "not-interrupted" not in str(s.child.before)
    s.line("python3 -q")
    s.expect(">>> ")
    s.line("6*7")
    s.expect("42")
    s.child.send("\x04")
    s.expect(re.escape(READY))
    s.line("exit 3")
    assert s.finish() == 3
    poll(lambda: not [p for p in process_tree(served.proc.pid) if pid_alive(p) and _comm(p) in ("bash", "sleep")],
         15, "the session's processes in the service's sandbox gone")


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def test_the_terminal_is_restored_when_the_service_goes_away(session: Callable[..., Session], served: Server
                                                              ) -> None:
    s = session("--connect", served.address, "shell")
    s.ready()
    served.proc.kill()
    s.expect("error: ")
    assert s.finish() == 125


def test_piped_keys_end_with_an_end_of_file_key(run_cli: Run) -> None:
    result = run_cli("exec", "-t", "-i", "--user", "alice", "--", "sh", "-c", "cat; echo cat-ended; exit 6",
                     input="typed-through-a-pipe\n")
    assert result.returncode == 6, result.stderr
    assert "typed-through-a-pipe" in result.stdout and "cat-ended" in result.stdout
