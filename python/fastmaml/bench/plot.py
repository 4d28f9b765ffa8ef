"""Turn the benchmark CSVs into PNG figures: time and memory against tasks and against inner steps.

Usage: ``python -m fastmaml.bench.plot [--results bench/results] [--out DIR] [--run-id ID ...]``.
Without ``--run-id`` each family's most recent run is plotted; several ``--run-id`` plot those runs
together (e.g. the separate commands of one commit's A/B measurements). Needs matplotlib.
"""
from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path

from ._common import results_dir


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as fh:
        return list(csv.DictReader(fh))


def latest_run(rows: list[dict], run_id=None) -> list[dict]:
    """The rows of one run: the given run id (or ids: a list), else the newest (run id, or date for
    rows without one)."""
    if not rows:
        return []
    if run_id:  # a suite run's id, or the date stamp of a family run on its own
        wanted = {run_id} if isinstance(run_id, str) else set(run_id)
        return [r for r in rows if r.get("run_id") in wanted or r.get("date") in wanted]
    key = max((r.get("run_id") or "", r.get("date") or "") for r in rows)
    return [r for r in rows if (r.get("run_id") or "", r.get("date") or "") == key]


def num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _series(rows, x_key, y_key, group_key):
    """{group: ([x], [y])} sorted by x, dropping missing values."""
    out = defaultdict(list)
    for r in rows:
        x, y = num(r.get(x_key)), num(r.get(y_key))
        if not (math.isnan(x) or math.isnan(y)):
            out[r[group_key]].append((x, y))
    return {g: tuple(zip(*sorted(pts))) for g, pts in out.items()}


_COLORS: dict = {}  # one color per series name across all panels of a run


def _lines(ax, series, *, xlabel, ylabel, title, logx=False, logy=False):
    for name, (xs, ys) in sorted(series.items()):
        style = "-" if "fastmaml" in name else "--"
        color = _COLORS.setdefault(name, f"C{len(_COLORS) % 10}")
        ax.plot(xs, ys, style, marker="o", label=name, color=color)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=7)


def _subtitle(rows) -> str:
    r = rows[0]
    commits = ", ".join(dict.fromkeys(x.get("commit", "") for x in rows))
    return f"{r.get('device', '')}, torch {r.get('torch', '')}, commit {commits}"


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_inner_update(rows, out: Path, plt) -> list[Path]:
    rows = [r for r in rows if r.get("lr_form") == "scalar" and r.get("dtype", "float32") == "float32"]
    if not rows:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, ("out-of-place", "in-place")):
        _lines(ax, _series([r for r in rows if r["mode"] == mode], "tasks", "median_ms", "provider"),
               xlabel="tasks T", ylabel="time per update (ms)", title=f"inner update, conv4, {mode}",
               logx=True, logy=True)
    fig.suptitle(f"fused inner update (scalar step): {_subtitle(rows)}", fontsize=9)
    path = _save(fig, plt, out / "bench_inner_update_vs_tasks.png")
    return [path]


def plot_meta(rows, out: Path, plt) -> list[Path]:
    written = []
    conv = [r for r in rows if r.get("workload") in ("A", "B")]
    if conv:
        workloads = sorted({r["workload"] for r in conv})
        fig, axes = plt.subplots(2, len(workloads), figsize=(5.5 * len(workloads), 8), squeeze=False)
        for j, wl in enumerate(workloads):
            timed = [r for r in conv if r["workload"] == wl and r.get("kind") != "memory_curve"
                     and r.get("check") in ("ok", "ok (f64)")]
            _lines(axes[0][j], _series(timed, "steps", "median_ms", "provider"), xlabel="inner steps K",
                   ylabel="meta-gradient time (ms)", title=f"workload {wl}: time, second order", logy=True)
            mem = [r for r in conv if r["workload"] == wl]
            _lines(axes[1][j], _series(mem, "steps", "peak_extra_mb", "provider"), xlabel="inner steps K",
                   ylabel="peak extra memory (MB)", title=f"workload {wl}: memory", logy=True)
        fig.suptitle(f"meta-gradient engine: {_subtitle(conv)}", fontsize=9)
        path = _save(fig, plt, out / "bench_meta_vs_steps.png")
        written.append(path)
    sine = [r for r in rows if r.get("workload") == "C" and r.get("check") in ("ok", "ok (f64)")]
    if sine:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        _lines(ax, _series(sine, "tasks", "median_ms", "provider"), xlabel="tasks T", ylabel="meta-gradient time (ms)",
               title="workload C: sinusoid MLP, K=1", logx=True, logy=True)
        fig.suptitle(_subtitle(sine), fontsize=8)
        path = _save(fig, plt, out / "bench_meta_sinusoid_vs_tasks.png")
        written.append(path)
    return written


def plot_heads(rows, out: Path, plt) -> list[Path]:
    written = []
    ridge = [r for r in rows if r.get("family") == "ridge"]
    if ridge:
        dims = sorted({r["features"] for r in ridge}, key=int)
        fig, axes = plt.subplots(1, len(dims), figsize=(5.5 * len(dims), 4), squeeze=False)
        for ax, d in zip(axes[0], dims):
            sub = [dict(r, series=f"{r['provider']} {r['shot']}-shot") for r in ridge if r["features"] == d]
            _lines(ax, _series(sub, "tasks", "median_ms", "series"), xlabel="tasks T", ylabel="fwd+bwd time (ms)",
                   title=f"R2-D2 ridge head, d={d}", logx=True, logy=True)
        fig.suptitle(_subtitle(ridge), fontsize=8)
        path = _save(fig, plt, out / "bench_heads_ridge_vs_tasks.png")
        written.append(path)
    svm = [r for r in rows if r.get("family") in ("svm_qp", "svm_e2e") and r.get("mode") == "fwd+bwd"
           and not math.isnan(num(r.get("median_ms")))]
    if svm:
        configs = list(dict.fromkeys((r["family"], r["tasks"], r["shot"], r["features"]) for r in svm))
        providers = list(dict.fromkeys(r["provider"] for r in svm))
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(configs)), 4))
        width = 0.8 / len(providers)
        for k, prov in enumerate(providers):
            heights = []
            for cfg in configs:
                match = [num(r["median_ms"]) for r in svm if (r["family"], r["tasks"], r["shot"], r["features"]) == cfg
                         and r["provider"] == prov]
                heights.append(match[0] if match else 0.0)
            ax.bar([i + k * width for i in range(len(configs))], heights, width, label=prov)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))])
        ax.set_xticklabels([f"{f}\nT={t} {s}-shot\nd={d}" for f, t, s, d in configs], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("fwd+bwd time (ms)")
        ax.set_title(f"MetaOptNet SVM head: {_subtitle(svm)}", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
        path = _save(fig, plt, out / "bench_heads_svm.png")
        written.append(path)
    return written


PLOTTERS = {"inner_update.csv": plot_inner_update, "meta.csv": plot_meta, "heads.csv": plot_heads}


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m fastmaml.bench.plot", description=__doc__)
    parser.add_argument("--results", type=Path, default=None, help="folder with the CSVs (default bench/results)")
    parser.add_argument("--out", type=Path, default=None, help="where the PNGs go (default <results>/figures)")
    parser.add_argument("--run-id", action="append", default=None,
                        help="plot this run: a suite run id or a row's date stamp (default: each family's latest); "
                             "repeat to plot several runs together")
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed")
        return []
    results = args.results or results_dir()
    if not results.is_dir():
        parser.error(f"--results: {results} is not a folder")
    out = args.out or results / "figures"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plotter in PLOTTERS.items():
        rows = latest_run(read_rows(results / name), args.run_id)
        if rows:
            written += plotter(rows, out, plt)
    return written


if __name__ == "__main__":
    for p in main():
        print(p)
