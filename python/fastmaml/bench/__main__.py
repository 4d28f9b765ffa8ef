"""``python -m fastmaml.bench``: run the benchmark suite and print its measured speed-ups.

Each family compares fastmaml with the baselines measured in the same run (plain PyTorch,
torch.func, and outside peers such as higher, learn2learn, qpth and cvxpylayers when they are
installed; a missing peer is reported as skipped), prints its full table, and appends its rows to
bench/results/<family>.csv with the date, commit, device and versions. The suite ends with one
headline table (also written to bench/results/summary.csv) and the figures of
``python -m fastmaml.bench.plot``.

Levels: ``--quick`` (a smoke run, about a minute), the default (a few minutes on a 2-core CPU),
``--full`` (every size of the benchmark specification: tens of minutes).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
import time

import torch

from . import FAMILIES
from ._common import append_csv, results_dir
from .summary import format_lines, summarize


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fastmaml.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(FAMILIES), action="append",
                        help="run only this family (repeatable); default: all")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--quick", dest="level", action="store_const", const="quick", help="smoke run")
    level.add_argument("--full", dest="level", action="store_const", const="full", help="every size (slow)")
    parser.set_defaults(level="standard")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-plots", action="store_true", help="do not write the PNG figures")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available on this machine (torch "
                     f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    families = list(dict.fromkeys(args.only or FAMILIES))
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    os.environ["FASTMAML_BENCH_RUN_ID"] = run_id  # stamped on every CSV row of this run
    forwarded = ([] if args.level == "standard" else [f"--{args.level}"]) + ["--device", args.device]
    print(f"fastmaml benchmark suite, level {args.level}, device {args.device}, run {run_id}", flush=True)
    results, failures = {}, 0
    for i, family in enumerate(families, 1):
        print(f"\n[{i}/{len(families)}] {family} ...", flush=True)
        start = time.perf_counter()
        module = importlib.import_module(f"{__package__}.{FAMILIES[family]}")
        rows = module.main(forwarded) or []
        results[family] = rows
        bad = [r for r in rows if r.get("check") == "FAILED"]
        ours = [r for r in bad if str(r.get("provider", "")).startswith("fastmaml")]
        failures += len(ours)
        print(f"[{i}/{len(families)}] {family} done in {time.perf_counter() - start:.0f} s"
              + (f", {len(bad)} rows FAILED their accuracy check ({len(ours)} of them fastmaml's)" if bad else ""),
              flush=True)
    lines = summarize(results)
    print("\nSummary (speed-up = fastest baseline's time / fastmaml's, same run; "
          "no speed-up is given for a line that failed its accuracy check)")
    print(format_lines(lines))
    append_csv("summary.csv", [{"run_id": run_id, "level": args.level, "device": args.device, **ln} for ln in lines])
    if not args.no_plots:
        from . import plot

        written = plot.main(["--results", str(results_dir()), "--out", str(results_dir() / "figures"),
                             "--run-id", run_id])
        if written:
            print(f"figures: {', '.join(str(p) for p in written)}")
    # A baseline that fails its check (e.g. torch.func.vmap through batch norm) is marked in the
    # tables; only a fastmaml row that fails makes the run fail.
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
