"""Load the SDK's big type packages lazily: each name is imported when first used.

``import anthropic`` executes about 3,100 modules (about 50 MB of a worker's memory): the
packages ``anthropic.types``, ``anthropic.types.beta`` (about 1,900 modules alone),
``anthropic.types.organization`` and a few more re-export every model of the API from an
``__init__`` made only of ``from .module import Name as Name`` lines. An agent run needs
a small part of them. :func:`install` puts a finder in front of the import system that
runs such an ``__init__`` as a table instead: the package gets a module ``__getattr__``
that imports ``.module`` and returns ``Name`` the first time ``Name`` is asked for (then
it is a plain attribute). The modules themselves are untouched and import each other as
before; an ``__init__`` with anything but those lines is run as it is.

Runs inside the worker (the SDK is untrusted code's neighbour there, not the host's).
"""

from __future__ import annotations

import ast
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Sequence
from typing import Any

PACKAGES = frozenset({
    "anthropic.types",
    "anthropic.types.beta",
    "anthropic.types.beta.organization",
    "anthropic.types.beta.sessions",
    "anthropic.types.organization",
    "anthropic.types.shared",
})
"""The packages whose ``__init__`` may be read as a table (checked again at import)."""


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once; before ``anthropic`` is imported)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def _table(source: str, package: str) -> dict[str, tuple[str, str]] | None:
    """``{Name: (module, attribute)}`` of an ``__init__`` made only of re-exports, else None."""
    table: dict[str, tuple[str, str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if not (isinstance(node, ast.ImportFrom) and node.level >= 1 and node.module):
            return None
        module = importlib.util.resolve_name("." * node.level + node.module, package)
        if not module.startswith(package + "."):
            return None
        for alias in node.names:
            name = alias.asname or alias.name
            if alias.name == "*" or name == module.rsplit(".", 1)[1]:
                return None  # a name a submodule import would shadow: not a plain table
            table[name] = (module, alias.name)
    return table


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in PACKAGES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec
        spec.loader = _TableLoader(spec.loader)
        return spec


class _TableLoader(importlib.abc.Loader):
    def __init__(self, original: importlib.machinery.SourceFileLoader) -> None:
        self._original = original

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        source = self._original.get_source(module.__name__)
        table = _table(source, module.__name__) if source is not None else None
        if table is None:
            self._original.exec_module(module)
            return
        names = sorted(table)

        def __getattr__(name: str) -> Any:
            target = table.get(name)
            if target is None:
                raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")
            value = getattr(importlib.import_module(target[0]), target[1])
            setattr(module, name, value)
            return value

        def __dir__() -> list[str]:
            return sorted({*module.__dict__, *names})

        module.__getattr__ = __getattr__  # type: ignore[method-assign]
        module.__dir__ = __dir__  # type: ignore[method-assign]
        module.__all__ = names  # type: ignore[attr-defined]
