""":mod:`sandbox_core.standin`: a deferred module loads at its first use, and is the real one from then on."""

from __future__ import annotations

import json
import subprocess
import sys

from sandbox_core.isolation.spec import PACKAGE_ROOT

_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from sandbox_core import standin
seen = {}
stand_in = standin.defer("inspect")
seen["again"] = standin.defer("inspect") is None and standin.defer("sys") is None  # loaded: left alone
import inspect as early  # what a module importing it now gets: the stand-in
seen["deferred"] = [standin.deferred("inspect"), "ast" in sys.modules, early is stand_in]
def f(a, b=2): pass
seen["answer"] = str(early.signature(f))  # the first question loads the real module
import inspect
seen["real"] = [standin.deferred("inspect"), inspect is not stand_in, inspect.signature is early.signature]
from inspect import isfunction  # from-imports of a module deferred earlier work the same
seen["from"] = isfunction(f)
print(json.dumps(seen))
"""


def test_the_first_question_loads_the_real_module_which_answers_from_then_on() -> None:
    out = subprocess.run([sys.executable, "-I", "-S", "-c", _PROBE, str(PACKAGE_ROOT)], capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    assert json.loads(out.stdout) == {"again": True, "deferred": [True, False, True], "answer": "(a, b=2)",
                                      "real": [False, True, True], "from": True}


_INSPECT_PROBE = """
import functools, json, sys
sys.path.insert(0, sys.argv[1])
from sandbox_core import standin
standin.defer("inspect", standin.Inspect("inspect"))
import asyncio.coroutines
def plain(): pass
async def coro(): pass
seen = {"plain": [standin.Inspect.iscoroutinefunction(plain), asyncio.coroutines.iscoroutinefunction(coro)]}
seen["still_deferred"] = standin.deferred("inspect")
class C:
    async def method(self): pass
seen["others"] = [standin.Inspect.iscoroutinefunction(C().method),
                  standin.Inspect.iscoroutinefunction(functools.partial(coro)),
                  standin.Inspect.iscoroutinefunction(C)]
seen["loaded"] = not standin.deferred("inspect")
print(json.dumps(seen))
"""


def test_the_inspect_stand_in_answers_for_a_plain_function_and_asks_the_real_module_otherwise() -> None:
    out = subprocess.run([sys.executable, "-I", "-S", "-c", _INSPECT_PROBE, str(PACKAGE_ROOT)], capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    assert json.loads(out.stdout) == {"plain": [False, True], "still_deferred": True,
                                      "others": [True, True, False], "loaded": True}
