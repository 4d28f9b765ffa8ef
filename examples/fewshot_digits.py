"""Few-shot classification of rotated handwritten digits: MAML, FOMAML, Reptile, ANIL and the
R2-D2, SVM (MetaOptNet) and ProtoNet heads, all built on fastmaml.

Data: scikit-learn's 8x8 digits (shipped with scikit-learn, nothing is downloaded), every digit
rotated by 0/90/180/270 degrees as a class of its own; meta-train on the rotations of digits 0-5
(20 classes), meta-test on those of digits 6-9 (14 classes); see ``examples/_fewshot_data.py``.

Run (6-8 minutes measured on 2 shared CPU cores):

    python examples/fewshot_digits.py
    python examples/fewshot_digits.py --methods maml protonet --shots 1 --iterations 200
    python examples/fewshot_digits.py --smoke --out /tmp/fewshot     # a few seconds, for CI

Prints one table (method x shot: meta-test accuracy with a 95% confidence interval, meta-training
wall time) and saves ``fewshot_digits.png`` under ``--out`` (default ``docs/figures``).
See ``docs/example_fewshot.md`` for the measured results.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _fewshot_data import check_episode_shape, load_class_pool, sample_episodes  # noqa: E402

from fastmaml.heads import ProtoNetHead, R2D2Head, SVMHead  # noqa: E402
from fastmaml.meta import TaskModel, adapt, maml_loss  # noqa: E402

GRADIENT_METHODS = ("maml", "fomaml", "reptile", "anil")
HEAD_METHODS = ("r2d2", "svm", "protonet")
METHODS = GRADIENT_METHODS + HEAD_METHODS
LABELS = {"maml": "MAML", "fomaml": "FOMAML", "reptile": "Reptile", "anil": "ANIL",
          "r2d2": "R2-D2", "svm": "SVM (MetaOptNet)", "protonet": "ProtoNet"}
# Initial output scale of the heads. With 128 features the unscaled ridge / SVM / ProtoNet logits of a
# fresh embedding spread by ~0.2 (a near-uniform softmax); Adam moves a scale of 1.0 by ~lr per step,
# so it would take thousands of steps to reach a useful range. Starting at 10 puts the logits'
# spread at ~2, like the linear head of the gradient methods.
HEAD_SCALE = 10.0
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "figures")


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------
class DigitConvNet(nn.Module):
    """Three ``conv3x3 -> BatchNorm -> ReLU`` blocks for 1x8x8 images (max-pool after the first two).

    Output: ``4 * filters`` features (a 2x2 map), followed by a linear head when ``n_way`` is given
    (MAML / FOMAML / Reptile / ANIL; ANIL adapts only that head). Without ``n_way`` the net is the
    embedding of the R2-D2, SVM and ProtoNet heads.

    Args:
        filters: channels of every conv layer.
        n_way: classes of the linear head, or ``None`` for an embedding.
        track_running_stats: keep batch-norm running averages (used in eval mode); without them
            batch norm always normalizes with the statistics of the batch it sees.
    """

    def __init__(self, filters: int, n_way: int | None = None, track_running_stats: bool = True):
        super().__init__()
        layers, c = [], 1
        for pool in (True, True, False):
            bn = nn.BatchNorm2d(filters, track_running_stats=track_running_stats)
            layers += [nn.Conv2d(c, filters, 3, padding=1), bn, nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2))
            c = filters
        self.features = nn.Sequential(*layers)
        self.feature_dim = 4 * filters
        self.head = nn.Linear(self.feature_dim, n_way) if n_way is not None else None

    def forward(self, x: Tensor) -> Tensor:  # x: [N, 1, 8, 8] -> [N, n_way] or [N, 4 * filters]
        z = self.features(x).flatten(1)
        return self.head(z) if self.head is not None else z


# --------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------
@dataclass
class Config:
    """Everything a run depends on (filled from the command line)."""

    methods: tuple
    shots: tuple
    ways: int = 5
    query: int = 15
    iterations: int = 150
    meta_batch: int = 8
    filters: int = 32
    inner_steps: int = 3
    test_inner_steps: int = 5
    inner_lr: float = 0.4
    reptile_steps: int = 5
    reptile_lr: float = 0.1
    outer_lr: float = 2e-3
    head_bn: str = "episode"
    test_episodes: int = 600
    train_class_episodes: int = 0
    eval_batch: int = 50
    seed: int = 0
    out: str = DEFAULT_OUT
    threads: int = 1
    progress: bool = True


def _episodes(pool, cfg: Config, shot: int, num_tasks: int, gen: torch.Generator):
    return sample_episodes(pool, num_tasks, cfg.ways, shot, cfg.query, gen)


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:  # [T, q, c], [T, q] -> [T]
    return (logits.argmax(-1) == labels).float().mean(-1)


class GradientLearner:
    """MAML (second order), first-order MAML, Reptile or ANIL on ``DigitConvNet``, through ``fastmaml.meta``.

    * MAML / FOMAML / ANIL: ``maml_loss(..., algorithm="maml" | "fomaml", adapt="all" | "head")``,
      ``inner_steps`` SGD steps of size ``inner_lr`` on the support set, Adam on the query loss.
    * Reptile: ``maml_loss(..., algorithm="reptile")`` whose gradient is ``theta - phi_K``;
      ``reptile_steps`` inner steps of size ``reptile_lr`` on the task's support and query images
      together (the whole task, as in Reptile), Adam on that gradient.
    * Batch norm: statistics of the batch at hand, per task (``fastmaml.meta``'s convention), also at
      meta-test time (so the query set is normalized with its own statistics, as in MAML).
    * Meta-test: ``test_inner_steps`` steps on the support set, then the query predictions.
    """

    def __init__(self, method: str, cfg: Config):
        self.method, self.cfg = method, cfg
        self.net = DigitConvNet(cfg.filters, cfg.ways)
        self.task_model = TaskModel(self.net, F.cross_entropy, adapt="head" if method == "anil" else "all")
        self.algorithm = {"maml": "maml", "anil": "maml", "fomaml": "fomaml", "reptile": "reptile"}[method]
        self.opt = torch.optim.Adam(self.net.parameters(), cfg.outer_lr)
        reptile = method == "reptile"
        self.lr = cfg.reptile_lr if reptile else cfg.inner_lr
        self.train_steps = cfg.reptile_steps if reptile else cfg.inner_steps

    def train_step(self, support, query) -> float:
        if self.method == "reptile":  # the inner loop sees the whole task
            support = (torch.cat([support[0], query[0]], 1), torch.cat([support[1], query[1]], 1))
        self.opt.zero_grad(set_to_none=True)
        loss = maml_loss(self.task_model, support=support, query=query, num_steps=self.train_steps, lr=self.lr,
                         algorithm=self.algorithm)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def predict(self, support, query_x) -> Tensor:  # -> logits [T, q, n_way]
        phi = adapt(self.task_model, support, self.cfg.test_inner_steps, self.lr)
        fixed = self.task_model.theta_fixed()
        return torch.stack([self.task_model.forward([p[t] for p in phi], fixed, query_x[t])
                            for t in range(query_x.shape[0])])


class HeadLearner:
    """An embedding trained end to end through a differentiable few-shot head (R2-D2, SVM, ProtoNet).

    Each episode's support and query images go through ``DigitConvNet`` (no linear head); the head
    computes the query logits from the support features and labels; Adam on the query
    cross-entropy. Batch norm (``cfg.head_bn``):

    * ``"episode"`` (default): every episode is normalized with its own statistics (support and
      query images together), while meta-training and at meta-test time: the convention of the
      gradient methods above, so that all methods see the same normalization.
    * ``"running"``: the whole meta-batch is normalized together while meta-training, and the running
      averages are used at meta-test time (ProtoNet's and MetaOptNet's convention; no query
      statistics at test time).
    """

    def __init__(self, method: str, cfg: Config):
        self.method, self.cfg = method, cfg
        self.net = DigitConvNet(cfg.filters, track_running_stats=cfg.head_bn == "running")
        if method == "r2d2":
            self.head = R2D2Head(lam_init=1.0, scale_init=HEAD_SCALE)
        elif method == "svm":
            self.head = SVMHead(C=0.1, scale_init=HEAD_SCALE, max_iter=30)
        else:
            self.head = ProtoNetHead(scale_init=HEAD_SCALE)
        self.opt = torch.optim.Adam(list(self.net.parameters()) + list(self.head.parameters()), cfg.outer_lr)

    def _logits(self, support, query_x) -> Tensor:
        xs, ys = support
        T, n, q = xs.shape[0], xs.shape[1], query_x.shape[1]
        images = torch.cat([xs, query_x], 1)  # [T, n + q, 1, 8, 8]
        if self.cfg.head_bn == "episode":
            z = torch.stack([self.net(images[t]) for t in range(T)])  # [T, n + q, d]
        else:
            z = self.net(images.flatten(0, 1)).view(T, n + q, -1)
        return self.head(z[:, :n], ys, z[:, n:], self.cfg.ways)

    def train_step(self, support, query) -> float:
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        logits = self._logits(support, query[0])
        loss = F.cross_entropy(logits.flatten(0, 1), query[1].flatten())
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def predict(self, support, query_x) -> Tensor:
        self.net.eval()  # "episode": no running statistics exist, so this still uses the episode's
        return self._logits(support, query_x)


def make_learner(method: str, cfg: Config):
    """A fresh learner for ``method`` (seeded by the caller)."""
    if method in GRADIENT_METHODS:
        return GradientLearner(method, cfg)
    if method in HEAD_METHODS:
        return HeadLearner(method, cfg)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# --------------------------------------------------------------------------------------------------
# Meta-training and meta-test
# --------------------------------------------------------------------------------------------------
def meta_train(learner, pool, cfg: Config, shot: int, seed: int, desc: str) -> tuple[float, list]:
    """``cfg.iterations`` meta-updates on batches of ``cfg.meta_batch`` episodes; returns (seconds, losses)."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    losses, elapsed = [], 0.0
    bar = tqdm(range(cfg.iterations), desc=desc, leave=False, disable=not cfg.progress, file=sys.stderr)
    for _ in bar:
        support, query = _episodes(pool, cfg, shot, cfg.meta_batch, gen)
        t0 = time.perf_counter()
        losses.append(learner.train_step(support, query))
        elapsed += time.perf_counter() - t0
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return elapsed, losses


def meta_test_episodes(pool, cfg: Config, shot: int, num_episodes: int | None = None) -> list:
    """The meta-test episodes of a run, in batches of ``cfg.eval_batch`` (the same for every method).

    ``num_episodes`` defaults to ``cfg.test_episodes``; the seed depends on the pool's split, so
    episodes of the meta-train classes (the ``--train-class-episodes`` check) are drawn independently.
    """
    offset = 10_000 if pool.split == "test" else 20_000
    gen = torch.Generator().manual_seed(offset + 100 * cfg.seed + shot)
    episodes, left = [], cfg.test_episodes if num_episodes is None else num_episodes
    while left > 0:
        b = min(cfg.eval_batch, left)
        episodes.append(_episodes(pool, cfg, shot, b, gen))
        left -= b
    return episodes


def meta_test(learner, episodes) -> Tensor:
    """Accuracy of every meta-test episode, ``[E]``."""
    accs = []
    for (support, (xq, yq)) in episodes:
        accs.append(_accuracy(learner.predict(support, xq), yq))
    return torch.cat(accs)


def mean_ci95(acc: Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% confidence interval."""
    n = acc.numel()
    std = float(acc.std(unbiased=True)) if n > 1 else 0.0
    return float(acc.mean()), 1.96 * std / math.sqrt(n)


def run(cfg: Config) -> list[dict]:
    """Meta-train and meta-test every (method, shot); returns one row per pair."""
    train_pool, test_pool = load_class_pool("train"), load_class_pool("test")
    for shot in cfg.shots:
        for pool in (train_pool, test_pool):
            check_episode_shape(pool, cfg.ways, shot, cfg.query)
    rows = []
    for shot in cfg.shots:
        episodes = meta_test_episodes(test_pool, cfg, shot)
        seen = meta_test_episodes(train_pool, cfg, shot, cfg.train_class_episodes) if cfg.train_class_episodes else None
        for method in cfg.methods:
            torch.manual_seed(cfg.seed)
            learner = make_learner(method, cfg)
            seconds, losses = meta_train(learner, train_pool, cfg, shot, seed=cfg.seed + shot,
                                         desc=f"{LABELS[method]} {cfg.ways}-way {shot}-shot")
            t0 = time.perf_counter()
            acc = meta_test(learner, episodes)
            test_seconds = time.perf_counter() - t0
            mean, ci = mean_ci95(acc)
            rows.append(dict(method=method, shot=shot, acc=mean, ci95=ci, train_s=seconds, test_s=test_seconds,
                             first_loss=sum(losses[:10]) / max(1, len(losses[:10])),
                             last_loss=sum(losses[-10:]) / max(1, len(losses[-10:]))))
            if seen is not None:
                rows[-1]["train_class_acc"], rows[-1]["train_class_ci95"] = mean_ci95(meta_test(learner, seen))
    return rows


def format_table(rows: list[dict], cfg: Config) -> str:
    """method x shot accuracy (mean +- 95% CI, %) and meta-training seconds."""
    shots = list(cfg.shots)
    by = {(r["method"], r["shot"]): r for r in rows}
    seen = cfg.train_class_episodes > 0
    head = ["method"] + [f"{cfg.ways}-way {s}-shot acc %" for s in shots] + [f"train s ({s}-shot)" for s in shots]
    head += [f"train-class {s}-shot %" for s in shots] if seen else []
    lines = [head]
    for m in cfg.methods:
        cells = [LABELS[m]]
        cells += [f"{100 * by[m, s]['acc']:.1f} +- {100 * by[m, s]['ci95']:.1f}" for s in shots]
        cells += [f"{by[m, s]['train_s']:.1f}" for s in shots]
        if seen:
            cells += [f"{100 * by[m, s]['train_class_acc']:.1f} +- {100 * by[m, s]['train_class_ci95']:.1f}"
                      for s in shots]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]

    def fmt(cells):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(c) for c in lines[1:]]
    return "\n".join(out)


def save_figure(rows: list[dict], cfg: Config, path: str) -> None:
    """Bar chart: accuracy with 95% CI per method and shot (left), meta-training time (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["method"], r["shot"]): r for r in rows}
    methods, shots = list(cfg.methods), list(cfg.shots)
    width = 0.8 / len(shots)
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw=dict(width_ratios=[3, 2]))
    for j, s in enumerate(shots):
        xs = [i + (j - (len(shots) - 1) / 2) * width for i in range(len(methods))]
        acc = [100 * by[m, s]["acc"] for m in methods]
        ci = [100 * by[m, s]["ci95"] for m in methods]
        ax.bar(xs, acc, width, yerr=ci, capsize=3, label=f"{s}-shot")
        ax_t.bar(xs, [by[m, s]["train_s"] for m in methods], width, label=f"{s}-shot")
    ax.axhline(100 / cfg.ways, color="k", ls="--", lw=1, label="chance")
    ax.set_ylabel("meta-test accuracy (%), 95% CI")
    ax.set_ylim(0, 100)
    ax.set_title(f"{cfg.ways}-way few-shot, rotated digits 6-9 (unseen), {cfg.test_episodes} episodes")
    ax_t.set_ylabel("meta-training wall time (s)")
    ax_t.set_title(f"{cfg.iterations} meta-iterations x {cfg.meta_batch} tasks")
    for a in (ax, ax_t):
        a.set_xticks(range(len(methods)))
        a.set_xticklabels([LABELS[m] for m in methods], rotation=30, ha="right")
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value
    return parse


def _positive_float(name):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{name} must be finite and > 0, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--shots", nargs="+", type=_positive_int("--shots"), default=[1, 5])
    p.add_argument("--ways", type=_positive_int("--ways"), default=5)
    p.add_argument("--query", type=_positive_int("--query"), default=15, help="query images per class")
    p.add_argument("--iterations", type=_positive_int("--iterations"), default=Config.iterations,
                   help="meta-updates per method and shot")
    p.add_argument("--meta-batch", type=_positive_int("--meta-batch"), default=Config.meta_batch,
                   help="episodes per meta-update")
    p.add_argument("--filters", type=_positive_int("--filters"), default=Config.filters)
    p.add_argument("--inner-steps", type=_positive_int("--inner-steps"), default=Config.inner_steps,
                   help="MAML / FOMAML / ANIL inner steps while meta-training")
    p.add_argument("--test-inner-steps", type=_positive_int("--test-inner-steps"), default=Config.test_inner_steps,
                   help="inner steps at meta-test time (all gradient methods)")
    p.add_argument("--inner-lr", type=_positive_float("--inner-lr"), default=Config.inner_lr)
    p.add_argument("--reptile-steps", type=_positive_int("--reptile-steps"), default=Config.reptile_steps)
    p.add_argument("--reptile-lr", type=_positive_float("--reptile-lr"), default=Config.reptile_lr)
    p.add_argument("--outer-lr", type=_positive_float("--outer-lr"), default=Config.outer_lr, help="Adam step size")
    p.add_argument("--head-bn", choices=("episode", "running"), default=Config.head_bn,
                   help="batch norm of the R2-D2 / SVM / ProtoNet embeddings: per-episode statistics (like the "
                        "gradient methods) or running averages at meta-test time")
    p.add_argument("--test-episodes", type=_positive_int("--test-episodes"), default=Config.test_episodes)
    p.add_argument("--train-class-episodes", type=int, default=0,
                   help="also evaluate on this many episodes of the meta-train classes (how well each method "
                        "fits the classes it was meta-trained on, next to how it generalizes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int("--threads"), default=1, help="torch threads")
    p.add_argument("--out", default=None, help=f"folder for the figure (default {DEFAULT_OUT}; smoke: required)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--smoke", action="store_true",
                   help="tiny budgets (seconds): 8 filters, 5 queries, 30 iterations x 4 tasks, 40 test episodes; "
                        "needs --out")
    return p


def config_from_args(argv=None) -> Config:
    """Parse the command line into a ``Config``; bad values exit with a message naming the option."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        if args.out is None:
            parser.error("--smoke needs --out (the smoke run must not overwrite the figures in docs/figures)")
        smoke = dict(ways=args.ways, query=5, iterations=30, meta_batch=4, filters=8, test_episodes=40, eval_batch=20)
        cfg = Config(methods=tuple(dict.fromkeys(args.methods)), shots=tuple(dict.fromkeys(args.shots)),
                     inner_steps=1, test_inner_steps=3, reptile_steps=3, outer_lr=5e-3, head_bn=args.head_bn,
                     train_class_episodes=min(args.train_class_episodes, 20), seed=args.seed,
                     out=args.out, threads=args.threads, progress=not args.no_progress, **smoke)
    else:
        cfg = Config(methods=tuple(dict.fromkeys(args.methods)), shots=tuple(dict.fromkeys(args.shots)),
                     ways=args.ways, query=args.query, iterations=args.iterations, meta_batch=args.meta_batch,
                     filters=args.filters, inner_steps=args.inner_steps, test_inner_steps=args.test_inner_steps,
                     inner_lr=args.inner_lr, reptile_steps=args.reptile_steps, reptile_lr=args.reptile_lr,
                     outer_lr=args.outer_lr, head_bn=args.head_bn, test_episodes=args.test_episodes,
                     train_class_episodes=args.train_class_episodes, seed=args.seed,
                     out=args.out or DEFAULT_OUT, threads=args.threads, progress=not args.no_progress)
    if cfg.train_class_episodes < 0:
        parser.error(f"--train-class-episodes must be >= 0, got {cfg.train_class_episodes}")
    if cfg.ways < 2:
        parser.error(f"--ways must be >= 2, got {cfg.ways}")
    for split in ("train", "test"):
        pool = load_class_pool(split)
        if cfg.ways > pool.num_classes:
            parser.error(f"--ways {cfg.ways} exceeds the {pool.num_classes} classes of the meta-{split} split")
        for shot in cfg.shots:
            if shot + cfg.query > pool.min_class_size:
                parser.error(f"--shots {shot} + --query {cfg.query} exceeds the smallest meta-{split} class "
                             f"({pool.min_class_size} images)")
    return cfg


def main(argv=None) -> list[dict]:
    """Run the comparison; prints the table, saves the figure and returns the rows."""
    cfg = config_from_args(argv)
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    rows = run(cfg)
    total = time.perf_counter() - t0
    print(f"{cfg.ways}-way few-shot on rotated digits (meta-train: digits 0-5, meta-test: digits 6-9), "
          f"{cfg.test_episodes} meta-test episodes, {cfg.query} queries per class, {cfg.iterations} meta-iterations "
          f"x {cfg.meta_batch} tasks, torch {torch.__version__}, {cfg.threads} thread(s)")
    print(format_table(rows, cfg))
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "fewshot_digits.png")
    save_figure(rows, cfg, path)
    print(f"total {total:.0f} s; figure: {path}")
    return rows


if __name__ == "__main__":
    main()
