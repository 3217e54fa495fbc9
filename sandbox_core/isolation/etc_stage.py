"""The host's /etc entries a strict sandbox sees, staged as one directory bound at /etc.

Bound one by one, the entries cost bwrap a mount, a remount and a read of its mount table
each (~0.25 ms): the 18 of a Debian host were ~4.5 ms of every strict worker's spawn, a
tenth of its cold start. Staged, they are one bind. The stage is ``etc-<key>/`` beside the
runtime stages (:func:`runtime.stage_root`: reachable only through directories no other uid
can write): each file entry hard-linked (copied where a link is impossible), each directory
entry rebuilt with its files linked and its symlinks recreated as they are (they resolve
inside the sandbox, as through a bind), anything else (sockets, devices, fifos) left out,
plus empty mount points for the files the launch generates (passwd, group, hosts).

**What the sandbox sees is what the binds showed at spawn.** A launch checks the identity
(device, inode, size, mtime) of every source it staged, and of every entry as the host's
/etc names it (a symlink re-pointed is a new link): ~40 ``stat`` calls, against the 4.5 ms.
Any change (a file replaced by rename, an entry added to or removed from a directory, a
file edited in place) is a new key and a new stage, built before that launch; a file
edited in place is also seen at once through its hard link, as through a bind. Within a
running worker the one difference from binds: a directory entry (``ssl/certs``) stays as
it was at the worker's spawn, where a bind showed files added later.

Surveying walks the directory entries (``ssl/certs`` and ``alternatives`` hold ~700 symlinks
on a Debian host: ~10 ms); the survey's checks are remembered in ``etcplan-<digest>.json``
beside the stages, so a new process (a one-shot ``sandbox exec``) checks them (~0.3 ms) and
takes the stage they name instead of walking again.

A stage is built under a temporary name and renamed into place, complete or not at all; a
source that changes while it is built makes the build start over (three times, then the
launch binds the entries one by one). Each process holds a shared lock on every stage it
has launched workers with; unheld stages go with the runtime's (:func:`runtime.collect_garbage`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import threading
from collections.abc import Sequence
from pathlib import Path

from sandbox_core.isolation import runtime
from sandbox_core.isolation.probes import sha256

PREFIX = "etc-"
_FORMAT = "1"
MOUNT_POINTS = ("passwd", "group", "hosts")
"""Files the launch mounts its own content over: they exist, empty, so that bwrap can."""
_ATTEMPTS = 3


class _Survey:
    """What one look at the sources found: the stage's content and what to re-check."""

    def __init__(self) -> None:
        self.files: list[tuple[str, str]] = []
        """(path in the stage, host source)."""
        self.links: list[tuple[str, str]] = []
        """(path in the stage, symlink target)."""
        self.dirs: list[tuple[str, int]] = []
        """(path in the stage, mode)."""
        self.checks: dict[tuple[str, bool], bytes] = {}
        """(host path, follow symlinks) -> identity, re-checked at every launch."""

    def key(self, entries: Sequence[tuple[str, str]]) -> str:
        digest = sha256(f"{_FORMAT}\0{MOUNT_POINTS}\0{sorted(entries)}\0".encode())
        for item in (sorted(self.files), sorted(self.links), sorted(self.dirs)):
            digest.update(repr(item).encode())
        for (path, follow), identity in sorted(self.checks.items()):
            digest.update(f"{path}\0{follow}\0".encode() + identity)
        return digest.hexdigest()[:32]

    def unchanged(self) -> bool:
        try:
            return all(runtime.identity(path, follow=follow) == identity
                       for (path, follow), identity in self.checks.items())  # fmt: skip
        except OSError:
            return False


class Staged:
    """A stage to bind at /etc: its host directory and the entries it holds (names below /etc)."""

    def __init__(self, entries: tuple[tuple[str, str], ...], path: str, survey: _Survey) -> None:
        self.entries = entries
        self.path = path
        self.survey = survey
        self.names = [name for name, host in entries if (host, False) in survey.checks]
        """The entries that existed when it was staged (a missing one is not in the stage)."""


_lock = threading.Lock()
_last: dict[str, Staged] = {}
"""The stage each stage root last gave, by root."""


def staged_etc(entries: Sequence[tuple[str, str]], root: Path | None = None) -> Staged | None:
    """The stage to bind at /etc for ``entries`` ((name below /etc, host path)), or None when
    it cannot be staged now (the caller binds the entries one by one)."""
    wanted = tuple(entries)
    with _lock:
        stage = root if root is not None else runtime.stage_root()
        last = _last.get(str(stage))
        if last is not None and last.entries == wanted and last.survey.unchanged():
            return last
        try:
            recalled = _recall(stage, wanted) if last is None else None
            if recalled is not None:  # a new process: the last survey of these entries still holds
                name, survey = recalled
                runtime.hold(stage / f"{name}.lock")  # before the look: no collection after it
                if (stage / name).is_dir():
                    _last[str(stage)] = Staged(wanted, str(stage / name), survey)
                    return _last[str(stage)]
            for _ in range(_ATTEMPTS):
                survey = _survey(wanted, stage)
                final = stage / f"{PREFIX}{survey.key(wanted)}"
                runtime.hold(stage / f"{final.name}.lock")
                if not final.is_dir() and not _build(survey, stage, final):
                    continue  # a source changed while it was staged: look again
                if last is None or last.path != str(final):
                    runtime.collect_garbage(stage, keep=final.name)
                _last[str(stage)] = Staged(wanted, str(final), survey)
                _remember(stage, wanted, final.name, survey)
                return _last[str(stage)]
        except OSError:
            pass
        return None


# ---------------------------------------------------------------- the last survey, remembered


def _check_file(stage: Path, entries: tuple[tuple[str, str], ...]) -> Path:
    """Where the last survey of ``entries`` is remembered (a walk of /etc/ssl/certs and
    /etc/alternatives, ~700 symlinks, is ~10 ms; checking what it found, ~0.2 ms)."""
    return stage / f"etcplan-{sha256(repr(entries).encode()).hexdigest()[:24]}.json"


def _remember(stage: Path, entries: tuple[tuple[str, str], ...], name: str, survey: _Survey) -> None:
    checks = [[path, follow, identity.decode()] for (path, follow), identity in sorted(survey.checks.items())]
    runtime.write_note(_check_file(stage, entries), {"stage": name, "checks": checks})


def _recall(stage: Path, entries: tuple[tuple[str, str], ...]) -> tuple[str, _Survey] | None:
    try:
        saved = json.loads(_check_file(stage, entries).read_text())
        name, checks = saved["stage"], saved["checks"]
        if not isinstance(name, str) or not re.fullmatch(rf"{PREFIX}[0-9a-f]{{32}}", name):
            return None
        survey = _Survey()
        for path, follow, identity in checks:
            if not isinstance(path, str) or not isinstance(follow, bool) or not isinstance(identity, str):
                return None
            survey.checks[(path, follow)] = identity.encode()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (name, survey) if survey.checks and survey.unchanged() else None


def _survey(entries: tuple[tuple[str, str], ...], stage: Path) -> _Survey:
    survey = _Survey()
    linkable = runtime.Linkable(stage.stat().st_dev)
    for name, host in entries:
        if not os.path.lexists(host):
            continue
        survey.checks[(host, False)] = runtime.identity(host, follow=False)
        source = os.path.realpath(host)
        survey.checks[(source, True)] = runtime.identity(source)
        if os.path.isdir(source):
            _survey_tree(survey, source, name, linkable)
        elif os.path.isfile(source):
            survey.files.append((name, source))
    return survey


def _survey_tree(survey: _Survey, top: str, name: str, linkable: runtime.Linkable) -> None:
    """A directory entry: its directories (checked: an entry added, removed or renamed changes
    their mtime), its symlinks as they are, its files (checked too where they are copied)."""
    for here, dirs, files in os.walk(top):
        rel = os.path.relpath(here, top)
        base = name if rel == "." else f"{name}/{rel}"
        survey.dirs.append((base, stat.S_IMODE(os.stat(here).st_mode)))
        survey.checks[(here, True)] = runtime.identity(here)
        for entry in sorted([*dirs, *files]):
            path = os.path.join(here, entry)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                survey.links.append((f"{base}/{entry}", os.readlink(path)))
                dirs[:] = [d for d in dirs if d != entry]  # os.walk does not follow it either
            elif stat.S_ISREG(st.st_mode):
                survey.files.append((f"{base}/{entry}", path))
                if not linkable(path):
                    survey.checks[(path, True)] = runtime.identity(path)


def _build(survey: _Survey, stage: Path, final: Path) -> bool:
    """Stage ``survey`` at ``final``; False (and nothing left) when a source changed meanwhile."""
    return runtime.build_stage(stage, final, lambda tmp: _populate(survey, tmp))


def _populate(survey: _Survey, tmp: Path) -> bool:
    tmp.mkdir(mode=0o755)
    made: set[str] = {str(tmp)}
    for name, mode in sorted(survey.dirs):
        runtime.mkdirs((tmp / name).parent, made)
        (tmp / name).mkdir(mode=0o700, exist_ok=True)
        os.chmod(tmp / name, mode & 0o755)
    for name, target in survey.links:
        os.symlink(target, tmp / name)
    for name, source in survey.files:
        runtime.mkdirs((tmp / name).parent, made)
        try:
            os.link(source, tmp / name, follow_symlinks=False)
        except OSError:  # another filesystem, or protected_hardlinks: a copy (checked by identity)
            shutil.copy2(source, tmp / name, follow_symlinks=False)
    for name in MOUNT_POINTS:
        if not (tmp / name).exists():
            (tmp / name).touch(mode=0o644)
    tmp.chmod(0o755)
    return survey.unchanged()
