"""Benchmark of the meta-gradient engine (fastmaml.meta) against the two usual baselines.

Workloads (the issue's):
  A: conv4 (64 filters, BN) on 1x28x28, 5-way 1-shot, 15 query per class, T = 8, lr 0.4, second order.
  B: conv4 (32 filters, BN) on 3x84x84, 5-way 1-shot, 15 query per class, T = 4, lr 0.01.
  C: sinusoid MLP 1-40-40-1, 10 support and 10 query points, 1 inner step, T = 25 and 1000.
  hvp: HVPs of the conv4 (A) support loss at per-task points, as a multiple of one gradient (the
      fastest of the measured ways to compute one).
  layers: the CPU kernels for the network's own layers against torch's ops, alone, on conv4
      activation shapes: max_pool2x2 vs F.max_pool2d, relu_bitmask vs torch.relu and
      batch_norm_train vs F.batch_norm (training mode), forward and forward + backward (batch norm
      also its double backward), with the bytes autograd saves for the backward; and the first
      convolution (data input) with conv2d_fixed_input vs F.conv2d, fwd+bwd and double backward;
      and batch norm + 2x2 max-pool differentiated as one layer (the fused conv path's kernels:
      backward, output tangent, R-operator backward) vs torch.func over torch's two ops.

Providers of the second-order meta-gradient (d mean_t L_query / d theta):
  loop_autograd   baseline: per-task loop, torch.autograd.grad(create_graph=True) (learn2learn pattern)
  func_vmap       baseline: torch.func.vmap of a functional inner loop, outer torch.autograd.grad
  higher          peer (when installed): per-task loop with higher.innerloop_ctx and a differentiable SGD
  learn2learn     peer (when installed): per-task loop with l2l.algorithms.MAML clone/adapt
  fastmaml_exact  maml_loss(hvp_mode="exact"), what users get by default: custom backward recursion with
                  the faster exact HVP for the batching (C: the fused MLP path, hand-written gradients and
                  R-operator HVPs; A, B: the fused conv path, the same for conv nets per task)
  fastmaml_loop   maml_loss(batching="loop"): the per-task autograd loop with the layer kernels and a
                  double-backward HVP, what A and B ran before the fused conv path
  fastmaml_fwdrev, fastmaml_revrev, fastmaml_stacked (on request): one HVP mode or batching forced (on
                  the fused MLP path every exact mode is the same R-operator)
  fastmaml_vmap   (on request) maml_loss(batching="vmap"): the generic vmap path, what "auto" ran on C
                  before the fused MLP path
  fastmaml_nolast, fastmaml_keepfirst (on request): fastmaml_loop with reuse_last_step=False (every
                  HVP recomputes its support pass, as before) / with keep_first_graph=True
  fastmaml_stock_ops  fastmaml_exact with torch's own max-pool, relu and batch norm (``stock_kernels()``,
                  which also turns the fused conv path off: the per-task autograd loop on torch's ops):
                  what the engine's compiled layer kernels contribute on the conv workloads (the same
                  results; batch norm's channel sums are added in another order)
  fastmaml_fresh_blocks  (on request) fastmaml_exact without the reuse of freed CPU blocks
                  (``no_block_reuse()``): every allocation from PyTorch's allocator, as before
  fastmaml_task_by_task  (on request) fastmaml_exact with task_by_task=True: each task's inner loop and
                  backward in turn, one task's per-step tensors kept
  fastmaml_fd64   maml_loss(hvp_mode="fd_central", fd_dtype=float64)
  fastmaml_fd32   maml_loss(hvp_mode="fd_forward") in float32 (reuses the saved gradients)

Accuracy: every provider's float32 meta-gradient is compared with the float64 loop_autograd
reference on the same weights and data; the row is ``ok`` when its relative error is at most
``max(2 * err(loop_autograd, float32), 1e-3)`` (flash-attention's rule with a float32 floor). An exact
provider beyond it is run once more in float64: ``ok (f64)`` when it then equals the reference to
1e-8 (``f64_rel_err``; its float32 difference is a ReLU / max-pool branch that float32 rounding
took the other way, which happens to every provider on some seeds), else ``FAILED`` and it gets no
speed-up. Finite-difference providers keep the float32 rule alone. Time: median (p25-p75) wall time over repeats, in-process, and the median process CPU time. Memory: each (provider, K)
runs in a fresh subprocess: one untimed call, then the peak extra memory of a second call, the
resident-set high-water mark during it (VmHWM, reset through /proc/self/clear_refs just before it)
minus the resident set before it (after model, data and the first call): everything the call allocated at its peak (autograd graph,
activations, saved per-step parameters, allocator slack), measured by the OS, not by a profiler.
(getrusage's ru_maxrss is not usable here: Linux carries it across execve from the parent.)
Children run with MALLOC_MMAP_THRESHOLD_=131072 (see MALLOC_ENV) so that freed activation blocks
go back to the OS instead of fragmenting the heap.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from ..meta.front import maml_loss
from ..meta.functional import TaskModel, batch_stats_only
from ..meta.hvp import batched_grad, hvp
from ..meta.inner_loop import normalize_step_sizes
from ..meta.models import Conv4, mse_loss, sinusoid_mlp
from ..ops.block_reuse import no_block_reuse
from ..ops.cpu_kernels import stock_kernels
from ..reference.meta import maml_loss_reference
from ._common import (add_level_options, append_csv, counted_gflop, environment, exact_float32, have_module,
                      print_table, progress, sync)

# float32 meta-gradients of BN conv nets differ from float64 by 1e-6 to 5e-3 for every correct
# implementation (the per-task autograd loop included); below this floor a difference is rounding.
ERR_FLOOR = 1e-3
# fastmaml_fd32 (forward differences in float32) is not run by default: on these ReLU / max-pool
# nets its error is 7e-2 to 1e3 relative (docs/meta.md); ask for it with --providers.
PROVIDERS = ("loop_autograd", "func_vmap", "higher", "learn2learn", "fastmaml_exact", "fastmaml_loop",
             "fastmaml_stock_ops", "fastmaml_fd64")
OPTIONAL_PROVIDERS = ("fastmaml_fd32", "fastmaml_fwdrev", "fastmaml_revrev", "fastmaml_stacked", "fastmaml_vmap",
                      "fastmaml_nolast", "fastmaml_keepfirst", "fastmaml_fresh_blocks", "fastmaml_task_by_task")
BASELINES = ("loop_autograd", "func_vmap", "higher", "learn2learn")
FD_PROVIDERS = ("fastmaml_fd64", "fastmaml_fd32")  # approximations: their float32 error is their accuracy
# An exact provider whose float32 error is beyond the float32 bound passes ("ok (f64)") if the same
# implementation in float64 equals the float64 reference to this: the float32 difference is then
# rounding that a ReLU / max-pool kink turned into another branch (A, seed 0, K = 5: 4.7e-3 for
# fastmaml_exact, 2.7e-5 for loop_autograd; with the seed changed, 1e-5 to 1e-1 for *every*
# provider, loop_autograd included), not an error of the implementation.
EXACT_F64_TOL = 1e-8
PEERS = {"higher": "higher", "learn2learn": "learn2learn"}  # provider -> module it needs

# What each level of the suite runs: quick is a smoke run (about a minute), standard the default
# (a few minutes on 2 cores), full every size of the issue (about 40 minutes on 2 cores).
LEVELS = {
    "quick": dict(workloads=("layers", "hvp", "C", "A"), c_tasks=(1000,), a_steps=(1,), b_steps=(), memory=False,
                  memory_workloads=(), memory_providers=None, curve_steps=(), repeats=2, c_repeats=3, hvp_repeats=3),
    # standard: each peak-memory run is a fresh process (~4 s of start-up), so only the conv
    # workloads and the providers the memory claims are about get one
    "standard": dict(workloads=("layers", "hvp", "C", "A", "B"), c_tasks=(25, 1000), a_steps=(1, 5), b_steps=(5,),
                     memory=True, memory_workloads=("A", "B"),
                     memory_providers=("loop_autograd", "func_vmap", "higher", "fastmaml_exact",
                                       "fastmaml_task_by_task"),
                     curve_steps=(2, 10), repeats=2, c_repeats=5, hvp_repeats=3),
    "full": dict(workloads=("layers", "hvp", "C", "A", "B"), c_tasks=(25, 1000), a_steps=(1, 5, 10, 20), b_steps=(5, 20),
                 memory=True, memory_workloads=("A", "B", "C"), memory_providers=None,
                 curve_steps=tuple(range(1, 21)), repeats=3, c_repeats=15, hvp_repeats=7),
}


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------
def make_workload(name: str, num_tasks: int, dtype=torch.float32, seed: int = 0, device="cpu"):
    """(model, loss_fn, support, query, lr) for workload A, B or C (made on the CPU, then moved:
    the same weights and data on every device)."""
    net, loss_fn, support, query, lr = _make_workload_cpu(name, num_tasks, dtype, seed)
    if torch.device(device).type != "cpu":
        net = net.to(device)
        support, query = tuple(t.to(device) for t in support), tuple(t.to(device) for t in query)
    return net, loss_fn, support, query, lr


def _make_workload_cpu(name: str, num_tasks: int, dtype, seed: int):
    torch.manual_seed(seed)
    if name in ("A", "B"):
        channels, filters, size = (1, 64, 28) if name == "A" else (3, 32, 84)
        net = Conv4(channels, filters, 5, size).to(dtype)
        xs = torch.randn(num_tasks, 5, channels, size, size, dtype=dtype)
        ys = torch.arange(5).repeat(num_tasks, 1)
        xq = torch.randn(num_tasks, 75, channels, size, size, dtype=dtype)
        yq = torch.arange(5).repeat_interleave(15).repeat(num_tasks, 1)
        # lr 0.4 (MAML's Omniglot value) for A; 0.01 (MAML's miniImageNet value) for B: with 0.4 on
        # 84x84 inputs the inner loop is chaotic and float32 meta-gradients of *every* provider
        # (the autograd loop included) differ from float64 by 15-20%.
        return net, F.cross_entropy, (xs, ys), (xq, yq), 0.4 if name == "A" else 0.01
    if name == "C":
        net = sinusoid_mlp().to(dtype)
        amp = torch.rand(num_tasks, 1, 1, dtype=dtype) * 4.9 + 0.1
        phase = torch.rand(num_tasks, 1, 1, dtype=dtype) * 3.14159
        xs = torch.rand(num_tasks, 10, 1, dtype=dtype) * 10 - 5
        xq = torch.rand(num_tasks, 10, 1, dtype=dtype) * 10 - 5
        return net, mse_loss, (xs, amp * torch.sin(xs + phase)), (xq, amp * torch.sin(xq + phase)), 0.01
    raise ValueError(f"unknown workload {name!r}")


def _cast(batch, dtype):
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)


def provider_fn(provider: str, net, loss_fn, support, query, num_steps: int, lr: float):
    """A closure computing the meta-gradient (list of tensors, one per parameter)."""
    tm = TaskModel(net, loss_fn)
    params = list(net.parameters())
    if provider == "loop_autograd":
        per_step, _ = normalize_step_sizes(lr, num_steps, [p.shape for p in params])
        return lambda: torch.autograd.grad(maml_loss_reference(tm, support, query, per_step).mean(), params)
    if provider == "func_vmap":
        names = [n for n, _ in net.named_parameters()]

        def loss(p, x, y):
            return loss_fn(tm.forward([p[n] for n in names], [], x), y)

        def task(p, xs, ys, xq, yq):
            for _ in range(num_steps):
                g = grad(loss)(p, xs, ys)
                p = {n: p[n] - lr * g[n] for n in names}
            return loss(p, xq, yq)

        def run():
            p = dict(zip(names, params))
            losses = vmap(task, in_dims=(None, 0, 0, 0, 0))(p, *support, *query)
            return torch.autograd.grad(losses.mean(), params)

        return run
    if provider == "higher":
        return _higher_fn(net, loss_fn, support, query, num_steps, lr, params)
    if provider == "learn2learn":
        return _learn2learn_fn(net, loss_fn, support, query, num_steps, lr, params)
    kw = {"fastmaml_exact": dict(hvp_mode="exact"),
          "fastmaml_stock_ops": dict(hvp_mode="exact"),  # run inside stock_kernels() below
          "fastmaml_fwdrev": dict(hvp_mode="forward_over_reverse"),
          "fastmaml_stacked": dict(hvp_mode="exact", batching="stacked"),
          "fastmaml_vmap": dict(hvp_mode="exact", batching="vmap"),
          "fastmaml_fd64": dict(hvp_mode="fd_central", fd_dtype=torch.float64),
          "fastmaml_fd32": dict(hvp_mode="fd_forward"),
          "fastmaml_revrev": dict(hvp_mode="reverse_over_reverse"),
          "fastmaml_loop": dict(hvp_mode="exact", batching="loop"),
          "fastmaml_nolast": dict(hvp_mode="exact", batching="loop", reuse_last_step=False),
          "fastmaml_keepfirst": dict(hvp_mode="exact", batching="loop", keep_first_graph=True),
          "fastmaml_fresh_blocks": dict(hvp_mode="exact"),  # run inside no_block_reuse()
          "fastmaml_task_by_task": dict(hvp_mode="exact", task_by_task=True)}[provider]
    ops = {"fastmaml_stock_ops": stock_kernels, "fastmaml_fresh_blocks": no_block_reuse}.get(provider,
                                                                                            contextlib.nullcontext)

    def run():
        with ops():
            return torch.autograd.grad(maml_loss(tm, support=support, query=query, num_steps=num_steps, lr=lr,
                                                 check_finite=False, **kw), params)

    return run


def _per_task_meta_grad(net, loss_fn, support, query, params, task_query_loss):
    """Mean over tasks of d L_query / d theta, one task at a time (how the peers are used)."""
    (xs, ys), (xq, yq) = support, query
    num_tasks = xs.shape[0]

    def run():
        total = [torch.zeros_like(p) for p in params]
        with batch_stats_only(net):  # batch statistics per task, as every provider uses
            for t in range(num_tasks):
                loss = task_query_loss(xs[t], ys[t], xq[t], yq[t]) / num_tasks
                for acc, g in zip(total, torch.autograd.grad(loss, params)):
                    acc += g
        return total

    return run


def _higher_fn(net, loss_fn, support, query, num_steps, lr, params):
    import higher

    inner_opt = torch.optim.SGD(params, lr=lr)

    def task_query_loss(xs, ys, xq, yq):
        with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False, track_higher_grads=True) as (fnet, opt):
            for _ in range(num_steps):
                opt.step(loss_fn(fnet(xs), ys))
            return loss_fn(fnet(xq), yq)

    return _per_task_meta_grad(net, loss_fn, support, query, params, task_query_loss)


def _learn2learn_fn(net, loss_fn, support, query, num_steps, lr, params):
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(net, lr=lr, first_order=False)

    def task_query_loss(xs, ys, xq, yq):
        learner = maml.clone()
        for _ in range(num_steps):
            learner.adapt(loss_fn(learner(xs), ys))
        return loss_fn(learner(xq), yq)

    return _per_task_meta_grad(net, loss_fn, support, query, params, task_query_loss)


def time_wall_and_cpu(fn, repeats: int, warmup: int = 1, device="cpu") -> dict:
    """Median and quartiles of wall time, and median process CPU time (all threads), in ms.

    On a shared machine the wall time includes waiting for the CPU; the CPU time does not (with one
    thread it is the compute time). Both are reported; speed-ups are given for both.
    """
    import statistics
    import time

    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append((time.perf_counter() - w0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    q = statistics.quantiles(wall, n=4) if len(wall) >= 2 else [wall[0], wall[0], wall[0]]
    return {"median_ms": statistics.median(wall), "p25_ms": q[0], "p75_ms": q[2], "n": len(wall),
            "cpu_ms": statistics.median(cpu)}


def rel_err(got, ref) -> float:
    a = torch.cat([t.double().reshape(-1) for t in got])
    b = torch.cat([t.double().reshape(-1) for t in ref])
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------
# Peak memory in a fresh subprocess
# ---------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec.get("device", "cpu"))
    net, loss_fn, sup, qry, lr = make_workload(spec["workload"], spec["tasks"], device=device)
    fn = provider_fn(spec["provider"], net, loss_fn, sup, qry, spec["steps"], lr)
    # One call first: what a training loop pays each iteration is measured, not what only the first
    # call of a process pays (library code paged in on first use, oneDNN kernels and scratchpads
    # created for new shapes: ~54 MB that stayed resident after the first double backward on B).
    fn()
    gc.collect()
    if device.type == "cuda":  # the caching allocator's own peak: what the call allocated on the device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        print(json.dumps({"extra_mb": (torch.cuda.max_memory_allocated(device) - before) / 2**20}))
        return
    # getrusage's ru_maxrss survives execve on Linux (a child inherits the parent's peak), so the
    # peak is read from this process's own VmHWM, reset to the current RSS just before the call.
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _status_kb("VmRSS")
        fn()
        after = _status_kb("VmHWM")
    except OSError:  # no procfs: fall back to ru_maxrss (exact only if the parent's peak is lower)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_mb": (after - before) / 1024.0}))


# A fixed mmap threshold: glibc's dynamic threshold otherwise serves freed-and-reallocated blocks of
# up to 32 MB from the heap, whose fragmentation inflates the RSS high-water mark by ~40 MB per
# inner step for *every* provider (measured on A: fastmaml_exact +46 MB/step with the default,
# +7.2 MB/step = exactly 2 T P float32 with this setting; loop_autograd +54 vs +53 MB/step).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def peak_extra_mb(workload: str, tasks: int, provider: str, steps: int, timeout: float = 900,
                  device="cpu") -> float:
    spec = json.dumps({"workload": workload, "tasks": tasks, "provider": provider, "steps": steps,
                       "threads": torch.get_num_threads(), "device": str(device)})
    code = f"from fastmaml.bench.meta import _child; _child({spec!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", **MALLOC_ENV})
    if out.returncode != 0:
        return float("nan")
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
def _skipped(providers) -> dict:
    """Peers that are not installed: reported as skipped rows, never timed or faked."""
    return {p: f"skipped: {PEERS[p]} not installed" for p in providers if p in PEERS and not have_module(PEERS[p])}


def run_meta(workload: str, tasks: int, steps_list, providers, repeats: int, memory_steps, env,
             device="cpu", memory_providers=None) -> list[dict]:
    rows = []
    skipped = _skipped(providers)
    active = [p for p in providers if p not in skipped]
    for steps in steps_list:
        net, loss_fn, sup, qry, lr = make_workload(workload, tasks, device=device)
        net64 = make_workload(workload, tasks, device=device)[0].double()
        net64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in net.state_dict().items()})
        ref = provider_fn("loop_autograd", net64, loss_fn, _cast(sup, torch.float64), _cast(qry, torch.float64),
                          steps, lr)()
        errs, times, gflop = {}, {}, {}
        for p in progress(active, f"meta {workload} T={tasks} K={steps}"):
            fn = provider_fn(p, net, loss_fn, sup, qry, steps, lr)
            try:
                out, gflop[p] = counted_gflop(fn)  # the accuracy call is also the counted one
                errs[p] = rel_err(out, ref)
                times[p] = time_wall_and_cpu(fn, repeats, device=device)
            except Exception as exc:  # a provider that cannot run this workload is reported, not hidden
                gflop[p] = float("nan")
                errs[p], times[p] = float("nan"), {"median_ms": float("nan"), "p25_ms": float("nan"),
                                                   "p75_ms": float("nan"), "n": 0, "cpu_ms": float("nan"),
                                                   "error": repr(exc)[:120]}
        loop_err = errs.get("loop_autograd", float("nan"))  # unknown when the loop is not run: the floor alone
        bound = max(2 * loop_err, ERR_FLOOR) if loop_err == loop_err else ERR_FLOOR
        ok = {p: errs[p] <= bound for p in active}
        errs64 = {}
        for p in active:  # beyond the float32 bound: is it the implementation, or float32 on kinks?
            if not ok[p] and errs[p] == errs[p] and p not in FD_PROVIDERS:
                try:
                    errs64[p] = rel_err(provider_fn(p, net64, loss_fn, _cast(sup, torch.float64),
                                                    _cast(qry, torch.float64), steps, lr)(), ref)
                except Exception:  # reported as the float32 failure it already is
                    errs64[p] = float("nan")
                ok[p] = errs64[p] <= EXACT_F64_TOL
        base = [times[b]["median_ms"] for b in BASELINES if b in times and ok.get(b)]
        fastest = min(base) if base else float("nan")
        base_cpu = [times[b]["cpu_ms"] for b in BASELINES if b in times and ok.get(b)]
        fastest_cpu = min(base_cpu) if base_cpu else float("nan")
        fastest_name = min((b for b in BASELINES if b in times and ok.get(b)), key=lambda b: times[b]["median_ms"],
                           default="")
        fastest_gflop = gflop.get(fastest_name, float("nan"))
        for p in providers:
            if p in skipped:
                rows.append({**env, "workload": workload, "tasks": tasks, "steps": steps, "provider": p,
                             "check": "skipped", "note": skipped[p]})
                continue
            measure = steps in memory_steps and (memory_providers is None or p in memory_providers)
            mem = peak_extra_mb(workload, tasks, p, steps, device=device) if measure else float("nan")
            rows.append({**env, "workload": workload, "tasks": tasks, "steps": steps, "provider": p,
                         **{k: v for k, v in times[p].items() if k != "error"}, "peak_extra_mb": mem,
                         "rel_err_vs_f64": errs[p], "err_bound": bound,
                         "f64_rel_err": errs64.get(p, float("nan")),
                         "check": ("ok (f64)" if p in errs64 else "ok") if ok[p] else "FAILED",
                         "speedup_vs_fastest_baseline": fastest / times[p]["median_ms"] if ok[p] else float("nan"),
                         "fastest_baseline": fastest_name,
                         "gflop": gflop[p],
                         # the speed-up if every provider ran at the fastest baseline's FLOP rate
                         "flop_speedup": fastest_gflop / gflop[p] if ok[p] and gflop[p] > 0 else float("nan"),
                         "cpu_speedup_vs_fastest_baseline": (fastest_cpu / times[p]["cpu_ms"] if ok[p]
                                                             else float("nan")),
                         "note": times[p].get("error", "")})
    return rows


def memory_curve(workload: str, tasks: int, steps_list, providers, env, device="cpu") -> list[dict]:
    rows = []
    for steps in progress(steps_list, f"memory curve {workload}"):
        for p in providers:
            rows.append({**env, "workload": workload, "tasks": tasks, "steps": steps, "provider": p,
                         "peak_extra_mb": peak_extra_mb(workload, tasks, p, steps, device=device),
                         "kind": "memory_curve"})
    return rows


def run_hvp(tasks: int, repeats: int, env, device="cpu") -> list[dict]:
    """HVPs of the conv4 (A) support loss at per-task points, as a multiple of one gradient (the
    fastest of the gradient rows)."""
    net, loss_fn, (xs, ys), _, _ = make_workload("A", tasks, device=device)
    tm = TaskModel(net, loss_fn)
    torch.manual_seed(1)
    phi = [p + 0.01 * torch.randn_like(p) for p in tm.initial_adapted(list(net.parameters()), tasks)]
    v = [torch.randn_like(p) for p in phi]
    _, g, _ = batched_grad(tm.task_loss, phi, [], xs, ys)
    net64 = make_workload("A", tasks, device=device)[0].double()
    net64.load_state_dict({k: v_.double() for k, v_ in net.state_dict().items() if v_.is_floating_point()},
                          strict=False)
    ref, _ = hvp(TaskModel(net64, loss_fn).task_loss, [p.double() for p in phi], [w.double() for w in v],
                 xs.double(), ys, mode="exact")

    def loop_double_backward():
        out = []
        for t in range(tasks):
            p = [q[t].detach().requires_grad_() for q in phi]
            gt = torch.autograd.grad(tm.task_loss(p, [], xs[t], ys[t]), p, create_graph=True)
            out.append(torch.autograd.grad(gt, p, [w[t] for w in v]))
        return [torch.stack([o[i] for o in out]) for i in range(len(phi))]

    def loop_grad():
        for t in range(tasks):
            p = [q[t].detach().requires_grad_() for q in phi]
            torch.autograd.grad(tm.task_loss(p, [], xs[t], ys[t]), p)

    cases = {
        "gradient (vmap)": (lambda: batched_grad(tm.task_loss, phi, [], xs, ys)[1], False),
        "gradient (per-task loop)": (loop_grad, False),
        "double_backward (per-task loop, baseline)": (loop_double_backward, True),
        "exact forward_over_reverse": (lambda: hvp(tm.task_loss, phi, v, xs, ys, mode="exact")[0], True),
        "exact reverse_over_reverse": (lambda: hvp(tm.task_loss, phi, v, xs, ys, mode="reverse_over_reverse")[0],
                                       True),
        "fd_forward float32 (saved grad)": (lambda: hvp(tm.task_loss, phi, v, xs, ys, mode="fd_forward",
                                                        saved_grad=g)[0], True),
        "fd_central float32": (lambda: hvp(tm.task_loss, phi, v, xs, ys, mode="fd_central")[0], True),
        "fd_forward float64 eval": (lambda: hvp(tm.task_loss, phi, v, xs, ys, mode="fd_forward",
                                                fd_dtype=torch.float64)[0], True),
        "fd_central float64 eval": (lambda: hvp(tm.task_loss, phi, v, xs, ys, mode="fd_central",
                                                fd_dtype=torch.float64)[0], True),
        # what the engine runs for conv nets on the CPU: the per-task loop with the layer kernels
        "gradient (per-task loop, layer kernels)": (lambda: batched_grad(tm.task_loss, phi, [], xs, ys,
                                                                         batching="loop")[1], False),
        "exact (per-task loop, layer kernels)": (lambda: hvp(tm.task_loss, phi, v, xs, ys, mode="exact",
                                                             batching="loop")[0], True),
        "fd_forward float32 (per-task loop, layer kernels)": (
            lambda: hvp(tm.task_loss, phi, v, xs, ys, mode="fd_forward", saved_grad=g, batching="loop")[0], True),
        # what the engine runs for conv nets on the CPU now: fastmaml.meta.fused_conv
        "gradient (fused conv)": (lambda: batched_grad(tm.task_loss, phi, [], xs, ys, batching="fused_conv")[1],
                                  False),
        "exact R-operator (fused conv)": (lambda: hvp(tm.task_loss, phi, v, xs, ys, mode="exact",
                                                      batching="fused_conv")[0], True),
        "fd_forward float32 (fused conv)": (
            lambda: hvp(tm.task_loss, phi, v, xs, ys, mode="fd_forward", saved_grad=g, batching="fused_conv")[0],
            True),
    }
    rows = []
    for name, (fn, is_hvp) in progress(cases.items(), "hvp", total=len(cases)):
        out, gflop = counted_gflop(fn)
        err = rel_err(out, ref) if is_hvp else float("nan")
        t = time_wall_and_cpu(fn, repeats, device=device)
        rows.append({**env, "workload": "hvp", "tasks": tasks, "provider": name, **t, "rel_err_vs_f64": err,
                     "gflop": gflop})
    # "one gradient" = the fastest of the gradient rows (vmap, plain loop, loop with the layer kernels)
    grads = [r for r in rows if r["provider"].startswith("gradient")]
    g_ms, g_cpu = min(r["median_ms"] for r in grads), min(r["cpu_ms"] for r in grads)
    g_gflop = rows[1]["gflop"]  # FLOPs against the plain per-task autograd gradient
    for r in rows:
        r["x_gradient"] = r["median_ms"] / g_ms
        r["cpu_x_gradient"] = r["cpu_ms"] / g_cpu
        # convolution / matmul work as a multiple of the gradient's: the floor of x_gradient at an
        # equal FLOP rate
        r["flop_x_gradient"] = r["gflop"] / g_gflop if g_gflop > 0 else float("nan")
    return rows


# Activation shapes of conv4: the first block's query activations of B and A, and A's support.
LAYER_SHAPES = ((75, 32, 84, 84), (75, 64, 28, 28), (5, 64, 28, 28))


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward of ``fn()``."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def run_layers(shapes, repeats: int, env, device="cpu") -> list[dict]:
    """fastmaml's CPU kernels for the network's own layers against torch's ops, alone.

    For each shape: max-pool 2x2 (``max_pool2x2`` vs ``F.max_pool2d``), relu (``relu_bitmask`` vs
    ``torch.relu``) and training-mode batch norm (``batch_norm_train`` vs ``F.batch_norm``),
    forward and forward + backward (one ``autograd.grad`` with a random output gradient), for batch
    norm also the double backward (the gradient of <v, dx> w.r.t. x and the output gradient, what a
    second-order MAML step runs), the bytes autograd keeps for the backward, and the largest
    difference of the outputs / input gradients from torch's, relative to torch's largest entry:
    max-pool and relu are exact (anything but 0 fails), batch norm adds its channel sums in another
    order (above 1e-5 in float32 fails).
    Then the first convolution's route (``_first_conv_rows``).
    On devices other than the CPU only torch's rows are meaningful: the kernels fall back to it.
    """
    from ..ops.batch_norm import batch_norm_train
    from ..ops.max_pool import max_pool2x2
    from ..ops.relu import relu_bitmask

    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in shapes:
        x = torch.randn(shape, generator=gen).to(device)
        w, b = (torch.randn(shape[1], generator=gen).to(device) for _ in range(2))
        ops = {  # name: (torch's, ours, tolerance, modes)
            "max_pool 2x2": (lambda t: F.max_pool2d(t, 2), max_pool2x2, 0.0, ("forward", "fwd+bwd")),
            "relu": (torch.relu, relu_bitmask, 0.0, ("forward", "fwd+bwd")),
            "batch_norm train": (lambda t: F.batch_norm(t, None, None, w, b, training=True),
                                 lambda t: batch_norm_train(t, w, b), 1e-5, ("forward", "fwd+bwd", "double bwd")),
        }
        for op, (torch_fn, ours_fn, tol, modes) in ops.items():
            xg = x.clone().requires_grad_()
            g = torch.randn(torch_fn(x).shape, generator=gen).to(device)
            gg, v = g.clone().requires_grad_(), torch.randn(shape, generator=gen).to(device)

            def double_bwd(fn):
                (dx,) = torch.autograd.grad(fn(xg), xg, gg, create_graph=True)
                return torch.autograd.grad(dx, (xg, gg), v)

            results, times = {}, {}
            for provider, fn in (("torch", torch_fn), ("fastmaml", ours_fn)):
                results[provider] = (fn(x), torch.autograd.grad(fn(xg), xg, g)[0])
                if "double bwd" in modes:
                    results[provider] += double_bwd(fn)
                runs = {"forward": lambda: fn(x), "fwd+bwd": lambda: torch.autograd.grad(fn(xg), xg, g),
                        "double bwd": lambda: double_bwd(fn)}
                for mode in modes:
                    times[(provider, mode)] = time_wall_and_cpu(runs[mode], repeats, device=device)
                times[(provider, "saved")] = _saved_bytes(lambda: fn(xg)) / 2**20
            diff = _max_rel_diff(results["fastmaml"], results["torch"])
            rows += _layer_rows(env, op, "x".join(map(str, shape)), modes, times, diff, tol)
    return rows + _first_conv_rows(repeats, env, device) + _bn_pool_rows(shapes, repeats, env, device)


def _bn_pool_rows(shapes, repeats: int, env, device="cpu") -> list[dict]:
    """Batch norm + 2x2 max-pool differentiated as one layer (the fused conv path's kernels,
    ``batch_norm_pool2x2_*``) against torch: their references (``fastmaml.reference.bn_pool``,
    ``torch.func`` over ``F.batch_norm`` and ``F.max_pool2d``): the backward (``vjp``), the pooled
    output's tangent (``jvp``) and the tangent of the backward (``jvp`` of ``vjp``, the
    R-operator). The kernels take the forward's pool code and statistics, computed once outside
    the timing. Timed in float32; the difference
    is taken in float64, where the two sides' pools pick the same argmaxes (in float32 a window
    whose two largest entries differ by rounding can go either way between two batch norms that
    add their sums in different orders: 8e-3 on B's first block). CPU only."""
    from ..ops._native_cpu import native_available
    from ..reference import bn_pool as ref

    if torch.device(device).type != "cpu" or not native_available("batch_norm_pool2x2_hvp_backward"):
        return []
    ops = torch.ops.fastmaml

    def cases(x, w, b, dw, db, g, dg, dx):
        a, mean, invstd = ops.batch_norm_train(x, w, b, 1e-5)
        code = ops.max_pool2x2(a)[1]
        return {  # mode: (torch's, ours)
            "backward": (lambda: ref.batch_norm_pool2x2_backward_reference(g, x, w, b)[0],
                         lambda: ops.batch_norm_pool2x2_backward(g, code, x, w, mean, invstd)[0]),
            "jvp": (lambda: ref.batch_norm_pool2x2_jvp_reference(dx, dw, db, x, w, b),
                    lambda: ops.batch_norm_pool2x2_jvp(dx, code, x, w, dw, db, mean, invstd)),
            "R-op backward": (lambda: ref.batch_norm_pool2x2_hvp_backward_reference(g, dg, dx, dw, x, w, b)[0],
                              lambda: ops.batch_norm_pool2x2_hvp_backward(g, dg, code, dx, x, w, dw, mean, invstd,
                                                                          True)[0]),
        }

    gen = torch.Generator().manual_seed(1)
    rows = []
    for shape in shapes:
        pooled = (shape[0], shape[1], shape[2] // 2, shape[3] // 2)
        args = [torch.randn(shape, generator=gen)] + [torch.randn(shape[1], generator=gen) for _ in range(4)] + [
            torch.randn(pooled, generator=gen), torch.randn(pooled, generator=gen), torch.randn(shape, generator=gen)]
        timed, exact = cases(*args), cases(*[t.double() for t in args])
        diff = max(_max_rel_diff([ours()], [theirs()]) for theirs, ours in exact.values())
        times = {}
        for mode, (torch_fn, ours_fn) in timed.items():
            times[("torch", mode)] = time_wall_and_cpu(torch_fn, repeats, device=device)
            times[("fastmaml", mode)] = time_wall_and_cpu(ours_fn, repeats, device=device)
        rows += _layer_rows(env, "batch_norm + max_pool (one layer)", "x".join(map(str, shape)), tuple(timed),
                            times, diff, 1e-10)
    return rows


def _max_rel_diff(ours, theirs) -> float:
    """The largest difference of matching tensors, relative to the largest entry of torch's."""
    return max(float((a - r).abs().max() / r.abs().max().clamp_min(1e-30)) for a, r in zip(ours, theirs))


def _layer_rows(env, op: str, shape: str, modes, times: dict, diff: float, tol: float) -> list[dict]:
    """The torch and fastmaml rows of one layer op and shape; ``times[(provider, mode)]`` are
    timings, ``times[(provider, "saved")]`` the saved MB (absent: not measured)."""
    rows = []
    for mode in modes:
        for provider in ("torch", "fastmaml"):
            t = times[(provider, mode)]
            ok = provider == "torch" or diff <= tol
            rows.append({**env, "workload": "layers", "op": op, "shape": shape, "mode": mode, "provider": provider,
                         **t, "saved_mb": times.get((provider, "saved"), float("nan")),
                         "max_rel_diff": 0.0 if provider == "torch" else diff, "check": "ok" if ok else "FAILED",
                         "speedup_vs_fastest_baseline": (times[("torch", mode)]["median_ms"] / t["median_ms"]
                                                         if ok else float("nan")),
                         "fastest_baseline": "torch", "note": ""})
    return rows


# conv4's first convolution on A's and B's support sets: (input shape, output channels)
FIRST_CONV_SHAPES = (((5, 1, 28, 28), 64), ((5, 3, 84, 84), 32))


def _first_conv_rows(repeats: int, env, device="cpu") -> list[dict]:
    """The first convolution (input = data, 3x3, padding 1) with a tanh after it: ``F.conv2d``
    against ``conv2d_fixed_input``, forward + backward (weight and bias gradients) and the double
    backward (the gradient of <v, (gW, gb)> w.r.t. the weights and the output gradient); exact
    (anything but 0 fails)."""
    from ..ops.conv_fixed_input import conv2d_fixed_input

    gen = torch.Generator().manual_seed(1)
    rows = []
    for shape, c_out in FIRST_CONV_SHAPES:
        x = torch.randn(shape, generator=gen).to(device)
        w = torch.randn(c_out, shape[1], 3, 3, generator=gen).to(device).requires_grad_()
        b = torch.randn(c_out, generator=gen).to(device).requires_grad_()
        g = torch.randn(shape[0], c_out, shape[2], shape[3], generator=gen).to(device).requires_grad_()
        vw, vb = torch.randn(w.shape, generator=gen).to(device), torch.randn(c_out, generator=gen).to(device)
        convs = {"torch": lambda: torch.tanh(F.conv2d(x, w, b, padding=1)),
                 "fastmaml": lambda: torch.tanh(conv2d_fixed_input(x, w, b, padding=1))}
        results, times = {}, {}
        for provider, fn in convs.items():
            def fwd_bwd():
                return torch.autograd.grad(fn(), (w, b), g)

            def double_bwd():
                gw, gb = torch.autograd.grad(fn(), (w, b), g, create_graph=True)
                return torch.autograd.grad((gw, gb), (w, b, g), (vw, vb))

            results[provider] = fwd_bwd() + double_bwd()
            times[(provider, "fwd+bwd")] = time_wall_and_cpu(fwd_bwd, repeats, device=device)
            times[(provider, "double bwd")] = time_wall_and_cpu(double_bwd, repeats, device=device)
        diff = _max_rel_diff(results["fastmaml"], results["torch"])
        rows += _layer_rows(env, "first conv", "x".join(map(str, shape)) + f"->{c_out}", ("fwd+bwd", "double bwd"),
                            times, diff, 0.0)
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m fastmaml.bench.meta", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_level_options(parser)
    parser.add_argument("--workload", choices=["A", "B", "C", "hvp", "layers", "all"], action="append",
                        help="repeatable; default: those of the level")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the 2 cores here are shared, see docs/meta.md)")
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess peak-memory runs")
    parser.add_argument("--steps", type=int, action="append",
                        help="inner steps K of workloads A and B (repeatable; default: those of the level)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS + OPTIONAL_PROVIDERS, default=None)
    parser.add_argument("--tasks", type=int, default=None,
                        help="tasks T of workloads A and B (default: the issue's, 8 for A and 4 for B)")
    args = parser.parse_args(argv)
    if args.tasks is not None and args.tasks < 1:
        parser.error(f"--tasks must be >= 1, got {args.tasks}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.steps and min(args.steps) < 1:
        parser.error(f"--steps must be >= 1, got {min(args.steps)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available on this machine")
    device = torch.device(args.device)
    exact_float32(device)
    level = LEVELS[args.level]
    workloads = args.workload or list(level["workloads"])
    if "all" in workloads:
        workloads = ["layers", "hvp", "C", "A", "B"]
    torch.set_num_threads(args.threads)
    env = environment(device)
    env["threads"] = torch.get_num_threads()
    env["level"] = args.level
    providers = tuple(args.providers or PROVIDERS)
    memory = level["memory"] and not args.no_memory
    all_rows = []
    meta_cols = [("workload", "wl", "s"), ("tasks", "T", "d"), ("steps", "K", "d"), ("provider", "provider", "s"),
                 ("median_ms", "median ms", ".1f"), ("p25_ms", "p25", ".1f"), ("p75_ms", "p75", ".1f"),
                 ("peak_extra_mb", "peak +MB", ".0f"), ("rel_err_vs_f64", "rel err", ".1e"),
                 ("f64_rel_err", "f64 err", ".0e"),
                 ("cpu_ms", "cpu ms", ".1f"), ("check", "check", "s"),
                 ("speedup_vs_fastest_baseline", "speed-up", ".2f"),
                 ("cpu_speedup_vs_fastest_baseline", "cpu speed-up", ".2f"), ("gflop", "GFLOP", ".1f"),
                 ("flop_speedup", "FLOP speed-up", ".2f"), ("note", "note", "s")]
    print(f"meta-gradient benchmark ({args.level}): {env['device']}, torch {env['torch']}, commit {env['commit']}, "
          f"{env['threads']} threads, float32" + ("; peak memory = CUDA allocator peak" if device.type == "cuda" else ""))
    for wl in workloads:
        if wl == "layers":
            rows = run_layers(LAYER_SHAPES, level["hvp_repeats"], env, device)
            print_table(rows, [("op", "op", "s"), ("shape", "shape", "s"), ("mode", "mode", "s"),
                               ("provider", "provider", "s"), ("median_ms", "median ms", ".2f"),
                               ("p25_ms", "p25", ".2f"), ("p75_ms", "p75", ".2f"), ("saved_mb", "saved MB", ".1f"),
                               ("max_rel_diff", "max rel diff", ".1e"), ("check", "check", "s"),
                               ("speedup_vs_fastest_baseline", "speed-up", ".2f"), ("note", "note", "s")])
        elif wl == "hvp":
            rows = run_hvp(8, level["hvp_repeats"], env, device)
            print_table(rows, [("provider", "HVP of the conv4 support loss (T=8)", "s"),
                               ("median_ms", "median ms", ".1f"), ("p25_ms", "p25", ".1f"), ("p75_ms", "p75", ".1f"),
                               ("x_gradient", "x gradient", ".2f"), ("cpu_ms", "cpu ms", ".1f"),
                               ("cpu_x_gradient", "cpu x gradient", ".2f"), ("flop_x_gradient", "FLOP x gradient", ".2f"),
                               ("rel_err_vs_f64", "rel err", ".1e")])
        elif wl == "C":
            rows = []
            for tasks in level["c_tasks"]:
                rows += run_meta("C", tasks, (1,), providers, level["c_repeats"],
                                 (1,) if memory and "C" in level["memory_workloads"] else (), env, device,
                                 level["memory_providers"])
            print_table(rows, meta_cols)
        else:
            tasks = args.tasks or (8 if wl == "A" else 4)
            steps = args.steps or (level["a_steps"] if wl == "A" else (level["b_steps"] or (5,)))
            rows = run_meta(wl, tasks, steps, providers, level["repeats"], steps if memory else (), env, device,
                            level["memory_providers"])
            print_table(rows, meta_cols)
            curve_steps = tuple(k for k in level["curve_steps"] if k not in steps) if wl == "A" or args.level == "full" else ()
            if memory and curve_steps:
                # higher is listed when installed: it runs backward task by task, the most frugal baseline
                mem_provs = ("loop_autograd", "func_vmap") + (("higher",) if have_module("higher") else ()) + (
                    "fastmaml_exact",)
                curve = memory_curve(wl, tasks, curve_steps, mem_provs, env, device)
                both = curve + [r for r in rows if r["provider"] in mem_provs]
                table = {}
                for r in both:
                    table.setdefault(r["steps"], {})[r["provider"]] = r["peak_extra_mb"]
                print(f"peak extra memory (MB, fresh subprocess, VmHWM delta), workload {wl}, T={tasks}")
                print("   K  " + "  ".join(f"{p:>15s}" for p in mem_provs))
                for k in sorted(table):
                    print(f"{k:4d}  " + "  ".join(f"{table[k].get(p, float('nan')):15.0f}" for p in mem_provs))
                rows += curve
        all_rows += rows
    path = append_csv("meta.csv", [{**{k: "" for k in _CSV_FIELDS}, **r} for r in all_rows])
    print(f"rows appended to {path}")
    return all_rows


_CSV_FIELDS = ("date", "run_id", "commit", "device", "torch", "fastmaml", "python", "threads", "level", "workload", "tasks", "steps", "provider", "kind",
               "op", "shape", "mode", "saved_mb", "max_rel_diff",
               "median_ms", "p25_ms", "p75_ms", "n", "peak_extra_mb", "rel_err_vs_f64", "err_bound", "f64_rel_err", "check",
               "speedup_vs_fastest_baseline", "fastest_baseline", "cpu_ms", "cpu_speedup_vs_fastest_baseline", "x_gradient",
               "cpu_x_gradient", "gflop", "flop_speedup", "flop_x_gradient", "note")


if __name__ == "__main__":
    main()
