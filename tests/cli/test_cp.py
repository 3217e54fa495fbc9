"""``sandbox cp``: docker's convention, a real CLI in a subprocess, real workers."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.cli.conftest import SANDBOX
from tests.integration.test_files import _digest, _tree

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")


def _cp(env: dict[str, str], cwd: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([SANDBOX, "--profile", "strict", "cp", *args], input=stdin, capture_output=True,
                          cwd=cwd, env=env, timeout=120, check=False)


def test_cp_round_trip_and_tar_streams(tmp_path: Path, cli_env: dict[str, str]) -> None:
    project = tmp_path / "project"
    project.mkdir()
    _tree(project)
    sent = _cp(cli_env, tmp_path, "./project", "alice:src")
    assert sent.returncode == 0, sent.stderr.decode()
    assert b"copied 4 file(s)" in sent.stderr
    back = _cp(cli_env, tmp_path, "alice:src", "back")  # a new local name: the tree is renamed
    assert back.returncode == 0, back.stderr.decode()
    assert _digest(tmp_path / "back") == _digest(project)
    one = _cp(cli_env, tmp_path, "alice:src/sub/run.sh", ".")
    assert one.returncode == 0 and (tmp_path / "run.sh").read_text() == "#!/bin/sh\necho hi\n"
    streamed = _cp(cli_env, tmp_path, "alice:src", "-")
    assert streamed.returncode == 0, streamed.stderr.decode()
    with tarfile.open(fileobj=io.BytesIO(streamed.stdout)) as archive:
        names = archive.getnames()
    assert "src/bin.dat" in names and "src/link-out" in names
    upload = _cp(cli_env, tmp_path, "-", "alice:from-tar", stdin=streamed.stdout)
    assert upload.returncode == 0, upload.stderr.decode()
    again = _cp(cli_env, tmp_path, "alice:from-tar/src", "again")
    assert again.returncode == 0 and _digest(tmp_path / "again") == _digest(project)


def test_cp_errors_are_clear(tmp_path: Path, cli_env: dict[str, str]) -> None:
    both = _cp(cli_env, tmp_path, "alice:a", "bob:b")
    assert both.returncode == 2 and b"exactly one of SRC and DEST" in both.stderr
    missing = _cp(cli_env, tmp_path, "alice:nothing-here", ".")
    assert missing.returncode == 1 and b"nothing-here: no such file or directory" in missing.stderr
    escape = _cp(cli_env, tmp_path, "alice:../x", ".")
    assert escape.returncode == 1 and b"must stay below" in escape.stderr
