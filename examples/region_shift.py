"""Few-shot land-cover classification across regions (the case study of Russwurm et al. 2020).

The case study: land-cover classes (water, forest, cropland, ...) look different in different parts
of the world, so a classifier trained on some regions is wrong in a new one; a few labelled samples
of the new region are cheap, thousands are not. Meta-learning treats every region as a task.

Here the regions are synthetic (nothing is downloaded): a "multispectral pixel" has 13 bands (as
Sentinel-2) and one of 6 land-cover classes. A class is a point of a small latent space, and the
13-band reflectance curve is a smooth function of it. A region changes the look of every class by

* a rotation of the latent "appearance plane" by the region's shift angle (season, climate and
  soil turn one class's typical signature towards another's: at 60 degrees a class looks like its
  neighbour did at 0),
* an offset of the latent point and a per-band gain (illumination, atmosphere, sensor),

while the class names stay the same everywhere. Meta-training regions have shift angles in
``[-train_angle, +train_angle]``; every region holds a fixed pool of labelled pixels (the case
study's scenes). Test regions are new regions.

Three methods, each adapted to a test region with the same batched SGD on ``k`` labelled pixels
per class (``fastmaml.meta.batched_grad`` and ``fastmaml.inner_sgd_step_``, all test regions at
once; 0 shots = the initialization itself, no adaptation):

* random initialization, trained on the shots only (a fresh network per test region);
* pretrain on the pooled meta-training regions, then fine-tune on the shots;
* MAML (second order, ``fastmaml.meta.MAML``, all regions of a meta-batch in one batched call),
  then adapt on the shots.

The number of SGD steps and the step size of each method are picked per shot count on separate
validation regions from a small grid (the picks are printed). Accuracies are means over test
regions (one task per region) with a 95% confidence interval (1.96 standard errors). The second
experiment fixes the shots (5) and moves the test regions' shift angle progressively outside the
meta-training range: every method first keeps the settings picked in range, then pretrain and MAML
are re-tuned on validation regions of each angle (a diagnostic: it needs labelled shifted regions).
Results and discussion: ``docs/example_region_shift.md``.

Run (about 5 minutes on 2 busy CPU cores)::

    python examples/region_shift.py              # tables on stdout, figures in docs/figures/
    python examples/region_shift.py --smoke      # a few seconds, figures in a temporary folder
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vmap
from tqdm import tqdm

from fastmaml import inner_sgd_step_
from fastmaml.meta import MAML, TaskModel, batched_grad
from fastmaml.meta.models import MLP

BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
CLASSES = ("water", "forest", "grassland", "cropland", "urban", "barren")
TRAIN_SHOTS = (1, 2, 5)  # meta-training cycles through these shots per class
METHODS = ("random init", "pretrain + fine-tune", "MAML + adapt")
DEFAULT_FIGURES = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs",
                                                "figures"))


# -- argument checks --------------------------------------------------------------------------------
def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_float(value, name: str, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0) or value < 0:
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a {kind} finite number, got {value}")
    return float(value)


# -- the synthetic world ----------------------------------------------------------------------------
@dataclass
class Regions:
    """Shift parameters of R regions.

    Attributes:
        angle: ``[R]`` rotation of the latent appearance plane, in radians (the regional shift).
        offset: ``[R, L]`` shift of the latent point.
        gain: ``[R, D]`` multiplicative per-band gain.
    """

    angle: Tensor
    offset: Tensor
    gain: Tensor

    def __len__(self) -> int:
        return int(self.angle.shape[0])


class SpectralWorld:
    """Land-cover classes, their spectra and how regions distort them (all fixed by ``seed``).

    A pixel of class ``c`` in region ``r`` is

        z = rot(angle_r) (mu_c + class_noise * xi) + offset_r          (latent, L = 4)
        x = gain_r * (1 + basis @ z) + band_noise * eps                 (13 bands)

    where ``rot`` rotates the first two latent coordinates (the appearance plane, in which the
    class means ``mu_c`` sit on a circle 360/C degrees apart), the last two latent coordinates
    carry weak class cues that no region changes, and ``basis`` ([13, 4]) is made of smooth bumps
    over the band axis, so every pixel is a smooth reflectance-like curve.

    Args:
        seed: fixes the class means and the spectral basis.
        class_noise: spread of a class inside a region (latent units; neighbours are 1.0 apart at
            6 classes).
        offset_noise: spread of the per-region latent offset.
        gain_noise: spread (log scale) of the per-region band gains.
        band_noise: per-band sensor noise.
    """

    latent_dim = 4

    def __init__(self, seed: int = 0, *, class_noise: float = 0.3, offset_noise: float = 0.25,
                 gain_noise: float = 0.1, band_noise: float = 0.05):
        _check_int(seed, "seed", 0)
        self.class_noise = _check_float(class_noise, "class_noise", positive=False)
        self.offset_noise = _check_float(offset_noise, "offset_noise", positive=False)
        self.gain_noise = _check_float(gain_noise, "gain_noise", positive=False)
        self.band_noise = _check_float(band_noise, "band_noise", positive=False)
        g = torch.Generator().manual_seed(seed)
        num_bands, num_classes, latent = len(BANDS), len(CLASSES), self.latent_dim
        band_axis = torch.linspace(0.0, 1.0, num_bands)
        centres = torch.linspace(0.1, 0.9, latent)
        basis = torch.exp(-((band_axis[:, None] - centres[None]) ** 2) / (2 * 0.12 ** 2))
        self.basis = basis + 0.1 * torch.randn(num_bands, latent, generator=g)        # [D, L]
        phase = torch.arange(num_classes) * 2 * math.pi / num_classes
        mu = torch.zeros(num_classes, latent)
        mu[:, 0], mu[:, 1] = phase.cos(), phase.sin()
        mu[:, 2:] = 0.3 * torch.randn(num_classes, latent - 2, generator=g)
        self.class_means = mu                                                          # [C, L]

    @property
    def num_classes(self) -> int:
        return len(CLASSES)

    @property
    def num_bands(self) -> int:
        return len(BANDS)

    def regions(self, angle: Tensor, generator: torch.Generator) -> Regions:
        """New regions with the given shift angles and random offsets and gains.

        Args:
            angle: ``[R]`` shift angles in radians.
            generator: the random stream.
        """
        if not isinstance(angle, Tensor) or angle.dim() != 1 or angle.numel() < 1:
            raise ValueError(f"angle must be a 1-d tensor [R] with R >= 1, got "
                             f"{tuple(angle.shape) if isinstance(angle, Tensor) else type(angle).__name__}")
        num = angle.shape[0]
        offset = self.offset_noise * torch.randn(num, self.latent_dim, generator=generator)
        gain = torch.exp(self.gain_noise * torch.randn(num, self.num_bands, generator=generator))
        return Regions(angle.float(), offset, gain)

    def sample(self, regions: Regions, per_class: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``per_class`` pixels of every class in every region.

        Returns:
            ``(x [R, C, n, D], y [R, C, n])``.
        """
        per_class = _check_int(per_class, "per_class", 1)
        num, classes = len(regions), self.num_classes
        y = torch.arange(classes).view(1, classes, 1).expand(num, classes, per_class)
        z = self.class_means[y] + self.class_noise * torch.randn(num, classes, per_class, self.latent_dim,
                                                                 generator=generator)
        c = regions.angle.cos().view(-1, 1, 1)
        s = regions.angle.sin().view(-1, 1, 1)
        z0, z1 = z[..., 0], z[..., 1]
        z = torch.cat([torch.stack([c * z0 - s * z1, s * z0 + c * z1], -1), z[..., 2:]], -1)
        z = z + regions.offset.view(num, 1, 1, -1)
        x = regions.gain.view(num, 1, 1, -1) * (1.0 + z @ self.basis.T)
        x = x + self.band_noise * torch.randn(x.shape, generator=generator)
        return x, y.contiguous()


def signed_angles(num: int, low_deg: float, high_deg: float, generator: torch.Generator) -> Tensor:
    """``num`` angles with magnitude uniform in ``[low_deg, high_deg]`` and a random sign (radians)."""
    mag = low_deg + (high_deg - low_deg) * torch.rand(num, generator=generator)
    sign = torch.where(torch.rand(num, generator=generator) < 0.5, -1.0, 1.0)
    return torch.deg2rad(mag * sign)


def split_tasks(x: Tensor, y: Tensor, shots: int, query: int):
    """Support (first ``shots`` per class) and query (next ``query``) of every region.

    Args:
        x: ``[R, C, n, D]``; y: ``[R, C, n]`` with ``n >= shots + query``.

    Returns:
        ``((xs [R, C*shots, D], ys), (xq [R, C*query, D], yq))``.
    """
    if x.shape[2] < shots + query:
        raise ValueError(f"need {shots} + {query} pixels per class, the regions hold {x.shape[2]}")
    num, dim = x.shape[0], x.shape[-1]
    xs, ys = x[:, :, :shots].reshape(num, -1, dim), y[:, :, :shots].reshape(num, -1)
    xq, yq = x[:, :, shots:shots + query].reshape(num, -1, dim), y[:, :, shots:shots + query].reshape(num, -1)
    return (xs, ys), (xq, yq)


# -- models and training ----------------------------------------------------------------------------
def make_net(seed: int, num_bands: int, num_classes: int, hidden: int) -> torch.nn.Module:
    """The MLP ``num_bands -> hidden -> hidden -> num_classes`` (ReLU), initialized from ``seed``."""
    torch.manual_seed(seed)
    return MLP(num_bands, (hidden, hidden), num_classes)


class Normalizer:
    """Per-band standardization with the statistics of the meta-training pool."""

    def __init__(self, x: Tensor):
        flat = x.reshape(-1, x.shape[-1])
        self.mean, self.std = flat.mean(0), flat.std(0)

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def pretrain(net: torch.nn.Module, x: Tensor, y: Tensor, *, steps: int, batch: int, lr: float,
             generator: torch.Generator, progress: bool) -> dict:
    """Plain supervised training on all meta-training regions pooled (Adam, cross-entropy).

    Args:
        net: the network, trained in place.
        x: ``[R, C, P, D]`` standardized pixels of the meta-training regions; y: ``[R, C, P]``.
        steps: Adam steps; batch: pixels per step (drawn from all regions); lr: Adam's step size.
        generator: the random stream; progress: show a tqdm bar.

    Returns:
        ``{"loss": per-step losses, "wall_s": seconds}``.
    """
    xs, ys = x.reshape(-1, x.shape[-1]), y.reshape(-1)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    start, losses = time.perf_counter(), []
    for _ in tqdm(range(steps), desc="pretrain (pooled regions)", disable=not progress, leave=False):
        idx = torch.randint(0, xs.shape[0], (batch,), generator=generator)
        loss = F.cross_entropy(net(xs[idx]), ys[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"loss": losses, "wall_s": time.perf_counter() - start}


def meta_train(net: torch.nn.Module, x: Tensor, y: Tensor, *, steps: int, meta_batch: int, shots: Sequence[int],
               query: int, inner_steps: int, inner_lr: float, lr: float, generator: torch.Generator,
               progress: bool) -> dict:
    """Second-order MAML over the meta-training regions, one batched call per meta-batch.

    Every meta-batch draws ``meta_batch`` regions of the pool and, cycling through ``shots``,
    ``k`` support and ``query`` query pixels per class from each region's pool (disjoint).

    Args:
        net: the network (theta), trained in place.
        x: ``[R, C, P, D]`` standardized pixels of the meta-training regions; y: ``[R, C, P]``.
        steps: meta-updates (Adam steps); meta_batch: regions per meta-update.
        shots: support sizes per class to cycle through; query: query pixels per class.
        inner_steps, inner_lr: MAML's inner loop (K SGD steps of a fixed size).
        lr: Adam's step size; generator: the random stream; progress: show a tqdm bar.

    Returns:
        ``{"loss": per-step mean query losses, "wall_s": seconds}``.
    """
    maml = MAML(net, F.cross_entropy, num_steps=inner_steps, lr=inner_lr, batching="vmap")
    opt = torch.optim.Adam(maml.parameters(), lr=lr)
    num_regions, classes, pool = x.shape[:3]
    start, losses = time.perf_counter(), []
    bar = tqdm(range(steps), desc="MAML meta-training", disable=not progress, leave=False)
    for step in bar:
        k = shots[step % len(shots)]
        r = torch.randint(0, num_regions, (meta_batch,), generator=generator)
        order = torch.argsort(torch.rand(meta_batch, classes, pool, generator=generator), dim=-1)[..., :k + query]
        xb = torch.gather(x[r], 2, order[..., None].expand(-1, -1, -1, x.shape[-1]))
        yb = torch.gather(y[r], 2, order)
        support, qry = split_tasks(xb, yb, k, query)
        loss = maml(support, qry)                 # mean query loss of the regions after the inner loop
        opt.zero_grad(set_to_none=True)
        loss.backward()                           # second-order meta-gradient, all regions at once
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            bar.set_postfix(query_loss=f"{sum(losses[-50:]) / 50:.3f}")
    return {"loss": losses, "wall_s": time.perf_counter() - start}


# -- evaluation -------------------------------------------------------------------------------------
def initial_weights(nets: Sequence[torch.nn.Module], num_tasks: int) -> tuple[TaskModel, list[Tensor]]:
    """Per-task starting weights ``[T, ...]``: one network for every task, or one network per task.

    Returns:
        ``(TaskModel of nets[0], [T, ...] per parameter)``.
    """
    if not nets:
        raise ValueError("nets must hold 1 or T networks, got none")
    tm = TaskModel(nets[0], F.cross_entropy)
    if len(nets) == 1:
        return tm, tm.initial_adapted(tm.theta_adapted(), num_tasks)
    if len(nets) != num_tasks:
        raise ValueError(f"nets must hold 1 or T = {num_tasks} networks, got {len(nets)}")
    return tm, [torch.stack([dict(n.named_parameters())[name].detach() for n in nets]) for name in tm.adapt_names]


def fine_tune_accuracy(task_model: TaskModel, phi0: Sequence[Tensor], support, query, lr: float,
                       checkpoints: Sequence[int]) -> dict[int, Tensor]:
    """Query accuracy ``[T]`` of every task after each number of SGD steps in ``checkpoints``.

    All T tasks are fine-tuned at once: per-task gradients on the support by
    ``fastmaml.meta.batched_grad`` (vmap), the update ``phi <- phi - lr * g`` in place by
    ``fastmaml.inner_sgd_step_``. From a shared start this is what ``fastmaml.meta.adapt`` computes;
    the loop exists to score several step counts in one run.

    Args:
        task_model: the network and loss (``adapt="all"``).
        phi0: starting weights ``[T, ...]`` per parameter (not modified).
        support: ``(xs [T, N, D], ys [T, N])``; with N = 0 no step is taken.
        query: ``(xq [T, M, D], yq [T, M])``.
        lr: SGD step size.
        checkpoints: step counts >= 0 at which to score.

    Returns:
        ``{steps: accuracy [T]}``.
    """
    if not checkpoints or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in checkpoints):
        raise ValueError(f"checkpoints must be non-empty ints >= 0, got {checkpoints}")
    phi = [p.detach().clone() for p in phi0]
    xq, yq = query

    def score():
        with torch.no_grad():
            logits = vmap(lambda p, xb: task_model.forward(p, [], xb))(phi, xq)   # [T, M, C]
        return (logits.argmax(-1) == yq).float().mean(1)

    out, done = {}, 0
    for target in sorted(set(checkpoints)):
        if support[0].shape[1] > 0:
            sgd_steps(task_model, phi, support, lr, target - done)
            done = target
        out[target] = score()
    return out


def sgd_steps(task_model: TaskModel, phi: list[Tensor], support, lr: float, steps: int) -> list[Tensor]:
    """``steps`` batched SGD steps on every task's support, written into ``phi`` ([T, ...] each)."""
    for _ in range(steps):
        _, grads, _ = batched_grad(task_model.task_loss, phi, [], *support, batching="vmap")
        inner_sgd_step_(phi, grads, lr)
    return phi


def mean_ci(acc: Tensor) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval (1.96 standard errors)."""
    n = acc.numel()
    sd = float(acc.std()) if n > 1 else float("nan")
    return float(acc.mean()), 1.96 * sd / math.sqrt(n)


# -- the experiment ---------------------------------------------------------------------------------
def _parse(argv: Optional[Sequence[str]]):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes: runs in seconds (CI)")
    p.add_argument("--out", default=None, help="folder for the figures (default docs/figures; "
                                                 "a temporary folder with --smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--shots", type=int, nargs="+", default=[0, 1, 2, 5], help="shots per class to test")
    p.add_argument("--train-angle", type=float, default=45.0,
                   help="meta-training regions have shift angles in [-A, A] (degrees)")
    p.add_argument("--max-angle", type=float, default=180.0, help="largest test shift angle (degrees)")
    p.add_argument("--extrap-shots", type=int, default=5, help="shots per class in the extrapolation test")
    p.add_argument("--train-regions", type=int, default=200)
    p.add_argument("--pool", type=int, default=40, help="labelled pixels per class in a training region")
    p.add_argument("--meta-steps", type=int, default=1500)
    p.add_argument("--meta-batch", type=int, default=16, help="regions per meta-batch")
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--inner-lr", type=float, default=0.5)
    p.add_argument("--pretrain-steps", type=int, default=3000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--test-tasks", type=int, default=500, help="test regions (one task each) per shot count")
    p.add_argument("--val-tasks", type=int, default=150, help="validation regions for picking fine-tuning settings")
    p.add_argument("--extrap-tasks", type=int, default=200, help="test regions per shift angle")
    p.add_argument("--extrap-val-tasks", type=int, default=80,
                   help="validation regions per shift angle for re-tuning pretrain and MAML (0: skip)")
    p.add_argument("--query", type=int, default=15, help="query pixels per class")
    args = p.parse_args(argv)
    if args.smoke:
        args.train_regions, args.pool, args.meta_steps, args.meta_batch, args.pretrain_steps = 16, 20, 30, 8, 150
        args.test_tasks, args.val_tasks, args.extrap_tasks, args.hidden = 40, 20, 20, 32
        args.extrap_val_tasks = min(args.extrap_val_tasks, 10)
    for name in ("seed",):
        _check_int(getattr(args, name), f"--{name}", 0)
    for name in ("threads", "train_regions", "meta_steps", "meta_batch", "inner_steps", "pretrain_steps",
                 "hidden", "test_tasks", "val_tasks", "extrap_tasks", "query"):
        _check_int(getattr(args, name), f"--{name.replace('_', '-')}", 1)
    if not args.shots or any(k < 0 for k in args.shots) or len(set(args.shots)) != len(args.shots):
        raise ValueError(f"--shots must be distinct integers >= 0, got {args.shots}")
    _check_int(args.extrap_shots, "--extrap-shots", 1)
    _check_int(args.extrap_val_tasks, "--extrap-val-tasks", 0)
    _check_float(args.inner_lr, "--inner-lr")
    _check_float(args.train_angle, "--train-angle")
    _check_float(args.max_angle, "--max-angle")
    if args.train_angle > 180 or args.max_angle > 180:
        raise ValueError(f"--train-angle and --max-angle are rotations in degrees <= 180, got "
                         f"{args.train_angle} and {args.max_angle}")
    if args.max_angle <= args.train_angle:
        raise ValueError(f"--max-angle ({args.max_angle}) must exceed --train-angle ({args.train_angle}) "
                         f"for the extrapolation test")
    if args.pool < max(TRAIN_SHOTS) + args.query:
        raise ValueError(f"--pool ({args.pool}) must hold the meta-training shots plus --query "
                         f"({max(TRAIN_SHOTS)} + {args.query})")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out must be a folder, {args.out!r} is a file")
    return args


def _fine_tune_grid(method: str, smoke: bool) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Step sizes and step counts to try; the validation regions pick one pair per method and shots."""
    if smoke:
        return ((0.5,), (40,)) if method == "random init" else ((0.2, 0.5), (5, 25))
    if method == "random init":
        return (0.03, 0.1), (30, 100, 300)
    return (0.01, 0.03, 0.1, 0.5), (5, 25, 100, 200)   # includes MAML's meta-training inner loop (5, 0.5)


def _shift_aware_grid(smoke: bool) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """The smaller grid for re-tuning pretrain and MAML at every shift angle of the extrapolation test."""
    return ((0.5,), (5, 25)) if smoke else ((0.03, 0.1), (5, 25, 100, 200))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run both experiments; returns the measured numbers (also printed) and the figure paths."""
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    args.load_start = os.getloadavg()[0]
    out = args.out or (tempfile.mkdtemp(prefix="region_shift_") if args.smoke else DEFAULT_FIGURES)
    os.makedirs(out, exist_ok=True)
    progress = not args.smoke
    world = SpectralWorld(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    C, D = world.num_classes, world.num_bands

    # meta-training regions: a fixed pool of labelled pixels per region
    train_regions = world.regions(signed_angles(args.train_regions, 0.0, args.train_angle, gen), gen)
    x_pool, y_pool = world.sample(train_regions, args.pool, gen)                    # [R, C, P, D]
    norm = Normalizer(x_pool)
    x_pool = norm(x_pool)

    def make(seed):
        return make_net(seed, D, C, args.hidden)

    started = time.perf_counter()
    pre_net = make(args.seed)
    pre_log = pretrain(pre_net, x_pool, y_pool, steps=args.pretrain_steps, batch=128, lr=1e-3,
                       generator=gen, progress=progress)
    maml_net = make(args.seed)
    maml_log = meta_train(maml_net, x_pool, y_pool, steps=args.meta_steps, meta_batch=args.meta_batch,
                          shots=TRAIN_SHOTS, query=args.query, inner_steps=args.inner_steps,
                          inner_lr=args.inner_lr, lr=1e-3, generator=gen, progress=progress)

    def held_out(num, low, high, shots, seed):
        g = torch.Generator().manual_seed(seed)
        regions = world.regions(signed_angles(num, low, high, g), g)
        x, y = world.sample(regions, shots + args.query, g)
        return split_tasks(norm(x), y, shots, args.query)

    def curves(method, support, query, lr, checkpoints):
        num = query[0].shape[0]
        if method == "random init":
            nets = [make(10_000 * (args.seed + 1) + t) for t in range(num)]   # a fresh network per task
        else:
            nets = [pre_net if method == "pretrain + fine-tune" else maml_net]
        tm, phi0 = initial_weights(nets, num)
        return fine_tune_accuracy(tm, phi0, support, query, lr, checkpoints)

    # pick each method's fine-tuning settings per shot count on validation regions (in range)
    max_shots = max(max(args.shots), args.extrap_shots)
    val_support, val_query = held_out(args.val_tasks, 0.0, args.train_angle, max_shots, args.seed + 2)
    test_support, test_query = held_out(args.test_tasks, 0.0, args.train_angle, max_shots, args.seed + 3)

    def first_shots(support, k):
        xs, ys = support
        n = xs.shape[0]
        return (xs.view(n, C, -1, D)[:, :, :k].reshape(n, -1, D), ys.view(n, C, -1)[:, :, :k].reshape(n, -1))

    def pick(method, support, query, grid):
        """The (steps, step size) of the grid with the best mean accuracy on these tasks."""
        scores = []
        for lr in grid[0]:
            acc = curves(method, support, query, lr, grid[1])
            scores += [(float(acc[c].mean()), c, lr) for c in grid[1]]
        best = max(scores, key=lambda t: t[0])
        return best[1], best[2], best[0]

    picks, shot_results = {}, {}
    shot_list = sorted(set(args.shots) | {args.extrap_shots})
    bar = tqdm(total=len(shot_list) * len(METHODS), desc="evaluating shots", disable=not progress, leave=False)
    for k in shot_list:
        for method in METHODS:
            if k == 0:
                picks[method, k] = (0, 0.0, float("nan"))
            else:
                picks[method, k] = pick(method, first_shots(val_support, k), val_query,
                                        _fine_tune_grid(method, args.smoke))
            steps, lr, _ = picks[method, k]
            if k in args.shots:
                acc = curves(method, first_shots(test_support, k), test_query, lr, [steps])[steps]
                shot_results[method, k] = mean_ci(acc)
            bar.update()
    bar.close()

    # extrapolation: fixed shots, shift angle moved outside the meta-training range. Every method
    # first keeps the settings it was tuned to in the training range (nobody knows the shift of a
    # new region); then pretrain and MAML are re-tuned on validation regions of that shift angle.
    num_points = 4 if args.smoke else 9
    magnitudes = [args.max_angle * i / (num_points - 1) for i in range(num_points)]
    extrap, extrap_picks = {}, {}
    for i, mag in enumerate(tqdm(magnitudes, desc="extrapolation", disable=not progress, leave=False)):
        support, query = held_out(args.extrap_tasks, mag, mag, args.extrap_shots, args.seed + 100 + i)
        for method in METHODS:
            steps, lr, _ = picks[method, args.extrap_shots]
            acc = curves(method, support, query, lr, [0, steps])
            extrap[method, mag] = mean_ci(acc[steps])
            if method == "random init":
                continue
            short = "pretrain" if method == METHODS[1] else "MAML"
            extrap[f"{short}, 0 shots", mag] = mean_ci(acc[0])   # the initialization, not adapted
            if args.extrap_val_tasks:
                val = held_out(args.extrap_val_tasks, mag, mag, args.extrap_shots, args.seed + 200 + i)
                steps, lr, v = extrap_picks[method, mag] = pick(method, *val, _shift_aware_grid(args.smoke))
                extrap[f"{short}, re-tuned", mag] = mean_ci(curves(method, support, query, lr, [steps])[steps])
    wall = time.perf_counter() - started

    _print_tables(args, shot_results, picks, extrap, extrap_picks, magnitudes, pre_log, maml_log, wall)
    figures = _plot(args, out, world, shot_results, extrap, magnitudes)
    return {"shots": shot_results, "picks": picks, "extrapolation": extrap, "extrapolation_picks": extrap_picks,
            "magnitudes": magnitudes,
            "figures": figures, "pretrain": pre_log, "maml": maml_log, "wall_s": wall}


def _fmt(mc) -> str:
    return f"{mc[0]:.3f} +- {mc[1]:.3f}"


def _print_tables(args, shot_results, picks, extrap, extrap_picks, magnitudes, pre_log, maml_log, wall):
    print(f"\nregions: shift angle in [-{args.train_angle:g}, {args.train_angle:g}] deg for meta-training; "
          f"{len(CLASSES)} classes, {len(BANDS)} bands; {args.test_tasks} test regions (one task each)")
    print(f"pretrain {args.pretrain_steps} Adam steps ({pre_log['wall_s']:.1f} s); MAML {args.meta_steps} "
          f"meta-steps x {args.meta_batch} regions, K={args.inner_steps}, inner lr {args.inner_lr} "
          f"({maml_log['wall_s']:.1f} s); total {wall:.1f} s; load average {args.load_start:.2f} at the "
          f"start, {os.getloadavg()[0]:.2f} at the end ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
          f"threads)\n")
    head = f"{'shots':>5}  " + "  ".join(f"{m:>22}" for m in METHODS)
    print("accuracy on held-out regions in the training range (mean +- 95% CI)")
    print(head)
    for k in args.shots:
        print(f"{k:>5}  " + "  ".join(f"{_fmt(shot_results[m, k]):>22}" for m in METHODS))
    print("\nfine-tuning settings picked on validation regions (SGD steps, step size, validation accuracy)")
    print(head)
    for k in sorted({k for _, k in picks}):
        if k == 0:
            continue
        print(f"{k:>5}  " + "  ".join(f"{'%d, %g, %.3f' % picks[m, k]:>22}" for m in METHODS))
    cols = list(METHODS) + ["pretrain, re-tuned", "MAML, re-tuned", "pretrain, 0 shots", "MAML, 0 shots"]
    cols = [c for c in cols if (c, magnitudes[0]) in extrap]
    short = {METHODS[0]: "random init", METHODS[1]: "pretrain", METHODS[2]: "MAML"}
    print(f"\nextrapolation: accuracy at {args.extrap_shots} shots vs |shift angle| (meta-training range: "
          f"{args.train_angle:g} deg; settings tuned in range, 're-tuned' = picked on regions of that angle)")
    print(f"{'angle':>5}  " + "  ".join(f"{short.get(c, c):>18}" for c in cols))
    for mag in magnitudes:
        mark = "*" if mag > args.train_angle else " "
        print(f"{mag:>5.1f}{mark} " + "  ".join(f"{_fmt(extrap[c, mag]):>18}" for c in cols))
    print("(* outside the meta-training range)")
    if extrap_picks:
        print("\nre-tuned settings per angle (SGD steps, step size, validation accuracy)")
        print(f"{'angle':>5}  " + "  ".join(f"{m:>22}" for m in METHODS[1:]))
        for mag in magnitudes:
            print(f"{mag:>5.1f}  " + "  ".join(f"{'%d, %g, %.3f' % extrap_picks[m, mag]:>22}" for m in METHODS[1:]))


def _plot(args, out, world, shot_results, extrap, magnitudes) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(METHODS, ("tab:gray", "tab:blue", "tab:red")))
    paths = []

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for m in METHODS:
        mean = [shot_results[m, k][0] for k in args.shots]
        ci = [shot_results[m, k][1] for k in args.shots]
        ax.errorbar(args.shots, mean, yerr=ci, marker="o", capsize=3, label=m, color=colors[m])
    ax.axhline(1 / world.num_classes, color="k", lw=0.6, ls=":", label="chance")
    ax.set_xlabel("labelled pixels per class in the new region (shots)")
    ax.set_ylabel("accuracy (mean, 95% CI)")
    ax.set_xticks(args.shots)
    ax.set_title(f"held-out regions, shift within +-{args.train_angle:g} deg")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(out, "region_shift_shots.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9.6, 4.2))
    ax.axvspan(0, args.train_angle, color="tab:green", alpha=0.12, label="meta-training range")
    for m in METHODS:
        mean = [extrap[m, a][0] for a in magnitudes]
        ci = [extrap[m, a][1] for a in magnitudes]
        ax.errorbar(magnitudes, mean, yerr=ci, marker="o", ms=4, capsize=2, label=f"{m}, {args.extrap_shots} shots (tuned in range)",
                    color=colors[m])
    for name, m in (("pretrain, re-tuned", METHODS[1]), ("MAML, re-tuned", METHODS[2])):
        if (name, magnitudes[0]) in extrap:
            ax.plot(magnitudes, [extrap[name, a][0] for a in magnitudes], ls="-.", marker="x", ms=4, lw=1,
                    color=colors[m], label=f"{name} at each angle, {args.extrap_shots} shots")
    for name, m in (("pretrain, 0 shots", METHODS[1]), ("MAML, 0 shots", METHODS[2])):
        ax.plot(magnitudes, [extrap[name, a][0] for a in magnitudes], ls="--", lw=1, color=colors[m], label=name)
    ax.axhline(1 / world.num_classes, color="k", lw=0.6, ls=":")
    ax.set_xlabel("|shift angle| of the test region (degrees)")
    ax.set_ylabel("accuracy (mean, 95% CI)")
    ax.set_title("extrapolation beyond the meta-training regions")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(out, "region_shift_extrapolation.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # what a region does to the classes: mean spectra of every class at three shift angles
    g = torch.Generator().manual_seed(args.seed + 7)
    angles = torch.deg2rad(torch.tensor([0.0, args.train_angle, 2 * args.train_angle]))
    regions = world.regions(angles, g)
    regions.offset.zero_()
    regions.gain.fill_(1.0)
    x, _ = world.sample(regions, 200, g)                                            # [3, C, n, D]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2), sharey=True)
    for i, ax in enumerate(axes):
        for c, name in enumerate(CLASSES):
            ax.plot(range(world.num_bands), x[i, c].mean(0), label=name)
        ax.set_title(f"shift angle {float(torch.rad2deg(angles[i])):.0f} deg")
        ax.set_xticks(range(world.num_bands))
        ax.set_xticklabels(BANDS, rotation=90, fontsize=7)
    axes[0].set_ylabel("mean reflectance (a.u.)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out, "region_shift_spectra.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    print("\nfigures: " + ", ".join(paths))
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
