"""The SDK's re-export packages read as tables: the same names, imported on first use."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sandbox_core.inside.agent import lazy_sdk


def test_a_plain_reexport_init_is_a_table() -> None:
    source = '"""doc"""\nfrom __future__ import annotations\nfrom .a import A as A\nfrom .b.c import C, D as E\n'
    assert lazy_sdk._table(source, "pkg") == {"A": ("pkg.a", "A"), "C": ("pkg.b.c", "C"), "E": ("pkg.b.c", "D")}


@pytest.mark.parametrize("source", [
    "from .a import A\nX = 1\n",  # anything else runs as it is
    "from .a import *\n",
    "from .a import a\n",  # the name of a submodule: importing it would shadow the value
    "from os import path\n",
    "from .. import up\n",
])
def test_anything_else_is_run_as_it_is(source: str) -> None:
    assert lazy_sdk._table(source, "pkg.sub") is None


def test_a_lazy_package_imports_a_module_when_its_name_is_first_used(tmp_path: Path) -> None:
    pkg = tmp_path / "lazypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .one import One as One\nfrom .two import Two as Two\n")
    (pkg / "one.py").write_text("One = 'one'\n")
    (pkg / "two.py").write_text("Two = 'two'\n")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from sandbox_core.inside.agent import lazy_sdk
        lazy_sdk.PACKAGES = frozenset({{"lazypkg"}})
        lazy_sdk.install()
        import lazypkg
        assert "lazypkg.one" not in sys.modules and "lazypkg.two" not in sys.modules
        from lazypkg import One
        assert One == "one" and "lazypkg.one" in sys.modules and "lazypkg.two" not in sys.modules
        assert sorted(lazypkg.__all__) == ["One", "Two"] and "Two" in dir(lazypkg)
        from lazypkg import *
        assert Two == "two"
        try:
            lazypkg.Three
        except AttributeError:
            pass
        else:
            raise AssertionError("no Three")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_the_sdk_loads_fewer_modules_and_keeps_every_name() -> None:
    script = textwrap.dedent("""
        import sys
        from sandbox_core.inside.agent import lazy_sdk
        if sys.argv[1] == "lazy":
            lazy_sdk.install()
        import anthropic.types.beta as beta
        from anthropic.types.beta import BetaMessage, BetaTextBlock
        names = [n for n in dir(beta) if n[0].isupper()]
        print(len(sys.modules), len(names), BetaMessage.__name__, BetaTextBlock.__module__)
    """)
    eager, lazy = (subprocess.run([sys.executable, "-c", script, mode], check=True, capture_output=True,
                                  text=True, timeout=120).stdout.split() for mode in ("eager", "lazy"))
    assert eager[1:] == lazy[1:]  # the same public names, the same classes
    assert int(lazy[0]) < int(eager[0])


DEFERRING = (
    "from __future__ import annotations\n"
    "from .heavy import Heavy, make as build\n"
    "from .._base import Base\n"
    "class Holder(Base):\n"
    "    def get(self, n: int = 1) -> Heavy:\n"
    "        return Heavy(build(n))\n"
)


def test_sibling_imports_read_only_in_function_bodies_are_deferred() -> None:
    tree = lazy_sdk._defer(ast.parse(DEFERRING), "pkg.sub")
    assert tree is not None
    code = ast.unparse(tree)
    assert "from .heavy" not in code and "from .._base import Base" in code
    assert "_sdk_deferred('pkg.sub.heavy', 'Heavy')(_sdk_deferred('pkg.sub.heavy', 'make')(n))" in code
    assert "-> Heavy:" in code  # annotations are never evaluated: left as written


@pytest.mark.parametrize("source", [
    DEFERRING.replace("from __future__ import annotations\n", ""),  # annotations would be evaluated
    DEFERRING + "DEFAULT = Heavy\n",  # read while the module runs
    DEFERRING + "class Other(Heavy):\n    pass\n",  # a base class
    DEFERRING.replace("    def get", "    @build\n    def get"),  # a decorator runs at definition
    DEFERRING.replace("n: int = 1", "n: int = build"),  # so does a default
    DEFERRING + "def set_it() -> None:\n    global Heavy\n    Heavy = None\n",  # assigned
    "from __future__ import annotations\nfrom .heavy import *\n",
])
def test_any_other_use_runs_the_module_as_it_is(source: str) -> None:
    assert lazy_sdk._defer(ast.parse(source), "pkg.sub") is None


def test_a_deferring_module_imports_a_sibling_when_a_function_first_needs_it(tmp_path: Path) -> None:
    pkg = tmp_path / "deferpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "heavy.py").write_text("class Heavy:\n    def __init__(self, n):\n        self.n = n\n")
    (pkg / "light.py").write_text(
        "from __future__ import annotations\nfrom .heavy import Heavy\n"
        "def make(n: int) -> Heavy:\n    return Heavy(n)\n"
    )
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from sandbox_core.inside.agent import lazy_sdk
        lazy_sdk.DEFERRED = frozenset({{"deferpkg.light"}})
        lazy_sdk.install()
        import deferpkg.light as light
        assert "deferpkg.heavy" not in sys.modules
        made = light.make(3)
        import deferpkg.heavy
        assert type(made) is deferpkg.heavy.Heavy and made.n == 3
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_the_sdk_defers_the_beta_resources_an_agent_does_not_build() -> None:
    script = textwrap.dedent("""
        import inspect, sys
        from sandbox_core.inside.agent import lazy_sdk
        if sys.argv[1] == "lazy":
            lazy_sdk.install()
        import anthropic
        imported = len(sys.modules)
        files_loaded = "anthropic.resources.beta.files" in sys.modules
        client = anthropic.AsyncAnthropic(api_key="placeholder", base_url="http://127.0.0.1:9")
        built = []
        for beta in (client.beta, client.beta.with_raw_response, client.beta.with_streaming_response):
            for name, value in sorted(inspect.getmembers(type(beta))):
                if type(value).__name__ == "cached_property" and not name.startswith("with_"):
                    built.append(f"{name}={type(getattr(beta, name)).__qualname__}")
        print(imported, files_loaded, " ".join(built))
    """)
    eager, lazy = (subprocess.run([sys.executable, "-c", script, mode], check=True, capture_output=True,
                                  text=True, timeout=120).stdout.split(" ", 2) for mode in ("eager", "lazy"))
    assert lazy[2] == eager[2] and "messages=AsyncMessages" in lazy[2]  # every resource, the same classes
    assert (eager[1], lazy[1]) == ("True", "False")
    assert int(lazy[0]) < int(eager[0]) - 500
