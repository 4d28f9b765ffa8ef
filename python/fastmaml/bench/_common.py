"""Timing, environment and CSV helpers shared by the benchmarks."""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, *, repeats: int = 20, warmup: int = 3,
              min_time_s: float = 0.0) -> dict:
    """Median and quartiles of ``fn``'s wall time in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all) < min_time_s:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * repeats:
            break
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), statistics.median(times), max(times)]
    return {"median_ms": statistics.median(times), "p25_ms": q[0], "p75_ms": q[2], "n": len(times)}


def exact_float32(device: torch.device) -> None:
    """Turn TF32 off on CUDA: every provider's float32 is then IEEE float32.

    cuDNN convolutions use TF32 by default on Ampere and later (10-bit mantissa products), which
    puts every float32 provider ~3e-2 from the float64 reference on conv4 and makes the accuracy
    checks measure the GPU's rounding mode instead of the algorithms.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask, out_shape, **kwargs) -> int:
    """torch's count for ``convolution_backward``, with the weight gradient of a grouped
    convolution divided by ``groups``: torch 2.13 counts it as if the convolution were dense,
    ``groups`` times too much (vmap runs per-task conv weights as one grouped convolution, so the
    vmap rows of the conv workloads came out ~3x too high)."""
    from torch.utils.flop_counter import conv_flop_count

    def t(shape):
        return [shape[1], shape[0]] + list(shape[2:])

    total = 0
    if output_mask[0]:  # grad_input: a transposed convolution of grad_out with the weight
        total += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:  # grad_weight: a convolution of the input with grad_out, per group
        pair = (t(grad_out_shape), t(x_shape)) if transposed else (t(x_shape), t(grad_out_shape))
        total += conv_flop_count(*pair, t(out_shape[1]), transposed=False) // groups
    return total


def counted_gflop(fn: Callable[[], object]) -> tuple[object, float]:
    """(fn(), GFLOP of that call) as torch's FlopCounterMode counts them: matrix products and
    convolutions, forward and backward (elementwise work is not counted), with grouped
    convolutions' weight gradients counted right (``_conv_backward_flop``). NaN when the counter
    cannot follow the call (then fn() runs again uncounted)."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with FlopCounterMode(display=False,
                             custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop}) as counter:
            out = fn()
        return out, counter.get_total_flops() / 1e9
    except Exception:  # the count is a diagnostic: never let it hide the measured call
        return fn(), float("nan")


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except Exception:  # not a checkout
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    """What every CSV row carries: when, which code, which machine and versions."""
    from .. import __version__ as fastmaml_version
    from .._extension import HAS_NATIVE

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run_id": os.environ.get("FASTMAML_BENCH_RUN_ID", ""),
        "commit": git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "fastmaml": fastmaml_version + ("" if HAS_NATIVE else " (no native build)"),
        "python": platform.python_version(),
    }


def progress(iterable, desc: str, total: int | None = None):
    """A progress bar on stderr (tqdm when installed; otherwise the iterable unchanged)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def have_module(name: str) -> bool:
    """Whether an optional peer imports (a peer that is missing is reported as skipped)."""
    try:
        __import__(name)
        return True
    except Exception:  # a broken install counts as missing, with the same 'skipped' row
        return False


def results_dir() -> Path:
    """bench/results in a checkout, else ./bench-results."""
    root = Path(__file__).resolve().parents[3]
    target = root / "bench" / "results" if (root / "bench").is_dir() else Path.cwd() / "bench-results"
    target.mkdir(parents=True, exist_ok=True)
    return target


def append_csv(name: str, rows: list[dict]) -> Path:
    path = results_dir() / name
    if not rows:
        return path
    fields = list(rows[0].keys())
    if path.exists():
        with path.open() as fh:
            header = fh.readline().strip().split(",")
        if header != fields:  # columns changed: keep the old file aside rather than mix layouts
            path.rename(path.with_suffix(f".{int(time.time())}.csv.old"))
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    cells = [[format(r[k], f) if isinstance(r.get(k), (int, float)) else str(r.get(k, "")) for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (_, h, _) in enumerate(columns)]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def add_level_options(parser: argparse.ArgumentParser) -> None:
    """--quick / --full (default: standard), shared by every family of the suite."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", dest="level", action="store_const", const="quick",
                       help="smoke run: smallest sizes, fewest repeats")
    group.add_argument("--full", dest="level", action="store_const", const="full",
                       help="every size of the benchmark specification (slow: tens of minutes)")
    parser.set_defaults(level="standard")
