"""MAML on few-shot sinusoid regression (Finn, Abbeel and Levine 2017, section 5.1).

Every task is a sine wave ``y = A sin(x - phase)`` with ``A ~ U[0.1, 5]``, ``phase ~ U[0, pi]`` and
inputs ``x ~ U[-5, 5]``. A 1-40-40-1 ReLU network is meta-trained with second-order MAML (one inner
SGD step of size 0.01 on K support points, MSE loss, 25 tasks per meta-batch, Adam) through
``fastmaml.meta.MAML``: the whole meta-batch is one batched call, the inner step and the
meta-gradient are computed for all 25 tasks at once.

The baseline ("pretrained") is the same network trained by plain regression on the same tasks and
points (same number of Adam updates), then fine-tuned at test time with the same SGD steps.

At test time both are adapted to fresh tasks with K support points (0..10 SGD steps of size 0.01,
the batched ``fastmaml.meta.adapt`` and the in-place ``fastmaml.inner_sgd_step_``) and scored by
the MSE on 100 new points of each task. The script prints a table (mean and 95% confidence
interval over the test tasks), the wall time of meta-training, and saves two figures.

Run (about 3-4 minutes on 2 CPU cores)::

    python examples/sinusoid_maml.py                 # K = 5 and K = 10, figures in docs/figures/
    python examples/sinusoid_maml.py --smoke         # a few seconds, figures in a temporary folder
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

import fastmaml
from fastmaml.meta import MAML, TaskModel, adapt, batched_grad
from fastmaml.meta.models import mse_loss, sinusoid_mlp

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)
DEFAULT_FIGURES = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs", "figures"))


# -- tasks ------------------------------------------------------------------------------------------
def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_positive_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


def sinusoid(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
    """``A sin(x - phase)`` per task.

    Args:
        x: inputs ``[T, N, 1]``.
        amplitude: ``[T]``.
        phase: ``[T]``.

    Returns:
        ``[T, N, 1]``.
    """
    return amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))


def sample_tasks(num_tasks: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw sinusoid tasks: ``amplitude ~ U[0.1, 5]``, ``phase ~ U[0, pi]``.

    Args:
        num_tasks: T >= 1.
        generator: the random stream (fixed seeds make runs repeatable).

    Returns:
        ``(amplitude [T], phase [T])``.
    """
    num_tasks = _check_positive_int(num_tasks, "num_tasks")
    lo, hi = AMPLITUDE_RANGE
    amplitude = lo + (hi - lo) * torch.rand(num_tasks, generator=generator)
    lo, hi = PHASE_RANGE
    phase = lo + (hi - lo) * torch.rand(num_tasks, generator=generator)
    return amplitude, phase


def sample_points(amplitude: Tensor, phase: Tensor, num_points: int,
                  generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``num_points`` inputs ``x ~ U[-5, 5]`` per task and their targets.

    Args:
        amplitude, phase: ``[T]`` (from ``sample_tasks``).
        num_points: N >= 1.
        generator: the random stream.

    Returns:
        ``(x [T, N, 1], y [T, N, 1])``.
    """
    num_points = _check_positive_int(num_points, "num_points")
    lo, hi = INPUT_RANGE
    x = lo + (hi - lo) * torch.rand(amplitude.shape[0], num_points, 1, generator=generator)
    return x, sinusoid(x, amplitude, phase)


# -- training ---------------------------------------------------------------------------------------
def _training_batches(shots: int, iterations: int, meta_batch: int, seed: int):
    """The stream of meta-batches: ``(support, query)``, K points each, fresh tasks every time."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(iterations):
        amplitude, phase = sample_tasks(meta_batch, generator)
        x, y = sample_points(amplitude, phase, 2 * shots, generator)  # [T, 2K, 1]
        yield (x[:, :shots], y[:, :shots]), (x[:, shots:], y[:, shots:])


def _initial_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return sinusoid_mlp()


def train_maml(shots: int, *, iterations: int, meta_batch: int = 25, inner_lr: float = 0.01,
               meta_lr: float = 1e-3, seed: int = 0, progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """Meta-train the 1-40-40-1 net with second-order MAML, one inner step (``fastmaml.meta.MAML``).

    Args:
        shots: K support (and K query) points per task.
        iterations: meta-updates (Adam steps).
        meta_batch: tasks per meta-update.
        inner_lr: inner SGD step size.
        meta_lr: Adam's learning rate.
        seed: initial weights and task stream.
        progress: show a tqdm bar.

    Returns:
        ``(net, log)``; ``log`` has ``query_loss`` and ``support_loss`` (per iteration, the
        meta-batch means after and before the inner step) and ``wall_s``.
    """
    shots = _check_positive_int(shots, "shots")
    iterations = _check_positive_int(iterations, "iterations")
    meta_batch = _check_positive_int(meta_batch, "meta_batch")
    inner_lr = _check_positive_float(inner_lr, "inner_lr")
    meta_lr = _check_positive_float(meta_lr, "meta_lr")
    net = _initial_net(seed)
    maml = MAML(net, mse_loss, num_steps=1, lr=inner_lr)
    opt = torch.optim.Adam(maml.parameters(), lr=meta_lr)
    log = {"query_loss": [], "support_loss": []}
    bar = tqdm(_training_batches(shots, iterations, meta_batch, seed), total=iterations,
               desc=f"MAML K={shots}", disable=not progress, leave=False)
    start = time.perf_counter()
    for support, query in bar:
        opt.zero_grad(set_to_none=True)
        loss = maml(support, query)          # mean query loss of the T tasks after one inner step
        loss.backward()                      # second-order meta-gradient, all tasks at once
        opt.step()
        log["query_loss"].append(loss.item())
        log["support_loss"].append(maml.last_info["support_losses"][0].mean().item())
        if len(log["query_loss"]) % 100 == 0:
            bar.set_postfix(query_mse=f"{sum(log['query_loss'][-100:]) / 100:.3f}")
    log["wall_s"] = time.perf_counter() - start
    return net, log


def train_pretrained(shots: int, *, iterations: int, meta_batch: int = 25, lr: float = 1e-3, seed: int = 0,
                     progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """The baseline: plain regression on all tasks jointly, same tasks, points and number of updates.

    Every update sees the same ``meta_batch`` tasks and ``2 K`` points per task as MAML's
    meta-update (support and query together) and minimizes their mean squared error.

    Returns:
        ``(net, log)`` with ``loss`` per iteration and ``wall_s``.
    """
    shots = _check_positive_int(shots, "shots")
    iterations = _check_positive_int(iterations, "iterations")
    meta_batch = _check_positive_int(meta_batch, "meta_batch")
    lr = _check_positive_float(lr, "lr")
    net = _initial_net(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    log = {"loss": []}
    bar = tqdm(_training_batches(shots, iterations, meta_batch, seed), total=iterations,
               desc=f"pretrained K={shots}", disable=not progress, leave=False)
    start = time.perf_counter()
    for (xs, ys), (xq, yq) in bar:
        x, y = torch.cat([xs, xq], 1), torch.cat([ys, yq], 1)   # [T, 2K, 1]
        opt.zero_grad(set_to_none=True)
        loss = mse_loss(net(x), y)
        loss.backward()
        opt.step()
        log["loss"].append(loss.item())
    log["wall_s"] = time.perf_counter() - start
    return net, log


# -- evaluation -------------------------------------------------------------------------------------
def query_mse(task_model: TaskModel, phi: Sequence[Tensor], query: tuple[Tensor, Tensor]) -> Tensor:
    """Per-task query MSE of per-task parameters ``phi`` (``[T, ...]`` each): ``[T]``."""
    x, y = query
    with torch.no_grad():
        return torch.func.vmap(task_model.task_loss, in_dims=(0, None, 0, 0))(list(phi), [], x, y)


def finetune_curve(net: torch.nn.Module, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor],
                   steps: int, lr: float) -> tuple[Tensor, list[list[Tensor]]]:
    """Fine-tune ``net`` on every test task at once and record the query MSE after each step.

    ``phi_0`` (the net's weights copied for every task) comes from ``fastmaml.meta.adapt`` with
    zero steps; each step is one batched gradient (``batched_grad``) and one in-place
    ``fastmaml.inner_sgd_step_`` on all tasks, under ``no_grad``.

    Args:
        net: the trained network.
        support: ``(x [T, K, 1], y [T, K, 1])``.
        query: ``(x [T, M, 1], y [T, M, 1])``.
        steps: SGD steps (>= 1).
        lr: step size.

    Returns:
        ``(mse [steps + 1, T], snapshots)``: ``snapshots[k]`` are the parameters after k steps
        (``[T, ...]`` each).
    """
    steps = _check_positive_int(steps, "steps")
    lr = _check_positive_float(lr, "lr")
    task_model = TaskModel(net, mse_loss)
    phi = adapt(task_model, support, 0, lr)           # theta for every task, [T, ...] each
    snapshots = [[p.clone() for p in phi]]
    curve = [query_mse(task_model, phi, query)]
    with torch.no_grad():
        for _ in range(steps):
            _, grads, _ = batched_grad(task_model.task_loss, phi, [], *support, batching="vmap")
            fastmaml.inner_sgd_step_(phi, grads, lr)  # phi <- phi - lr * grad, all tasks, in place
            snapshots.append([p.clone() for p in phi])
            curve.append(query_mse(task_model, phi, query))
    return torch.stack(curve), snapshots


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% confidence interval (``1.96 std / sqrt(n)``)."""
    values = values.double()
    if values.numel() < 2:
        raise ValueError(f"need at least 2 values for a confidence interval, got {values.numel()}")
    return values.mean().item(), 1.96 * values.std().item() / math.sqrt(values.numel())


# -- figures ----------------------------------------------------------------------------------------
def plot_fits(path: str, fits: dict, shots_list: Sequence[int], task: tuple[float, float], show_steps=(0, 1, 10)):
    """Paper-style figure: one test task, true function, support points, model before/after updates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    amplitude, phase = task
    grid = torch.linspace(*INPUT_RANGE, 200).view(-1, 1)
    truth = amplitude * torch.sin(grid - phase)
    fig, axes = plt.subplots(len(shots_list), 2, figsize=(10, 3.6 * len(shots_list)), squeeze=False)
    for row, shots in enumerate(shots_list):
        for col, name in enumerate(("MAML", "pretrained")):
            ax = axes[row][col]
            entry = fits[(name, shots)]
            task_model = TaskModel(entry["net"], mse_loss)
            ax.plot(grid, truth, color="tab:red", lw=2, label="ground truth")
            shades = ("#a6cee3", "#1f78b4", "#08306b") if name == "pretrained" else ("#b2df8a", "#33a02c", "#00441b")
            for shade, k in zip(shades, show_steps):
                if k >= len(entry["snapshots"]):
                    continue
                params = [p[0] for p in entry["snapshots"][k]]
                with torch.no_grad():
                    pred = task_model.forward(params, [], grid)
                label = "pre-update" if k == 0 else f"{k} grad step" + ("s" if k > 1 else "")
                ax.plot(grid, pred, ls="--", color=shade, lw=1.8, label=label)
            xs, ys = entry["support"]
            ax.scatter(xs.view(-1), ys.view(-1), marker="^", color="purple", zorder=5, label=f"{shots} support points")
            ax.set_title(f"{name}, K={shots}")
            ax.set_ylim(-6, 6)
            ax.legend(fontsize=7.5, loc="lower center", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(path: str, curves: dict, shots_list: Sequence[int]):
    """Mean test MSE (and 95% CI) against the number of fine-tuning steps, MAML vs pretrained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shots_list), figsize=(5 * len(shots_list), 3.8), squeeze=False)
    for ax, shots in zip(axes[0], shots_list):
        for name, color in (("MAML", "tab:green"), ("pretrained", "tab:blue")):
            curve = curves[(name, shots)]               # [steps + 1, T]
            stats = [mean_ci95(row) for row in curve]
            mean = [m for m, _ in stats]
            half = [h for _, h in stats]
            steps = list(range(curve.shape[0]))
            ax.plot(steps, mean, marker="o", color=color, label=name)
            ax.fill_between(steps, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                            color=color, alpha=0.2)
        ax.set_title(f"K={shots}, step size 0.01")
        ax.set_xlabel("number of gradient steps")
        ax.set_ylabel("test MSE")
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line -----------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shots", type=int, nargs="+", default=[5, 10], help="K values to train and test (default 5 10)")
    p.add_argument("--iterations", type=int, default=10000, help="meta-iterations per K (default 10000)")
    p.add_argument("--meta-batch", type=int, default=25, help="tasks per meta-batch (default 25)")
    p.add_argument("--inner-lr", type=float, default=0.01, help="inner / fine-tuning SGD step size (default 0.01)")
    p.add_argument("--meta-lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--test-tasks", type=int, default=600, help="fresh test tasks (default 600)")
    p.add_argument("--query-points", type=int, default=100, help="query points per test task (default 100)")
    p.add_argument("--steps", type=int, default=10, help="fine-tuning steps at test time (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the training tasks")
    p.add_argument("--eval-seed", type=int, default=2017, help="seed of the test tasks")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=None, help="folder for the figures (default docs/figures; --smoke: a temp dir)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--smoke", action="store_true", help="tiny run (30 iterations, 20 test tasks) for CI")
    return p


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("iterations", "meta_batch", "query_points", "steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    bad = [k for k in args.shots if k < 1]
    if bad:
        p.error(f"--shots must be >= 1 (support points per task), got {args.shots}")
    if args.test_tasks < 2:
        p.error(f"--test-tasks must be >= 2 (a confidence interval needs two tasks), got {args.test_tasks}")
    for name in ("inner_lr", "meta_lr"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v > 0):
            p.error(f"--{name.replace('_', '-')} must be a positive finite number, got {v}")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the experiment; returns the results (also printed) for scripted use and tests.

    Returns:
        dict with ``table`` (rows ``(method, K, steps, mean, ci95)``), ``curves``
        (``{(method, K): [steps + 1, T] MSEs}``), ``train`` (logs per method and K), ``figures``.
    """
    p = _parser()
    args = p.parse_args(argv)
    _validate(p, args)
    if args.smoke:
        args.iterations, args.test_tasks, args.query_points = 30, 20, 20
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict:
    out = args.out
    if out is None:
        out = tempfile.mkdtemp(prefix="sinusoid_maml_") if args.smoke else DEFAULT_FIGURES
    os.makedirs(out, exist_ok=True)
    shots_list = sorted(set(args.shots))
    progress = not args.no_progress

    # Fixed test set, shared by every method and K (K = 5 uses the first 5 of the support points).
    gen = torch.Generator().manual_seed(args.eval_seed)
    amplitude, phase = sample_tasks(args.test_tasks, gen)
    support_all = sample_points(amplitude, phase, max(shots_list), gen)
    query = sample_points(amplitude, phase, args.query_points, gen)

    train_logs, curves, fits = {}, {}, {}
    for shots in shots_list:
        support = (support_all[0][:, :shots], support_all[1][:, :shots])
        for name in ("MAML", "pretrained"):
            if name == "MAML":
                net, log = train_maml(shots, iterations=args.iterations, meta_batch=args.meta_batch,
                                      inner_lr=args.inner_lr, meta_lr=args.meta_lr, seed=args.seed,
                                      progress=progress)
            else:
                net, log = train_pretrained(shots, iterations=args.iterations, meta_batch=args.meta_batch,
                                            lr=args.meta_lr, seed=args.seed, progress=progress)
            curve, snapshots = finetune_curve(net, support, query, args.steps, args.inner_lr)
            train_logs[(name, shots)] = log
            curves[(name, shots)] = curve
            fits[(name, shots)] = {"net": net, "snapshots": [[p[:1] for p in s] for s in snapshots],
                                   "support": (support[0][0], support[1][0])}

    rows = []
    report_steps = sorted({0, 1, args.steps})
    for shots in shots_list:
        for k in report_steps:
            for name in ("MAML", "pretrained"):
                mean, half = mean_ci95(curves[(name, shots)][k])
                rows.append((name, shots, k, mean, half))

    print(f"\nSinusoid regression: {args.test_tasks} test tasks, {args.query_points} query points each, "
          f"fine-tuning step size {args.inner_lr}; {args.iterations} (meta-)iterations of {args.meta_batch} tasks")
    print(f"{'K':>3} {'steps':>5}   {'MAML MSE (95% CI)':>22}   {'pretrained MSE (95% CI)':>24}")
    for shots in shots_list:
        for k in report_steps:
            m = next(r for r in rows if r[:3] == ("MAML", shots, k))
            b = next(r for r in rows if r[:3] == ("pretrained", shots, k))
            print(f"{shots:>3} {k:>5}   {m[3]:>12.3f} +- {m[4]:<7.3f}   {b[3]:>14.3f} +- {b[4]:<7.3f}")
    print(f"\n{'K':>3} {'method':>10} {'train wall s':>12} {'ms/iter':>8} {'final train loss':>17}")
    for shots in shots_list:
        for name in ("MAML", "pretrained"):
            log = train_logs[(name, shots)]
            losses = log["query_loss"] if name == "MAML" else log["loss"]
            tail = losses[-min(100, len(losses)):]
            print(f"{shots:>3} {name:>10} {log['wall_s']:>12.1f} {1e3 * log['wall_s'] / args.iterations:>8.2f} "
                  f"{sum(tail) / len(tail):>17.3f}")

    fit_path = os.path.join(out, "sinusoid_fits.png")
    curve_path = os.path.join(out, "sinusoid_mse_vs_steps.png")
    plot_fits(fit_path, fits, shots_list, (amplitude[0].item(), phase[0].item()),
              show_steps=tuple(sorted({0, 1, args.steps})))
    plot_curves(curve_path, curves, shots_list)
    print(f"\nfigures: {fit_path}, {curve_path}")
    return {"table": rows, "curves": curves, "train": train_logs, "figures": [fit_path, curve_path],
            "shots": shots_list}


if __name__ == "__main__":
    main(sys.argv[1:])
