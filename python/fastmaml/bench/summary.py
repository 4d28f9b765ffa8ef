"""The suite's headline table: one line per comparison, fastmaml against its fastest baseline.

Each family's rows are reduced to the comparisons the benchmark specification names. A line whose
fastmaml row failed its accuracy check says FAILED and carries no speed-up; a comparison whose
baseline is missing (a peer that is not installed) says so.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

HVP_HEADLINES = ("exact forward_over_reverse", "exact (per-task loop, layer kernels)", "fd_forward float32 (saved grad)", "fd_central float64 eval")
HVP_ERR_BOUND = 1e-3  # relative to the float64 exact HVP; a looser HVP is reported FAILED
COLUMNS = ("family", "case", "fastmaml", "fastmaml_ms", "baseline", "baseline_ms", "speedup", "memory", "check")


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# "ok (f64)": beyond the float32 bound, equal to the reference in float64 (fastmaml.bench.meta)
PASSED = ("ok", "ok (f64)")


def _line(family: str, case: str, fast: Optional[dict], base: Optional[dict], *, speedup: float = math.nan,
          memory: str = "", check: Optional[str] = None) -> dict:
    if fast is None:
        return {"family": family, "case": case, "fastmaml": "", "fastmaml_ms": math.nan, "baseline": "",
                "baseline_ms": math.nan, "speedup": math.nan, "memory": memory, "check": check or "missing"}
    status = check or fast.get("check") or "ok"
    if base is None and status in PASSED:
        status = "no baseline"
    if status not in PASSED:
        speedup = math.nan  # a failed or incomparable line never reports a speed-up
    return {"family": family, "case": case, "fastmaml": fast.get("provider", ""),
            "fastmaml_ms": _num(fast.get("median_ms")), "baseline": (base or {}).get("provider", ""),
            "baseline_ms": _num((base or {}).get("median_ms")), "speedup": speedup, "memory": memory,
            "check": status}


def _fastest_ok(rows: Iterable[dict]) -> Optional[dict]:
    ok = [r for r in rows if r.get("check") in PASSED + ("low accuracy",) and not math.isnan(_num(r.get("median_ms")))]
    return min(ok, key=lambda r: _num(r["median_ms"]), default=None)


def inner_update_lines(rows: list[dict]) -> list[dict]:
    """Scalar-step update, out of place and in place, per task count: best fastmaml backend vs foreach."""
    lines = []
    keys = sorted({(r["tasks"], r["mode"], r.get("dtype", "")) for r in rows if r.get("lr_form") == "scalar"},
                  key=lambda k: (k[2], k[1], int(k[0])))
    for tasks, mode, dtype in keys:
        group = [r for r in rows if (r["tasks"], r["mode"], r.get("dtype", ""), r.get("lr_form")) ==
                 (tasks, mode, dtype, "scalar")]
        fast = _fastest_ok(r for r in group if r["provider"].startswith("fastmaml"))
        if fast is None:
            fast = next((r for r in group if r["provider"].startswith("fastmaml")), None)
        base = _fastest_ok(r for r in group if r["provider"].startswith("foreach"))
        speed = _num(base["median_ms"]) / _num(fast["median_ms"]) if fast and base else math.nan
        memory = f"{_num(fast['frac_of_copy']):.2f} of copy bandwidth" if fast else ""
        lines.append(_line("inner_update", f"conv4 T={tasks} {mode} {dtype}", fast, base, speedup=speed,
                           memory=memory))
    return lines


def meta_lines(rows: list[dict]) -> list[dict]:
    """Second-order meta-gradient (exact mode) per workload and K; HVP cost as a multiple of a gradient."""
    lines = []
    base = next((b for b in rows if b.get("workload") == "hvp" and b["provider"].startswith("double_backward")), None)
    for r in rows:
        if r.get("workload") == "hvp" and r["provider"] in HVP_HEADLINES:
            err = _num(r.get("rel_err_vs_f64"))
            check = "ok" if err <= HVP_ERR_BOUND else "FAILED"
            speed = _num(base["median_ms"]) / _num(r["median_ms"]) if base else math.nan
            lines.append(_line("meta", f"HVP conv4 T=8: {r['provider']} = {_num(r['x_gradient']):.2f}x a gradient",
                               {**r, "check": check}, base, speedup=speed, memory=f"rel err {err:.0e}"))
    for r in rows:  # the CPU kernels of the network's own layers, alone, against torch's ops
        if r.get("workload") == "layers" and r["provider"] == "fastmaml" and r.get("mode") in ("fwd+bwd", "double bwd"):
            base = next((b for b in rows if b.get("workload") == "layers" and b["provider"] == "torch"
                         and all(b.get(k) == r.get(k) for k in ("op", "shape", "mode"))), None)
            memory = (f"saves {_num(r.get('saved_mb')):.1f} MB vs {_num((base or {}).get('saved_mb')):.1f} MB"
                      if base and not math.isnan(_num(r.get("saved_mb"))) else "")
            lines.append(_line("meta", f"{r['op']} {r['shape']} {r['mode']}", r, base,
                               speedup=_num(r.get("speedup_vs_fastest_baseline")), memory=memory))
    keys = sorted({(r["workload"], int(r["tasks"]), int(r["steps"])) for r in rows
                   if r.get("workload") in ("A", "B", "C") and r.get("kind", "") != "memory_curve"})
    for workload, tasks, steps in keys:
        group = [r for r in rows if (r.get("workload"), int(r.get("tasks", 0)), int(r.get("steps") or 0)) ==
                 (workload, tasks, steps) and r.get("kind", "") != "memory_curve"]
        fast = next((r for r in group if r["provider"] == "fastmaml_exact"), None)
        name = (fast or {}).get("fastest_baseline", "")
        base = next((r for r in group if r["provider"] == name), None) if name else None
        memory = ""
        if fast is not None and base is not None and not math.isnan(_num(fast.get("peak_extra_mb"))):
            memory = (f"{_num(fast['peak_extra_mb']):.0f} MB vs {_num(base.get('peak_extra_mb')):.0f} MB "
                      f"(fastest baseline)")
        lines.append(_line("meta", f"workload {workload} T={tasks} K={steps}", fast, base,
                           speedup=_num((fast or {}).get("speedup_vs_fastest_baseline")), memory=memory))
        stock = next((r for r in group if r["provider"] == "fastmaml_stock_ops"), None)
        if stock is not None and workload in ("A", "B"):  # the same engine with torch's layers
            lines.append(_line("meta", f"workload {workload} T={tasks} K={steps} (torch's max-pool, relu, batch norm)", stock,
                               base, speedup=_num(stock.get("speedup_vs_fastest_baseline"))))
    return lines


def heads_lines(rows: list[dict]) -> list[dict]:
    """Thin products vs bmm; ridge vs the best torch.linalg route; SVM (QP alone and end to end)
    vs qpth and cvxpylayers."""
    lines = []
    configs = []
    for r in rows:
        key = (r.get("family"), r.get("mode"), r.get("tasks"), r.get("shot"), r.get("features"))
        if r.get("family") in ("ridge", "svm_qp", "svm_e2e") and key not in configs:
            configs.append(key)
    for r in rows:  # the thin products: compiled kernel against bmm
        if r.get("family") == "products" and r.get("provider") == "fastmaml":
            base = next((b for b in rows if b.get("family") == "products" and b.get("provider") == "bmm"
                         and all(b.get(k) == r.get(k) for k in ("mode", "tasks", "queries", "features", "n_way"))),
                        None)
            speed = _num(base["median_ms"]) / _num(r["median_ms"]) if base else math.nan
            case = f"task_matmul_{r['mode']} T={r['tasks']} m={r['queries']} d={r['features']} c={r['n_way']}"
            lines.append(_line("heads", case, r, base, speedup=speed, memory=f"rel err {_num(r.get('rel_err')):.0e}"))
    for family, mode, tasks, shot, d in configs:
        if mode not in ("fwd+bwd",):
            continue
        group = [r for r in rows if (r.get("family"), r.get("mode"), r.get("tasks"), r.get("shot"),
                                     r.get("features")) == (family, mode, tasks, shot, d)]
        case = f"{family} T={tasks} {shot}-shot d={d}"
        # fastmaml, and fastmaml with its CPU gradient-buffer cache bypassed where that row exists
        variants = [(r, case + (" (no buffer cache)" if r["provider"] == "fastmaml_no_cache" else ""))
                    for name in ("fastmaml", "fastmaml_no_cache")
                    for r in group if r["provider"] == name]
        if not variants:
            variants = [(None, case)]
        if family == "ridge":
            base = _fastest_ok(r for r in group if not r["provider"].startswith("fastmaml"))
            for fast, label in variants:
                speed = _num(base["median_ms"]) / _num(fast["median_ms"]) if fast and base else math.nan
                memory = ""
                if fast and base and not math.isnan(_num(fast.get("extra_mem_mb"))):
                    memory = f"{_num(fast['extra_mem_mb']):.0f} MB vs {_num(base.get('extra_mem_mb')):.0f} MB"
                lines.append(_line("heads", label, fast, base, speedup=speed, memory=memory))
            continue
        for fast, label in variants:
            for peer in ("qpth_maxIter3", "qpth_maxIter15", "cvxpylayers"):
                base = next((r for r in group if r["provider"] == peer), None)
                if base is None:
                    continue
                if base.get("check") == "skipped":
                    lines.append(_line("heads", f"{label} vs {peer}", fast, None, check="skipped: peer not installed"))
                    continue
                speed = _num(base["median_ms"]) / _num(fast["median_ms"]) if fast else math.nan
                note = f"baseline err {_num(base.get('rel_err')):.0e}, ours {_num((fast or {}).get('rel_err')):.0e}"
                lines.append(_line("heads", f"{label} vs {peer}", fast, base, speedup=speed, memory=note))
    return lines


FAMILY_LINES = {"inner_update": inner_update_lines, "meta": meta_lines, "heads": heads_lines}


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """results: family -> the rows its main() returned."""
    return [line for family, rows in results.items() for line in FAMILY_LINES[family](rows)]


def format_lines(lines: list[dict]) -> str:
    header = ("family", "case", "fastmaml ms", "baseline", "baseline ms", "speed-up", "memory / accuracy", "check")
    cells = []
    for ln in lines:
        cells.append((ln["family"], ln["case"], _fmt(ln["fastmaml_ms"]), ln["baseline"], _fmt(ln["baseline_ms"]),
                      "" if math.isnan(ln["speedup"]) else f"{ln['speedup']:.2f}x", ln["memory"], ln["check"]))
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(v.ljust(w) for v, w in zip(c, widths)) for c in cells]
    return "\n".join(out)


def _fmt(ms: float) -> str:
    if math.isnan(ms):
        return ""
    return f"{ms:.3f}" if ms < 1 else f"{ms:.1f}"
