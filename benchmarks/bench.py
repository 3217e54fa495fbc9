"""Benchmark script: ``./dev bench [--profile P] [--quick] [--json] [--only STEP]...`` (not a test).

Prints each figure with its target and, where there is one, the baseline measured in
the same run and the ratio to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from sandbox_core.bench import Figure, run_suite
from sandbox_core.config import load_config
from sandbox_core.errors import ConfigError


def _line(f: Figure) -> str:
    unit = f.unit.split()[0]
    base = f"  baseline {f.baseline} {unit}  ratio {f.ratio}x" if f.baseline is not None else ""
    verdict = "" if f.ok is None else ("  PASS" if f.ok else "  MISS")
    extra = "  " + " ".join(f"{k}={v}" for k, v in f.detail.items()) if f.detail else ""
    target = f"  target {f.target}" if f.target else ""
    return f"{f.name:<28} {f.value:>9} {f.unit}{base}{target}{verdict}{extra}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", choices=["strict", "process"], default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", action="append", default=[], metavar="STEP",
                        help="run only this step (repeatable), e.g. --only 'claim new user'")
    args = parser.parse_args()
    overrides = {"profile": args.profile} if args.profile else {}
    config = load_config(overrides=overrides).config
    try:
        figures = asyncio.run(run_suite(config, args.quick, lambda n: print(f"... {n}", file=sys.stderr),
                                        only=tuple(args.only)))
    except ConfigError as exc:
        parser.error(exc.message)
    if args.json:
        print(json.dumps([f.to_dict() for f in figures], indent=2))
    else:
        for figure in figures:
            print(_line(figure))


if __name__ == "__main__":
    main()
