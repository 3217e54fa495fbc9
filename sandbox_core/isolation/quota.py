"""Disk quotas per workspace: each workspace is its own ext4 filesystem image, mounted at it.

The host's root filesystem has no project quotas (ext4 needs them switched on while it is
unmounted), so a byte and inode quota the kernel enforces is a filesystem of the workspace's
own: ``<state_dir>/images/<user>.img`` (root's, 0600, outside every tree a sandbox can see),
made with ``mkfs.ext4 -m 0 -N INODES -E root_owner=UID:GID`` (no reserved blocks: the host's
``/`` reserves them for uid 65534), loop-mounted ``nosuid,nodev`` at the workspace. Writing past
``limits.workspace_mb`` fails with ``ENOSPC`` inside, and so does creating a file past
``limits.workspace_inodes``; the host's disk only ever holds the image (sparse up to its size).

The image is prepared on a private mount point below the state directory (its ``lost+found``
removed there, before any sandbox sees it), then mounted at the workspace. A workspace that
already holds files outside an image is refused (mounting would hide them), and so is every
configured quota that cannot be enforced here (not root, no ``mkfs.ext4``, no loop devices):
the worker does not start. The mount stays after the worker stops (it *is* the workspace);
:func:`release` unmounts it when no worker uses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from sandbox_core.config import ProcessSandboxConfig
from sandbox_core.errors import IsolationUnavailable
from sandbox_core.isolation import tenants

MECHANISM = "ext4 image per workspace (loop mount)"
MOUNT_OPTIONS = "loop,nosuid,nodev,noatime"
_TIMEOUT = 60


def configured(config: ProcessSandboxConfig) -> bool:
    return bool(config.limits.workspace_mb or config.limits.workspace_inodes)


def describe(config: ProcessSandboxConfig) -> dict[str, Any] | bool:
    """The handshake report's ``disk_quota`` entry (False when none is configured)."""
    if not configured(config):
        return False
    return {"mechanism": MECHANISM, "workspace_mb": config.limits.workspace_mb or None,
            "workspace_inodes": config.limits.workspace_inodes or None}


def unavailable(config: ProcessSandboxConfig) -> str | None:
    """Why a configured quota cannot be enforced here, or None."""
    if config.profile != "strict":
        return "disk quotas need the strict profile"
    if os.geteuid() != 0:
        return "disk quotas need the orchestrator to run as root (it mounts each workspace's image)"
    if not config.limits.workspace_mb:
        return "limits.workspace_inodes needs limits.workspace_mb (the image's size) too"
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: e2fsprogs, mount)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control)"
    return None


def _image(config: ProcessSandboxConfig, key: str) -> Path:
    return config.state_dir / "images" / f"{key}.img"


def ensure(config: ProcessSandboxConfig, key: str, workspace: Path, owner: tuple[int, int]) -> None:
    """Mount ``key``'s image at ``workspace`` (made on first use), or IsolationUnavailable."""
    why = unavailable(config)
    if why is not None:
        raise IsolationUnavailable(f"limits.workspace_mb is set but cannot be enforced: {why}",
                                   data={"field": "limits.workspace_mb", "value": config.limits.workspace_mb})
    tenants.state_dir(config)  # ours, nobody else's to write
    image = _image(config, key)
    image.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = os.open(image.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two orchestrators must not mount one image twice
        _ensure_locked(config, key, workspace, owner, image)
    finally:
        os.close(lock)


def _ensure_locked(config: ProcessSandboxConfig, key: str, workspace: Path, owner: tuple[int, int],
                   image: Path) -> None:  # fmt: skip
    if mounted_image(workspace) is not None:
        check(config, key, workspace)
        return
    with contextlib.suppress(FileNotFoundError), os.scandir(workspace) as entries:
        if any(entries):
            raise IsolationUnavailable(
                f"{workspace} holds files outside a quota image; move them out (or into the image once it is "
                "mounted) before enabling limits.workspace_mb for this user",
                data={"field": "limits.workspace_mb", "value": config.limits.workspace_mb})
    if not image.exists():
        _make(config, image, owner)
    _run(["mount", "-o", MOUNT_OPTIONS, str(image), str(workspace)])
    check(config, key, workspace)


def _make(config: ProcessSandboxConfig, image: Path, owner: tuple[int, int]) -> None:
    tmp = image.with_name(f".{image.name}.{os.getpid()}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, config.limits.workspace_mb * 1024 * 1024)
    finally:
        os.close(fd)
    try:
        inodes = ["-N", str(config.limits.workspace_inodes)] if config.limits.workspace_inodes else []
        _run(["mkfs.ext4", "-q", "-F", "-m", "0", *inodes, "-E", f"root_owner={owner[0]}:{owner[1]}", str(tmp)])
        staging = image.parent / f".mnt-{os.getpid()}"
        staging.mkdir(mode=0o700, exist_ok=True)
        _run(["mount", "-o", MOUNT_OPTIONS, str(tmp), str(staging)])
        try:
            (staging / "lost+found").rmdir()  # our own fresh filesystem: nobody else has seen it
            os.chmod(staging, 0o700)
        finally:
            _run(["umount", str(staging)])
            staging.rmdir()
        os.rename(tmp, image)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def mounted_image(workspace: Path, mountinfo: str | None = None) -> str | None:
    """The device mounted exactly at ``workspace`` (e.g. ``/dev/loop3``), or None."""
    text = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    target = str(workspace)
    found = None
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split(" ")
        if sep and len(fields) > 4 and fields[4].replace("\\040", " ") == target:
            found = right.split(" ")[1]  # the last mount at a path is the one in force
    return found


def check(config: ProcessSandboxConfig, key: str, workspace: Path) -> None:
    """Fail closed unless ``workspace`` is the mount of ``key``'s image."""
    device = mounted_image(workspace)
    image = _image(config, key)
    backing = _backing_file(device) if device else None
    if backing is None or os.path.realpath(backing) != os.path.realpath(image):
        raise IsolationUnavailable(
            f"{workspace} is not the mount of its quota image {image} (it is {device or 'not a mount point'})",
            data={"field": "limits.workspace_mb", "value": config.limits.workspace_mb})


def _backing_file(device: str) -> str | None:
    name = os.path.basename(device)
    try:
        return Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def release(config: ProcessSandboxConfig, workspace: Path) -> bool:
    """Unmount the image at ``workspace`` (its loop device goes with it); whether one was."""
    if mounted_image(workspace) is None:
        return False
    _run(["umount", str(workspace)])
    return True


def _run(argv: list[str]) -> None:
    try:
        subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT, check=True)
    except subprocess.CalledProcessError as exc:
        raise IsolationUnavailable(f"{' '.join(argv[:2])} failed: {(exc.stderr or exc.stdout).strip()[:300]}",
                                   data={"field": "limits.workspace_mb"}) from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IsolationUnavailable(f"{argv[0]} failed: {exc}", data={"field": "limits.workspace_mb"}) from None
