"""The worker's serving loop is imported without ``ssl``, ``logging``, ``inspect``, ``traceback`` or
``linecache`` (inside/boot.py), all stay importable, asyncio's questions to them are answered
(as before: a debug future's source traceback ends in the frames that made it), and the
loggers asyncio made meanwhile are the real ones;
nor do it and what the first command needs load ``pathlib``, ``hashlib`` or ``urllib.parse``, which
serving does not need (~20 ms of a worker's boot), nor the ``ctypes`` package (its C calls go
through :mod:`sandbox_core.ffi`: 3 ms)."""

from __future__ import annotations

import json
import subprocess
import sys

from sandbox_core.isolation.spec import PACKAGE_ROOT

_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from sandbox_core.inside.boot import _first_request_modules
_first_request_modules()
import asyncio.base_events, asyncio.log, asyncio.sslproto, concurrent.futures._base
seen = {"ssl_loaded": "ssl" in sys.modules, "logging_loaded": "logging" in sys.modules,
        "inspect_loaded": "inspect" in sys.modules,
        "traceback_loaded": sorted({"traceback", "linecache", "tokenize", "textwrap"} & set(sys.modules)),
        "unneeded": sorted({"pathlib", "hashlib", "urllib.parse", "ctypes"} & set(sys.modules)),
        "asyncio_ssl": asyncio.base_events.ssl is not None or asyncio.sslproto.ssl is not None}
import ssl
seen["ssl_after"] = hasattr(ssl, "SSLContext")
asyncio.new_event_loop().close()  # says debug() twice: dropped without loading logging, as logging would drop it
asyncio.log.logger.info("nobody configured logging")
seen["logging_after_loop"] = "logging" in sys.modules
async def job():
    return 1
def plain():
    return 1
seen["coroutine_function"] = [asyncio.iscoroutinefunction(job), asyncio.iscoroutinefunction(plain)]
import io
async def stacked():
    task = asyncio.current_task()
    out = io.StringIO()
    task.print_stack(file=out)  # asyncio's own use of traceback: loads the real one
    return out.getvalue()
seen["print_stack"] = "stacked" in asyncio.run(stacked())
loop = asyncio.new_event_loop()
loop.set_debug(True)
def made_here():
    return loop.create_future()  # debug: the C future keeps its source traceback (extract_stack)
seen["source_traceback"] = [f.name for f in made_here()._source_traceback][-2:]
loop.close()
import inspect
seen["real_inspect"] = hasattr(inspect, "signature") and sys.modules["inspect"] is inspect
import logging
logging.getLogger("asyncio").setLevel(logging.DEBUG)
heard = []
class Keep(logging.Handler):
    def emit(self, record):
        heard.append([record.name, record.levelname, record.getMessage(), record.exc_info is not None])
for name in ("asyncio", "concurrent.futures"):
    logging.getLogger(name).addHandler(Keep())
asyncio.log.logger.warning("loop %s", "said")
asyncio.log.logger.debug("now %s", "heard")  # configured: debug reaches it
try:
    raise KeyError("boom")
except KeyError:
    concurrent.futures._base.LOGGER.exception("callback raised")
seen["heard"] = heard
seen["same_logger"] = asyncio.log.logger.getChild("x") is logging.getLogger("asyncio.x")
seen["real_logging"] = hasattr(logging, "Handler") and type(logging).__name__ == "module"
print(json.dumps(seen))
"""


def test_the_serving_loop_loads_without_what_asyncio_only_asks_later_and_all_work_after() -> None:
    # a fresh interpreter as the worker starts (-I -S): what the import leaves behind is all its own
    out = subprocess.run([sys.executable, "-I", "-S", "-c", _PROBE, str(PACKAGE_ROOT)], capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    assert json.loads(out.stdout) == {
        "ssl_loaded": False, "logging_loaded": False, "inspect_loaded": False, "traceback_loaded": [],
        "unneeded": [], "asyncio_ssl": False, "ssl_after": True, "logging_after_loop": False,
        "coroutine_function": [True, False], "print_stack": True, "source_traceback": ["made_here", "create_future"],
        "real_inspect": True,
        # asyncio's and concurrent.futures' loggers, made while logging was a stand-in, are the real ones
        "heard": [["asyncio", "WARNING", "loop said", False], ["asyncio", "DEBUG", "now heard", False],
                  ["concurrent.futures", "ERROR", "callback raised", True]],
        "same_logger": True, "real_logging": True,
    }


_LEAVE = """
import atexit, sys
sys.path.insert(0, sys.argv[1])
from sandbox_core.inside import boot
atexit.register(lambda: print("teardown ran", flush=True))
sys.stdout.write("written before")  # buffered (a pipe): only a flush gets it out
sys.stderr.write("said on stderr")
boot._leave()
print("never", flush=True)
"""


def test_a_worker_that_served_leaves_at_once_with_its_output_flushed() -> None:
    """boot._leave, after the serving loop: exit status 0, buffered output out, and none of the
    interpreter's teardown (an exit hook does not run: neither do the module clean-ups)."""
    out = subprocess.run([sys.executable, "-I", "-S", "-c", _LEAVE, str(PACKAGE_ROOT)], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0
    assert out.stdout == "written before" and out.stderr == "said on stderr"
