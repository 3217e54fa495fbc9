"""The console script's fast path (:mod:`cli.main`): what it imports, what it leaves to typer.

What a command imports is behaviour: a client of a running service that loads the
orchestrator or the SDK, or an ``exec`` that loads typer's help machinery, is slow for
every user. The real console script runs under ``-X importtime`` and the modules it
loaded are read from that report.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cli.main import _Unsure, fast_command
from tests.cli.conftest import SANDBOX, Run, find_process, needs_agent, poll
from tests.cli.test_client_mode import Server, base_env, runtime_dir, unix_server  # noqa: F401 - fixtures
from tests.helpers import pid_alive

HEAVY = ("typer", "click", "rich", "pydantic", "anthropic", "prompt_toolkit", "starlette", "uvicorn")


def imported(
    env: dict[str, str], *args: str, stdin: int | None = None
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the console script under ``-X importtime``; its result and every module it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", SANDBOX, *args], env=env, capture_output=True,
                            text=True, timeout=60, check=False, stdin=stdin)
    modules = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    return result, modules


def top_levels(modules: set[str]) -> set[str]:
    return {m.split(".", 1)[0] for m in modules}


def test_in_process_exec_loads_no_cli_framework_and_no_sdk(cli_env: dict[str, str]) -> None:
    result, modules = imported(cli_env, "--local", "exec", "--", "sh", "-c", "echo fast")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "fast\n"
    assert "sandbox_core.orchestrator" in modules  # it did run the pool in-process
    heavy = top_levels(modules) & set(HEAVY)
    assert not heavy, sorted(heavy)
    assert "sandbox_core.service.client" not in modules and "httpx2" not in top_levels(modules)
    assert "sandbox_core.service.blocking" not in modules  # --local: no service is looked for


def test_in_process_exec_never_loads_inspect_nor_secrets(cli_env: dict[str, str]) -> None:
    """dataclasses (for the config) and asyncio would import inspect; nothing before the worker
    is spawned (sandbox_core.head_start: before asyncio is imported) asks it anything, and the
    one question after it, asyncio's ``add_signal_handler`` asking whether the CLI's SIGTERM
    handler is a coroutine function, is answered by the stand-in (sandbox_core.standin.Inspect).
    The pool's worker tag and the record's run id come from os.urandom, without secrets."""
    result = subprocess.run([sys.executable, "-X", "importtime", SANDBOX, "--local", "exec", "--", "true"],
                            env=cli_env, capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    order = [line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
             if line.startswith("import time:") and "|" in line]  # fmt: skip
    before_loop = order[: order.index("asyncio.base_events")]
    assert "dataclasses" in before_loop and "sandbox_core.head_start" in before_loop
    assert "inspect" not in before_loop and "ast" not in before_loop
    assert "sandbox_core.orchestrator" in order and "sandbox_core.record.observe" in order  # the run was recorded
    loaded = set(order) & {"inspect", "ast", "dis", "secrets", "hmac"}
    assert not loaded, sorted(loaded)


def test_a_client_of_the_service_still_fails_on_a_bad_setting_it_reads(
    unix_server: Server, tmp_path: Path  # noqa: F811
) -> None:
    env = {**base_env(tmp_path), "SANDBOX_LIMITS__PROCESSES": "many"}
    result = subprocess.run([SANDBOX, "--connect", unix_server.address, "exec", "--", "true"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr  # EXIT_USAGE, named as the full config names it
    assert "limits.processes" in result.stderr and "must be an integer" in result.stderr, result.stderr


def test_an_exec_narrowing_the_network_loads_no_cli_framework(cli_env: dict[str, str]) -> None:
    result, modules = imported(cli_env, "--local", "exec", "--network", "none", "--", "sh", "-c", "echo narrowed")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "narrowed\n"
    assert not top_levels(modules) & set(HEAVY)


def test_a_client_of_the_service_is_thin(unix_server: Server, tmp_path: Path) -> None:  # noqa: F811
    env = {**base_env(tmp_path), "SANDBOX_WORKSPACE_ROOT": str(tmp_path / "local-ws")}
    result, modules = imported(env, "--connect", unix_server.address, "exec", "--", "sh", "-c", "echo remote; exit 3")
    assert result.returncode == 3, result.stderr
    assert result.stdout == "remote\n"
    loaded = {m for m in modules if m.startswith("sandbox_core.")}
    for module in ("sandbox_core.orchestrator", "sandbox_core.worker", "sandbox_core.isolation",
                   "sandbox_core.gateway", "sandbox_core.record", "sandbox_core.config"):
        assert module not in loaded, module  # the config's classes too: it reads its three settings light
    heavy = top_levels(modules) & {*HEAVY, "httpx2", "httpcore2", "anyio", "asyncio", "ssl"}
    assert not heavy, sorted(heavy)  # a blocking request: not even an event loop
    unneeded = modules & {"hashlib", "tomllib", "difflib", "traceback"}  # no config file, no token, no error
    assert not unneeded, sorted(unneeded)


def test_a_client_exec_on_the_service_loads_none_of_the_costly_stdlib(
    unix_server: Server, tmp_path: Path,  # noqa: F811
) -> None:
    """The plain case (:mod:`cli.service_exec`): each of these costs a fresh process 5-15 ms here."""
    env = {**base_env(tmp_path), "SANDBOX_WORKSPACE_ROOT": str(tmp_path / "local-ws")}
    result, modules = imported(env, "--connect", unix_server.address, "exec", "--", "sh", "-c",
                               "test -c /dev/stdin && echo null-stdin", stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "null-stdin\n"  # /dev/null here is /dev/null there: no stdin stream, no thread
    costly = modules & {"typing", "dataclasses", "pathlib", "json", "socket", "re", "enum", "contextlib",
                        "threading", "asyncio", "inspect", "base64", "sandbox_core.events", "cli.state"}
    assert not costly, sorted(costly)
    assert "cli.service_exec" in modules and "cli.commands.exec_impl" not in modules


def test_version_is_answered_without_the_cli_framework_and_as_typer_answers_it(cli_env: dict[str, str]) -> None:
    result, modules = imported(cli_env, "--version")
    assert result.returncode == 0, result.stderr
    assert not top_levels(modules) & set(HEAVY)
    typer_said = subprocess.run([SANDBOX, "--json", "--version"], env=cli_env, capture_output=True, text=True,
                                timeout=60, check=True)  # another form: typer's eager option
    assert result.stdout == typer_said.stdout and result.stdout.startswith("sandbox ")


@pytest.mark.parametrize(
    ("argv", "taken"),
    [
        (["exec", "--", "true"], True),
        (["--local", "-v", "--profile", "process", "exec", "--user", "a", "--timeout", "1.5", "--", "ls", "-l"], True),
        (["--user", "exec", "exec", "true"], True),  # a global option's value that names a command
        (["exec", "ls", "--help"], True),  # after the command, everything is its own argv
        (["run", "--json", "hello", "--max-turns", "2"], True),
        (["exec", "--help"], False),
        (["--help"], False),
        (["--version"], False),
        (["stats"], False),
        (["exec"], False),
        (["exec", "--timeout", "soon", "--", "true"], False),
        (["exec", "--user", "a", "--user", "b", "--", "true"], False),
        (["exec", "-ti", "--", "sh"], False),
        (["--local", "--connect", "unix:/x", "exec", "--", "true"], False),
        (["run", "a", "b"], False),
        (["run", "--max-turns", "0", "hi"], False),
        (["run", "--provider", "nope", "hi"], False),
        (["exec", "--network", "none", "--", "true"], True),
        (["exec", "--allow", "pypi.org", "--allow=*.github.com:443", "--", "true"], True),
        (["run", "hi", "--allow", "pypi.org"], True),
        (["exec", "--network", "all", "--", "true"], False),  # not a value typer takes
        (["exec", "--network", "none", "--allow", "pypi.org", "--", "true"], False),  # contradict: typer says so
        (["exec", "--allow", "bad host", "--", "true"], False),
        (["exec", "--allow", "pypi.org:99999", "--", "true"], False),
    ],
)
def test_the_fast_path_takes_plain_forms_and_leaves_the_rest_to_typer(argv: list[str], taken: bool) -> None:
    try:
        fast_command(argv)
    except _Unsure:
        assert not taken
    else:
        assert taken


def test_what_the_fast_path_parsed_is_what_runs() -> None:
    options, name, arguments = fast_command(["--user", "exec", "exec", "--timeout=2", "-i", "--", "ls", "--", "-l"])
    assert (options, name) == ({"user": "exec"}, "exec")
    assert arguments == {"command": ["ls", "--", "-l"], "timeout": 2.0, "interactive": True}
    options, name, arguments = fast_command(["--json", "run", "hi", "--provider", "offline", "--continue"])
    assert (options, name) == ({"json": True}, "run")
    assert arguments == {"prompt": "hi", "provider": "offline", "resume_last": True}
    _, _, arguments = fast_command(["exec", "--allow", "pypi.org", "--allow", "*.github.com:443", "--", "true"])
    assert arguments == {"command": ["true"], "network": ("pypi.org", "*.github.com:443")}
    _, _, arguments = fast_command(["run", "--network=none", "hi"])
    assert arguments == {"prompt": "hi", "network": ()}


def test_network_flags_on_the_fast_path_reach_the_request(run_cli: Run) -> None:
    refused = run_cli("exec", "--allow", "evil.example", "--", "true")  # the fast path took it to the request
    assert refused.returncode == 2 and "'evil.example' would widen the network policy" in refused.stderr
    contradiction = run_cli("exec", "--network", "none", "--allow", "pypi.org", "--", "true")  # typer's
    assert contradiction.returncode == 2 and "contradict" in contradiction.stderr


def test_what_it_declines_gets_typer_answers(run_cli: Run) -> None:
    bad = run_cli("exec", "--timeout", "soon", "--", "true")
    assert bad.returncode == 2 and "Invalid value" in bad.stderr and "Traceback" not in bad.stderr
    helped = run_cli("exec", "--help")
    assert helped.returncode == 0 and "--timeout" in helped.stdout


def test_a_usage_error_on_the_fast_path_exits_like_typer(run_cli: Run) -> None:
    result = run_cli("exec", "-i", "--", "true")  # -i without -t: a warning, then the command runs
    assert result.returncode == 0
    assert "warning: -i only matters with -t" in result.stderr
    missing = run_cli("run", "-", input="")
    assert missing.returncode == 2 and "the prompt is empty" in missing.stderr


@needs_agent
def test_a_run_against_the_service_loads_neither_the_pool_nor_an_http_library(
    unix_server: Server, tmp_path: Path,  # noqa: F811
) -> None:
    env = {**base_env(tmp_path), "SANDBOX_WORKSPACE_ROOT": str(tmp_path / "local-ws")}
    result, modules = imported(env, "--connect", unix_server.address, "run", "--json", "run: echo thin-run")
    assert result.returncode == 0, result.stderr
    assert "thin-run" in result.stdout
    heavy = top_levels(modules) & {"anthropic", "httpx2", "httpcore2", "anyio", "typer", "pydantic"}
    assert not heavy, sorted(heavy)
    assert not {m for m in modules if m.startswith(("sandbox_core.orchestrator", "sandbox_core.worker"))}


@pytest.mark.parametrize(("command", "marker"), [
    pytest.param(["exec", "--", "sleep", "3017"], ["sleep", "3017"], id="exec"),
    pytest.param(["run", "run: sleep 3018"], ["sleep", "3018"], marks=needs_agent, id="run"),
])
def test_ctrl_c_on_a_client_command_cancels_the_run_on_the_service(
    unix_server: Server, tmp_path: Path, command: list[str], marker: list[str],  # noqa: F811
) -> None:
    env = {**base_env(tmp_path), "SANDBOX_WORKSPACE_ROOT": str(tmp_path / "local-ws")}
    cli = subprocess.Popen([SANDBOX, "--connect", unix_server.address, *command], env=env,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sleeper = poll(lambda: find_process(marker, unix_server.proc.pid), 15, "sleep on the service")
        cli.send_signal(signal.SIGINT)
        _, err = cli.communicate(timeout=20)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    poll(lambda: not pid_alive(sleeper), 10, "the cancelled command to die on the service")


def test_piped_stdin_reaches_a_client_exec_byte_for_byte(unix_server: Server, tmp_path: Path) -> None:  # noqa: F811
    env = {**base_env(tmp_path), "SANDBOX_WORKSPACE_ROOT": str(tmp_path / "local-ws")}
    data = bytes(range(256)) * 4096 + b"\x00tail"
    result = subprocess.run([SANDBOX, "--connect", unix_server.address, "exec", "--", "sha256sum"], env=env,
                            input=data, capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


@needs_agent
def test_a_client_run_on_the_service_loads_no_event_loop_and_no_config(
    unix_server: Server, tmp_path: Path,  # noqa: F811
) -> None:
    """The plain ``run`` (:mod:`cli.service_run`): blocking sockets, the renderers, nothing of the full command."""
    env = {**base_env(tmp_path), "SANDBOX_WORKSPACE_ROOT": str(tmp_path / "local-ws")}
    result, modules = imported(env, "--connect", unix_server.address, "run", "run: echo thin-run")
    assert result.returncode == 0, result.stderr
    assert "thin-run" in result.stdout and "continue it with `sandbox run --conversation run-" in result.stderr
    unneeded = modules & {"asyncio", "ssl", "cli.state", "cli.commands.common", "cli.commands.run_impl",
                          "cli.runtime", "sandbox_core.config", "sandbox_core.requests", "secrets", "typer"}
    assert not unneeded, sorted(unneeded)
    assert "cli.service_run" in modules and "cli.render" in modules


def _comparable(text: str) -> str:
    """A run's output with what differs between two runs of the same prompt (ids, times) blanked."""
    if text.startswith("{"):
        text = _output_merged(text)
    for pattern, blank in ((r"run-[0-9a-f]{8}", "run-ID"), (r"run_[0-9a-f]{16}", "run_ID"), (r"\d+\.\d+ s", "T s"),
                           (r"toolu_offline_[0-9a-f_]+", "toolu_ID"), (r'"pid":\d+', '"pid":N'),
                           (r'"duration_s":[0-9.e-]+', '"duration_s":T')):  # fmt: skip
        text = re.sub(pattern, blank, text)
    return text


def _output_merged(lines: str) -> str:
    """``--json`` events with a command's output chunks merged: how its bytes split into events
    depends on when the worker read them, not on the client (renumbered after the merge)."""
    events: list[dict[str, Any]] = []
    for line in lines.splitlines():
        event = json.loads(line)
        last = events[-1] if events else None
        if (last is not None and event.get("type") in ("stdout", "stderr") and last.get("type") == event["type"]
                and last["data"].get("tool_use_id") == event["data"].get("tool_use_id")):  # fmt: skip
            last["data"]["data"] += event["data"]["data"]
            continue
        events.append(event)
    for seq, event in enumerate(events):
        event["seq"] = seq
    return "".join(json.dumps(event, separators=(",", ":")) + "\n" for event in events)


@needs_agent
@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["rich", "json"])
def test_the_thin_and_the_full_client_run_print_the_same(
    unix_server: Server, tmp_path: Path, json_flag: list[str],  # noqa: F811
) -> None:
    env = {**base_env(tmp_path), "SANDBOX_WORKSPACE_ROOT": str(tmp_path / "local-ws")}
    me = pwd.getpwuid(os.getuid()).pw_name  # the service's name for us: a --user that matches (and sends the full path)
    prompt = "run: printf 'one\\ntwo\\n'; echo err >&2; exit 3"
    thin, thin_modules = imported(env, "--connect", unix_server.address, "run", *json_flag, prompt)
    full, full_modules = imported(env, "--connect", unix_server.address, "--user", me, "run", *json_flag, prompt)
    assert "cli.service_run" in thin_modules and "cli.commands.run_impl" not in thin_modules
    assert "cli.commands.run_impl" in full_modules
    assert thin.returncode == full.returncode == 0, (thin.stderr, full.stderr)
    assert _comparable(thin.stdout) == _comparable(full.stdout), (thin.stdout, full.stdout)
    assert _comparable(_no_importtime(thin.stderr)) == _comparable(_no_importtime(full.stderr))


def _no_importtime(stderr: str) -> str:
    return "".join(line for line in stderr.splitlines(keepends=True) if not line.startswith("import time:"))
