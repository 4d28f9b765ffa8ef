"""learn2learn-style MAML training: before and after moving to fastmaml.

Runs one MAML training loop in several ways and prints, for each, the wall time per
meta-iteration, the peak extra memory and how far its meta-gradient is from the plain loop's:

  before       the plain per-task autograd loop (learn2learn's pattern, written by hand:
               clone, K differentiable SGD steps with create_graph=True, query loss .backward())
  compat       the same loop on fastmaml.compat.MAML (the import line and nothing else changes)
  batched      all T tasks in one fastmaml.meta.maml_loss call (stack_tasks + maml_loss)
  torchfunc    the torch.func pattern: vmap over tasks of a grad(...) inner loop, backward through it
               (BatchNorm on batch statistics via fastmaml.meta.batch_stats_only, as vmap requires)
  learn2learn  learn2learn.algorithms.MAML itself, when --l2l-path points at its package directory

Workloads (--workload):
  conv4      Conv4 (64 filters, BatchNorm), 1x28x28 random images shaped like Omniglot 5-way 1-shot
             with 15 query images per class, T = 8 tasks per meta-batch, K = 5 inner steps, inner
             lr 0.4 (the default)
  l2l_cnn    the same episodes on learn2learn's OmniglotCNN written out here as learn2learn 0.2.0
             defines it (ConvBlock modules with their own forward, stride-2 convs and no pools,
             Lambda views, the spatial mean, l2l's view-Flatten, the blocks registered under two
             paths; 64 filters by default): a model fastmaml does not know, which the batched
             engine reads by tracing its forward
  sinusoid   Finn et al.'s regression MLP 1-40-40-1 (ReLU), MSE, 10 support and 10 query points per
             task (amplitude in [0.1, 5], phase in [0, pi], x in [-5, 5]), T = 25, K = 1, inner lr 0.01
Second order, Adam on the meta-parameters.

Every variant runs in its own subprocess (same seed, same initial weights, same episodes).
Time: median (min-max) wall time and median process CPU time of the timed meta-iterations
(--iters per round after --warmup untimed ones; --rounds rounds that run every variant in turn, so
a change in machine load hits all variants alike); the speed-ups are the ``before`` median over
the variant's, in wall and in CPU time (CPU time is the steadier one on a shared machine). Memory: the
resident-set high-water mark during the iterations (VmHWM, reset just after setup) minus the
resident set after setup (on CUDA: the allocator's peak above what is allocated after setup);
children run with MALLOC_MMAP_THRESHOLD_=131072 so freed activations go back to the OS instead of
fragmenting the heap (this makes every large allocation fault in fresh pages, which slows code that
allocates more; --default-malloc times the variants under glibc's default allocator instead, as
users run them, and then the memory column includes heap fragmentation). Gradients: each variant's meta-gradient of the
first meta-iteration (before any optimizer step) is compared with the ``before`` variant's, in
float32 (the timed run) and in float64 (one extra iteration per variant, --no-check64 skips it).

Usage:
    python examples/l2l_style_before_after.py                      # the table of docs/dropin.md
    python examples/l2l_style_before_after.py --l2l-path /path/to/site-packages/learn2learn
    python examples/l2l_style_before_after.py --iters 2 --warmup 1 --filters 16   # a quick look
    python examples/l2l_style_before_after.py --workload sinusoid                  # the MLP table
    python examples/l2l_style_before_after.py --workload l2l_cnn --default-malloc  # learn2learn's CNN layout
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fastmaml.compat import MAML, stack_tasks
from fastmaml.meta import batch_stats_only, maml_loss
from fastmaml.meta.models import Conv4

N_WAY, K_SHOT, N_QUERY = 5, 1, 15
VARIANTS = ("before", "compat", "batched", "torchfunc", "learn2learn")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


# Defaults per workload: tasks T, inner steps K, inner lr, timed iterations.
WORKLOADS = {"conv4": dict(tasks=8, steps=5, lr=0.4, iters=5), "l2l_cnn": dict(tasks=8, steps=5, lr=0.4, iters=5),
             "sinusoid": dict(tasks=25, steps=1, lr=0.01, iters=50)}


class Lambda(nn.Module):
    """learn2learn.nn.Lambda."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Flatten(nn.Module):
    """learn2learn.nn.Flatten."""

    def forward(self, x):
        return x.view(x.size(0), -1)


class ConvBlock(nn.Module):
    """learn2learn.vision.models.ConvBlock: 3x3 conv, batch norm, ReLU and a 2x2 max-pool, or
    (``max_pool=False``, as its Omniglot model uses it) a stride-2 conv and no pool."""

    def __init__(self, in_channels, out_channels, max_pool=True):
        super().__init__()
        self.max_pool = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=False) if max_pool else (lambda x: x)
        self.normalize = nn.BatchNorm2d(out_channels, affine=True)
        nn.init.uniform_(self.normalize.weight)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=1 if max_pool else 2, padding=1, bias=True)
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        x = self.conv(x)
        x = self.normalize(x)
        x = self.relu(x)
        x = self.max_pool(x)
        return x


class OmniglotCNN(nn.Module):
    """learn2learn.vision.models.OmniglotCNN: 4 stride-2 conv blocks (no pools), the spatial mean, a
    linear head. As there, the blocks are registered twice (``base`` and ``features.1``)."""

    def __init__(self, output_size=N_WAY, hidden_size=64, layers=4):
        super().__init__()
        self.base = nn.Sequential(*[ConvBlock(1 if i == 0 else hidden_size, hidden_size, max_pool=False)
                                    for i in range(layers)])
        self.features = nn.Sequential(Lambda(lambda x: x.view(-1, 1, 28, 28)), self.base,
                                      Lambda(lambda x: x.mean(dim=[2, 3])), Flatten())
        self.classifier = nn.Linear(hidden_size, output_size, bias=True)
        self.classifier.weight.data.normal_()
        self.classifier.bias.data.mul_(0.0)

    def forward(self, x):
        return self.classifier(self.features(x))


def sinusoid_episode(gen: torch.Generator, dtype: torch.dtype, device: str = "cpu", points: int = 10):
    """One sine-regression task (Finn et al. 2017): (xs [10, 1], ys [10, 1], xq [10, 1], yq [10, 1])."""
    amplitude = 0.1 + 4.9 * torch.rand((), generator=gen)
    phase = math.pi * torch.rand((), generator=gen)
    x = 10.0 * torch.rand(2 * points, 1, generator=gen) - 5.0
    y = amplitude * torch.sin(x - phase)
    x, y = x.to(device, dtype), y.to(device, dtype)
    return x[:points], y[:points], x[points:], y[points:]


def sinusoid_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def episode(gen: torch.Generator, dtype: torch.dtype, device: str = "cpu"):
    """One random 5-way 1-shot task with 15 queries per class: (xs [5,1,28,28], ys [5], xq [75,...], yq [75])."""
    xs = torch.randn(N_WAY * K_SHOT, 1, 28, 28, generator=gen).to(device, dtype)
    xq = torch.randn(N_WAY * N_QUERY, 1, 28, 28, generator=gen).to(device, dtype)
    ys = torch.arange(N_WAY, device=device).repeat_interleave(K_SHOT)
    yq = torch.arange(N_WAY, device=device).repeat_interleave(N_QUERY)
    return xs, ys, xq, yq


# -------------------------------------------------------------------------------------------
# The training step, four ways. Each fills model's .grad with the meta-gradient (mean over tasks).
# -------------------------------------------------------------------------------------------
def step_before(model, tasks, num_steps, lr, state):
    """Plain autograd, task by task: learn2learn's pattern without learn2learn."""
    loss_fn = state["loss_fn"]
    theta = dict(model.named_parameters())
    for xs, ys, xq, yq in tasks:
        fast = dict(theta)                                                   # learner = maml.clone()
        for _ in range(num_steps):                                           # learner.adapt(loss)
            loss = loss_fn(call(model, fast, xs), ys)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {name: p - lr * g for (name, p), g in zip(fast.items(), grads)}
        (loss_fn(call(model, fast, xq), yq) / len(tasks)).backward()


def call(model, params, x):
    """``model(x)`` with ``params``. ``tie_weights=False``: with the default, torch 2.13 swaps a
    module registered under two paths (OmniglotCNN's blocks) twice and leaves the call's tensors in
    the model afterwards. (No weights are tied here; fastmaml handles both cases.)"""
    return functional_call(model, params, (x,), tie_weights=False)


def step_compat(model, tasks, num_steps, lr, state):
    """fastmaml.compat.MAML: the learn2learn API on fastmaml's fused update."""
    if "maml" not in state:
        state["maml"] = MAML(model, lr=lr, first_order=False)
    maml, loss_fn = state["maml"], state["loss_fn"]
    for xs, ys, xq, yq in tasks:
        learner = maml.clone()
        for _ in range(num_steps):
            learner.adapt(loss_fn(learner(xs), ys))
        (loss_fn(learner(xq), yq) / len(tasks)).backward()


def step_batched(model, tasks, num_steps, lr, state):
    """All tasks at once: one maml_loss call on the stacked [T, ...] episodes."""
    support, query = stack_tasks(tasks)
    maml_loss(model, state["loss_fn"], support, query, num_steps=num_steps, lr=lr).backward()


def step_torchfunc(model, tasks, num_steps, lr, state):
    """torch.func: the per-task inner loop with grad(...), vmapped over tasks, backward through all of it."""
    from torch.func import grad, vmap

    (xs, ys), (xq, yq) = stack_tasks(tasks)
    theta = dict(model.named_parameters())
    loss_fn = state["loss_fn"]

    def loss_at(params, x, y):
        return loss_fn(call(model, params, x), y)

    def task_query_loss(params, xs, ys, xq, yq):
        for _ in range(num_steps):
            g = grad(loss_at)(params, xs, ys)
            params = {name: params[name] - lr * g[name] for name in params}
        return loss_at(params, xq, yq)

    with batch_stats_only(model):  # vmap cannot update running statistics in place
        vmap(task_query_loss, in_dims=(None, 0, 0, 0, 0))(theta, xs, ys, xq, yq).mean().backward()


def load_learn2learn_maml(path: str):
    """learn2learn's MAML class from its package directory, without importing its dataset modules."""
    import importlib
    import types

    try:
        from learn2learn.algorithms import MAML as L2LMAML
        return L2LMAML
    except ImportError:
        pass
    for name, sub in (("learn2learn", ""), ("learn2learn.algorithms", "algorithms")):
        stub = types.ModuleType(name)
        stub.__path__ = [os.path.join(path, sub)]
        sys.modules[name] = stub
    return importlib.import_module("learn2learn.algorithms.maml").MAML


def step_learn2learn(model, tasks, num_steps, lr, state):
    """learn2learn.algorithms.MAML itself (the BEFORE code of docs/dropin.md, verbatim)."""
    if "maml" not in state:
        state["maml"] = state["l2l_class"](model, lr=lr, first_order=False)
    maml, loss_fn = state["maml"], state["loss_fn"]
    for xs, ys, xq, yq in tasks:
        learner = maml.clone()
        for _ in range(num_steps):
            learner.adapt(loss_fn(learner(xs), ys))
        (loss_fn(learner(xq), yq) / len(tasks)).backward()


STEPS = {"before": step_before, "compat": step_compat, "batched": step_batched, "torchfunc": step_torchfunc,
         "learn2learn": step_learn2learn}


# -------------------------------------------------------------------------------------------
# One variant in this process (the child)
# -------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_variant(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    device = spec["device"]
    sinusoid = spec.get("workload") == "sinusoid"
    if sinusoid:
        model = sinusoid_mlp()
    elif spec.get("workload") == "l2l_cnn":
        model = OmniglotCNN(N_WAY, spec["filters"])
    else:
        model = Conv4(1, spec["filters"], N_WAY, 28)
    model = model.to(device, dtype).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    n_iter = spec["warmup"] + spec["iters"]
    make = sinusoid_episode if sinusoid else episode
    batches = [[make(gen, dtype, device) for _ in range(spec["tasks"])] for _ in range(n_iter)]
    state = {"loss_fn": F.mse_loss if sinusoid else F.cross_entropy}
    if spec["variant"] == "learn2learn":
        state["l2l_class"] = load_learn2learn_maml(spec["l2l_path"])
    step = STEPS[spec["variant"]]

    cuda = device.startswith("cuda")
    if cuda:  # device memory: the allocator's peak above what is allocated after setup
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        kb_before = torch.cuda.memory_allocated(device) / 1024.0
        peak = lambda: torch.cuda.max_memory_allocated(device) / 1024.0  # noqa: E731
    else:  # peak RSS of this process from here on (ru_maxrss would carry the parent's peak over exec)
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            kb_before, peak = _status_kb("VmRSS"), lambda: _status_kb("VmHWM")
        except OSError:
            kb_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    times, cpu_times, first_grad = [], [], None
    for i, tasks in enumerate(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        step(model, tasks, spec["steps"], spec["lr"], state)
        if first_grad is None:
            first_grad = [p.grad.detach().cpu().clone() for p in model.parameters()]
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    extra_mb = (peak() - kb_before) / 1024.0
    torch.save(first_grad, spec["grad_file"])
    return {"times_ms": [1e3 * t for t in times], "cpu_ms": [1e3 * t for t in cpu_times], "extra_mb": extra_mb}


def spawn(spec: dict, default_malloc: bool = False) -> dict:
    code = ("import json, sys; sys.path.insert(0, %r); import l2l_style_before_after as m; "
            "print(json.dumps(m.run_variant(json.loads(%r))))") % (os.path.dirname(os.path.abspath(__file__)),
                                                                  json.dumps(spec))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", **({} if default_malloc else MALLOC_ENV)})
    if out.returncode != 0:
        raise RuntimeError(f"variant {spec['variant']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def relative_difference(grad, ref) -> tuple[float, float]:
    """Over all parameters: (||g - ref|| / ||ref||, max |g - ref| / max |ref|).

    Not per tensor: the conv biases in front of BatchNorm have a zero meta-gradient (BN removes
    them), so their own relative differences are rounding noise divided by rounding noise.
    """
    a = torch.cat([g.double().flatten() for g in grad])
    b = torch.cat([g.double().flatten() for g in ref])
    return float((a - b).norm() / b.norm()), float((a - b).abs().max() / b.abs().max())


def load_average() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "n/a"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="conv4",
                    help="conv4 (Omniglot-shaped, the default), l2l_cnn (the same on learn2learn's OmniglotCNN "
                         "layout) or sinusoid (Finn et al.'s MLP)")
    ap.add_argument("--tasks", type=int, default=None, help="tasks per meta-batch T (conv4: 8, sinusoid: 25)")
    ap.add_argument("--steps", type=int, default=None, help="inner steps K (conv4: 5, sinusoid: 1)")
    ap.add_argument("--lr", type=float, default=None, help="inner step size (conv4: 0.4, sinusoid: 0.01)")
    ap.add_argument("--filters", type=int, default=64, help="Conv4 / OmniglotCNN filters")
    ap.add_argument("--iters", type=int, default=None,
                    help="timed meta-iterations per variant (conv4: 5, sinusoid: 50)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed meta-iterations first, in every round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of all variants, one after the other")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each variant's process")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] (memory is then the CUDA allocator's peak)")
    ap.add_argument("--variants", default="before,compat,batched,torchfunc",
                    help=f"comma-separated, from {VARIANTS} (learn2learn is added by --l2l-path)")
    ap.add_argument("--l2l-path", default=None, help="learn2learn's package directory (…/site-packages/learn2learn)")
    ap.add_argument("--no-check64", action="store_true", help="skip the float64 gradient agreement run")
    ap.add_argument("--default-malloc", action="store_true",
                    help="time under glibc's default allocator (memory then includes heap fragmentation)")
    args = ap.parse_args(argv)
    for key, value in WORKLOADS[args.workload].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tasks < 1 or args.steps < 0 or args.iters < 1:
        ap.error(f"--tasks and --iters must be >= 1 and --steps >= 0, got {args.tasks}, {args.iters}, {args.steps}")
    variants = [v for v in args.variants.split(",") if v]
    if args.l2l_path and "learn2learn" not in variants:
        variants.append("learn2learn")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"--variants: unknown variant {v!r}; choose from {VARIANTS}")
        if v == "learn2learn" and not args.l2l_path:
            raise ValueError("--variants learn2learn needs --l2l-path")
    if variants[0] != "before":
        variants.insert(0, "before")  # the reference of the gradient check

    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"{os.cpu_count()} CPUs"
    print(f"torch {torch.__version__}, {args.device} ({where}), {args.threads} thread(s) per variant, "
          f"load average {load_average()} (start)"
          + (", glibc default allocator" if args.default_malloc else f", {MALLOC_ENV}"))
    if args.workload == "sinusoid":
        print(f"sinusoid MLP 1-40-40-1 (ReLU), MSE, 10 support + 10 query points, "
              f"T = {args.tasks}, K = {args.steps}, lr = {args.lr}, second order, float32")
    else:
        name = "learn2learn-style OmniglotCNN" if args.workload == "l2l_cnn" else "Conv4"
        print(f"{name}-{args.filters} + BN, 1x28x28, {N_WAY}-way {K_SHOT}-shot, {N_QUERY} query/class, "
              f"T = {args.tasks}, K = {args.steps}, lr = {args.lr}, second order, float32")
    base = dict(workload=args.workload, tasks=args.tasks, steps=args.steps, lr=args.lr, filters=args.filters,
                threads=args.threads, l2l_path=args.l2l_path, device=args.device)
    rows, grads32, grads64 = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for v in variants:
                f = os.path.join(tmp, f"{v}32.pt")
                out = spawn({**base, "variant": v, "dtype": "float32", "iters": args.iters, "warmup": args.warmup,
                             "grad_file": f}, default_malloc=args.default_malloc)
                row = rows.setdefault(v, {"times_ms": [], "cpu_ms": [], "extra_mb": []})
                for key in ("times_ms", "cpu_ms"):
                    row[key] += out[key]
                row["extra_mb"].append(out["extra_mb"])
                if r == 0:
                    grads32[v] = torch.load(f)
        if not args.no_check64:
            for v in variants:
                f = os.path.join(tmp, f"{v}64.pt")
                spawn({**base, "variant": v, "dtype": "float64", "iters": 0, "warmup": 1, "grad_file": f})
                grads64[v] = torch.load(f)
    for row in rows.values():
        row["extra_mb"] = statistics.median(row["extra_mb"])

    ref_ms = statistics.median(rows["before"]["times_ms"])
    ref_cpu = statistics.median(rows["before"]["cpu_ms"])
    ref_mb = rows["before"]["extra_mb"]
    head = (f"{'variant':>12} {'ms/iter':>8} {'min':>6} {'max':>6} {'wall x':>6} {'cpu ms':>6} {'cpu x':>5} "
            f"{'peak +MB':>8} {'mem x':>5} "
            f"{'f32 rel':>8} {'f32 max':>8} {'f64 rel':>8} {'f64 max':>8}")
    print(head)
    agree, disagree = [], []
    for v in variants:
        t = rows[v]["times_ms"]
        med = statistics.median(t)
        d32 = relative_difference(grads32[v], grads32["before"])
        d64 = relative_difference(grads64[v], grads64["before"]) if grads64 else (float("nan"),) * 2
        if v != "before" and grads64:
            (agree if d64[1] <= 1e-10 else disagree).append(v)
        cpu = statistics.median(rows[v]["cpu_ms"])
        p = 0 if ref_ms >= 100 else 2  # decimals: the sinusoid iterations take milliseconds
        print(f"{v:>12} {med:8.{p}f} {min(t):6.{p}f} {max(t):6.{p}f} {ref_ms / med:6.2f} {cpu:6.{p}f} {ref_cpu / cpu:5.2f} "
              f"{rows[v]['extra_mb']:8.0f} {rows[v]['extra_mb'] / ref_mb:5.2f} "
              f"{d32[0]:8.1e} {d32[1]:8.1e} {d64[0]:8.1e} {d64[1]:8.1e}")
    print(f"{args.rounds} round(s) x {args.iters} timed iterations per variant; peak +MB: median over rounds")
    print("rel: ||g - g_before|| / ||g_before||, max: max |g - g_before| / max |g_before|, over all parameters, "
          "first meta-iteration")
    if grads64:
        print(f"float64 meta-gradient equal to before's (max <= 1e-10): {', '.join(agree) or 'none'}; "
              f"different: {', '.join(disagree) or 'none'}")
    print(f"load average {load_average()} (end)")


if __name__ == "__main__":
    main()
