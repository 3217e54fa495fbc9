"""The compiled seccomp program is kept for the next host process, and only believed when trustworthy.

Each check runs in a fresh interpreter (the program is also cached per process), which reports
whether it loaded pyseccomp (that is, compiled) and the program's bytes.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = """
import json, sys
from pathlib import Path
from sandbox_core.isolation import seccomp
program = seccomp.program(True, Path(sys.argv[1]))
print(json.dumps({"compiled": "pyseccomp" in sys.modules, "ctypes": "ctypes" in sys.modules,
                  "bpf": program.bpf.hex(), "rules": program.rules, "denied": list(program.denied)}))
"""


def _program(cache: Path) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", CHECK, str(cache)], capture_output=True, text=True, timeout=60,
                         check=True)  # fmt: skip
    result = json.loads(out.stdout)
    assert isinstance(result, dict)
    return result


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    path = tmp_path / "probes"
    path.mkdir(mode=0o700)
    return path


def _kept(cache: Path) -> Path:
    (kept,) = [p for p in cache.iterdir() if p.name.startswith("seccomp-")]
    return kept


def test_a_second_process_takes_the_kept_program_without_compiling(cache: Path) -> None:
    first = _program(cache)
    assert first["compiled"] is True
    kept = _kept(cache)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    second = _program(cache)
    assert second["compiled"] is False and second["ctypes"] is False  # neither pyseccomp nor ctypes loaded
    assert second["bpf"] == first["bpf"] and second["rules"] == first["rules"]
    assert second["denied"] == first["denied"]


@pytest.mark.parametrize("spoil", ["mode", "library", "source", "bpf"])
def test_a_kept_program_that_could_be_stale_or_foreign_is_compiled_again(cache: Path, spoil: str) -> None:
    first = _program(cache)
    kept = _kept(cache)
    record = json.loads(kept.read_text())
    if spoil == "mode":  # someone else could have written it
        kept.chmod(0o644)
    else:
        if spoil == "library":  # libseccomp or pyseccomp replaced since (another identity)
            name = next(n for n in record["files"] if "libseccomp" in n)
            record["files"][name] = "0:0:0:0:0"
        elif spoil == "source":  # made by another version of the filter's rules
            record["source"] = "0" * 64
        else:  # not whole BPF instructions
            record["bpf"] = record["bpf"][:-2]
        kept.write_text(json.dumps(record))
        os.chmod(kept, 0o600)
    again = _program(cache)
    assert again["compiled"] is True
    assert again["bpf"] == first["bpf"]
    assert _program(cache)["compiled"] is False  # and what it kept instead is believed again


def test_no_cache_directory_compiles_and_keeps_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "not-there"
    assert _program(missing)["compiled"] is True
    assert not missing.exists()
