"""Hessian-vector products of per-task losses, batched over tasks.

A per-task loss ``L(params, fixed, *task_args) -> scalar`` (for a module: ``TaskModel.task_loss``)
is differentiated with ``torch.func`` and batched with ``vmap`` over the leading task dimension of
``params``, ``v`` and the task arguments; ``fixed`` tensors are shared by the tasks. Each mode
returns ``H v`` restricted to ``params`` and, when ``fixed`` is not empty, the mixed block
``d/dfixed (grad_params L . v)`` (what the meta-gradient of ANIL / CAVIA needs).

Modes:

* ``"forward_over_reverse"`` (exact): ``jvp`` of ``grad``; one forward and one reverse pass with
  tangents, no graph of the gradient kept.
* ``"reverse_over_reverse"`` (exact): ``vjp`` of ``grad`` (double backward).
* ``"fd_forward"``: ``(g(x + r v) - g(x)) / r``; reuses a saved ``g(x)`` when given (one gradient).
* ``"fd_central"``: ``(g(x + r v) - g(x - r v)) / (2 r)`` (two gradients).

Error model of the finite differences (relative to ``||H v||``): for a smooth loss, truncation
``~ r ||v|| L3 / (2 ||H||)`` (forward) or ``~ r^2 ||v||^2 L3 / (6 ||H||)`` (central), plus rounding
``~ eps_eval ||g|| / (r ||H v||)`` with ``eps_eval`` the machine epsilon of the dtype in which the
gradients are evaluated. Nets with ReLU / max-pool have gradients that jump where a unit changes
sign or a pool changes its argmax: a perturbation ``r v`` flips about ``N p0 r`` of the ``N``
units and each flip adds ``O(jump / r)``, an error that does *not* shrink with ``r`` once any unit
flips. The cure is a step so small that (almost) no unit flips, which float32 cannot resolve (its
rounding term is then > 10%). ``fd_dtype=torch.float64`` evaluates the two gradients in float64
(parameters, data and arithmetic upcast), where ``r = sqrt(eps64) (1 + ||x||) / ||v||`` (1.5e-8
relative) keeps rounding near 1e-8 and flips rare. ``hvp_fd_step`` computes the default ``r``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from .. import _validation as V
from ..inner_update import fd_perturb
from ..ops.block_reuse import reusing_cpu_blocks
from ..ops.cpu_kernels import cpu_kernels
from ..ops.multi_tensor import task_axpby, task_dot
from . import fused_conv, fused_mlp
from .functional import TaskModel, without_autocast
from .rng import RngLog
from .stacked import stacked_task_losses, supports_stacking

HVP_MODES = ("forward_over_reverse", "reverse_over_reverse", "fd_forward", "fd_central")
_ALIASES = {"fwdrev": "forward_over_reverse", "revrev": "reverse_over_reverse",
            "double_backward": "reverse_over_reverse"}

TaskLoss = Callable[..., Tensor]


def resolve_hvp_mode(mode: str) -> str:
    """Map aliases to a mode of ``HVP_MODES`` or ``"exact"`` (the faster exact one); raise on anything else."""
    if not isinstance(mode, str):
        raise TypeError(f"hvp mode must be a string, got {type(mode).__name__}")
    mode = _ALIASES.get(mode, mode)
    if mode not in HVP_MODES + ("exact",):
        raise ValueError(f"hvp mode must be one of {HVP_MODES} (or 'exact'), got {mode!r}")
    return mode


BATCHINGS = ("auto", "vmap", "loop", "stacked", "fused_mlp", "fused_conv")
_FUSED = ("auto", "fused_mlp", "fused_conv")  # the batchings that take a fused path where one applies
# Per-task batch size from which "auto" loops over tasks: vmap turns convs with per-task weights
# into grouped convs, which the CPU backend runs ~2x slower than T plain convs for large per-task
# batches (conv4, 75 query images: 1.9 s vs 0.95 s on 1 thread), and faster for small ones (5
# support images: 70 ms vs 99 ms; the 1000-task sinusoid MLP: far faster).
AUTO_LOOP_MIN_BATCH = 32
# Task counts up to which "auto" loops over tasks whatever the batch: the loop (plain autograd per
# task) costs a few hundred microseconds of Python per task and call, and its double backward is
# ~25% cheaper than vmap's jvp/vjp of grad on conv4 (A support, T = 8: 204 ms vs 264-269 ms).
AUTO_LOOP_MAX_TASKS = 16
# Per-task samples with this many dims or more ([N, C, H, W]: images, conv nets) are always looped
# on the CPU: there the loop runs the network's max-pools, relus and batch norms on fastmaml's
# kernels (fastmaml.ops.cpu_kernels, which vmap cannot use) and plain instead of grouped convs.
# Conv4 A (5-image support sets, one thread): T = 32, 75 query images: loop 2666-2784 ms vs
# 3407-3467 for "auto" with vmap'ed support passes (K = 1), 4431-4764 vs 5140-5395 (K = 3);
# T = 64 with 5 query images: 1711 vs 5002-5018 ms.
AUTO_LOOP_SAMPLE_DIMS = 3


def resolve_batching(batching: str, task_args: Sequence[Tensor]) -> str:
    """``"vmap"`` or ``"loop"`` for a call on these per-task data ``[T, N, ...]`` (``"fused_mlp"``
    and ``"fused_conv"`` resolve like ``"auto"`` here: this is the choice for calls no fused path takes)."""
    if batching not in BATCHINGS:
        raise ValueError(f"batching must be one of {BATCHINGS}, got {batching!r}")
    if batching not in _FUSED:
        return batching
    first = task_args[0] if task_args else None
    if first is None or first.dim() < 1:
        return "vmap"
    if first.device.type != "cpu":
        # On a GPU the loop's per-task kernels are launch-bound (conv4, T = 8, H100: the per-task
        # loop 4.4x slower than torch.func.vmap for the same second-order meta-gradient).
        return "vmap"
    big = first.dim() >= 2 and first.shape[1] >= AUTO_LOOP_MIN_BATCH
    images = first.dim() >= 2 + AUTO_LOOP_SAMPLE_DIMS
    return "loop" if big or images or first.shape[0] <= AUTO_LOOP_MAX_TASKS else "vmap"


def choose_batching(batching: str, task_loss, params, fixed, task_args, shared: bool) -> str:
    """``resolve_batching`` plus the stacked batching, which needs a ``TaskModel`` whose forward
    the stacked mode can run (checked once per model, see ``fastmaml.meta.stacked``)."""
    if batching not in BATCHINGS:
        raise ValueError(f"batching must be one of {BATCHINGS}, got {batching!r}")
    if batching == "stacked":
        # Never chosen by "auto": on the CPU it measured slower than vmap and the loop (see
        # fastmaml.meta.stacked); offered for devices where one batched matmul / grouped conv wins.
        task_model = getattr(task_loss, "__self__", None)
        usable = (isinstance(task_model, TaskModel) and getattr(task_loss, "__func__", None) is TaskModel.task_loss
                  and len(task_args) == 2
                  and supports_stacking(task_model, params, fixed, *task_args, shared))
        if not usable:
            raise ValueError(
                "batching='stacked' needs a TaskModel built from Linear / Conv2d / BatchNorm layers and per-sample "
                "ops, called with (x, y) task data; this model or call is not supported: use 'auto', 'vmap' or "
                "'loop'")
        return "stacked"
    return resolve_batching(batching, task_args)


def fused_plan(batching: str, task_loss, params, fixed, task_args, shared: bool):
    """The fused plan for this call when ``batching`` allows one, else ``None``: a
    ``fastmaml.meta.fused_mlp`` plan (a plain Linear/activation ``nn.Sequential`` with a known loss)
    under ``"auto"`` / ``"fused_mlp"``, a ``fastmaml.meta.fused_conv`` plan (conv / batch norm /
    ReLU / 2x2 max-pool blocks and a linear head, on the CPU) under ``"auto"`` / ``"fused_conv"``.
    ``"auto"`` takes them whenever they apply: each measured faster than vmap and the loop on its
    workloads (docs/meta.md)."""
    if batching in ("auto", "fused_mlp"):
        plan = fused_mlp.plan_for_call(task_loss, params, fixed, task_args, shared)
        if plan is not None:
            return plan
    if batching in ("auto", "fused_conv"):
        return fused_conv.plan_for_call(task_loss, params, fixed, task_args, shared)
    return None


def _fused_grad(plan, params, fixed, task_args, wrt, shared, low_rank, keep_state):
    if isinstance(plan, fused_conv.ConvPlan):
        return fused_conv.grad(plan, params, fixed, *task_args, wrt_fixed=wrt, shared=shared)
    return fused_mlp.grad(plan, params, fixed, *task_args, wrt_fixed=wrt, low_rank=low_rank, keep_state=keep_state)


def _fused_hvp(plan, params, fixed, v, task_args, shared, sum_tasks):
    if isinstance(plan, fused_conv.ConvPlan):
        return fused_conv.hvp(plan, params, fixed, v, *task_args, shared=shared, sum_tasks=sum_tasks)
    return fused_mlp.hvp(plan, params, fixed, v, *task_args, sum_tasks=sum_tasks)


def _has_conv(task_loss) -> bool:
    """Under vmap, forward-over-reverse is the faster exact HVP for conv nets (conv4 support, T = 8,
    HVP table of the meta benchmark) and reverse-over-reverse for the rest (sinusoid MLP: 37.5 vs
    39.0 ms per meta-gradient at T = 1000, 4.8 vs 5.7 at T = 25, docs/meta.md). A loss that is not
    a TaskModel's counts as a conv net (the old default)."""
    task_model = getattr(task_loss, "__self__", None)
    if not isinstance(task_model, TaskModel):
        return True
    return any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in task_model.model.modules())


def _stacked_leaves(ts, num_tasks, shared, requires_grad=True):
    """Per-task leaves ``[T, ...]`` (a shared tensor is expanded: its gradient comes out per task)."""
    out = [(q.detach().unsqueeze(0).expand(num_tasks, *q.shape) if shared else q.detach()) for q in ts]
    return [q.requires_grad_() for q in out] if requires_grad else out


def _stacked_grad(task_model, params, fixed, task_args, wrt, shared):
    num_tasks = task_args[0].shape[0]
    with torch.enable_grad():
        p = _stacked_leaves(params, num_tasks, shared)
        f = _stacked_leaves(fixed, num_tasks, True) if wrt else [q.detach() for q in fixed]
        losses = stacked_task_losses(task_model, p, f, *task_args)
        targets = p + (f if wrt else [])
        gs = _zeros_for_none(torch.autograd.grad(losses.sum(), targets, allow_unused=True), targets)
    return losses.detach(), list(gs[:len(p)]), list(gs[len(p):])


def _stacked_hvp(task_model, params, fixed, v, task_args, wrt, shared):
    """``H v`` (and the mixed block) for all tasks by one double backward through the stacked forward."""
    num_tasks = v[0].shape[0]
    with torch.enable_grad():
        p = _stacked_leaves(params, num_tasks, shared)
        f = _stacked_leaves(fixed, num_tasks, True) if wrt else [q.detach() for q in fixed]
        targets = p + (f if wrt else [])
        losses = stacked_task_losses(task_model, p, f, *task_args)
        g = torch.autograd.grad(losses.sum(), p, create_graph=True, allow_unused=True)
        pairs = [(gi, vi) for gi, vi in zip(g, v) if gi is not None and gi.requires_grad]
        hv = (torch.autograd.grad([gi for gi, _ in pairs], targets, [vi for _, vi in pairs], allow_unused=True)
              if pairs else [None] * len(targets))
    hv = [h.detach() for h in _zeros_for_none(hv, targets)]
    return hv[:len(p)], hv[len(p):]


def _leaves(ts, t, shared):
    return [(q if shared else q[t]).detach().requires_grad_() for q in ts]


def _zeros_for_none(grads, like):
    return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, like)]


def _loop_grad_autograd(task_loss, params, fixed, task_args, wrt, shared):
    """Per-task gradients with plain ``torch.autograd`` in a loop (the ``"loop"`` batching)."""
    num_tasks = task_args[0].shape[0]
    losses, ga, gf = [], [], []
    for t in range(num_tasks):
        p = _leaves(params, t, shared)
        f = [q.detach().requires_grad_() for q in fixed] if wrt else [q.detach() for q in fixed]
        with torch.enable_grad(), cpu_kernels():
            loss = task_loss(p, f, *[a[t] for a in task_args])
            gs = torch.autograd.grad(loss, p + (f if wrt else []), allow_unused=True)
        gs = _zeros_for_none(gs, p + (f if wrt else []))
        losses.append(loss.detach())
        ga.append(gs[:len(p)])
        gf.append(gs[len(p):])
    stack = lambda rows, i: torch.stack([r[i] for r in rows])  # noqa: E731
    return (torch.stack(losses), [stack(ga, i) for i in range(len(params))],
            [stack(gf, i) for i in range(len(fixed))] if wrt else [])


def _loop_hvp_double_backward(task_loss, params, fixed, v, task_args, wrt, shared):
    """Per-task ``H v`` (and the mixed block) by plain double backward in a loop over tasks."""
    num_tasks = v[0].shape[0]
    out_a, out_f = [], []
    for t in range(num_tasks):
        p = _leaves(params, t, shared)
        f = [q.detach().requires_grad_() for q in fixed] if wrt else [q.detach() for q in fixed]
        targets = p + (f if wrt else [])
        with torch.enable_grad(), cpu_kernels():
            loss = task_loss(p, f, *[a[t] for a in task_args])
            g = torch.autograd.grad(loss, p, create_graph=True, allow_unused=True)
            pairs = [(gi, vi[t]) for gi, vi in zip(g, v) if gi is not None and gi.requires_grad]
            hv = (torch.autograd.grad([gi for gi, _ in pairs], targets, [vi for _, vi in pairs], allow_unused=True)
                  if pairs else [None] * len(targets))
        hv = _zeros_for_none(hv, targets)
        out_a.append(hv[:len(p)])
        out_f.append(hv[len(p):])
    stack = lambda rows, i: torch.stack([r[i] for r in rows])  # noqa: E731
    return [stack(out_a, i) for i in range(len(params))], ([stack(out_f, i) for i in range(len(fixed))]
                                                            if wrt else [])


def _task_grad_with_graph(task_loss, params, fixed, args_t, t, shared, wrt):
    """Task t's leaves ``p`` and ``f``, its loss and ``grad(loss, p)`` with ``create_graph=True``."""
    with torch.enable_grad(), cpu_kernels():
        p = _leaves(params, t, shared)
        f = [q.detach().requires_grad_() for q in fixed] if wrt else [q.detach() for q in fixed]
        loss = task_loss(p, f, *args_t)
        g = torch.autograd.grad(loss, p, create_graph=True, allow_unused=True)
    return p, f, loss, g


def loop_grad_keep_graph(task_loss, params, fixed, task_args, *, shared: bool, wrt_fixed: bool):
    """Per-task gradients by plain autograd with ``create_graph=True``, graphs kept for ``kept_graph_hvp``.

    Returns:
        ``(losses [T], grads [T, ...] (detached), graphs)``; ``graphs[t]`` holds task t's leaves and
        its gradient with its graph (one step's activations per task, until ``kept_graph_hvp``).
    """
    num_tasks = task_args[0].shape[0]
    wrt = wrt_fixed and len(fixed) > 0
    losses, grads, graphs = [], [], []
    for t in range(num_tasks):
        p, f, loss, g = _task_grad_with_graph(task_loss, params, fixed, [a[t] for a in task_args], t, shared, wrt)
        losses.append(loss.detach())
        grads.append(_zeros_for_none([None if gi is None else gi.detach() for gi in g], p))
        graphs.append((p, f if wrt else [], g))
    return (torch.stack(losses), [torch.stack([r[i] for r in grads]) for i in range(len(params))], graphs)


def kept_graph_hvp(graphs, v: Sequence[Tensor]):
    """``H_t v_t`` (and the mixed block with the fixed tensors) by a double backward through the
    graphs of ``loop_grad_keep_graph``, which are freed task by task. ``v``: ``[T, ...]`` tensors."""
    out_a, out_f = [], []
    for t, (p, f, g) in enumerate(graphs):
        targets = p + f
        pairs = [(gi, vi[t]) for gi, vi in zip(g, v) if gi is not None and gi.requires_grad]
        with torch.enable_grad():
            hv = (torch.autograd.grad([gi for gi, _ in pairs], targets, [vi for _, vi in pairs], allow_unused=True)
                  if pairs else [None] * len(targets))
        hv = _zeros_for_none(hv, targets)
        out_a.append(hv[:len(p)])
        out_f.append(hv[len(p):])
        graphs[t] = None  # free this task's activations now
    stack = lambda rows, i: torch.stack([r[i] for r in rows])  # noqa: E731
    return [stack(out_a, i) for i in range(len(out_a[0]))], [stack(out_f, i) for i in range(len(out_f[0]))]


def loop_last_step(task_loss, params, fixed, support, query, step, *, shared: bool, wrt_fixed: bool):
    """The last inner step, the query gradient and the first HVP of the MAML backward, task by task.

    For each task t: ``g_t = grad L_support(phi_t)`` with its graph (``create_graph``), ``phi'_t =
    phi_t - alpha * g_t``, the query gradient at ``phi'_t``, then ``H_t(phi_t) (alpha * gq_t)`` by a
    double backward through that same graph, which is freed before the next task. The backward
    recursion's first step needs ``H(phi_{K-1}) (alpha * w_t gq_t) = w_t H (alpha * gq_t)`` (``w_t``
    the incoming gradient of task t's loss, a scalar): computing it here reuses the activations of
    the forward pass instead of recomputing them, and holds one task's graph at a time.

    Args:
        task_loss: ``L(params, fixed, x, y) -> scalar`` for one task.
        params: ``phi_{K-1}``: tensors ``[T, ...]``, or without the task dimension when ``shared``.
        fixed: tensors shared by the tasks; with ``wrt_fixed`` the query gradient and the HVP's
            mixed block with respect to them are returned too.
        support: per-task support data ``[T, ...]`` (e.g. ``(x, y)``).
        query: per-task query data ``[T, ...]``.
        step: the step sizes of the last step, one per tensor of ``params`` (floats or detached
            tensors: scalars or parameter-shaped, Meta-SGD).
        shared: ``params`` have no task dimension.
        wrt_fixed: differentiate with respect to ``fixed`` too.

    Returns:
        A dict of ``[T]`` / ``[T, ...]`` tensors: ``support_losses``, ``grads`` (``g_t``),
        ``query_losses``, ``query_grads`` and ``query_grads_fixed`` (``[]`` without ``wrt_fixed``),
        ``hvp`` and ``hvp_fixed`` (``H_aa (alpha * gq_t)`` and ``H_fa (alpha * gq_t)``).
    """
    num_tasks = support[0].shape[0]
    wrt = wrt_fixed and len(fixed) > 0
    rows = []
    for t in range(num_tasks):
        p, f, loss, g = _task_grad_with_graph(task_loss, params, fixed, [a[t] for a in support], t, shared, wrt)
        with torch.no_grad():
            nxt = [(pi.detach() if gi is None else pi.detach() - a * gi.detach()) for pi, gi, a in zip(p, g, step)]
        with torch.enable_grad(), cpu_kernels():
            pq = [q.requires_grad_() for q in nxt]
            fq = [q.detach().requires_grad_() for q in fixed] if wrt else [q.detach() for q in fixed]
            q_loss = task_loss(pq, fq, *[a[t] for a in query])
            gq = _zeros_for_none(torch.autograd.grad(q_loss, pq + (fq if wrt else []), allow_unused=True),
                                 pq + (fq if wrt else []))
            targets = p + (f if wrt else [])
            pairs = [(gi, a * gqi) for gi, gqi, a in zip(g, gq, step) if gi is not None and gi.requires_grad]
            # retain_graph=False: this task's activations are freed here
            hv = (torch.autograd.grad([gi for gi, _ in pairs], targets, [ui for _, ui in pairs], allow_unused=True)
                  if pairs else [None] * len(targets))
        g = _zeros_for_none([None if gi is None else gi.detach() for gi in g], p)
        rows.append((loss.detach(), g, q_loss.detach(), gq, _zeros_for_none(hv, targets)))
    n_p = len(params)

    def stack(j, lo=0, hi=None):
        return [torch.stack([r[j][i] for r in rows]) for i in range(lo, len(rows[0][j]) if hi is None else hi)]

    return {"support_losses": torch.stack([r[0] for r in rows]), "grads": stack(1),
            "query_losses": torch.stack([r[2] for r in rows]), "query_grads": stack(3, 0, n_p),
            "query_grads_fixed": stack(3, n_p), "hvp": stack(4, 0, n_p), "hvp_fixed": stack(4, n_p)}


def over_tasks(fn, in_dims, args, batching: str):
    """``vmap(fn, in_dims)(*args)``, or the same computed by a Python loop over tasks and stacked.

    Both give identical results (tasks are independent); they differ in speed only.
    """
    if batching == "vmap":
        # "different": a random op (dropout) draws for every task, as the loop does
        return vmap(fn, in_dims=in_dims, randomness="different")(*args)
    num_tasks = next(leaf.shape[0] for a, d in zip(args, in_dims) if d == 0
                     for leaf in tree_leaves(a))
    outs = []
    for t in range(num_tasks):
        sliced = [tree_map(lambda x: x[t], a) if d == 0 else a for a, d in zip(args, in_dims)]
        outs.append(fn(*sliced))
    flat0, spec = tree_flatten(outs[0])
    flats = [tree_flatten(o)[0] for o in outs]
    return tree_unflatten([torch.stack([f[i] for f in flats]) for i in range(len(flat0))], spec)


def _in_dims(n_task_args: int, shared_params: bool = False):
    return (None if shared_params else 0, None) + (0,) * n_task_args


@without_autocast  # in the parameters' dtype (the fused kernels take float32 / float64)
@reusing_cpu_blocks  # its per-task activations reuse freed CPU blocks (ops/block_reuse.py)
def batched_grad(task_loss: TaskLoss, params: Sequence[Tensor], fixed: Sequence[Tensor], *task_args: Tensor,
                 wrt_fixed: bool = False, shared_params: bool = False, batching: str = "vmap",
                 low_rank: bool = False, keep_state: bool = False):
    """Per-task gradients ``vmap(grad(L))`` (or ``grad(L)`` in a loop over tasks).

    Args:
        task_loss: ``L(params, fixed, *task_args) -> scalar`` for one task.
        params: tensors ``[T, ...]``.
        fixed: tensors shared by the tasks (no task dimension).
        *task_args: per-task data ``[T, ...]``.
        wrt_fixed: also return the per-task gradients with respect to ``fixed`` (``[T, ...]``).
        shared_params: ``params`` have no task dimension: every task starts from the same point
            (the first inner step from ``theta``). Layers then run once on all tasks' data
            (a plain conv / matmul instead of a grouped / batched one).
        batching: ``"vmap"``, ``"loop"`` (over tasks), ``"auto"`` (see ``resolve_batching``) or
            ``"fused_mlp"`` / ``"fused_conv"`` (``fastmaml.meta.fused_mlp`` / ``fused_conv`` where it
            applies, else as ``"auto"``).
        low_rank: allow the fused MLP path to return adapted weights' gradients as
            ``fastmaml.meta.fused_mlp.LowRank`` factors (``hvp`` takes them as directions).
        keep_state: let the fused MLP path keep this pass for the next ``hvp`` at the same point
            (the engine's last backward step is an HVP at its first inner step's point).

    Returns:
        ``(losses [T], grads_params, grads_fixed)``; ``grads_fixed`` is ``[]`` unless ``wrt_fixed``.

    Example:
        >>> tm = TaskModel(MLP(1, (40, 40), 1), F.mse_loss)
        >>> phi = tm.initial_adapted(tm.theta_adapted(), 8)
        >>> losses, g, _ = batched_grad(tm.task_loss, phi, [], x, y)   # x: [8, N, 1]
    """
    params, fixed = tuple(params), tuple(fixed)
    wrt = wrt_fixed and len(fixed) > 0

    plan = fused_plan(batching, task_loss, params, fixed, task_args, shared_params)
    if plan is not None:
        return _fused_grad(plan, params, fixed, task_args, wrt, shared_params, low_rank, keep_state)
    params = tuple(fused_mlp.dense(p) for p in params)  # factored points from the fused path, if any

    def with_aux(p, f, *args):
        loss = task_loss(p, f, *args)
        return loss, loss

    how = choose_batching(batching, task_loss, params, fixed, task_args, shared_params)
    if how == "stacked":
        return _stacked_grad(task_loss.__self__, params, fixed, task_args, wrt, shared_params)
    if how == "loop":
        return _loop_grad_autograd(task_loss, params, fixed, task_args, wrt, shared_params)
    gfn = grad(with_aux, argnums=(0, 1) if wrt else 0, has_aux=True)
    grads, losses = over_tasks(gfn, _in_dims(len(task_args), shared_params), (params, fixed, *task_args), how)
    if wrt:
        return losses, list(grads[0]), list(grads[1])
    return losses, list(grads), []


def hvp_fd_step(params: Sequence[Tensor], v: Sequence[Tensor], *, scheme: str = "forward",
                eval_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Default per-task finite-difference step ``r_t = c (1 + ||x_t||) / ||v_t||``.

    ``c = sqrt(eps)`` (forward) or ``eps^(1/3)`` (central) of the dtype the gradients are evaluated
    in, except that in float64 both schemes use ``sqrt(eps)``: on piecewise-linear nets the small
    step keeps activation flips rare (see the module docstring), and central differences do not
    need a larger step to balance a truncation error that is already below rounding.

    Returns:
        ``[T]`` steps in float64 when ``eval_dtype`` is float64, else in the dtype of ``params``.
    """
    dtype = eval_dtype or params[0].dtype
    eps = torch.finfo(dtype).eps
    c = math.sqrt(eps) if (scheme == "forward" or dtype == torch.float64) else eps ** (1.0 / 3.0)
    with torch.no_grad():
        x_norm = task_dot(params, params).to(dtype).sqrt()
        v_norm = task_dot(v, v).to(dtype).sqrt()
        v_norm = torch.where(v_norm > 0, v_norm, torch.ones_like(v_norm))
        return c * (1 + x_norm) / v_norm


def _cast(ts, dtype):
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in ts)


@without_autocast
@reusing_cpu_blocks
def hvp(task_loss: TaskLoss, params: Sequence[Tensor], v: Sequence[Tensor], *task_args: Tensor,
        fixed: Sequence[Tensor] = (), mode: str = "forward_over_reverse", r: Optional[Tensor] = None,
        saved_grad: Optional[Sequence[Tensor]] = None, fd_dtype: Optional[torch.dtype] = None,
        shared_params: bool = False, batching: str = "vmap", sum_tasks: bool = False):
    """Batched Hessian-vector products ``H_t v_t`` of per-task losses.

    Args:
        task_loss: ``L(params, fixed, *task_args) -> scalar`` for one task (``TaskModel.task_loss``
            wraps any ``nn.Module`` through ``torch.func.functional_call``).
        params: the point ``x``, tensors ``[T, ...]``.
        v: the direction, shaped like ``params``.
        *task_args: per-task data ``[T, ...]`` (e.g. ``x_support, y_support``).
        fixed: tensors shared by the tasks; when given, the mixed block ``d/dfixed <grad_params L, v>``
            is returned too (the direction has no ``fixed`` component).
        mode: ``"forward_over_reverse"``, ``"reverse_over_reverse"``, ``"exact"`` (whichever of the
            two is faster for the batching: reverse-over-reverse by plain double backward in a loop,
            forward-over-reverse under vmap), ``"fd_forward"`` or ``"fd_central"``.
        r: ``[T]`` finite-difference steps (default ``hvp_fd_step``).
        saved_grad: ``fd_forward`` only: ``g(x)`` already computed, the params part followed by
            the fixed part (per task, ``[T, ...]``); saves one gradient evaluation. Ignored when
            ``fd_dtype`` differs from the dtype of ``params``.
        fd_dtype: dtype in which finite-difference gradients are evaluated and differenced
            (e.g. ``torch.float64`` for float32 models with ReLU; see the module docstring).
        shared_params: ``params`` have no task dimension (the same point for every task).
        batching: ``"vmap"``, ``"loop"`` (over tasks), ``"auto"`` (see ``resolve_batching``) or
            ``"fused_mlp"`` / ``"fused_conv"`` (``fastmaml.meta.fused_mlp`` / ``fused_conv`` where it
            applies, else as ``"auto"``).
        sum_tasks: return ``sum_t H_t v_t`` (no task dimension). The fused MLP path computes the
            sum directly (one matmul over all tasks' rows per weight); the others sum the per-task results.

    Returns:
        ``(hv_params, hv_fixed)``: lists of ``[T, ...]`` tensors (or their sums over tasks) in the
        dtype of ``params``; ``hv_fixed`` is ``[]`` when ``fixed`` is empty.

    Example:
        >>> tm = TaskModel(Conv4(1, 8, 5, 28), F.cross_entropy)
        >>> phi = tm.initial_adapted(tm.theta_adapted(), 4)       # xs: [4, 5, 1, 28, 28]
        >>> v = [torch.randn_like(p) for p in phi]
        >>> hv, _ = hvp(tm.task_loss, phi, v, xs, ys, mode="exact")
    """
    mode = resolve_hvp_mode(mode)
    if any(fused_mlp.is_factored(t) for t in list(v) + list(params)):  # from the fused path's low-rank steps
        plan = fused_plan(batching, task_loss, params, fixed, task_args, shared_params)
        if plan is not None and mode in ("exact", "forward_over_reverse", "reverse_over_reverse"):
            return _fused_hvp(plan, params, fixed, v, task_args, shared_params, sum_tasks)
        v = [fused_mlp.dense(t) for t in v]
        params = [fused_mlp.dense(t) for t in params]
    params = V.check_tensor_list(params, "params")
    v = V.check_tensor_list(v, "v")
    V.check_same_length(params=params, v=v)
    if shared_params:
        num_tasks = V.check_task_tensors(v, "v")
        for i, (p, w) in enumerate(zip(params, v)):
            if p.shape != w.shape[1:]:
                raise ValueError(f"params[{i}] has shape {tuple(p.shape)}; with shared_params expected {tuple(w.shape[1:])}")
    else:
        num_tasks = V.check_task_tensors(params, "params")
        V.check_task_tensors(v, "v", like=params)
    for i, a in enumerate(task_args):
        if not isinstance(a, Tensor) or a.dim() < 1 or a.shape[0] != num_tasks:
            shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise ValueError(f"task_args[{i}] has shape {shape}; expected a leading task dimension of {num_tasks}")
    params, v, fixed = tuple(params), tuple(v), tuple(fixed)
    wrt = len(fixed) > 0
    plan = fused_plan(batching, task_loss, params, fixed, task_args, shared_params)
    if plan is not None and mode in ("exact", "forward_over_reverse", "reverse_over_reverse"):
        # every exact mode is the same H v; the R-operator is forward-over-reverse written out
        return _fused_hvp(plan, params, fixed, v, task_args, shared_params, sum_tasks)
    if sum_tasks:
        hv_a, hv_f = hvp(task_loss, params, v, *task_args, fixed=fixed, mode=mode, r=r, saved_grad=saved_grad,
                         fd_dtype=fd_dtype, shared_params=shared_params, batching=batching)
        return [h.sum(0) for h in hv_a], [h.sum(0) for h in hv_f]
    how = choose_batching(batching, task_loss, params, fixed, task_args, shared_params)
    if plan is not None:  # finite differences: the gradient evaluations below run fused
        how = batching
    n_p = len(params)
    if how == "stacked" and mode in ("exact", "forward_over_reverse", "reverse_over_reverse"):
        # one exact implementation here: double backward through the stacked forward
        return _stacked_hvp(task_loss.__self__, params, fixed, v, task_args, wrt, shared_params)
    if mode == "exact":  # the faster exact implementation for this batching
        mode = "reverse_over_reverse" if how == "loop" or not _has_conv(task_loss) else "forward_over_reverse"
    if mode == "reverse_over_reverse" and how == "loop":
        return _loop_hvp_double_backward(task_loss, params, fixed, v, task_args, wrt, shared_params)

    if mode == "forward_over_reverse":
        def one(p, f, vv, *args):
            gfn = lambda p_: grad(task_loss, argnums=(0, 1) if wrt else 0)(p_, f, *args)  # noqa: E731
            return jvp(gfn, (p,), (vv,))[1]

        out = over_tasks(one, (None if shared_params else 0, None, 0) + (0,) * len(task_args),
                         (params, fixed, v, *task_args), how)
        return (list(out[0]), list(out[1])) if wrt else (list(out), [])

    if mode == "reverse_over_reverse":
        def one(p, f, vv, *args):
            if wrt:
                _, pull = vjp(lambda p_, f_: grad(task_loss, argnums=0)(p_, f_, *args), p, f)
                return pull(vv)
            _, pull = vjp(lambda p_: grad(task_loss, argnums=0)(p_, f, *args), p)
            return pull(vv)[0]

        out = over_tasks(one, (None if shared_params else 0, None, 0) + (0,) * len(task_args),
                         (params, fixed, v, *task_args), how)
        return (list(out[0]), list(out[1])) if wrt else (list(out), [])

    # -- finite differences ------------------------------------------------------------------
    if shared_params:
        params = tuple(p.unsqueeze(0).expand(num_tasks, *p.shape) for p in params)
    scheme = "forward" if mode == "fd_forward" else "central"
    dtype = params[0].dtype
    ev = fd_dtype or dtype
    if r is None:
        r = hvp_fd_step(params, v, scheme=scheme, eval_dtype=ev)
    else:
        V.check_task_vector(r, "r", num_tasks, r if r.dtype == ev else params[0].to(ev))
    with torch.no_grad():
        p_ev, v_ev, f_ev = _cast(params, ev), _cast(v, ev), _cast(fixed, ev)
        args_ev = _cast(task_args, ev) if ev != dtype else task_args
        r_ev = r.to(ev)
        plus = fd_perturb(p_ev, v_ev, r_ev, sign=1.0)
        rng = RngLog(params[0].device)  # the second gradient draws the first's dropout masks
        rng.mark()
        _, gp, gpf = batched_grad(task_loss, plus, f_ev, *args_ev, wrt_fixed=wrt, batching=how)
        if scheme == "forward":
            if saved_grad is not None and ev == dtype:
                base = list(saved_grad)
                if len(base) != n_p + len(fixed):
                    raise ValueError(f"saved_grad must hold {n_p + len(fixed)} tensors (params then fixed), got {len(base)}")
            else:
                rng.replay(0)
                _, gb, gbf = batched_grad(task_loss, p_ev, f_ev, *args_ev, wrt_fixed=wrt, batching=how)
                base = gb + gbf
            inv = 1.0 / r_ev
        else:
            minus = fd_perturb(p_ev, v_ev, r_ev, sign=-1.0)
            rng.replay(0)
            _, gb, gbf = batched_grad(task_loss, minus, f_ev, *args_ev, wrt_fixed=wrt, batching=how)
            base = gb + gbf
            inv = 0.5 / r_ev
        # (g_plus - g_base) * inv per task, in one fused pass over all tensors
        diff = task_axpby(gp + gpf, base, 1.0, x_scale=inv, y_scale=inv, check_finite=False)
        diff = [d.to(dtype) for d in diff]
    return diff[:n_p], diff[n_p:]
