"""Files in and out (``pool.files``): through the user's sandbox, never following what it planted."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

from sandbox_core.config import ProcessSandboxConfig, ResourceLimits
from sandbox_core.errors import FileTransferError, LimitExceeded
from sandbox_core.orchestrator import SandboxOrchestrator
from sandbox_core.requests import ExecRequest
from sandbox_core.tarstream import TransferError, unpack
from tests.helpers import process_config

AS_ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")


def _strict(tmp_path: Path, **changes: object) -> ProcessSandboxConfig:
    return process_config(tmp_path / "ws", state_dir=tmp_path / "state", **changes).replace(profile="strict")


def _tree(top: Path) -> None:
    (top / "sub" / "deeper").mkdir(parents=True)
    (top / "bin.dat").write_bytes(os.urandom(300_000) + bytes(range(256)))
    (top / "sub" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (top / "sub" / "run.sh").chmod(0o755)
    (top / "sub" / "secret").write_bytes(b"\x00\xffsecret")
    (top / "sub" / "secret").chmod(0o600)
    (top / "sub" / "deeper" / "ro.txt").write_text("read only")
    (top / "sub" / "deeper" / "ro.txt").chmod(0o444)
    (top / "link-in").symlink_to("sub/run.sh")
    (top / "link-out").symlink_to("/etc/hostname")
    (top / "sub" / "deeper").chmod(0o750)


def _digest(top: Path) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for path in sorted([top, *top.rglob("*")]):
        st = path.lstat()
        rel = str(path.relative_to(top))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", oct(stat.S_IMODE(st.st_mode)))
        else:
            out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), oct(stat.S_IMODE(st.st_mode)))
    return out


async def test_a_tree_round_trips_with_binary_files_symlinks_and_modes(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    _tree(project)
    config = _strict(tmp_path)
    async with SandboxOrchestrator(config) as pool:
        summary = await pool.files.put("alice", "src", project)
        assert summary["files"] == 4 and summary["symlinks"] == 2 and summary["dirs"] == 3
        seen = await pool.execute("alice", ExecRequest(shell="id -u; cat src/sub/secret | od -c | head -1; "
                                                             "./src/sub/run.sh; readlink src/link-out"))
        uid, _, said, link = seen.stdout_text.splitlines()
        assert said == "hi" and link == "/etc/hostname"
        workspace = config.workspace_root / "alice"
        if AS_ROOT:
            owners = {p.lstat().st_uid for p in (workspace / "src").rglob("*")}
            assert owners == {int(uid)} == {workspace.stat().st_uid}  # landed as the user's uid
        back = tmp_path / "back"
        back.mkdir()
        await pool.files.get_path("alice", "src", back)
        assert _digest(back / "src") == _digest(project)
        await pool.files.get_path("alice", "src", tmp_path / "renamed")  # cp -r: a new name
        assert _digest(tmp_path / "renamed") == _digest(project)
        listing = {row["name"]: row for row in await pool.files.list("alice", "src")}
        assert listing["link-out"]["type"] == "symlink" and listing["sub"]["type"] == "dir"
        assert (await pool.files.stat("alice", "src/link-in"))["target"] == "sub/run.sh"
        assert await pool.files.get("alice", "src/sub/secret") == b"\x00\xffsecret"
        await pool.files.remove("alice", "src", recursive=True)
        assert await pool.files.list("alice", ".") == [r for r in await pool.files.list("alice") if r["name"] != "src"]
        with pytest.raises(FileTransferError, match="no such") as missing:
            await pool.files.stat("alice", "src")
        assert missing.value.data["reason"] == "not_found"


async def test_a_planted_symlink_never_redirects_a_write(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("host data\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    config = _strict(tmp_path)
    async with SandboxOrchestrator(config) as pool:
        workspace = config.workspace_root / "alice"
        plant = f"ln -s {victim} evil; ln -s ../../victim.txt evil-rel; ln -s {outside} evildir; ln -s /etc etc"
        await pool.execute("alice", ExecRequest(shell=plant))
        assert os.readlink(workspace / "evil") == str(victim)  # on the host it points at the victim
        await pool.files.put("alice", "evil", b"sandbox bytes")
        await pool.files.put("alice", "evil-rel", b"sandbox bytes")
        for name in ("evildir/x", "etc/x", "evildir/deeper/x"):
            with pytest.raises(FileTransferError, match="not a directory") as refused:
                await pool.files.put("alice", name, b"sandbox bytes")
            assert refused.value.data["reason"] == "not_a_directory"
        assert victim.read_text() == "host data\n" and list(outside.iterdir()) == []
        assert (workspace / "evil").read_bytes() == b"sandbox bytes" and not (workspace / "evil").is_symlink()
        assert not (workspace / "evil-rel").is_symlink()
        with pytest.raises(FileTransferError):
            await pool.files.put("alice", "../escape", b"x")
        assert not (config.workspace_root / "escape").exists()


async def test_transfers_are_bounded_by_transfer_mb(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    config = _strict(tmp_path, limits=ResourceLimits(transfer_mb=1))
    async with SandboxOrchestrator(config) as pool:
        with pytest.raises(LimitExceeded, match=r"limits.transfer_mb \(1 MiB\)"):
            await pool.files.put("alice", "big.bin", big)
        await pool.execute("alice", ExecRequest(shell="head -c 3000000 /dev/zero > made.bin"))
        with pytest.raises(LimitExceeded, match="larger than"):
            await pool.files.get("alice", "made.bin")


# ---------------------------------------------------------------- unpacking an untrusted stream


def _tar(*members: tuple[str, bytes, str]) -> io.BytesIO:
    """A tar of (name, data, kind) with kind file, dir, symlink (data = target) or hardlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as archive:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE}[kind]
            info.linkname = data.decode()
            archive.addfile(info)
    buf.seek(0)
    return buf


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([("../x", b"x", "file")], "bad_name"),
        ([("/abs", b"x", "file")], "bad_name"),
        ([("link", b"VICTIM", "symlink"), ("link/x", b"x", "file")], "not_a_directory"),
        ([("h", b"/etc/passwd", "hardlink")], "unsupported"),
        ([("f", b"", "fifo")], "unsupported"),
    ],
)
def test_an_untrusted_stream_cannot_write_outside(tmp_path: Path, members: list[tuple[str, bytes, str]],
                                                  reason: str) -> None:  # fmt: skip
    victim = tmp_path / "victim"
    victim.mkdir()
    dest = tmp_path / "dest" / "inner"
    dest.mkdir(parents=True)
    members = [(n, d.replace(b"VICTIM", str(victim).encode()), k) for n, d, k in members]
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(TransferError) as refused:
            unpack(_tar(*members), fd, [])
    finally:
        os.close(fd)
    assert refused.value.reason == reason
    assert list(victim.iterdir()) == [] and not (tmp_path / "dest" / "x").exists() and not Path("/abs").exists()


def test_an_existing_symlink_or_hard_link_is_replaced_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "a").symlink_to(victim)
    os.link(victim, dest / "b")
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        unpack(_tar(("a", b"new a", "file"), ("b", b"new b", "file")), fd, [])
    finally:
        os.close(fd)
    assert victim.read_text() == "keep"
    assert (dest / "a").read_bytes() == b"new a" and not (dest / "a").is_symlink()
    assert (dest / "b").read_bytes() == b"new b"
