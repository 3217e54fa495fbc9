"""Shell completion: the checked-in scripts match what the app generates, and they work."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import typer.main

from cli.app import app
from cli.commands.completions import FILES, script
from tests.cli.conftest import SANDBOX, Invoke, Run

COMPLETIONS = Path(__file__).resolve().parents[2] / "completions"


@pytest.mark.parametrize("shell", sorted(FILES))
def test_checked_in_script_is_up_to_date(shell: str) -> None:
    generated = script(typer.main.get_command(app), shell)
    checked_in = (COMPLETIONS / FILES[shell]).read_text()
    assert generated == checked_in, (
        f"completions/{FILES[shell]} is stale: regenerate it with "
        f"`sandbox completions {shell} > completions/{FILES[shell]}`"
    )


def test_completions_command_prints_the_script(run_cli: Run, invoke: Invoke) -> None:
    piped = run_cli("completions", "zsh")
    assert piped.returncode == 0 and piped.stdout == (COMPLETIONS / FILES["zsh"]).read_text()
    in_process = invoke("completions", "fish")
    assert in_process.exit_code == 0 and in_process.stdout == (COMPLETIONS / FILES["fish"]).read_text()
    unknown = run_cli("completions", "tcsh")
    assert unknown.returncode == 2


def _complete(run_cli: Run, shell: str, words: str) -> list[str]:
    env = {"_SANDBOX_COMPLETE": f"complete_{shell}", "_TYPER_COMPLETE_ARGS": words,
           "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1),
           "_TYPER_COMPLETE_FISH_ACTION": "get-args"}
    result = run_cli(env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_the_program_answers_its_scripts(run_cli: Run) -> None:
    assert _complete(run_cli, "bash", "sandbox wor") == ["workers"]
    assert _complete(run_cli, "bash", "sandbox workers ") == ["launch", "list", "stop"]
    assert _complete(run_cli, "fish", "sandbox completions ") == ["bash", "zsh", "fish"]
    assert '"strict"' in " ".join(_complete(run_cli, "zsh", "sandbox --profile "))


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_script_completes_in_bash(cli_env: dict[str, str]) -> None:
    probe = (
        f"source {COMPLETIONS / FILES['bash']}; COMP_WORDS=(sandbox con); COMP_CWORD=1; "
        "_sandbox_completion sandbox; echo \"${COMPREPLY[@]}\""
    )
    env = {**cli_env, "PATH": f"{Path(SANDBOX).parent}:{cli_env.get('PATH', '/usr/bin:/bin')}"}
    result = subprocess.run(["bash", "--norc", "-c", probe], capture_output=True, text=True, env=env,
                            timeout=30, check=False)
    assert result.stdout.strip() == "config", result.stderr
