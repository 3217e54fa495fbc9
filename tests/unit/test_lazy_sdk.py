"""The SDK's re-export packages read as tables: the same names, imported on first use."""

from __future__ import annotations

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
