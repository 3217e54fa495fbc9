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
"""The packages whose ``__init__`` may be read as a table (checked again at import)..."""
TREES = ("anthropic.resources",)
"""...and the trees of packages that may be, each package in them: ``import anthropic`` imports
``anthropic.resources.beta`` (through the Vertex, Bedrock and other platform clients it
star-imports), whose ``__init__`` imports every beta resource and so most of the type modules;
the client builds only the resources it is asked for (``client.beta.messages``)."""


DEFERRED = frozenset({"anthropic.resources.beta.beta"})
"""Modules whose imports of their sibling modules wait for first use (see :func:`_defer`):
``resources/beta/beta.py`` imports every beta resource (files, skills, agents, sessions,
vaults...) and with them about 1,100 type modules (about 15 MB), where an agent builds one
(``client.beta.messages``); each resource is a ``cached_property`` that names its class only
in its body."""
HELPER = "_sdk_deferred"
"""The name a deferring module's body calls for a deferred name (its own global)."""


def _lazy(fullname: str) -> bool:
    return fullname in PACKAGES or any(fullname == tree or fullname.startswith(tree + ".") for tree in TREES)


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once; before ``anthropic`` is imported)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def _table(source: str, package: str) -> dict[str, tuple[str, str]] | None:
    """``{Name: (module, attribute)}`` of an ``__init__`` made only of re-exports, else None.

    An ``__all__`` list of names is allowed too when it names exactly the re-exports.
    """
    table: dict[str, tuple[str, str]] = {}
    exported: list[str] | None = None
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if exported is None and (names := _all_names(node)) is not None:
            exported = names
            continue
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
    if exported is not None and sorted(exported) != sorted(table):
        return None
    return table


def _all_names(node: ast.stmt) -> list[str] | None:
    """The names of an ``__all__ = [...]`` statement (None for any other statement)."""
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == "__all__" and isinstance(node.value, ast.List | ast.Tuple)):
        return None
    names = [item.value for item in node.value.elts if isinstance(item, ast.Constant) and isinstance(item.value, str)]
    return names if len(names) == len(node.value.elts) else None


def _defer(tree: ast.Module, package: str) -> ast.Module | None:
    """``tree`` with its imports of sibling modules (``from .x import A``) replaced by look-ups
    at the place of use, else None.

    Only where it is sure to mean the same: the module has ``from __future__ import
    annotations`` (annotations are never evaluated), and every deferred name is only read,
    only inside function bodies (run after the import, never while the module runs). Each
    such read becomes ``_sdk_deferred("package.x", "A")``: the import then, once.
    """
    body = tree.body
    if not any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
               and any(a.name == "annotations" for a in n.names) for n in body):
        return None
    deferred: dict[str, tuple[str, str]] = {}
    kept: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            if any(alias.name == "*" for alias in node.names):
                return None
            module = importlib.util.resolve_name("." + node.module, package)
            for alias in node.names:
                deferred[alias.asname or alias.name] = (module, alias.name)
            continue
        kept.append(node)
    if not deferred or HELPER in deferred:
        return None
    rewriter = _Rewriter(deferred)
    tree.body = [rewriter.visit(node) for node in kept]
    if rewriter.unsure:
        return None
    return ast.fix_missing_locations(tree)


class _Rewriter(ast.NodeTransformer):
    """Replaces reads of deferred names in function bodies; notes (``unsure``) any other use."""

    def __init__(self, deferred: dict[str, tuple[str, str]]) -> None:
        self.deferred = deferred
        self.depth = 0
        self.unsure = False

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> ast.AST:
        if not isinstance(node, ast.Lambda):
            node.decorator_list = [self.visit(d) for d in node.decorator_list]
        node.args.defaults = [self.visit(d) for d in node.args.defaults]
        node.args.kw_defaults = [None if d is None else self.visit(d) for d in node.args.kw_defaults]
        self.depth += 1  # the annotations stay as they are: never evaluated
        if isinstance(node, ast.Lambda):
            node.body = self.visit(node.body)
        else:
            node.body = [self.visit(statement) for statement in node.body]
        self.depth -= 1
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id not in self.deferred:
            return node
        if self.depth == 0 or not isinstance(node.ctx, ast.Load):
            self.unsure = True
            return node
        module, name = self.deferred[node.id]
        call = ast.Call(ast.Name(HELPER, ast.Load()), [ast.Constant(module), ast.Constant(name)], [])
        return ast.copy_location(call, node)


def _deferred_name(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname in DEFERRED:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and isinstance(spec.loader, importlib.machinery.SourceFileLoader):
                spec.loader = _DeferringLoader(spec.loader)
            return spec
        if not _lazy(fullname):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.submodule_search_locations is None:
            return spec  # not a package: run as it is
        if not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec
        spec.loader = _TableLoader(spec.loader)
        return spec


class _WrappingLoader(importlib.abc.Loader):
    """A loader that runs a module from the source its original loader finds, its own way."""

    def __init__(self, original: importlib.machinery.SourceFileLoader) -> None:
        self._original = original

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None


class _TableLoader(_WrappingLoader):
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


class _DeferringLoader(_WrappingLoader):
    def exec_module(self, module: types.ModuleType) -> None:
        source = self._original.get_source(module.__name__)
        package = module.__name__.rpartition(".")[0]
        tree = _defer(ast.parse(source), package) if source is not None else None
        if tree is None:
            self._original.exec_module(module)
            return
        module.__dict__[HELPER] = _deferred_name
        code = compile(tree, self._original.get_filename(module.__name__), "exec")
        exec(code, module.__dict__)  # the SDK's own source, its sibling imports deferred
