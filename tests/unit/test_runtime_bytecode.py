"""The worker's stage holds valid bytecode for every staged module, whatever the host's .pyc files are.

A worker runs with ``-B`` on a read-only stage, so a module without valid bytecode there would
be compiled from source at every start. Sources whose ``.pyc`` is missing or stale on the host
get bytecode compiled into the stage; fresh ones are linked as they are.
"""

from __future__ import annotations

import os
import py_compile
import stat
import subprocess
import sys
from pathlib import Path

from sandbox_core.isolation import runtime

TAG = sys.implementation.cache_tag


def _module(src: Path, name: str, body: str, *, pyc: str) -> None:
    """``name``.py in ``src``, with a fresh, stale or no ``.pyc`` beside it."""
    path = src / f"{name}.py"
    path.write_text(body)
    if pyc != "none":
        py_compile.compile(str(path), cfile=str(src / "__pycache__" / f"{name}.{TAG}.pyc"), doraise=True)
    if pyc == "stale":
        path.write_text(body + "# edited since\n")
        os.utime(path, (1, 1))


def _plan_of(src: Path) -> runtime._Plan:
    """A stage plan of package ``src`` at ``app/pkg`` (and this interpreter)."""
    plan = runtime._Plan()
    plan.interpreter = ("python/bin/python3", sys.executable)
    runtime._add_tree(plan, str(src), "app/pkg", stdlib=False)
    return plan


def test_missing_and_stale_bytecode_is_compiled_into_the_stage_and_fresh_is_linked(tmp_path: Path) -> None:
    src = tmp_path / "src" / "pkg"
    (src / "__pycache__").mkdir(parents=True)
    _module(src, "__init__", "", pyc="fresh")
    _module(src, "none", "VALUE = 'none'\n", pyc="none")
    _module(src, "fresh", "VALUE = 'fresh'\n", pyc="fresh")
    _module(src, "stale", "VALUE = 'stale'\n", pyc="stale")
    plan = _plan_of(src)

    runtime._compile_missing(plan)

    assert sorted(dest for dest, _ in plan.compiled) == [f"app/pkg/__pycache__/none.{TAG}.pyc",
                                                         f"app/pkg/__pycache__/stale.{TAG}.pyc"]  # fmt: skip
    linked = {dest for dest, _ in plan.links}
    assert f"app/pkg/__pycache__/fresh.{TAG}.pyc" in linked  # the host's own, as it is
    assert f"app/pkg/__pycache__/stale.{TAG}.pyc" not in linked  # replaced, not linked as well

    stage = tmp_path / "stage"
    assert runtime._populate(plan, stage)
    for name in ("none", "fresh", "stale"):
        staged = stage / "app" / "pkg" / "__pycache__" / f"{name}.{TAG}.pyc"
        assert runtime._fresh(str(staged), str(stage / "app" / "pkg" / f"{name}.py")), name
        assert stat.S_IMODE(staged.stat().st_mode) & 0o444 == 0o444  # readable by the sandbox's uid
    # what a worker does: -B on the stage; every module is loaded from its bytecode, none compiled
    probe = (f"import sys; sys.path.insert(0, {str(stage / 'app')!r}); import pkg.none, pkg.fresh, pkg.stale; "
             "print(pkg.none.VALUE, pkg.fresh.VALUE, pkg.stale.VALUE)")  # fmt: skip
    done = subprocess.run([sys.executable, "-I", "-S", "-B", "-v", "-c", probe], capture_output=True, text=True,
                          check=True)  # fmt: skip
    assert done.stdout.split() == ["none", "fresh", "stale"]
    assert "bytecode is stale" not in done.stderr and "code object from '" in done.stderr
    for name in ("none", "fresh", "stale"):
        assert f"{name}.{TAG}.pyc matches" in done.stderr, name


def test_a_source_that_does_not_compile_is_staged_without_bytecode(tmp_path: Path) -> None:
    src = tmp_path / "src" / "pkg"
    src.mkdir(parents=True)
    (src / "broken.py").write_text("def (:\n")
    plan = _plan_of(src)
    runtime._compile_missing(plan)
    assert runtime._populate(plan, tmp_path / "stage")
    assert (tmp_path / "stage" / "app" / "pkg" / "broken.py").exists()
    assert not (tmp_path / "stage" / "app" / "pkg" / "__pycache__" / f"broken.{TAG}.pyc").exists()


def test_building_a_stage_changes_nothing_above_it(tmp_path: Path) -> None:
    """The stage's directories are made 0755; the directories above it keep their modes (a
    non-root user's stage is below ~/.cache, and the walk once reached the home directory)."""
    outer = tmp_path / "home"
    (outer / ".cache").mkdir(parents=True)
    outer.chmod(0o700)
    (outer / ".cache").chmod(0o750)
    src = tmp_path / "src" / "pkg"
    src.mkdir(parents=True)
    (src / "mod.py").write_text("VALUE = 1\n")
    plan = _plan_of(src)
    stage = outer / ".cache" / "stage"
    assert runtime._populate(plan, stage)
    assert stat.S_IMODE(outer.stat().st_mode) == 0o700
    assert stat.S_IMODE((outer / ".cache").stat().st_mode) == 0o750
    assert stat.S_IMODE(stage.stat().st_mode) == 0o755
    assert stat.S_IMODE((stage / "app" / "pkg").stat().st_mode) == 0o755
