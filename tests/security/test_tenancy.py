"""Tenancy: a host uid per user, kept in the state directory, and what it keeps apart."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sandbox_core.config import ProcessSandboxConfig, StrictIsolation, default_state_dir, parse_uid_range
from sandbox_core.errors import ConfigError, IsolationUnavailable
from sandbox_core.isolation import tenants
from sandbox_core.isolation.launch import prepare_workspace
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.process_tree import descendants
from sandbox_core.requests import ExecRequest
from tests.helpers import process_config

AS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not AS_ROOT, reason="per-user uids exist only when the host is root")
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    tenants._cache.clear()
    tenants._snapshots.clear()


def _config(tmp_path: Path, **strict: Any) -> ProcessSandboxConfig:
    base = process_config(tmp_path / "ws", state_dir=tmp_path / "state").replace(profile="strict")
    return base.replace(strict=StrictIsolation(**strict)) if strict else base


# ---------------------------------------------------------------- the uid map


def test_each_user_gets_a_stable_uid_of_their_own(tmp_path: Path) -> None:
    config = _config(tmp_path)
    alice, bob = tenants.identity_for(config, "alice"), tenants.identity_for(config, "bob")
    assert alice.uid != bob.uid and {alice.uid, bob.uid}.isdisjoint({0, 65534})
    assert alice.gid == alice.uid and 200000 <= alice.uid <= 299999
    tenants._cache.clear()  # a restarted orchestrator reads the map back
    assert tenants.identity_for(config, "bob") == bob and tenants.identity_for(config, "alice") == alice
    state = tmp_path / "state"
    assert oct(state.stat().st_mode & 0o777) == "0o700"
    assert json.loads((state / "uids.json").read_text())["users"] == {"alice": alice.uid, "bob": bob.uid}
    assert [p.name for p in state.iterdir() if p.name.endswith(".tmp")] == []


def test_uids_known_to_the_host_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tenants, "host_knows", lambda uid: "user 'taken'" if uid in (200000, 200001) else None)
    assert tenants.identity_for(_config(tmp_path), "alice").uid == 200002


def test_an_account_made_later_with_a_tenants_uid_fails_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(tmp_path)
    uid = tenants.identity_for(config, "alice").uid
    monkeypatch.setattr(tenants, "host_knows", lambda u: "user 'newcomer'" if u == uid else None)
    with pytest.raises(IsolationUnavailable, match="now used by the host's user 'newcomer'"):
        tenants.identity_for(config, "alice")


def _assign_many(state: str, names: list[str], out: multiprocessing.Queue[list[int]]) -> None:
    config = ProcessSandboxConfig(profile="strict", state_dir=Path(state), workspace_root=Path(state) / "ws")
    out.put([tenants.identity_for(config, n).uid for n in names])


def test_orchestrators_assigning_at_once_never_collide(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[list[int]] = ctx.Queue()
    names = [[f"p{p}-u{i}" for i in range(15)] + ["shared"] for p in range(4)]
    procs = [ctx.Process(target=_assign_many, args=(str(state), n, out)) for n in names]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    shared = {r[-1] for r in results}
    assert len(shared) == 1  # every process got the same uid for the same user
    mine = [u for r in results for u in r[:-1]]
    assert len(set(mine)) == len(mine) == 60 and not shared & set(mine)
    users = json.loads((state / "uids.json").read_text())["users"]
    assert len(users) == 61 and len(set(users.values())) == 61


def test_the_map_read_without_its_lock_is_never_older_than_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """assigned() answers from its snapshot only while the file is the one it read or wrote."""
    config = _config(tmp_path)
    alice = tenants.identity_for(config, "alice").uid
    parsed: list[Path] = []
    real_parse = tenants._parse

    def parse(text: str, path: Path) -> dict[str, int]:
        parsed.append(path)
        return real_parse(text, path)

    monkeypatch.setattr(tenants, "_parse", parse)
    assert tenants.assigned(config) == {"alice": alice} and not parsed  # what this process wrote
    assert tenants.assigned(config) == {"alice": alice} and not parsed
    path = tmp_path / "state" / "uids.json"
    other = json.loads(path.read_text())
    other["users"]["bob"] = alice + 1  # another process's write: a new file renamed over the map
    (tmp_path / "state" / "other.tmp").write_text(json.dumps(other))
    os.rename(tmp_path / "state" / "other.tmp", path)
    assert tenants.assigned(config) == {"alice": alice, "bob": alice + 1} and len(parsed) == 1
    assert tenants.assigned(config) == {"alice": alice, "bob": alice + 1} and len(parsed) == 1
    tenants.assigned(config)["mallory"] = 1  # a caller's copy: the snapshot does not change
    assert "mallory" not in tenants.assigned(config)
    path.unlink()
    assert tenants.assigned(config) == {}


def test_the_range_must_stay_clear_of_subordinate_ids(tmp_path: Path) -> None:
    subuid = tmp_path / "subuid"
    subuid.write_text("carol:100000:65536\ndave:165536:65536\n")
    with pytest.raises(IsolationUnavailable, match="overlaps dave's range 165536-231071"):
        tenants.check_range(200000, 299999, (str(subuid),))
    tenants.check_range(300000, 399999, (str(subuid),))


@pytest.mark.parametrize("text", ["100-200", "300000-200000", "abc", "200000", "200000-4294967295"])
def test_bad_uid_ranges_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_uid_range(text)
    with pytest.raises(ConfigError):
        ProcessSandboxConfig(strict=StrictIsolation(uid_range=text))


def test_a_used_up_range_says_so(tmp_path: Path) -> None:
    config = _config(tmp_path, uid_range="300000-300001")
    tenants.identity_for(config, "a")
    tenants.identity_for(config, "b")
    with pytest.raises(IsolationUnavailable, match="used up"):
        tenants.identity_for(config, "c")


def test_a_state_dir_others_can_write_or_a_corrupt_map_fail_closed(tmp_path: Path) -> None:
    config = _config(tmp_path)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    state.chmod(0o777)
    with pytest.raises(IsolationUnavailable, match="nobody else can write"):
        tenants.identity_for(config, "alice")
    state.chmod(0o700)
    (state / "uids.json").write_text('{"users": {"a": 200000, "b": 200000}}')
    with pytest.raises(IsolationUnavailable, match=r"corrupt .*assigned twice"):
        tenants.identity_for(config, "alice")


def test_the_default_state_dir() -> None:
    assert default_state_dir({"SANDBOX_STATE_DIR": "/srv/s"}) == Path("/srv/s")
    if AS_ROOT:
        assert default_state_dir({}) == Path("/var/lib/sandbox")
    else:
        assert default_state_dir({"XDG_STATE_HOME": "/x"}) == Path("/x/sandbox")


# ---------------------------------------------------------------- real workers


@needs_root
def test_workspaces_belong_to_their_users_uid(tmp_path: Path) -> None:
    config = _config(tmp_path)
    alice, bob = prepare_workspace(config, "alice"), prepare_workspace(config, "bob")
    a, b = alice.stat(), bob.stat()
    assert a.st_uid != b.st_uid and {a.st_uid, b.st_uid}.isdisjoint({0, 65534})
    assert (a.st_uid, a.st_gid) == (tenants.identity_for(config, "alice").uid,) * 2
    assert oct(a.st_mode & 0o7777) == oct(b.st_mode & 0o7777) == "0o700"


@needs_root
def test_the_shared_sandbox_user_is_an_explicit_opt_out(tmp_path: Path) -> None:
    config = _config(tmp_path, sandbox_user="nobody")
    assert prepare_workspace(config, "alice").stat().st_uid == prepare_workspace(config, "bob").stat().st_uid == 65534
    assert not (tmp_path / "state" / "uids.json").exists()


def _as_uid(uid: int, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "sh", "-c", script],
                          capture_output=True, text=True, timeout=30, check=False)


@needs_root
@needs_bwrap
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux setpriv is not installed")
async def test_another_tenants_uid_cannot_reach_the_workspace(tmp_path: Path) -> None:
    config = _config(tmp_path)
    async with SandboxOrchestrator(config) as pool:
        first = await pool.execute("alice", ExecRequest(shell="id -u; echo secret > notes.txt"))
        second = await pool.execute("bob", ExecRequest(shell="id -u"))
        alice_uid, bob_uid = int(first.stdout_text.split()[0]), int(second.stdout_text.split()[0])
        assert alice_uid != bob_uid and {alice_uid, bob_uid}.isdisjoint({0, 65534})
        workspace = config.workspace_root / "alice"
        assert (workspace / "notes.txt").stat().st_uid == alice_uid
        worker = next(w for w in pool._workers.values() if w.user_id == "alice")
        pid = next(p for p in descendants(worker.pid or 0) if os.stat(f"/proc/{p}").st_uid == alice_uid)
        inside = f"/proc/{pid}/root"
        direct = _as_uid(bob_uid, f"cat {workspace}/notes.txt")
        assert direct.returncode != 0 and "Permission denied" in direct.stderr
        through_proc = _as_uid(bob_uid, f"ls {inside}/workspace")
        assert through_proc.returncode != 0 and "Permission denied" in through_proc.stderr
        signal_it = _as_uid(bob_uid, f"kill -0 {pid}")
        assert signal_it.returncode != 0 and "not permitted" in signal_it.stderr
        assert (workspace / "notes.txt").read_text() == "secret\n"  # the denials above are not a missing file
