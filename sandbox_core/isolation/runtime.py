"""The Python a strict worker runs on: staged once on the host, mounted at ``/opt/sandbox``.

The interpreter, its standard library, the third-party packages the inside imports (the
closure of :data:`INSIDE_DISTRIBUTIONS`) and the ``sandbox_core`` package are hard-linked
(copied where a link is impossible) into ``<stage>/<key>/`` and bound read-only at
:data:`SANDBOX_ROOT` as one mount. Why not bind them where they are: a bind mount shows its
source in ``/proc/self/mountinfo`` (the "root" field is the path within the source
filesystem), so binding the interpreter, the venv and the checkout in place tells the sandbox
where each lives on the host. A staged tree shows only the stage path. Only what the worker
needs is staged: no dev tools of the venv, no base site-packages, no test suites.

The key is a digest of every staged source path and of the identity and mtime of every
source directory: a file added, removed or replaced (by rename) changes a directory's mtime
and so the key; a file edited in place needs nothing, as its hard link shares the inode
(files that have to be copied add their own identity, size and mtime to the key). A stage
is built under a temporary name and renamed into place, so it is complete once it exists,
and it is never written again. Each host process holds a shared ``flock`` on the lock file
of the stage it uses, and touches that lock file when it takes it; a stage whose lock nobody
holds and nobody took for :data:`STAGE_KEEP_SECONDS` is garbage and removed when a new one is
built.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import importlib.util
import json
import os
import re
import shutil
import stat
import struct
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox_core.errors import IsolationUnavailable
from sandbox_core.isolation.probes import sha256
from sandbox_core.isolation.spec import PACKAGE_ROOT
from sandbox_core.valueclass import dataclass

if TYPE_CHECKING:
    import importlib.metadata

SANDBOX_ROOT = "/opt/sandbox"
"""Where the staged runtime appears inside the sandbox."""
INSIDE_DISTRIBUTIONS = ("anthropic",)
"""Third-party distributions the inside imports (their dependencies are found from metadata)."""
_FORMAT = "1"
"""Bumped when the layout of a stage changes."""
_STDLIB_SKIP_TOP = frozenset({"site-packages", "dist-packages", "idlelib", "tkinter", "turtledemo", "ensurepip"})
_SKIP_ANYWHERE = frozenset({"test", "tests", "idle_test"})
TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 24 * 3600
STAGE_KEEP_SECONDS = 3600
"""How long an unheld stage is kept after a process last took it: two checkouts (or an old and
a new install) used in turns each find their stage, instead of rebuilding it (~0.5 s) every
time the other collected it."""
_DT_NULL, _DT_STRTAB, _DT_RPATH, _DT_RUNPATH = 0, 5, 15, 29
_PT_LOAD, _PT_DYNAMIC = 1, 2
_EXTRA = re.compile(r"\bextra\s*==")


@dataclass(frozen=True)
class Runtime:
    """A staged runtime: its host directory and the paths the worker uses inside."""

    host_dir: str
    executable: str
    app_dir: str
    site_dir: str


@dataclass
class _Plan:
    """What a stage holds: files to link, files to copy and patch, directories that key it."""

    links: list[tuple[str, str]] = field(default_factory=list)
    """(path in the stage, host source)."""
    interpreter: tuple[str, str] = ("", "")
    libdir: tuple[str, str] | None = None
    """(libpython's directory in the stage, on the host): the interpreter's RUNPATH is relinked."""
    dirs: set[str] = field(default_factory=set)
    compiled: list[tuple[str, str]] = field(default_factory=list)
    """(bytecode path in the stage, host source): sources of the app and the packages whose
    ``.pyc`` is missing or stale on the host, compiled into the stage (:func:`_compile_missing`)."""


def inside_executable() -> str:
    """The interpreter's path inside the sandbox (known without staging anything)."""
    return f"{SANDBOX_ROOT}/python/{_interpreter_rel()}"


def app_dir() -> str:
    """The directory inside the sandbox that holds ``sandbox_core``."""
    return f"{SANDBOX_ROOT}/app"


@functools.cache
def runtime() -> Runtime:
    """The staged runtime of this host process (built on first use, then kept for its life).

    Planning walks the whole standard library and reads package metadata (about 0.1 s); a
    process whose last plan's directories are all unchanged (:func:`_unchanged_key`) takes
    that plan's key instead, which is what a fresh plan would have given.
    """
    stage = stage_root()
    key = _unchanged_key(stage)
    if key is not None:
        hold(stage / f"{key}.lock")
        if (stage / key).is_dir():
            return Runtime(str(stage / key), inside_executable(), app_dir(), f"{SANDBOX_ROOT}/lib")
    plan = _plan()
    key, copied = _key(plan, stage)
    final = stage / key
    hold(stage / f"{key}.lock")
    if not final.is_dir():
        _build(plan, stage, final)
        collect_garbage(stage, keep=key)
    _remember(stage, key, [*plan.dirs, plan.interpreter[1], *copied])
    return Runtime(str(final), inside_executable(), app_dir(), f"{SANDBOX_ROOT}/lib")


# ---------------------------------------------------------------- the last plan, remembered


def _check_file(stage: Path) -> Path:
    """Where this interpreter, venv, search path and checkout remember their last plan's key."""
    whose = f"{_FORMAT}\0{sys.version}\0{os.path.realpath(sys.executable)}\0{sys.prefix}\0{PACKAGE_ROOT}\0{sys.path}"
    return stage / f"plan-{sha256(whose.encode()).hexdigest()[:24]}.json"


def _remember(stage: Path, key: str, paths: list[str]) -> None:
    """Note ``key`` with the identity of every directory (and copied file) its plan read."""
    try:
        check = {"key": key, "paths": {path: identity(path).decode() for path in sorted(set(paths))}}
    except OSError:
        return  # only a cache: the next process plans again
    write_note(_check_file(stage), check)


def write_note(target: Path, data: object) -> None:
    """Replace the JSON note ``target`` whole (a temporary file renamed over it); a note that
    cannot be written is skipped: notes only spare the next process a look it can take again."""
    tmp = target.with_name(f"{TMP_PREFIX}{target.name}-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data))
        tmp.replace(target)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _unchanged_key(stage: Path) -> str | None:
    """The last plan's key if none of what it read changed (else None: plan again).

    A plan is the listing of its directories and the identity of what it copies. Adding,
    removing or renaming an entry changes its directory's mtime, so the same identities
    mean the same listings and the same plan; an installed or removed distribution changes
    its site directory, which is among them.
    """
    try:
        check = json.loads(_check_file(stage).read_text())
        key, paths = check["key"], check["paths"]
        if not isinstance(key, str) or not re.fullmatch(r"[0-9a-f]{32}", key) or not isinstance(paths, dict):
            return None
        for path, seen in paths.items():
            if identity(path).decode() != seen:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return key


# ---------------------------------------------------------------- what to stage


def _interpreter_rel() -> str:
    exe = os.path.realpath(sys.executable)
    base = os.path.realpath(sys.base_exec_prefix)
    rel = os.path.relpath(exe, base)
    return rel if not rel.startswith("..") else f"bin/{os.path.basename(exe)}"


def _plan() -> _Plan:
    plan = _Plan()
    base_prefix, base_exec = os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)
    plan.interpreter = (f"python/{_interpreter_rel()}", os.path.realpath(sys.executable))
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and soname:
        lib = os.path.realpath(libdir)
        rel = os.path.relpath(lib, base_exec)
        dest = f"python/{rel}" if not rel.startswith("..") else "python/lib"
        plan.links.append((f"{dest}/{soname}", os.path.realpath(os.path.join(lib, soname))))
        plan.libdir = (dest, lib)
    seen: set[str] = set()
    for key, base in (("stdlib", base_prefix), ("platstdlib", base_exec)):
        tree = os.path.realpath(sysconfig.get_path(key))
        rel = os.path.relpath(tree, base)
        if tree in seen or rel.startswith("..") or not os.path.isdir(tree):
            continue
        seen.add(tree)
        _add_tree(plan, tree, f"python/{rel}", stdlib=True)
    stdlib_links = len(plan.links)
    _add_distributions(plan)
    _add_tree(plan, os.path.join(PACKAGE_ROOT, "sandbox_core"), "app/sandbox_core", stdlib=False)
    _compile_missing(plan, start=stdlib_links)
    return plan


def _compile_missing(plan: _Plan, start: int = 0) -> None:
    """Plan bytecode for each staged source (from ``plan.links[start:]``) that has none fresh.

    A worker runs with ``-B`` on a read-only stage: a module without a valid ``.pyc`` there is
    compiled from source at every start of every worker (a strict start without any host
    bytecode took 47-57 ms against 34-40 with it). The host's ``.pyc`` are linked when they are fresh; an
    install without bytecode (``uv`` writes none by default, the host never imports the inside,
    ``PYTHONDONTWRITEBYTECODE`` stops the rest) or a source edited since its ``.pyc`` was
    written gets its bytecode compiled into the stage instead, and the stale link is dropped.
    The standard library is left as installed (its ``.pyc`` ship with the interpreter).
    """
    links = plan.links[start:]
    linked = {dest for dest, _ in links}
    stale: set[str] = set()
    for dest, src in links:
        if not dest.endswith(".py") or "/__pycache__/" in dest:
            continue
        name = os.path.basename(dest)[:-3]
        pyc = f"{os.path.dirname(dest)}/__pycache__/{name}.{sys.implementation.cache_tag}.pyc"
        if pyc in linked and _fresh(importlib.util.cache_from_source(src), src):
            continue
        stale.add(pyc)
        plan.compiled.append((pyc, src))
    if stale:
        plan.links[start:] = [(dest, src) for dest, src in links if dest not in stale]


def _fresh(pyc: str, src: str) -> bool:
    """Whether ``pyc`` is bytecode Python would take for ``src`` (its timestamp header matches,
    or it is hash-based)."""
    try:
        with open(pyc, "rb") as fh:
            header = fh.read(16)
        st = os.stat(src)
    except OSError:
        return False
    if len(header) < 16 or header[:4] != importlib.util.MAGIC_NUMBER:
        return False
    flags, mtime, size = struct.unpack("<III", header[4:16])
    if flags != 0:  # hash-based: checked against the source by Python, or never
        return True
    return bool(mtime == (int(st.st_mtime) & 0xFFFFFFFF) and size == (st.st_size & 0xFFFFFFFF))


def _add_tree(plan: _Plan, top: str, dest: str, *, stdlib: bool) -> None:
    """Every file below ``top`` (minus test suites, and in the stdlib the skipped packages)."""
    for root, dirs, files in os.walk(top):
        rel = os.path.relpath(root, top)
        skip = (_SKIP_ANYWHERE | (_STDLIB_SKIP_TOP if rel == "." else frozenset())) if stdlib else frozenset()
        dirs[:] = sorted(d for d in dirs if d not in skip and not (stdlib and rel == "." and d.startswith("config-")))
        plan.dirs.add(root)
        base = dest if rel == "." else f"{dest}/{rel}"
        plan.links += [(f"{base}/{name}", f"{root}/{name}") for name in files]


def _add_distributions(plan: _Plan) -> None:
    """The inside's distributions and their dependencies: each top-level entry of their RECORDs.

    A top-level package is staged whole (with its bytecode); a namespace package shared with
    a distribution outside the closure would come along too, which is harmless.
    """
    for dist in _closure(INSIDE_DISTRIBUTIONS):
        record = dist.read_text("RECORD")
        if record is None:
            raise IsolationUnavailable(f"{dist.metadata['Name']} has no RECORD; reinstall it with pip or uv")
        site = str(dist.locate_file(""))
        plan.dirs.add(site)
        tops = {line.split(",", 1)[0].split("/", 1)[0] for line in record.splitlines() if line.strip()}
        for top in sorted(tops - {"..", "__pycache__", ""}):
            src = os.path.join(site, top)
            if os.path.isdir(src):
                _add_tree(plan, src, f"lib/{top}", stdlib=False)
            elif os.path.isfile(src) and not top.endswith(".pth"):
                plan.links.append((f"lib/{top}", src))
                if top.endswith(".py"):
                    _add_bytecode(plan, src, "lib")


def _add_bytecode(plan: _Plan, src: str, dest_dir: str) -> None:
    cached = importlib.util.cache_from_source(src)
    if os.path.isfile(cached):
        plan.links.append((f"{dest_dir}/__pycache__/{os.path.basename(cached)}", cached))
        plan.dirs.add(os.path.dirname(cached))


def _closure(names: tuple[str, ...]) -> list[importlib.metadata.Distribution]:
    """The installed distributions ``names`` need (requirements behind an extra are left out).

    Other markers are not evaluated: a dependency that is installed is staged (one that a
    marker excludes is then staged needlessly, never missed).
    """
    import importlib.metadata  # slow to import, and only a fresh plan needs it

    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in found:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            if name in names:
                raise IsolationUnavailable(f"{name} is not installed in {sys.prefix}") from None
            continue
        found[key] = dist
        todo += [_requirement_name(r) for r in dist.requires or () if not _EXTRA.search(r)]
    return [found[k] for k in sorted(found)]


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(@]", requirement.strip(), maxsplit=1)[0]


# ---------------------------------------------------------------- the key


def _key(plan: _Plan, stage: Path) -> tuple[str, list[str]]:
    """The stage's name for ``plan``, and the sources it copies (keyed by their identity)."""
    digest = sha256(f"{_FORMAT}\0{sys.version}\0".encode())
    linkable = Linkable(stage.stat().st_dev)
    copied = []
    for dest, src in sorted(plan.links):
        digest.update(f"{dest}\0{src}\0".encode())
        if not linkable(src):
            digest.update(identity(src))
            copied.append(src)
    for dest, src in sorted(plan.compiled):  # bytecode made from the source as it is now
        digest.update(f"compile\0{dest}\0{src}\0".encode() + identity(src))
        copied.append(src)
    digest.update(identity(plan.interpreter[1]))
    for path in sorted(plan.dirs):
        digest.update(path.encode() + b"\0" + identity(path))
    return digest.hexdigest()[:32], copied


def identity(path: str, *, follow: bool = True) -> bytes:
    """What changes when ``path`` (or, not following, the link itself) is replaced or edited."""
    st = os.stat(path, follow_symlinks=follow)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}\0".encode()


class Linkable:
    """Whether a hard link will stand for a source file: same filesystem as the stage, and
    root (``fs.protected_hardlinks`` lets other users link only files they own; they copy)."""

    def __init__(self, stage_dev: int) -> None:
        self._stage_dev = stage_dev
        self._dirs: dict[str, bool] = {}

    def __call__(self, src: str) -> bool:
        parent = os.path.dirname(src)
        if parent not in self._dirs:
            self._dirs[parent] = os.geteuid() == 0 and os.stat(parent).st_dev == self._stage_dev
        return self._dirs[parent]


# ---------------------------------------------------------------- building


def stage_root() -> Path:
    """The directory stages live in, which no other uid can write or swap (checked up to ``/``).

    The worker's own code runs from it, before it confines itself: whoever could replace a
    stage could run code in every sandbox ahead of its uid switch.
    """
    root = Path("/var/cache/sandbox/runtime") if os.geteuid() == 0 else Path.home() / ".cache/sandbox/runtime"
    try:
        for path in [*reversed(root.parents), root]:
            if not path.exists():
                path.mkdir(mode=0o755)
                path.chmod(0o755)
    except OSError as exc:
        raise IsolationUnavailable(f"cannot create the runtime stage {root}: {exc}") from None
    for path in [*root.parents, root]:
        st = path.lstat()
        writable = st.st_mode & 0o022 and not (st.st_mode & stat.S_ISVTX and path != root)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, os.geteuid()) or writable:
            raise IsolationUnavailable(
                f"the runtime stage {root} must be reachable only through directories owned by root or "
                f"uid {os.geteuid()} that no one else can write; {path} is not (fix its owner or mode)"
            )
    return root


def _build(plan: _Plan, stage: Path, final: Path) -> None:
    try:
        build_stage(stage, final, functools.partial(_populate, plan))
    except OSError as exc:
        raise IsolationUnavailable(f"cannot stage the worker's runtime in {stage}: {exc}") from None


def build_stage(stage: Path, final: Path, populate: Callable[[Path], bool]) -> bool:
    """Build a stage at ``final``, complete or not at all: ``populate`` fills a temporary tree
    (False: do not keep it), which is then renamed into place. A stage another process put at
    ``final`` first is as good. Raises OSError; nothing temporary is left either way."""
    tmp = stage / f"{TMP_PREFIX}{final.name}-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        if not populate(tmp):
            return False
        try:
            tmp.rename(final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _populate(plan: _Plan, tmp: Path) -> bool:
    made: set[str] = {str(tmp)}  # mkdirs stops here: nothing above the stage is made or chmod'ed
    for dest, src in plan.links:
        target = tmp / dest
        mkdirs(target.parent, made)
        try:
            os.link(src, target, follow_symlinks=False)
        except OSError:  # another filesystem, or protected_hardlinks: a copy (keyed by identity)
            shutil.copy2(src, target, follow_symlinks=False)
    for dest, src in plan.compiled:
        _compile_into(tmp, dest, src)
    exe_dest, exe_src = plan.interpreter
    target = tmp / exe_dest
    mkdirs(target.parent, made)
    image = bytearray(Path(exe_src).read_bytes())
    if plan.libdir is not None:
        lib_dest, lib_host = plan.libdir
        _relink_runpath(image, lib_host, "$ORIGIN/" + os.path.relpath(lib_dest, os.path.dirname(exe_dest)))
    target.write_bytes(image)
    target.chmod(0o755)
    tmp.chmod(0o755)
    return True


def _compile_into(tmp: Path, dest: str, src: str) -> None:
    """Bytecode of ``src`` at ``tmp/dest``, 0644, naming the source by its path inside the
    sandbox; a source that does not compile is left without (Python reports it at import)."""
    import py_compile

    inside = f"{SANDBOX_ROOT}/{os.path.dirname(os.path.dirname(dest))}/{os.path.basename(src)}"
    target = tmp / dest
    try:
        py_compile.compile(src, cfile=str(target), dfile=inside, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)  # fmt: skip
    except py_compile.PyCompileError:
        return
    target.chmod(0o644)


def mkdirs(path: Path, made: set[str]) -> None:
    """Make ``path`` and its parents, each 0755, up to the first one in ``made`` (the stage's
    root must be there: the walk would otherwise chmod every directory up to ``/``, a user's
    home among them when the stage is below ``~/.cache``)."""
    if str(path) in made:
        return
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    for p in (path, *path.parents):
        if str(p) in made:
            break
        made.add(str(p))
        with contextlib.suppress(OSError):
            p.chmod(0o755)


def _relink_runpath(image: bytearray, host_libdir: str, entry: str) -> bool:
    """Point the ELF interpreter's RUNPATH (or RPATH) entry for ``host_libdir`` at ``entry``.

    The string is rewritten in place (it must not grow); the loader reads it up to the new
    NUL. Returns False when the image is not a 64-bit little-endian ELF or has no such entry.
    """
    if image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", image, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        p_type, _fl, off, vaddr, _pa, filesz, _mem, _al = struct.unpack_from("<IIQQQQQQ", image, phoff + i * phentsize)
        if p_type == _PT_LOAD:
            loads.append((vaddr, off, filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (off, filesz)
    if dynamic is None:
        return False
    tags = []
    for j in range(dynamic[1] // 16):
        tag, val = struct.unpack_from("<qQ", image, dynamic[0] + 16 * j)
        if tag == _DT_NULL:
            break
        tags.append((tag, val))
    strtab = next((v for t, v in tags if t == _DT_STRTAB), None)
    base = next((off + strtab - va for va, off, size in loads if strtab is not None and va <= strtab < va + size), None)
    if base is None:
        return False
    changed = False
    for tag, val in tags:
        if tag not in (_DT_RPATH, _DT_RUNPATH):
            continue
        start = base + val
        old = bytes(image[start : image.index(b"\0", start)]).decode()
        parts = [entry if p and os.path.realpath(p) == host_libdir else p for p in old.split(":")]
        new = ":".join(parts)
        if new == old:
            continue
        if len(new) > len(old):
            raise IsolationUnavailable(f"the interpreter's RUNPATH {old!r} is too short to relocate")
        image[start : start + len(new) + 1] = new.encode() + b"\0"
        changed = True
    return changed


# ---------------------------------------------------------------- sharing and garbage


_held: list[int] = []
"""Lock descriptors this process holds for its life (its stage must not be collected)."""


def hold(lock: Path) -> None:
    """Take a shared lock on ``lock`` and keep it (retried if the file was replaced meanwhile)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        if _same_file(fd, lock):
            with contextlib.suppress(OSError):
                os.utime(fd)  # "last taken": the stage outlives this process by STAGE_KEEP_SECONDS
            _held.append(fd)
            return
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def collect_garbage(stage: Path, keep: str) -> None:
    """Remove stages no process holds nor took lately, and temporary trees left by builds that died."""
    now = time.time()
    for entry in _entries(stage):
        name = entry.name
        if name.startswith(TMP_PREFIX):
            if now - entry.lstat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        elif not name.endswith(".lock") and name != keep and entry.is_dir():
            lock = stage / f"{name}.lock"
            try:
                taken = lock.lstat().st_mtime
            except FileNotFoundError:
                taken = 0.0
            except OSError:
                continue
            if now - taken > STAGE_KEEP_SECONDS:
                _remove_unheld(entry, lock)


def _remove_unheld(tree: Path, lock: Path) -> None:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return
    try:
        if _same_file(fd, lock):
            shutil.rmtree(tree, ignore_errors=True)
            lock.unlink()
    finally:
        os.close(fd)


def _entries(stage: Path) -> Iterator[Path]:
    try:
        yield from sorted(stage.iterdir())
    except OSError:
        return
