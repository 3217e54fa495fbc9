"""The strict mount view against real bubblewrap: what the sandbox sees of the host.

Probes run the exact launch of :func:`strict_launch` with the worker's program replaced (see
``test_strict_engine``): they apply the plan's layers (uid switch, landlock...) as the worker
does, then try what an attacker in the sandbox would.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from sandbox_core.errors import IsolationUnavailable
from sandbox_core.isolation import strict
from sandbox_core.isolation.launch import PACKAGE_ROOT
from sandbox_core.isolation.runtime import SANDBOX_ROOT
from sandbox_core.isolation.strict import launch_args, strict_launch
from tests.security import test_strict_engine
from tests.security.test_strict_engine import AS_ROOT, _config, launched, run

pytestmark = test_strict_engine.pytestmark

# ----------------------------------------------------------------- what the sandbox sees of the host


def test_no_host_path_in_cmdline_or_mountinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{sys.prefix}/bin:/root/.pyenv/shims:/usr/bin:/nonexistent:/bin")
    config = _config(tmp_path)
    host = {
        "workspace root": str(config.workspace_root),
        "checkout": PACKAGE_ROOT,
        "venv": sys.prefix,
        "interpreter prefix": os.path.realpath(sys.base_prefix),
    }
    code = """
    import subprocess
    out["cmdline"] = open("/proc/1/cmdline", "rb").read().decode()
    out["own_cmdline"] = open("/proc/self/cmdline", "rb").read().decode()
    out["mountinfo"] = open("/proc/self/mountinfo").read()
    out["path"] = {e: os.path.isdir(e) for e in os.environ["PATH"].split(":")}
    out["local_etc"] = os.listdir("/usr/local/etc")
    out["sh"] = subprocess.run(["sh", "-c", "echo ok"], capture_output=True, text=True).stdout
    out["executable"] = sys.executable
    """
    with launched(tmp_path) as spec:
        assert spec.argv[1:3] == ["--args", spec.argv[2]] and spec.argv[3] == "--"
        out = run(spec, code, apply=False)  # uid 0 inside: PID 1 is readable
    for text in (out["cmdline"], out["own_cmdline"]):
        assert not [what for what, path in host.items() if path in text], text
    lines = out["mountinfo"].splitlines()
    assert not [what for what, path in host.items() if what != "workspace root" and path in out["mountinfo"]]
    # What the kernel shows anyway: a bind mount's "root" field is its source's path within the
    # source filesystem, so the workspace's host path is in the root field of /workspace (and of
    # the mounts that hold its protected entries), and nowhere else.
    for line in lines:
        if host["workspace root"] in line:
            fields = line.split(" ")
            assert fields[4].startswith("/workspace") and host["workspace root"] not in " ".join(fields[4:]), line
    stage = [line.split(" ") for line in lines if line.split(" ")[4] == SANDBOX_ROOT]
    assert len(stage) == 1 and stage[0][3].startswith("/var/cache/sandbox/runtime/" if AS_ROOT else "/")
    assert out["executable"] == f"{SANDBOX_ROOT}/python/bin/{os.path.basename(os.path.realpath(sys.executable))}"
    assert out["path"] and all(out["path"].values()), out["path"]
    assert "/nonexistent" not in out["path"] and f"{sys.prefix}/bin" not in out["path"]
    assert out["sh"] == "ok\n"
    if os.path.isdir("/usr/local/etc") and os.listdir("/usr/local/etc"):
        assert out["local_etc"] == []


def test_the_worker_runtime_has_its_packages_but_no_dev_tools(tmp_path: Path) -> None:
    code = """
    import importlib.util, site
    site.addsitedir(plan["site_packages"])
    out["anthropic"] = importlib.util.find_spec("anthropic") is not None
    out["dev"] = {m: importlib.util.find_spec(m) is not None for m in ("pytest", "mypy", "ruff", "typer")}
    out["lib"] = sorted(os.listdir(plan["site_packages"]))
    out["prefix"] = sys.prefix
    """
    with launched(tmp_path) as spec:
        out = run(spec, code)
    assert out["anthropic"] is True and out["dev"] == dict.fromkeys(out["dev"], False)
    assert not [n for n in out["lib"] if n.split("-")[0] in ("pytest", "_pytest", "mypy", "ruff", "pip", "setuptools")]
    assert out["prefix"] == f"{SANDBOX_ROOT}/python"


def test_bwrap_without_args_fails_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(strict, "_bwrap_help", lambda bwrap: "--bind SRC DEST\n--ro-bind-fd FD DEST\n")
    with pytest.raises(IsolationUnavailable, match=r"lacks --args, --bind-fd.*install bubblewrap"):
        strict_launch(_config(tmp_path), "w", None)


def test_launch_args_reads_back_the_options(tmp_path: Path) -> None:
    with launched(tmp_path) as spec:
        options = launch_args(spec)
    assert "--unshare-net" in options and options[options.index("/workspace") - 2] == "--bind"
    assert json.dumps(spec.argv).count("/workspace") == 0  # not on the command line
