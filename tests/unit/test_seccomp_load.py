"""Loading pyseccomp runs no ``ldconfig``: the loader resolves libc and libseccomp itself."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import ctypes.util, json, os, sys
real = ctypes.util.find_library
lookups = []
ldconfig = ctypes.util._findSoname_ldconfig
def counted(name):
    lookups.append(name)
    return ldconfig(name)
ctypes.util._findSoname_ldconfig = counted
from sandbox_core.isolation import seccomp
program = seccomp.program()
print(json.dumps({"lookups": lookups, "restored": ctypes.util.find_library is real,
                  "bpf": len(program.bpf), "other": ctypes.util.find_library("m")}))
"""


def test_pyseccomp_loads_without_ldconfig_and_other_lookups_stay_real() -> None:
    import json

    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60, check=True)
    report = json.loads(out.stdout)
    assert report["bpf"] > 0 and report["restored"] is True
    assert report["lookups"] == ["m"]  # only the lookup made after the import went to ldconfig
    assert report["other"] == "libm.so.6"
