"""``python -m fastmaml.bench``: run the benchmark families and print their tables.

Each family compares fastmaml's backends with the baselines measured in the same run and appends
its rows to bench/results/<family>.csv.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time

from . import FAMILIES


def _available(family: str) -> bool:
    return importlib.util.find_spec(f"{__package__}.{FAMILIES[family]}") is not None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmaml.bench", description=__doc__)
    parser.add_argument("--only", choices=sorted(FAMILIES), action="append",
                        help="run only this family (repeatable); default: all")
    parser.add_argument("--quick", action="store_true", help="smaller sweeps and fewer repeats")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    families = args.only or list(FAMILIES)
    forwarded = (["--quick"] if args.quick else []) + ["--device", args.device]
    failures = 0
    for i, family in enumerate(families, 1):
        if not _available(family):
            print(f"[{i}/{len(families)}] {family}: skipped (not in this version)")
            continue
        print(f"\n[{i}/{len(families)}] {family} ...", flush=True)
        start = time.perf_counter()
        module = importlib.import_module(f"{__package__}.{FAMILIES[family]}")
        rows = module.main(forwarded) or []
        bad = [r for r in rows if r.get("check") == "FAILED"]
        failures += len(bad)
        print(f"[{i}/{len(families)}] {family} done in {time.perf_counter() - start:.0f} s"
              + (f", {len(bad)} rows FAILED their accuracy check" if bad else ""), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
