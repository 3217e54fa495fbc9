"""The strict mount view against real bubblewrap: protected paths, deny paths, what the sandbox sees.

Probes run the exact launch of :func:`strict_launch` with the worker's program replaced (see
``test_strict_engine``): they apply the plan's layers (uid switch, landlock...) as the worker
does, then try what an attacker in the sandbox would.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from sandbox_core.config import DEFAULT_PROTECTED_PATHS
from sandbox_core.errors import ConfigError, IsolationUnavailable
from sandbox_core.inside import confine
from sandbox_core.isolation import runtime, strict
from sandbox_core.isolation.launch import PACKAGE_ROOT, prepare_workspace
from sandbox_core.isolation.runtime import SANDBOX_ROOT
from sandbox_core.isolation.spec import LaunchSpec
from sandbox_core.isolation.strict import launch_args, strict_launch
from tests.security import test_strict_engine
from tests.security.test_strict_engine import AS_ROOT, _config, launched, run

pytestmark = test_strict_engine.pytestmark


ATTACKS = """
import errno
W = "/workspace"
def err(fn, *args):
    try:
        fn(*args)
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]
def write(path, mode="a"):
    with open(path, mode) as fh:
        fh.write("echo pwned\\n")
def create(path):
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
def swap(path):  # a symlink made next to the target, renamed over it (ln -sf)
    tmp = os.path.join(os.path.dirname(os.path.dirname(path) + "/"), ".swap")
    os.symlink("/tmp/evil", tmp)
    try:
        os.rename(tmp, path)
    finally:
        if os.path.islink(tmp):
            os.unlink(tmp)
def replace(path):  # a new file next to the target, renamed over it (git's config.lock)
    tmp = os.path.join(os.path.dirname(path), ".new")
    write(tmp, "w")
    try:
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
out["attempts"] = {
    "write .bashrc": err(write, W + "/.bashrc"),
    "truncate .git/config": err(write, W + "/.git/config", "w"),
    "write .vscode/settings.json": err(write, W + "/.vscode/settings.json"),
    "create .profile": err(create, W + "/.profile"),
    "open-create .profile": err(write, W + "/.profile", "w"),
    "create .mcp.json": err(create, W + "/.mcp.json"),
    "create .claude/settings.json": err(create, W + "/.claude/settings.json"),
    "mkdir .claude/commands": err(os.mkdir, W + "/.claude/commands"),
    "create .git/hooks/post-checkout": err(create, W + "/.git/hooks/post-checkout"),
    "rename .bashrc": err(os.rename, W + "/.bashrc", W + "/bashrc.moved"),
    "rename .git (parent of .git/config)": err(os.rename, W + "/.git", W + "/git.moved"),
    "rename .git/hooks": err(os.rename, W + "/.git/hooks", W + "/hooks.moved"),
    "rename over .gitconfig": err(replace, W + "/.gitconfig"),
    "rename over .git/config": err(replace, W + "/.git/config"),
    "unlink .bashrc": err(os.unlink, W + "/.bashrc"),
    "unlink .git/hooks/pre-commit": err(os.unlink, W + "/.git/hooks/pre-commit"),
    "rmdir .vscode": err(os.rmdir, W + "/.vscode"),
    "rmdir .claude": err(os.rmdir, W + "/.claude"),
    "symlink swap .bashrc": err(swap, W + "/.bashrc"),
    "symlink swap .git/hooks/pre-commit": err(swap, W + "/.git/hooks/pre-commit"),
    "symlink at .ripgreprc": err(os.symlink, "/tmp/evil", W + "/.ripgreprc"),
    "hard link to .bashrc": err(os.link, W + "/.bashrc", W + "/bashrc.link"),
}
out["allowed"] = {
    "write .git/index": err(write, W + "/.git/index", "w"),
    "write notes.txt": err(write, W + "/notes.txt", "w"),
    "write ~/.profile": err(write, os.environ["HOME"] + "/.profile", "w"),
}
out["bashrc"] = open(W + "/.bashrc").read()
out["profile"] = open(W + "/.profile").read()
"""
REFUSED = {"EROFS", "EBUSY", "EEXIST", "EXDEV"}


def _own(path: Path, owner: Path | None = None) -> None:
    """Give ``path`` (and what is below it) to the workspace's sandbox user, as if the sandbox made it."""
    st = (owner or path).stat()
    for p in [path, *path.rglob("*")]:
        os.lchown(p, st.st_uid, st.st_gid)


def _workspace(tmp_path: Path, **strict_settings: object) -> Path:
    workspace = prepare_workspace(_config(tmp_path, **strict_settings), "alice")
    (workspace / ".bashrc").write_text("# mine\n")
    (workspace / ".gitconfig").write_text("[user]\n\tname = me\n")
    (workspace / ".git" / "hooks").mkdir(parents=True)
    (workspace / ".git" / "config").write_text("[core]\n")
    (workspace / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\n")
    (workspace / ".vscode").mkdir()
    (workspace / ".vscode" / "settings.json").write_text("{}")
    for p in [workspace, *workspace.rglob("*")]:
        p.chmod(0o700 if p.is_dir() else 0o644)
    _own(workspace)
    return workspace


# ----------------------------------------------------------------- protected paths


@pytest.fixture(params=["host builds the tree", "bwrap mounts each"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the guards reach the sandbox: a root host mounts them on a clone of the workspace
    before bwrap binds it (:func:`strict.builds_workspace`), elsewhere bwrap mounts each one."""
    if request.param == "bwrap mounts each":
        monkeypatch.setattr(strict, "builds_workspace", lambda *args, **kwargs: False)
    elif not AS_ROOT:
        pytest.skip("only a root host builds the workspace tree (mount(2) on the host)")
    return str(request.param)


def test_protected_paths_refuse_write_create_rename_delete_and_swap(tmp_path: Path, way: str) -> None:
    workspace = _workspace(tmp_path)
    with launched(tmp_path) as spec:
        out = run(spec, ATTACKS)
        protected = spec.plan["host_layers"]["filesystem"]["protected"]
    refused = {name: result for name, result in out["attempts"].items() if result not in REFUSED}
    assert refused == {}, f"these succeeded or failed for another reason: {refused}"
    assert out["attempts"]["rename .git (parent of .git/config)"] == "EBUSY"
    assert out["attempts"]["rename over .git/config"] == "EBUSY" and out["attempts"]["unlink .bashrc"] == "EBUSY"
    assert out["allowed"] == dict.fromkeys(out["allowed"], "ok")  # the rest of the tree and HOME stay writable
    assert out["bashrc"] == "# mine\n" and out["profile"] == ""
    assert {"/workspace/.bashrc", "/workspace/.git/config", "/workspace/.git/hooks", "/workspace/.claude"} <= set(
        protected
    )
    # on the host, for the next run and for an operator's git or IDE: nothing changed, nothing planted
    assert (workspace / ".bashrc").read_text() == "# mine\n"
    assert (workspace / ".git" / "config").read_text() == "[core]\n"
    assert sorted(p.name for p in (workspace / ".git" / "hooks").iterdir()) == ["pre-commit"]
    assert not (workspace / "bashrc.moved").exists() and not (workspace / "git.moved").exists()
    assert (workspace / "notes.txt").exists() and not (workspace / ".profile").read_text()
    placeholder = (workspace / ".profile").stat()
    assert stat.S_IMODE(placeholder.st_mode) == 0o444 and placeholder.st_uid == os.geteuid()
    assert (workspace / ".claude").is_dir() and list((workspace / ".claude").iterdir()) == []


def test_protection_holds_in_a_later_run(tmp_path: Path) -> None:
    """A second worker of the same user finds the placeholders and protects them the same way."""
    _workspace(tmp_path)
    with launched(tmp_path, worker_id="first") as spec:
        run(spec, "pass")
    with launched(tmp_path, worker_id="second") as spec:
        out = run(spec, ATTACKS)
    assert {n: r for n, r in out["attempts"].items() if r not in REFUSED} == {}


def test_protected_paths_can_be_lifted(tmp_path: Path) -> None:
    workspace = _workspace(tmp_path, protected_paths=())
    code = 'out["write"] = open("/workspace/.bashrc", "a").write("x")\nos.rename("/workspace/.git", "/workspace/g")'
    with launched(tmp_path, protected_paths=()) as spec:
        run(spec, code)
        assert spec.plan["expect_mounts"] == []
    assert (workspace / ".bashrc").read_text() == "# mine\nx" and (workspace / "g" / "config").exists()
    assert not (workspace / ".profile").exists()  # no placeholder either


def test_globs_protect_what_matches(tmp_path: Path) -> None:
    workspace = _workspace(tmp_path)
    (workspace / "sub" / ".git").mkdir(parents=True)
    (workspace / "sub" / ".git" / "config").write_text("[core]\n")
    (workspace / "link").symlink_to("sub")  # matches the glob too: skipped, not a reason to refuse
    _own(workspace / "sub", workspace)
    code = """
    out["sub"] = attempt(lambda: open("/workspace/sub/.git/config", "a").write("x"))
    out["move"] = attempt(os.rename, "/workspace/sub", "/workspace/sub2")
    out["other"] = attempt(lambda: open("/workspace/new.txt", "w").write("x"))
    """
    with launched(tmp_path, protected_paths=("*/.git/config",)) as spec:
        out = run(spec, code)
    assert out["sub"] == errno.EROFS and out["move"] == errno.EBUSY and out["other"] == "ok"


@pytest.mark.parametrize("trap", ["symlink", "symlink-parent", "symlink-inside", "hard-link"])
def test_a_protected_path_that_could_be_redirected_refuses_the_launch(tmp_path: Path, trap: str) -> None:
    workspace = _workspace(tmp_path)
    if trap == "symlink":
        (workspace / ".bashrc").unlink()
        (workspace / ".bashrc").symlink_to("/etc/shadow")
    elif trap == "symlink-parent":
        (workspace / ".git").rename(workspace / "realgit")
        (workspace / ".git").symlink_to("realgit")
    elif trap == "symlink-inside":
        (workspace / ".git" / "hooks" / "post-merge").symlink_to("../../notes.sh")
    else:
        os.link(workspace / ".bashrc", workspace / "innocent.txt")
    with pytest.raises(IsolationUnavailable, match=r"symlink|hard link"):
        strict_launch(_config(tmp_path), "w", workspace)


def test_bad_protected_patterns_are_config_errors(tmp_path: Path) -> None:
    workspace = _workspace(tmp_path)
    for bad in ("/etc/passwd", "../x", "a/../../b", ""):
        with pytest.raises(ConfigError, match="protected_paths"):
            strict_launch(_config(tmp_path, protected_paths=(bad,)), "w", workspace)


def test_check_mounts_fails_closed_on_a_missing_or_writable_mount() -> None:
    info = (
        "150 111 254:0 /h/ws /workspace rw,nosuid - ext4 /dev/vda rw\n"
        "151 150 254:0 /h/ws/.bashrc /workspace/.bashrc ro,nosuid - ext4 /dev/vda rw\n"
        "152 150 254:0 /h/ws/a\\040b /workspace/a\\040b ro,nosuid - ext4 /dev/vda rw\n"
    )
    confine.check_mounts([["/workspace/.bashrc", "ro"], ["/workspace/a b", "ro"]], info)
    with pytest.raises(IsolationUnavailable, match="not a mount point"):
        confine.check_mounts([["/workspace/.profile", "ro"]], info)
    with pytest.raises(IsolationUnavailable, match="should be a rw mount point but is ro"):
        confine.check_mounts([["/workspace/.bashrc", "rw"]], info)


# ----------------------------------------------------------------- deny paths


DENIED = "/workspace/base/denied-dir/secret.txt"


def _secret_workspace(tmp_path: Path) -> Path:
    workspace = prepare_workspace(_config(tmp_path), "alice")
    (workspace / "base" / "denied-dir").mkdir(parents=True)
    (workspace / "base" / "denied-dir" / "secret.txt").write_text("top-secret")
    (workspace / "base" / "denied-dir" / "other.txt").write_text("fine")
    _own(workspace)
    return workspace


def test_deny_path_cannot_be_moved_away_by_renaming_a_parent(tmp_path: Path, way: str) -> None:
    workspace = _secret_workspace(tmp_path)
    code = f"""
    out["read"] = attempt(lambda: open({DENIED!r}).read())
    out["mv base"] = attempt(os.rename, "/workspace/base", "/workspace/moved")
    out["mv denied-dir"] = attempt(os.rename, "/workspace/base/denied-dir", "/workspace/base/moved")
    out["mv secret"] = attempt(os.rename, {DENIED!r}, "/workspace/base/denied-dir/renamed.txt")
    out["link secret"] = attempt(os.link, {DENIED!r}, "/workspace/secret.link")
    out["rm secret"] = attempt(os.unlink, {DENIED!r})
    out["sibling"] = attempt(os.rename, "/workspace/base/denied-dir/other.txt", "/workspace/base/denied-dir/o2")
    os.rename("/workspace/base/denied-dir/o2", "/workspace/base/denied-dir/other.txt")
    out["out of a pinned dir"] = attempt(os.rename, "/workspace/base/denied-dir/other.txt", "/workspace/o3")
    def grep(top):
        found = []
        for root, _dirs, files in os.walk(top):
            for name in files:
                try:
                    if "top-secret" in open(os.path.join(root, name), errors="replace").read():
                        found.append(os.path.join(root, name))
                except OSError:
                    pass
        return found
    out["found"] = grep("/workspace")
    """
    outs = []
    for worker in ("first", "second"):  # the second run finds the secret where it was, hidden again
        with launched(tmp_path, worker_id=worker, deny_paths=(DENIED,)) as spec:
            outs.append(run(spec, code))
            assert spec.plan["host_layers"]["filesystem"]["denied"] == [DENIED]
        assert (workspace / "base" / "denied-dir" / "secret.txt").read_text() == "top-secret"
        assert not (workspace / "moved").exists() and not (workspace / "secret.link").exists()
    for out in outs:
        assert out["read"] != "ok" and out["found"] == []
        assert out["mv base"] == out["mv denied-dir"] == out["mv secret"] == out["rm secret"] == errno.EBUSY
        assert out["link secret"] != "ok"
    assert outs[0]["sibling"] == "ok"  # what is next to it stays the sandbox's to rename...
    assert outs[0]["out of a pinned dir"] == errno.EXDEV  # ...and, a mount apart, to copy (mv does) elsewhere


def test_missing_deny_path_is_reported_and_its_parents_pinned(tmp_path: Path) -> None:
    workspace = _secret_workspace(tmp_path)
    (workspace / "base" / "denied-dir" / "secret.txt").unlink()
    code = 'out["mv"] = attempt(os.rename, "/workspace/base", "/workspace/moved")'
    with launched(tmp_path, deny_paths=(DENIED,)) as spec:
        out = run(spec, code)
        fs = spec.plan["host_layers"]["filesystem"]
    assert fs["denied"] == [] and fs["deny_missing"] == [DENIED]
    assert out["mv"] == errno.EBUSY


def test_a_denied_file_with_another_hard_link_refuses_the_launch(tmp_path: Path) -> None:
    workspace = _secret_workspace(tmp_path)
    os.link(workspace / "base" / "denied-dir" / "secret.txt", workspace / "copy.txt")
    with pytest.raises(IsolationUnavailable, match="hard link"):
        strict_launch(_config(tmp_path, deny_paths=(DENIED,)), "w", workspace)


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
    monkeypatch.setattr(strict, "_bwrap_help", lambda bwrap, cache=None: "--bind SRC DEST\n--ro-bind-fd FD DEST\n")
    with pytest.raises(IsolationUnavailable, match=r"lacks --args, --bind-fd.*install bubblewrap"):
        strict_launch(_config(tmp_path), "w", None)


def test_launch_args_reads_back_the_options(tmp_path: Path) -> None:
    with launched(tmp_path) as spec:
        options = launch_args(spec)
    assert "--unshare-net" in options and options[options.index("/workspace") - 2] == "--bind"
    assert json.dumps(spec.argv).count("/workspace") == 0  # not on the command line
    assert set(DEFAULT_PROTECTED_PATHS) >= {".bashrc", ".git/config", ".git/hooks/", ".claude/"}


def test_a_stage_that_others_could_swap_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's code runs from the stage before it confines itself: no one else may write its path."""
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o777)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
    with pytest.raises(IsolationUnavailable, match=f"no one else can write; {home} is not"):
        runtime.stage_root()
    home.chmod(0o755)
    assert runtime.stage_root() == home / ".cache" / "sandbox" / "runtime"


ETC_VIEW = """
import hashlib
out["mounts"] = sorted(line.split(" ")[4] for line in open("/proc/self/mountinfo")
                       if line.split(" ")[4] == "/etc" or line.split(" ")[4].startswith("/etc/"))
out["digests"] = {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in FILES}
out["listing"] = sorted(os.listdir("/etc"))
out["certs"] = sorted(os.listdir("/etc/ssl/certs")) if os.path.isdir("/etc/ssl/certs") else None
out["append"] = attempt(open, "/etc/nsswitch.conf", "a")
out["create"] = attempt(open, "/etc/planted", "w")
out["extra"] = open("/etc/extra.conf").read() if os.path.exists("/etc/extra.conf") else None
"""


def _etc_probe(spec: LaunchSpec, files: list[str]) -> dict[str, Any]:
    return run(spec, ETC_VIEW.replace("FILES", repr(files)))


def _host_etc() -> tuple[list[str], list[str]]:
    names = [name for name, path in strict._etc_entries() if os.path.lexists(path)]
    files = [f"/etc/{n}" for n in names if os.path.isfile(f"/etc/{n}")]
    return names, files


def test_etc_is_one_read_only_mount_showing_the_host_entries(tmp_path: Path) -> None:
    """The selected /etc entries are one bind of their stage (plus the generated passwd,
    group and hosts), byte for byte the host's, and the sandbox can change none of it."""
    names, files = _host_etc()
    with launched(tmp_path) as spec:
        out = _etc_probe(spec, files)
    assert out["mounts"] == ["/etc", "/etc/group", "/etc/hosts", "/etc/passwd"]
    assert out["digests"] == {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}
    tops = {n.split("/")[0] for n in names}
    assert set(out["listing"]) == tops | {"passwd", "group", "hosts"}
    if os.path.isdir("/etc/ssl/certs"):
        host_certs = sorted(e.name for e in os.scandir("/etc/ssl/certs") if e.is_symlink() or e.is_file()
                            or e.is_dir(follow_symlinks=False))  # fmt: skip
        assert out["certs"] == host_certs
    assert out["append"] in (errno.EROFS, errno.EACCES) and out["create"] in (errno.EROFS, errno.EACCES)


def test_a_bind_below_etc_binds_the_entries_one_by_one(tmp_path: Path) -> None:
    """A configured bind whose mount point is below /etc cannot go into the read-only stage:
    the entries are bound one by one, as before staging, and the bind shows."""
    extra = tmp_path / "extra.conf"
    extra.write_text("operator's\n")
    names, files = _host_etc()
    with launched(tmp_path, ro_binds=(f"{extra}:/etc/extra.conf",)) as spec:
        out = _etc_probe(spec, files)
    assert out["extra"] == "operator's\n"
    assert "/etc" not in out["mounts"] and "/etc/extra.conf" in out["mounts"]
    assert {f"/etc/{n}" for n in names} <= set(out["mounts"])
    assert out["create"] in (errno.EROFS, errno.EACCES)
