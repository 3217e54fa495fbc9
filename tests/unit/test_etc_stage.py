"""The staged /etc (:mod:`sandbox_core.isolation.etc_stage`) on real files: what a stage holds,
and that every change to a source gives the next launch a new stage, never a stale one."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_core.isolation import etc_stage, runtime


@pytest.fixture(autouse=True)
def _release() -> Iterator[None]:
    """Each test's stages are its own: the locks it took are released, its last stage forgotten."""
    held = len(runtime._held)
    yield
    for fd in runtime._held[held:]:
        os.close(fd)
    del runtime._held[held:]
    etc_stage._last.clear()


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A small host /etc: a file, a symlinked file, a directory of a file, a link and a socket."""
    etc = tmp_path / "etc"
    (etc / "ssl" / "certs").mkdir(parents=True)
    (etc / "nsswitch.conf").write_text("hosts: files\n")
    (tmp_path / "zoneinfo").mkdir()
    (tmp_path / "zoneinfo" / "UTC").write_text("TZif\n")
    (etc / "localtime").symlink_to(tmp_path / "zoneinfo" / "UTC")
    (etc / "ssl" / "certs" / "ca.pem").write_text("cert one\n")
    (etc / "ssl" / "certs" / "abcd.0").symlink_to("/usr/share/ca-certificates/ca.crt")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(etc / "ssl" / "certs" / "agent.sock"))
    return etc


@pytest.fixture
def root(tmp_path: Path) -> Path:
    stage = tmp_path / "stage"
    stage.mkdir(mode=0o755)
    return stage


def _path(entries: list[tuple[str, str]], root: Path) -> str | None:
    staged = etc_stage.staged_etc(entries, root)
    return staged.path if staged is not None else None


def _entries(etc: Path) -> list[tuple[str, str]]:
    return [(name, str(etc / name)) for name in ("nsswitch.conf", "localtime", "ssl/certs", "missing")]


def test_a_stage_holds_the_entries_as_links_and_the_mount_points(host: Path, root: Path) -> None:
    stage = etc_stage.staged_etc(_entries(host), root)
    assert stage is not None and stage.names == ["nsswitch.conf", "localtime", "ssl/certs"]  # not "missing"
    staged = Path(stage.path)
    assert staged.parent == root and staged.name.startswith(etc_stage.PREFIX)
    assert (staged / "nsswitch.conf").read_text() == "hosts: files\n"
    assert (staged / "localtime").read_text() == "TZif\n" and not (staged / "localtime").is_symlink()
    assert (staged / "ssl/certs/ca.pem").read_text() == "cert one\n"
    assert os.readlink(staged / "ssl/certs/abcd.0") == "/usr/share/ca-certificates/ca.crt"
    assert not os.path.lexists(staged / "ssl/certs/agent.sock")  # sockets are never staged
    assert not os.path.lexists(staged / "missing")
    for name in etc_stage.MOUNT_POINTS:
        assert (staged / name).is_file() and (staged / name).stat().st_size == 0
    if os.geteuid() == 0:  # root links (others copy what they do not own)
        assert (staged / "nsswitch.conf").stat().st_ino == (host / "nsswitch.conf").stat().st_ino
    assert (staged.stat().st_mode & 0o777) == 0o755
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_unchanged_sources_give_the_same_stage(host: Path, root: Path) -> None:
    first = _path(_entries(host), root)
    etc_stage._last.clear()  # a new process: looks again, finds the same stage
    assert _path(_entries(host), root) == first
    assert _path(_entries(host), root) == first
    assert len([p for p in root.iterdir() if p.is_dir()]) == 1


def test_a_new_process_takes_the_remembered_stage_only_while_its_sources_hold(
    host: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _path(_entries(host), root)
    assert list(root.glob("etcplan-*.json"))
    walked: list[object] = []
    real = etc_stage._survey

    def survey(entries: tuple[tuple[str, str], ...], stage: Path) -> etc_stage._Survey:
        walked.append(entries)
        return real(entries, stage)

    monkeypatch.setattr(etc_stage, "_survey", survey)
    etc_stage._last.clear()  # a new process
    assert _path(_entries(host), root) == first and not walked  # checked, not walked
    etc_stage._last.clear()
    (host / "ssl/certs/ca2.pem").write_text("cert two\n")
    second = _path(_entries(host), root)
    assert walked and second != first and (Path(second or "") / "ssl/certs/ca2.pem").is_file()
    for check in root.glob("etcplan-*.json"):
        check.write_text("{not json")
    etc_stage._last.clear()
    walked.clear()
    assert _path(_entries(host), root) == second and walked  # a corrupt note: walked again


@pytest.mark.parametrize("change", ["replace a file", "edit a file", "add to a directory", "repoint a symlink",
                                    "remove from a directory"])  # fmt: skip
def test_a_changed_source_gives_a_new_stage(host: Path, root: Path, change: str) -> None:
    before = Path(_path(_entries(host), root) or "")
    if change == "replace a file":
        (host / "new").write_text("hosts: dns\n")
        (host / "new").rename(host / "nsswitch.conf")
    elif change == "edit a file":
        with open(host / "nsswitch.conf", "a") as fh:
            fh.write("passwd: files\n")
        os.utime(host / "nsswitch.conf", ns=(1, 10**9))  # a distinct mtime, whatever the clock's tick
    elif change == "add to a directory":
        (host / "ssl/certs/ca2.pem").write_text("cert two\n")
    elif change == "repoint a symlink":
        (host.parent / "zoneinfo" / "Paris").write_text("TZif paris\n")
        (host / "lt").symlink_to(host.parent / "zoneinfo" / "Paris")
        (host / "lt").rename(host / "localtime")
    else:
        (host / "ssl/certs/ca.pem").unlink()
    after = Path(_path(_entries(host), root) or "")
    assert after != before and after.is_dir() and before.is_dir()  # the old one stays: workers bind it
    assert (after / "nsswitch.conf").read_text() == (host / "nsswitch.conf").read_text()
    assert (after / "localtime").read_text() == (host / "localtime").read_text()
    assert sorted(os.listdir(after / "ssl/certs")) == sorted(
        n for n in os.listdir(host / "ssl/certs") if not n.endswith(".sock"))  # fmt: skip


def test_a_source_that_keeps_changing_while_staged_is_bound_unstaged(
    host: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(etc_stage._Survey, "unchanged", lambda self: False)
    assert _path(_entries(host), root) is None
    assert not list(root.glob(f"{etc_stage.PREFIX}*[!k]"))  # no stage half built, no temporary tree
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_a_stage_root_it_cannot_write_means_no_stage(host: Path, tmp_path: Path) -> None:
    assert _path(_entries(host), tmp_path / "absent") is None


def test_copies_are_checked_file_by_file(host: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a link is impossible (another filesystem; a host that is not root) the files are
    copied, and a copy does not follow its source: every copied file is among the checks."""
    monkeypatch.setattr(runtime.Linkable, "__call__", lambda self, src: False)
    monkeypatch.setattr(os, "link", _no_link)
    before = Path(_path(_entries(host), root) or "")
    assert (before / "ssl/certs/ca.pem").stat().st_ino != (host / "ssl/certs/ca.pem").stat().st_ino
    (host / "ssl/certs/ca.pem").write_text("cert 1!\n")  # same size, in place: its directory is unchanged
    os.utime(host / "ssl/certs/ca.pem", ns=(1, 10**9))
    after = Path(_path(_entries(host), root) or "")
    assert after != before and (after / "ssl/certs/ca.pem").read_text() == "cert 1!\n"


def _no_link(src: str, dst: object, **kwargs: object) -> None:
    raise OSError(18, "Invalid cross-device link")
