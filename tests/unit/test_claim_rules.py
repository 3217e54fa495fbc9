"""The rules of claiming a pre-warmed strict worker, in memory: what the host accepts of an
unbound worker, when the attach falls back to spawn-per-user, and how the refill is sized."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import pytest

from sandbox_core import orchestrator
from sandbox_core.config import StrictIsolation
from sandbox_core.errors import IsolationUnavailable
from sandbox_core.isolation import procfs, slots, strict, verify
from sandbox_core.orchestrator import SandboxOrchestrator
from tests.helpers import process_config

ZERO = "0000000000000000"


def _facts(**status: str) -> verify.Facts:
    base = {"Uid": "0\t0\t0\t0", "Gid": "0\t0\t0\t0", "Groups": "", "CapEff": "00000000000000c0",
            "CapPrm": "00000000000000c0", "CapBnd": ZERO, "CapInh": ZERO, "CapAmb": ZERO}  # fmt: skip
    base.update(status)
    snap = procfs.Snapshot(pid=1, status=base, stat=[], limits={}, namespaces={}, environ_names=None, cgroups={})
    return verify.Facts(snap, {}, 0, {})


def test_an_unbound_worker_may_hold_only_setuid_and_setgid_as_root() -> None:
    assert verify._unbound(_facts(), verify.Expected(unbound=True)) is None
    assert verify._unbound(_facts(CapEff=ZERO, CapPrm=ZERO), verify.Expected(unbound=True)) is None


@pytest.mark.parametrize("status", [
    {"CapEff": "00000000002000c0"},  # CAP_SYS_ADMIN as well
    {"CapPrm": "00000000000001c0"},  # CAP_SETPCAP kept
    {"CapBnd": "000001ffffffffff"},  # a bounding set left: exec could regain capabilities
    {"CapAmb": "0000000000000080"},
    {"Uid": "0\t0\t0\t200000"},
    {"Groups": "0"},
])  # fmt: skip
def test_anything_more_fails_the_unbound_check(status: dict[str, str]) -> None:
    assert verify._unbound(_facts(**status), verify.Expected(unbound=True)) is not None


def test_the_unbound_check_runs_only_for_unbound_workers_and_never_survives_a_join() -> None:
    check = next(c for c in verify.CHECKS if c.layer == "unbound")
    assert check.asked(verify.Expected(unbound=True)) and not check.asked(verify.Expected())
    assert not verify.Expected(unbound=True).join(verify.Expected()).unbound


def test_claimed_checks_the_tenants_identity_and_no_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class Pinned:
        pid = 4242
        closed = False

        def close(self) -> None:
            self.closed = True

    def check(proc: Any, expected: Any, report: Any, verified: Any) -> None:
        seen.update(proc=proc, expected=expected)

    monkeypatch.setattr(verify, "_check", check)
    config = process_config(Path("/nonexistent")).replace(profile="strict")
    pinned = Pinned()
    at_start = verify.Verified(verify.Expected(unbound=True), worker_pid=4242, process=pinned)  # type: ignore[arg-type]
    verified = verify.claimed(config, {"profile": "strict"}, at_start, {}, 201000, 201000)
    assert seen["proc"] is pinned and pinned.closed and at_start.process is None  # the process pinned at start
    assert verified.expected.identity == (201000, 201000) and verified.expected.no_capabilities
    assert not verified.expected.unbound and verified.worker_pid == 4242
    with pytest.raises(IsolationUnavailable, match="not kept"):  # a second claim has nothing to read
        verify.claimed(config, {"profile": "strict"}, at_start, {}, 201000, 201000)


def test_claimed_uses_expectations_worked_out_ahead_only_for_the_same_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    class Pinned:
        pid = 4242

        def close(self) -> None:
            pass

    monkeypatch.setattr(verify, "_check", lambda proc, expected, report, verified: seen.append(expected))
    config = process_config(Path("/nonexistent")).replace(profile="strict")
    plan = {"profile": "strict"}
    prepared = verify.claim_expectations(config, plan, 201000, 201000)
    assert prepared.expected == verify.claim_expectations(config, plan, 201000, 201000).expected

    def at_start() -> verify.Verified:
        return verify.Verified(verify.Expected(unbound=True), worker_pid=4242, process=Pinned())  # type: ignore[arg-type]

    assert verify.claimed(config, plan, at_start(), {}, 201000, 201000, prepared).expected is prepared.expected
    other = verify.claimed(config, plan, at_start(), {}, 201001, 201001, prepared)  # another uid: worked out anew
    assert other.expected.identity == (201001, 201001) and seen[-1] is other.expected


def test_what_the_attach_cannot_express_falls_back_to_spawn_per_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slots, "unavailable", lambda: None)
    config = process_config(tmp_path).replace(profile="strict")
    assert strict.can_attach(config) is None
    quota = config.replace(limits=dataclasses.replace(config.limits, workspace_mb=64))
    assert "workspace_mb" in (strict.can_attach(quota) or "")
    denied = config.replace(strict=StrictIsolation(deny_paths=("/etc/passwd",)))
    assert "passwd" in (strict.can_attach(denied) or "")
    workspace_deny = config.replace(strict=StrictIsolation(deny_paths=("/workspace/secrets",)))
    assert strict.can_attach(workspace_deny) is None  # mounted onto the clone at claim
    monkeypatch.setattr(slots, "unavailable", lambda: "the host is not root")
    assert strict.can_attach(config) == "the host is not root"


def test_slots_only_on_root_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "not root" in (slots.unavailable() or "")


def test_a_slot_name_is_never_a_path(tmp_path: Path) -> None:
    for bad in ("", ".", "..", "a/b"):
        with pytest.raises(IsolationUnavailable):
            slots.Slot.create(tmp_path, bad)
    assert not (tmp_path / "slots").exists() or list((tmp_path / "slots").iterdir()) == []


def test_a_guard_target_is_opened_beneath_without_symlinks(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "d")
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        fd = slots._beneath(root, "d/f")
        os.close(fd)
        for bad in ("link/f", "d/../d/f"):
            with pytest.raises((IsolationUnavailable, OSError)):
                os.close(slots._beneath(root, bad))
    finally:
        os.close(root)


def test_the_refill_follows_min_idle_and_recent_claims(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = SandboxOrchestrator(process_config(tmp_path, min_idle=1, max_workers=8))
    assert pool._warm_target() == 1
    now = time.monotonic()
    pool._claims.extend([now - orchestrator.DEMAND_WINDOW - 1, now, now, now])
    assert pool._warm_target() == 3  # the old claim is forgotten
    pool._claims.clear()
    assert pool._warm_target() == 1
    off = SandboxOrchestrator(process_config(tmp_path, min_idle=0, max_workers=8))
    off._claims.extend([now, now])
    assert off._warm_target() == 0  # min_idle = 0: no pre-warming, whatever the demand
