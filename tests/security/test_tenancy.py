"""Tenancy: a host uid per user, kept in the state directory, and what it keeps apart."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
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
    tenants.close_maps()


def _config(tmp_path: Path, **strict: Any) -> ProcessSandboxConfig:
    base = process_config(tmp_path / "ws", state_dir=tmp_path / "state").replace(profile="strict")
    return base.replace(strict=StrictIsolation(**strict)) if strict else base


# ---------------------------------------------------------------- the uid map


def test_each_user_gets_a_stable_uid_of_their_own(tmp_path: Path) -> None:
    config = _config(tmp_path)
    alice, bob = tenants.identity_for(config, "alice"), tenants.identity_for(config, "bob")
    assert alice.uid != bob.uid and {alice.uid, bob.uid}.isdisjoint({0, 65534})
    assert alice.gid == alice.uid and 200000 <= alice.uid <= 299999
    tenants.close_maps()  # a restarted orchestrator reads the map back
    assert tenants.identity_for(config, "bob") == bob and tenants.identity_for(config, "alice") == alice
    state = tmp_path / "state"
    assert oct(state.stat().st_mode & 0o777) == "0o700"
    assert oct((state / "uids.sqlite3").stat().st_mode & 0o777) == "0o600"
    with contextlib.closing(sqlite3.connect(state / "uids.sqlite3")) as db:  # what another process reads
        assert dict(db.execute("SELECT key, uid FROM tenants")) == {"alice": alice.uid, "bob": bob.uid}
    assert tenants.assigned(config) == {"alice": alice.uid, "bob": bob.uid}
    assert oct((state / "uids.sqlite3-wal").stat().st_mode & 0o777) == "0o600"


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
    users = tenants.assigned(ProcessSandboxConfig(profile="strict", state_dir=state))
    assert len(users) == 61 and len(set(users.values())) == 61


def test_a_change_touches_one_row_and_others_see_it_at_once(tmp_path: Path) -> None:
    """A spare's hand-over is one row's update; another process's change is read at the next look."""
    config = _config(tmp_path)
    spare = tenants.identity_for(config, ".spare-1-w1").uid
    assert tenants.rename(config, ".spare-1-w1", "carol") == tenants.Tenant("carol", spare, spare)
    assert tenants.rename(config, ".spare-1-w1", "carol") is None  # carol has a uid now: nothing changes
    assert tenants.assigned(config) == {"carol": spare} and tenants.has_uid(config, "carol")
    tenants.flush(config)
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "uids.sqlite3", isolation_level=None)) as db:
        db.execute("INSERT INTO tenants VALUES ('dave', ?)", (spare + 7,))  # another orchestrator's assignment
        with pytest.raises(sqlite3.IntegrityError):  # the schema itself refuses a uid given twice
            db.execute("INSERT INTO tenants VALUES ('eve', ?)", (spare,))
    assert tenants.has_uid(config, "dave") and tenants.assigned(config)["dave"] == spare + 7
    assert tenants.identity_for(config, "eve").uid not in (spare, spare + 7)
    with pytest.raises(IsolationUnavailable, match="only a spare's uid"):
        tenants.forget(config, "carol")
    assert not tenants.has_uid(_config(tmp_path / "other"), "carol")  # no map there: nothing made
    assert not (tmp_path / "other" / "state" / "uids.sqlite3").exists()


def test_an_earlier_versions_json_map_is_imported_and_left_unusable_to_it(tmp_path: Path) -> None:
    config = _config(tmp_path)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "uids.json").write_text(json.dumps({"version": 1, "users": {"alice": 200000, ".spare-9-w0": 200003}}))
    assert tenants.identity_for(config, "alice").uid == 200000
    assert tenants.identity_for(config, "bob").uid == 200001  # the lowest free one: 200003 is taken
    assert tenants.assigned(config) == {"alice": 200000, ".spare-9-w0": 200003, "bob": 200001}
    note = json.loads((state / "uids.json").read_text())
    assert "users" not in note and note["moved_to"] == "uids.sqlite3"  # the earlier version fails closed on it
    tenants.close_maps()
    assert tenants.assigned(config)["bob"] == 200001  # the note is not imported again
    (state / "uids.json").write_text(json.dumps({"version": 1, "users": {"mallory": 200001}}))
    tenants.close_maps()
    with pytest.raises(IsolationUnavailable, match=r"gives uid 200001 to 'mallory'.* to 'bob'"):
        tenants.assigned(config)


def test_a_process_killed_inside_a_change_leaves_the_map_whole(tmp_path: Path) -> None:
    """Another orchestrator dies holding the map's write lock, mid-change: the lock goes with
    it, its change is rolled back, and readers never saw it."""
    config = _config(tmp_path)
    alice = tenants.identity_for(config, "alice").uid
    script = (
        "import sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('BEGIN IMMEDIATE')\n"
        "db.execute('INSERT INTO tenants VALUES (?, ?)', ('mallory', int(sys.argv[2])))\n"
        "print('inside', flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "state" / "uids.sqlite3"), str(alice + 1)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as child:  # fmt: skip
        try:
            assert child.stdout is not None and child.stdout.readline() == "inside\n"
            assert tenants.assigned(config) == {"alice": alice}  # a reader is not blocked, nor sees it
        finally:
            child.kill()
            child.wait(timeout=30)
    assert tenants.identity_for(config, "bob").uid == alice + 1  # the dead change left nothing behind
    assert tenants.assigned(config) == {"alice": alice, "bob": alice + 1}


def test_a_corrupt_or_foreign_map_fails_closed(tmp_path: Path) -> None:
    config = _config(tmp_path)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "uids.sqlite3").write_bytes(b"not a database, just bytes" * 100)
    (state / "uids.sqlite3").chmod(0o600)
    with pytest.raises(IsolationUnavailable, match="corrupt"):
        tenants.identity_for(config, "alice")
    (state / "uids.sqlite3").unlink()
    (state / "uids.sqlite3").write_bytes(b"")
    (state / "uids.sqlite3").chmod(0o644)
    with pytest.raises(IsolationUnavailable, match="that only it can read"):
        tenants.identity_for(config, "alice")


def test_a_map_replaced_behind_the_process_is_opened_again(tmp_path: Path) -> None:
    config = _config(tmp_path)
    state = tmp_path / "state"
    first = tenants.identity_for(config, "alice").uid
    for name in ("uids.sqlite3", "uids.sqlite3-wal", "uids.sqlite3-shm"):
        (state / name).unlink(missing_ok=True)  # e.g. an operator restored an (empty) backup
    assert tenants.assigned(config) == {}
    assert tenants.identity_for(config, "bob").uid == first  # assigned in the new file, not the removed one
    assert tenants.identity_for(config, "alice").uid == first + 1  # not the uid cached from the old file
    assert tenants.assigned(config) == {"bob": first, "alice": first + 1}


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
    assert not (tmp_path / "state" / "uids.sqlite3").exists()


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
