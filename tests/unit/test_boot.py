"""The worker's serving loop is imported without ``ssl`` (inside/boot.py), and ``ssl`` stays importable;
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
import asyncio.base_events, asyncio.sslproto
seen = {"ssl_loaded": "ssl" in sys.modules,
        "unneeded": sorted({"pathlib", "hashlib", "urllib.parse", "ctypes"} & set(sys.modules)),
        "asyncio_ssl": asyncio.base_events.ssl is not None or asyncio.sslproto.ssl is not None}
import ssl
seen["ssl_after"] = hasattr(ssl, "SSLContext")
print(json.dumps(seen))
"""


def test_the_serving_loop_loads_without_ssl_and_ssl_still_imports_after() -> None:
    # a fresh interpreter as the worker starts (-I -S): what the import leaves behind is all its own
    out = subprocess.run([sys.executable, "-I", "-S", "-c", _PROBE, str(PACKAGE_ROOT)], capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    assert json.loads(out.stdout) == {"ssl_loaded": False, "unneeded": [], "asyncio_ssl": False,
                                      "ssl_after": True}
