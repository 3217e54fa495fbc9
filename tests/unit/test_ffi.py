""":mod:`sandbox_core.ffi` calls libc as ``ctypes.CDLL(None, use_errno=True)`` does, without loading ``ctypes``."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

from sandbox_core.isolation.spec import PACKAGE_ROOT

_PROBE = """
import errno, json, os, sys
sys.path.insert(0, sys.argv[1])
from sandbox_core import ffi

class Pair(ffi.Structure):
    _fields_ = (("a", ffi.c_uint32), ("b", ffi.c_int))

libc = ffi.libc()
pairs = (Pair * 2)()
pairs[1].a, pairs[1].b = 7, -3
flag = ffi.c_int(5)
got = libc.prctl(37, ffi.byref(flag), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER: writes 0 through the pointer
bad = libc.prctl(-1, 0, 0, 0, 0)  # no such option: -1, errno EINVAL
print(json.dumps({
    "pid": libc.getpid() == os.getpid(), "syscall_pid": libc.syscall(ffi.c_long(39)) == os.getpid(),
    "prctl": [got, flag.value], "bad": [bad, ffi.get_errno()],
    "sizes": [ffi.sizeof(Pair), ffi.sizeof(pairs), ffi.sizeof(ffi.c_uint64), ffi.sizeof(ffi.c_size_t)],
    "array": [pairs[1].a, pairs[1].b, pairs[0].a],
    "ctypes_loaded": "ctypes" in sys.modules,
}))
"""


def test_libc_calls_pointers_structures_and_errno_without_the_ctypes_package() -> None:
    out = subprocess.run([sys.executable, "-I", "-S", "-c", _PROBE, str(PACKAGE_ROOT)], capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    seen = json.loads(out.stdout)
    if os.uname().machine != "x86_64":  # 39 is getpid on x86_64 only
        seen["syscall_pid"] = True
    assert seen == {"pid": True, "syscall_pid": True, "prctl": [0, 0], "bad": [-1, errno.EINVAL],
                    "sizes": [8, 16, 8, 8], "array": [7, -3, 0], "ctypes_loaded": False}
