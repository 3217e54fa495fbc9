"""The strict mount view against real bubblewrap: what the sandbox sees of the host.

Probes run the exact launch of :func:`strict_launch` with the worker's program replaced (see
``test_strict_engine``): they apply the plan's layers (uid switch, landlock...) as the worker
does, then try what an attacker in the sandbox would.
"""

from __future__ import annotations

from pathlib import Path

from sandbox_core.isolation.runtime import SANDBOX_ROOT
from tests.security import test_strict_engine
from tests.security.test_strict_engine import launched, run

pytestmark = test_strict_engine.pytestmark

# ----------------------------------------------------------------- what the sandbox sees of the host


def test_the_worker_runtime_has_its_packages_but_no_dev_tools(tmp_path: Path) -> None:
    code = """
    import importlib.util, site
    site.addsitedir(plan["site_packages"])
    out["anthropic"] = importlib.util.find_spec("anthropic") is not None
    out["dev"] = {m: importlib.util.find_spec(m) is not None for m in ("pytest", "mypy", "ruff", "typer")}
    out["lib"] = sorted(os.listdir(plan["site_packages"]))
    out["prefix"] = sys.prefix
    """
    with launched(tmp_path) as spec:
        out = run(spec, code)
    assert out["anthropic"] is True and out["dev"] == dict.fromkeys(out["dev"], False)
    assert not [n for n in out["lib"] if n.split("-")[0] in ("pytest", "_pytest", "mypy", "ruff", "pip", "setuptools")]
    assert out["prefix"] == f"{SANDBOX_ROOT}/python"
