"""Pre-warmed strict workers claimed by a new user: the claim path's safety, with real workers.

A worker never serves two users; an unbound worker serves nothing before its claim; an
attach that fails leaves no half-bound worker, no slot mount and no process behind.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from sandbox_core import codes
from sandbox_core.errors import IsolationUnavailable, RemoteError, SandboxError
from sandbox_core.isolation import slots, strict, tenants
from sandbox_core.isolation.launch import can_prewarm, launch_spec
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.process_tree import descendants
from sandbox_core.requests import ExecRequest
from sandbox_core.worker import SandboxWorker
from tests.helpers import pid_alive, wait_for
from tests.security.claims import NEEDS_UNBOUND_STRICT, claim_config, fresh_uid_maps, slot_mounts  # noqa: F401

pytestmark = NEEDS_UNBOUND_STRICT
_config = claim_config


def _existing_workspace(config: Any, user: str) -> Path:
    workspace: Path = config.workspace_for(user)
    workspace.parent.mkdir(parents=True, exist_ok=True)
    workspace.mkdir(mode=0o700)
    return workspace


def _spares(config: Any) -> tuple[list[str], list[str]]:
    """Spare workspaces left in the workspace root, and spare keys left in the uid map."""
    names = sorted(n for n in os.listdir(config.workspace_root) if n.startswith(tenants.SPARE_PREFIX))
    return names, sorted(k for k in tenants.assigned(config) if k.startswith(tenants.SPARE_PREFIX))


def sh(script: str) -> ExecRequest:
    return ExecRequest(shell=script)


async def _prewarmed(pool: SandboxOrchestrator, count: int = 1) -> None:
    await wait_for(lambda: pool.get_pool_stats()["workers"]["prewarmed"] >= count, 30, "a pre-warmed worker")


async def test_a_new_user_claims_a_prewarmed_worker_confined_as_their_own_uid(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert can_prewarm(config)
    async with SandboxOrchestrator(config) as pool:
        await _prewarmed(pool)
        unbound = [w["worker_id"] for w in pool.list_workers() if w["user_id"] is None]
        result = await pool.execute("alice", sh(
            "id -u; pwd; echo mine > a.txt; cat /etc/passwd; grep -E '^(Cap|NoNewPrivs|Seccomp)' /proc/self/status;"
            " echo x > .bashrc || echo frozen"))  # fmt: skip
        assert result.exit_code == 0, result.stderr_text
        assert result.worker_id in unbound and pool.get_pool_stats()["claimed"] == 1
        uid = tenants.identity_for(config, "alice").uid
        lines = result.stdout_text.splitlines()
        assert lines[0] == str(uid) and lines[1] == "/workspace"
        assert f"sandbox:x:{uid}:{uid}:" in result.stdout_text
        assert all(line.endswith("0000000000000000") for line in lines if line.startswith("Cap"))
        assert "NoNewPrivs:\t1" in result.stdout_text and "Seccomp:\t2" in result.stdout_text
        assert lines[-1] == "frozen"
        assert (tmp_path / "ws" / "alice" / "a.txt").stat().st_uid == uid
        report = pool.worker_report(result.worker_id)
        assert report is not None and report["uid"] == uid and report["capabilities_zero"] is True
        assert {"identity", "capabilities", "seccomp", "no_new_privs"} <= set(report["verified_by_host"])
        assert report["identity"]["uid"] == uid
    assert slot_mounts(tmp_path) == []


async def test_a_new_user_takes_the_spare_workspace_staged_for_the_worker(tmp_path: Path) -> None:
    config = _config(tmp_path)
    async with SandboxOrchestrator(config) as pool:
        await _prewarmed(pool)
        (unbound,) = [w for w in pool._workers.values() if w.user_id is None]
        assert unbound.report["spare"] == "staged"
        (name,), (key,) = _spares(config)
        assert name == key and unbound.worker_id in name
        spare_uid, spare_ino = tenants.assigned(config)[name], os.stat(config.workspace_root / name).st_ino
        assert os.stat(config.workspace_root / name).st_uid == spare_uid
        result = await pool.execute("ivan", sh("id -u; echo hi > f; cat /etc/passwd"))
        assert result.exit_code == 0, result.stderr_text
        assert result.worker_id == unbound.worker_id and unbound.claimed_spare
        uid = tenants.identity_for(config, "ivan").uid
        assert result.stdout_text.splitlines()[0] == str(uid) == str(spare_uid)
        assert f"sandbox:x:{uid}:{uid}:" in result.stdout_text
        workspace = config.workspace_for("ivan")
        assert os.stat(workspace).st_ino == spare_ino and (workspace / "f").stat().st_uid == uid
        assert name not in os.listdir(config.workspace_root) and name not in tenants.assigned(config)
        report = pool.worker_report(result.worker_id)
        assert report is not None and report["uid"] == uid and "/workspace/.bashrc" in report["filesystem"]["protected"]
    assert _spares(config) == ([], [])  # the refill's spares were removed and their uids given back
    assert set(tenants.assigned(config)) == {"ivan"}
    assert slot_mounts(tmp_path) == []


async def test_a_returning_user_gets_their_own_workspace_and_the_spare_is_given_back(tmp_path: Path) -> None:
    config = _config(tmp_path)
    workspace = _existing_workspace(config, "judy")
    (workspace / "old.txt").write_text("judy's")
    judy = tenants.identity_for(config, "judy").uid
    async with SandboxOrchestrator(config) as pool:
        await _prewarmed(pool)
        (name,), _keys = _spares(config)
        spare_uid = tenants.assigned(config)[name]
        result = await pool.execute("judy", sh("ls -a; id -u"))
        assert result.exit_code == 0, result.stderr_text
        assert "old.txt" in result.stdout_text and result.stdout_text.splitlines()[-1] == str(judy) != str(spare_uid)
        assert not pool._workers[result.worker_id].claimed_spare
        await pool.stop_workers(user_id="judy")
        await wait_for(lambda: name not in os.listdir(config.workspace_root), 10, "the spare removed")
        assert name not in tenants.assigned(config)
    assert (workspace / "old.txt").read_text() == "judy's" and _spares(config) == ([], [])
    assert slot_mounts(tmp_path) == []


async def test_a_spare_promised_to_a_user_who_turns_out_to_have_a_uid_fails_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker switches to the spare's uid while the host hands the spare over; when the hand-over
    finds the user has a uid after all (another orchestrator gave one), the worker is retired, the
    user gets a worker of their own uid, and the spare's uid (which a process ran as) is never reused."""
    config = _config(tmp_path)
    kim = tenants.identity_for(config, "kim").uid  # a uid, but no workspace yet
    monkeypatch.setattr(tenants, "has_uid", lambda cfg, key: False)  # the promise's quick look misses it
    async with SandboxOrchestrator(config) as pool:
        await _prewarmed(pool)
        (unbound,) = [w for w in pool._workers.values() if w.user_id is None]
        (name,), _keys = _spares(config)
        result = await pool.execute("kim", sh("id -u"))
        assert result.exit_code == 0 and result.stdout_text.strip() == str(kim)
        assert result.worker_id != unbound.worker_id and pool.get_pool_stats()["claim_fallbacks"] == 1
        await wait_for(lambda: unbound.pid is None or not pid_alive(unbound.pid), 10, "the retired worker's exit")
        await wait_for(lambda: name not in os.listdir(config.workspace_root), 10, "the spare removed")
        monkeypatch.undo()
        assert name in tenants.assigned(config)  # burned: never given to anyone
    assert slot_mounts(tmp_path) == []


async def test_stale_spares_of_a_dead_orchestrator_are_swept_at_start(tmp_path: Path) -> None:
    config = _config(tmp_path, min_idle=0)
    name = f"{tenants.SPARE_PREFIX}999999999-stale"  # as if its orchestrator (pid 999999999) had died
    stale = config.workspace_root / name
    stale.mkdir(parents=True)
    (stale / "dir").mkdir()
    (stale / "dir" / "file").write_text("x")
    (stale / "link").symlink_to("/etc")  # removed as a link, never followed
    tenants.identity_for(config, name)
    async with SandboxOrchestrator(config) as pool:
        assert f"spare {name}" in pool.swept
    assert not stale.exists() and name not in tenants.assigned(config) and os.path.isfile("/etc/passwd")


async def test_a_worker_never_serves_two_users(tmp_path: Path) -> None:
    config = _config(tmp_path)
    async with SandboxOrchestrator(config) as pool:
        await _prewarmed(pool)
        first = await pool.execute("alice", sh("echo secret > mine.txt"))
        alice = pool._workers[first.worker_id]
        with pytest.raises(IsolationUnavailable):  # the host refuses a second claim of the same worker
            await alice.bind("bob", config.workspace_for("alice"))
        await pool.stop_workers(user_id="alice")
        await _prewarmed(pool)
        second = await pool.execute("bob", sh("ls -a /workspace; cat /etc/passwd; id -u"))
        assert second.worker_id != first.worker_id
        assert "mine.txt" not in second.stdout_text and "secret" not in second.stdout_text
        bob_uid = tenants.identity_for(config, "bob").uid
        assert second.stdout_text.splitlines()[-1] == str(bob_uid) != str(tenants.identity_for(config, "alice").uid)
        assert f":{tenants.identity_for(config, 'alice').uid}:" not in second.stdout_text
        seen = [w["worker_id"] for w in pool.list_workers()]
        assert first.worker_id not in seen
    assert slot_mounts(tmp_path) == []


async def test_an_unbound_worker_serves_nothing_before_its_claim(tmp_path: Path) -> None:
    config = _config(tmp_path)
    worker = SandboxWorker(config, "unbound-1", launcher=launch_spec)
    await worker.start()
    try:
        assert worker.report["uid"] == 0 and worker.report["seccomp"] is True
        assert "unbound" in worker.report["verified_by_host"]
        with pytest.raises(RemoteError) as caught:
            await worker.call("exec", {"argv": ["true"]})
        assert caught.value.remote_code == codes.NOT_BOUND
        with pytest.raises(IsolationUnavailable, match="never becomes root"):
            await worker.call("bind", {"user_id": "mallory", "workspace": "/workspace", "uid": 0, "gid": 0})
        with pytest.raises(SandboxError, match="never retried"):
            await worker.call("bind", {"user_id": "mallory", "workspace": "/workspace", "uid": 201234, "gid": 201234})
    finally:
        await worker.stop()
    assert slot_mounts(tmp_path) == []


async def test_an_attach_the_workspace_refuses_fails_closed(tmp_path: Path) -> None:
    config = _config(tmp_path)
    workspace = config.workspace_for("eve")
    workspace.parent.mkdir(parents=True, exist_ok=True)
    workspace.mkdir(mode=0o700)
    (workspace / ".bashrc").symlink_to("/etc/shadow")  # a protected path swapped for a symlink
    async with SandboxOrchestrator(config) as pool:
        await _prewarmed(pool)
        claimed = [w["worker_id"] for w in pool.list_workers() if w["user_id"] is None]
        pids = [w["pid"] for w in pool.list_workers()]
        with pytest.raises(IsolationUnavailable, match="symlink"):
            await pool.execute("eve", sh("cat .bashrc"))
        assert all(w["user_id"] is None for w in pool.list_workers())  # nothing bound to eve, half or whole
        assert not set(claimed) & {w["worker_id"] for w in pool.list_workers()}
        await wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "the claimed worker's exit")
        await wait_for(lambda: not any(c in m for c in claimed for m in slot_mounts(tmp_path)), 10, "slot detached")
        assert pool.get_pool_stats()["claim_fallbacks"] == 1
    assert slot_mounts(tmp_path) == []


@pytest.mark.parametrize("returning", [False, True], ids=["new user: the spare", "returning user: attach"])
async def test_a_crash_between_attach_and_bind_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, returning: bool
) -> None:
    config = _config(tmp_path)
    if returning:
        _existing_workspace(config, "frank")
    killed: list[tuple[str, int]] = []

    def crash() -> None:
        inside: list[int] = []
        for info in pool.list_workers():
            if info["user_id"] == "frank" and info["pid"] is not None and not killed:
                killed.append((info["worker_id"], info["pid"]))
                inside = descendants(info["pid"])
                os.kill(info["pid"], signal.SIGKILL)
        # bwrap's exit ends the sandbox, but its processes die a moment later (the pid namespace's
        # init is killed by its parent's death, then takes the rest): wait for every one of them,
        # or a loaded machine lets the worker answer the bind first
        deadline = time.monotonic() + 10
        while killed and any(pid_alive(p) for p in (killed[0][1], *inside)) and time.monotonic() < deadline:
            time.sleep(0.005)

    if returning:  # her own workspace is attached, then the worker dies
        claim = strict.claim_slot

        def attach_then_crash(cfg: Any, slot: slots.Slot, spare: Any, workspace: Path, prepare: Any) -> dict[str, Any]:
            answer = claim(cfg, slot, spare, workspace, prepare)
            assert "spare" not in answer
            crash()
            return answer

        monkeypatch.setattr(strict, "claim_slot", attach_then_crash)
    else:  # the spare is handed over to him, then the worker dies
        from sandbox_core.isolation import spares

        hand_over = spares.Spare.claim

        def hand_over_then_crash(self: Any, workspace: Path) -> dict[str, Any] | None:
            answer = hand_over(self, workspace)
            assert answer is not None
            crash()
            return answer

        monkeypatch.setattr(spares.Spare, "claim", hand_over_then_crash)
    async with SandboxOrchestrator(config) as pool:
        await _prewarmed(pool)
        result = await pool.execute("frank", sh("id -u"))  # the request gets another worker
        assert result.exit_code == 0 and killed and result.worker_id != killed[0][0]
        worker_id, pid = killed[0]
        await wait_for(lambda: not pid_alive(pid), 10, "the crashed worker's exit")
        assert worker_id not in {w["worker_id"] for w in pool.list_workers()}
        await wait_for(lambda: not any(worker_id in m for m in slot_mounts(tmp_path)), 10, "its slot detached")
        assert not (tmp_path / "state" / "slots" / f"{os.getpid()}-{worker_id}").exists()
    assert slot_mounts(tmp_path) == []
    assert _spares(config) == ([], [])


async def test_an_attach_that_fails_midway_mounts_nothing_and_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path)
    _existing_workspace(config, "grace")  # a returning user: her own workspace is attached (a new one takes a spare)
    async with SandboxOrchestrator(config) as pool:
        await _prewarmed(pool)
        monkeypatch.setattr(slots, "move_mount", _failing_final_move(monkeypatch))
        before = {w["worker_id"] for w in pool.list_workers()}
        result = await pool.execute("grace", sh("id -u; ls /workspace | wc -l"))
        assert result.exit_code == 0 and result.worker_id not in before  # spawned for her instead
        assert pool.get_pool_stats()["claim_fallbacks"] == 1
        await wait_for(lambda: not any(w in m for w in before for m in slot_mounts(tmp_path)), 10, "slot detached")
    assert slot_mounts(tmp_path) == []


def _failing_final_move(monkeypatch: pytest.MonkeyPatch) -> Any:
    original = slots.move_mount
    failed: list[str] = []

    def move(from_dfd: int, from_path: str, to_dfd: int, to_path: str, flags: int) -> None:
        if to_dfd == slots.AT_FDCWD and not failed:  # the claim's finished tree onto the slot: refuse it
            failed.append(to_path)  # (the worker spawned for her instead builds its tree the same way)
            raise OSError(22, "injected failure of the final move_mount")
        original(from_dfd, from_path, to_dfd, to_path, flags)

    return move


async def test_stale_slots_of_a_dead_orchestrator_are_swept_at_start(tmp_path: Path) -> None:
    config = _config(tmp_path, min_idle=0)
    state = tenants.state_dir(config)
    slot = slots.Slot.create(state, "stale")
    dead = state / "slots" / "999999999-stale"
    os.rename(slot.path, dead)  # as if its orchestrator (pid 999999999) had died
    assert slot_mounts(tmp_path)
    async with SandboxOrchestrator(config) as pool:
        assert "slot 999999999-stale" in pool.swept
    assert not dead.exists() and slot_mounts(tmp_path) == []


async def test_refill_follows_min_idle_and_demand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox_core import orchestrator

    monkeypatch.setattr(orchestrator, "DEMAND_WINDOW", 600.0)  # every claim of this test counts
    config = _config(tmp_path, min_idle=1, max_workers=5)
    async with SandboxOrchestrator(config) as pool:
        for i in range(3):
            await _prewarmed(pool)
            await pool.execute(f"u{i}", sh("true"))
        assert pool.get_pool_stats()["claimed"] == 3
        # three claims lately: the refill keeps more than min_idle warm, within the cap (3 + 2 = 5)
        await _prewarmed(pool, 2)
        stats = pool.get_pool_stats()
        assert stats["workers"]["total"] <= config.max_workers
        assert stats["workers"]["prewarmed"] + stats["workers"]["starting"] <= 2
    assert slot_mounts(tmp_path) == []


async def test_deny_paths_in_the_workspace_are_covered_at_claim(tmp_path: Path) -> None:
    from sandbox_core.config import StrictIsolation

    config = _config(tmp_path, strict=StrictIsolation(deny_paths=("/workspace/secret", "/workspace/key.pem")))
    assert can_prewarm(config)
    workspace = config.workspace_for("heidi")
    workspace.parent.mkdir(parents=True, exist_ok=True)
    workspace.mkdir(mode=0o700)
    (workspace / "secret").mkdir()
    (workspace / "secret" / "token").write_text("hidden-token")
    (workspace / "key.pem").write_text("hidden-key")
    async with SandboxOrchestrator(config) as pool:
        await _prewarmed(pool)
        script = "cat secret/token key.pem; ls secret; rm -rf secret key.pem; echo done"
        result = await pool.execute("heidi", sh(script))
        assert result.stdout_text.endswith("done\n")
        assert "hidden" not in result.stdout_text + result.stderr_text
        assert pool.get_pool_stats()["claimed"] == 1
        report = pool.worker_report(result.worker_id)
        assert report is not None
        assert set(report["filesystem"]["denied"]) == {"/workspace/secret", "/workspace/key.pem"}
    assert (workspace / "secret" / "token").read_text() == "hidden-token" and (workspace / "key.pem").exists()
    assert slot_mounts(tmp_path) == []


async def test_an_unbound_agent_worker_preloads_before_its_claim_and_binds_single_threaded(tmp_path: Path) -> None:
    """preload = "agent" with unbound strict workers: the worker runs the whole preload while it
    waits (the claim finds it agent-ready), its preload thread is gone before bind switches the
    uid and applies Landlock, and the claimed worker answers the new user's agent run."""
    import dataclasses

    from sandbox_core.kernel import landlock_abi
    from sandbox_core.requests import AgentRequest

    base = _config(tmp_path, preload="agent", request_timeout=90.0)
    config = base.replace(model=dataclasses.replace(base.model, provider="offline"))
    async with SandboxOrchestrator(config) as pool:
        await _prewarmed(pool)
        (unbound,) = [w for w in pool._workers.values() if w.user_id is None]
        await wait_for(lambda: unbound.agent_ready, 90, "the unbound worker to be agent-ready before its claim")
        assert unbound.user_id is None and set(unbound.preload_report["confined"]) == {"before_bind"}
        result = await pool.execute("bob", AgentRequest(prompt="hello"))
        assert result.worker_id == unbound.worker_id and pool.get_pool_stats()["preload"]["failed"] == 0
        assert "".join(e.data.get("text", "") for e in result.events if e.type == "text")
        assert result.result["tools_built"] == 0  # the preload built them for the claim's workspace and HOME
        assert unbound.report["uid"] != 0
        if landlock_abi() > 0:
            assert unbound.report["landlock"]["abi"] > 0  # applied at bind: refused with a second thread
    assert slot_mounts(tmp_path) == []


async def test_the_first_command_on_a_claimed_worker_starts_no_waiter_thread(tmp_path: Path) -> None:
    """A claimed worker's first command is watched by a pidfd on the worker's loop (seccomp
    allows ``pidfd_open``): the worker stays single-threaded while it runs."""
    async with SandboxOrchestrator(_config(tmp_path)) as pool:
        await _prewarmed(pool)
        result = await pool.execute("olga", sh("grep -E '^Threads:' /proc/$PPID/status"))
        assert result.exit_code == 0, result.stderr_text
        assert pool.get_pool_stats()["claimed"] == 1
        assert result.stdout_text.split() == ["Threads:", "1"]
    assert slot_mounts(tmp_path) == []


async def test_the_claims_expectations_are_worked_out_for_the_staged_spares_uid(tmp_path: Path) -> None:
    config = _config(tmp_path)
    async with SandboxOrchestrator(config) as pool:
        await _prewarmed(pool)
        (unbound,) = [w for w in pool._workers.values() if w.user_id is None]
        (name,), _keys = _spares(config)
        spare_uid = tenants.assigned(config)[name]
        prepared = unbound._claim_expected
        assert prepared is not None and (prepared.uid, prepared.gid) == (spare_uid, spare_uid)
        assert prepared.expected.identity == (spare_uid, spare_uid) and prepared.expected.no_capabilities
        result = await pool.execute("petra", sh("id -u"))
        assert result.exit_code == 0 and result.stdout_text.strip() == str(spare_uid)
        report = pool.worker_report(result.worker_id)
        assert report is not None and "identity" in report["verified_by_host"]


async def test_a_claimed_worker_runs_under_the_ruleset_it_built_while_it_waited(tmp_path: Path) -> None:
    """An unbound worker adds every Landlock rule but its workspace's while it waits; the claim
    adds that one (after the attach: a rule holds the mount it was added on) and puts the
    ruleset in force. The user's command writes its workspace, /tmp and HOME and reads the
    system; what only the mounts would allow stays shut (proc is mounted read-write, and a
    process may write its own /proc/self/comm: Landlock gives /proc read rights only)."""
    from sandbox_core.kernel import landlock_abi

    if landlock_abi() == 0:
        pytest.skip("this kernel has no Landlock")
    async with SandboxOrchestrator(_config(tmp_path)) as pool:
        await _prewarmed(pool)
        (unbound,) = [w for w in pool._workers.values() if w.user_id is None]
        script = ('echo a > ws && echo b > /tmp/t && echo c > "$HOME/h" && cat ws /tmp/t "$HOME/h" '
                  '&& head -c1 /usr/bin/env > /dev/null && echo read; '
                  '(echo x > /proc/self/comm) 2> /dev/null && echo comm-written || echo comm-refused')
        result = await pool.execute("nina", sh(script))
        assert result.worker_id == unbound.worker_id and pool.get_pool_stats()["claimed"] == 1
        assert result.stdout_text == "a\nb\nc\nread\ncomm-refused\n", result.stderr_text
        assert unbound.report["landlock"]["abi"] == landlock_abi()
    assert slot_mounts(tmp_path) == []


async def test_a_worker_bound_at_spawn_is_confined_as_a_claimed_one(tmp_path: Path) -> None:
    """A worker spawned for its user (its workspace mounted by bwrap, Landlock put in force by
    the bind the handshake answers) gives its command the same confinement as a claimed
    worker's: its workspace, /tmp and HOME writable, the system readable, what only the mounts
    would allow shut (/proc/self/comm, and /etc, which is read-only anyway)."""
    from sandbox_core.kernel import landlock_abi

    if landlock_abi() == 0:
        pytest.skip("this kernel has no Landlock")
    async with SandboxOrchestrator(_config(tmp_path, min_idle=0)) as pool:
        script = ('echo a > ws && echo b > /tmp/t && echo c > "$HOME/h" && cat ws /tmp/t "$HOME/h" '
                  '&& head -c1 /usr/bin/env > /dev/null && echo read; '
                  '(echo x > /proc/self/comm) 2> /dev/null && echo comm-written || echo comm-refused; '
                  '(echo y > /etc/hostname) 2> /dev/null && echo etc-written || echo etc-refused')
        result = await pool.execute("otto", sh(script))
        assert pool.get_pool_stats()["claimed"] == 0  # spawned for the user, not claimed
        assert result.stdout_text == "a\nb\nc\nread\ncomm-refused\netc-refused\n", result.stderr_text
        report = pool.worker_report(result.worker_id)
        assert report is not None and report["landlock"]["abi"] == landlock_abi()
    assert (_config(tmp_path).workspace_for("otto") / "ws").read_text() == "a\n"
