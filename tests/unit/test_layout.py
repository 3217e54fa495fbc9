"""The trust boundary in the tree: every library module is on a named side of it."""

from __future__ import annotations

import pkgutil
import tomllib
from pathlib import Path

import sandbox_core

ROOT = Path(__file__).resolve().parents[2]


def _contracts() -> dict[str, dict[str, list[str]]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {c["name"]: c for c in config["tool"]["importlinter"]["contracts"]}


def test_every_top_level_module_is_host_shared_or_inside() -> None:
    """A new module must be named in the contracts, so it cannot slip past the boundary."""
    contracts = list(_contracts().values())
    inside_rule = next(c for c in contracts if c["source_modules"] == ["sandbox_core.inside"])
    host_rule = next(c for c in contracts if c.get("forbidden_modules") == ["sandbox_core.inside"])
    named = set(inside_rule["forbidden_modules"]) | set(host_rule["source_modules"]) | {"sandbox_core.inside"}
    modules = {f"sandbox_core.{m.name}" for m in pkgutil.iter_modules(sandbox_core.__path__)}
    assert modules - named == set(), "classify these modules in pyproject.toml's import contracts"


def test_the_launcher_names_the_entry_module_that_exists() -> None:
    """The host starts the worker by a string; that string must name the real module."""
    import importlib.util

    from sandbox_core.isolation.spec import python_argv
    from sandbox_core.shared import PROBE_COMMAND_ENTRY, WORKER_ENTRY
    from tests.helpers import process_config

    assert importlib.util.find_spec(WORKER_ENTRY) is not None
    assert importlib.util.find_spec(PROBE_COMMAND_ENTRY) is not None
    assert WORKER_ENTRY in " ".join(python_argv(process_config(Path("/tmp"))))
