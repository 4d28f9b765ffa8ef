"""Meta-gradients of the query loss by a custom backward: MAML (second order), FOMAML, Reptile.

Forward: the batched inner loop runs without an autograd graph and keeps, per step, only
``phi_k`` and ``grad L_support(phi_k)`` (``[T, ...]`` each): memory ``2 K T P`` plus one step's
activations, instead of ``K`` steps of activations.

Backward (second order), with ``v_K = w_t grad L_query(phi_K)`` (``w`` = the incoming gradient of
each task's loss) and ``u_k = alpha_k * v_{k+1}`` (elementwise for Meta-SGD):

    d/dalpha_k  = -sum_t v_{k+1} * g_k         (reduced to alpha_k's shape)
    v_k         = v_{k+1} - H_aa(phi_k) u_k     (one batched HVP per step)
    d/dfixed   += -H_fa(phi_k) u_k              (ANIL body / CAVIA network)
    d/dtheta_a  = sum_t v_0

Under the loop batching the last step's HVP is taken in the forward pass on that step's own graph
(``reuse_last_step``: the backward is linear in each task's weight ``w_t``, so ``H (alpha * w_t gq_t)
= w_t H (alpha * gq_t)``), and optionally step 0's graph is kept for the backward's last HVP
(``keep_first_graph``); the other steps' HVPs recompute their support pass.

FOMAML drops the HVPs (``v_k = v_K``, the step sizes still get ``-<v_K, g_k>``); Reptile's
gradient is ``sum_t w_t (theta - phi_K)``.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..ops.block_reuse import reusing_cpu_blocks
from ..ops.multi_tensor import task_axpby
from .fd_guard import FD_OUTLIER_RATIO, FDGuard
from . import fused_conv
from .functional import TaskModel, check_losses_finite, numbering_tasks_from, without_autocast
from .fused_mlp import LowRank, dense
from .hvp import batched_grad, fused_plan, hvp, kept_graph_hvp, loop_grad_keep_graph, loop_last_step, resolve_batching
from .inner_loop import _step_from_shared, detached_step, run_inner_loop
from .rng import RngLog, replaying

ALGORITHMS = ("maml", "fomaml", "reptile", "imaml")
_EXACT_MODES = ("exact", "forward_over_reverse", "reverse_over_reverse")
# task_by_task=None runs second-order MAML task by task when the per-step points and gradients of
# all tasks (2 K T P) would take more than this: the step-by-step order is ~8% faster on
# workload A (one thread; 1183 vs 1318 ms at K = 5, 3351 vs 3621 ms at K = 20), the task-by-task
# one keeps 2 K P (A, K = 20: 73 vs 192 MB peak extra)
TASK_BY_TASK_BYTES = 256 * 2 ** 20


@dataclass
class EngineConfig:
    task_model: TaskModel
    support: tuple
    query: tuple
    per_step: list  # per_step[k][i]: float or index into the lr tensors (int wrapped in _LrRef)
    n_a: int
    n_f: int
    n_lr: int
    algorithm: str = "maml"
    hvp_mode: str = "forward_over_reverse"
    fd_dtype: Optional[torch.dtype] = None
    check_finite: bool = True
    batching: str = "auto"
    reuse_last_step: bool = True  # the front door passes False under no_grad (no HVP wanted then)
    keep_first_graph: bool = False
    task_major: object = False  # True, False or "auto" (the front door's task_by_task; False without grad)
    info: dict = field(default_factory=dict)


class LrRef(int):
    """Marks a step-size entry that is the lr tensor input number ``int(self)``."""


def _per_task(w: Tensor, like: Tensor) -> Tensor:
    return w.reshape((-1,) + (1,) * (like.dim() - 1))


def _resolve_step(step, lr_tensors):
    return [lr_tensors[int(a)] if isinstance(a, LrRef) else a for a in step]


def split_inputs(cfg: EngineConfig, inputs):
    """The Functions' inputs, detached: ``(theta_adapted, theta_fixed, lr tensors, per-step step
    sizes with the lr tensors in place)``."""
    n_a, n_f = cfg.n_a, cfg.n_f
    theta_a = [t.detach() for t in inputs[:n_a]]
    fixed = [t.detach() for t in inputs[n_a:n_a + n_f]]
    lr_tensors = [t.detach() for t in inputs[n_a + n_f:]]
    return theta_a, fixed, lr_tensors, [_resolve_step(s, lr_tensors) for s in cfg.per_step]


class MetaGradient(torch.autograd.Function):
    """``(theta_adapted..., theta_fixed..., lr tensors...) -> per-task query losses [T]``."""

    @staticmethod
    @without_autocast
    @reusing_cpu_blocks
    def forward(ctx, cfg: EngineConfig, *inputs):
        return _forward(ctx, cfg, *inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    @without_autocast
    @reusing_cpu_blocks
    def backward(ctx, grad_out: Tensor):
        grads = _backward(ctx, grad_out)
        if ctx.cfg.check_finite:
            check_meta_gradient_finite(ctx.cfg, grads[1:], grad_out)
        return grads


def _forward(ctx, cfg: EngineConfig, *inputs):
    """``MetaGradient.forward``'s body (``ctx``: an autograd context, or a ``_TaskContext``)."""
    n_f = cfg.n_f
    theta_a, fixed, lr_tensors, per_step = split_inputs(cfg, inputs)
    tm = cfg.task_model
    second = cfg.algorithm == "maml"
    keep = cfg.algorithm in ("maml", "fomaml")
    fd_reuse = second and cfg.hvp_mode == "fd_forward" and cfg.fd_dtype in (None, theta_a[0].dtype if theta_a
                                                                             else fixed[0].dtype)
    phi0 = tm.shared_start(theta_a)
    ctx.task_grads = None
    one_at_a_time = _task_major_batching(ctx, cfg, phi0, fixed)
    if one_at_a_time is not None:
        return _forward_task_major(ctx, cfg, inputs, one_at_a_time)
    rng = RngLog(cfg.support[0].device)
    if _reuses_last_step(ctx, cfg, phi0, fixed):
        out = _forward_reusing_last_step(ctx, cfg, phi0, fixed, per_step, theta_a, lr_tensors, rng)
        ctx.rng = _random_draws(rng, cfg)
        return out
    with torch.enable_grad():  # torch.func transforms inside need grad mode
        phi, history, sup_losses = run_inner_loop(tm, phi0, fixed, cfg.support, per_step, keep_history=keep,
                                                  rng_log=rng,
                                                  history_fixed_grads=fd_reuse and n_f > 0,
                                                  check_finite=cfg.check_finite, shared_start=True,
                                                  batching=cfg.batching,
                                                  keep_first_state=second and cfg.hvp_mode in _EXACT_MODES,
                                                  low_rank_first_step=cfg.algorithm == "fomaml" or (
                                                      second and cfg.hvp_mode in _EXACT_MODES))
        if cfg.query is not None:
            # FOMAML and exact MAML only scale, dot, sum the query gradient and use it as an HVP
            # direction: the fused MLP path may keep its weight blocks as LowRank factors
            low_rank = cfg.algorithm == "fomaml" or (second and cfg.hvp_mode in _EXACT_MODES)
            q_losses, gq_a, gq_f = batched_grad(tm.task_loss, phi, fixed, *cfg.query, wrt_fixed=n_f > 0,
                                                batching=cfg.batching, low_rank=low_rank)
        else:  # Reptile without query: report the adapted support loss
            q_losses, gq_a, gq_f = batched_grad(tm.task_loss, phi, fixed, *cfg.support, wrt_fixed=False,
                                                batching=cfg.batching)
    if cfg.check_finite:
        check_losses_finite(q_losses, "query loss after the inner loop")
    if cfg.algorithm == "fomaml":  # first order needs the gradients (step sizes), not the points
        history = [(None, g, gf, sh) for _, g, gf, sh in history]
    cfg.info["support_losses"] = sup_losses
    ctx.cfg = cfg
    ctx.history = history
    ctx.phi_k = phi
    ctx.gq = (gq_a, gq_f)
    ctx.fd_reuse = fd_reuse
    ctx.last_hvp = None
    ctx.first_graph = None
    ctx.rng = _random_draws(rng, cfg)
    ctx.save_for_backward(*theta_a, *fixed, *lr_tensors)
    return q_losses.detach()


class NonFiniteMetaGradientError(FloatingPointError):
    """The backward produced NaN or infinite meta-gradients from finite losses and weights."""


def check_meta_gradient_finite(cfg: EngineConfig, grads, grad_out: Tensor) -> None:
    """Raise naming the first meta-gradient (parameter, fixed tensor or step size) with a NaN or an
    infinity, when the incoming gradient of the losses was finite (else the caller's own)."""
    if not bool(torch.isfinite(grad_out).all()):
        return
    tm = cfg.task_model
    names = ([f"parameter {n!r}" for n in tm.adapt_names] if not tm.context else []) + [
        f"parameter {n!r}" for n in tm.fixed_names] + [f"step size tensor {j}" for j in range(cfg.n_lr)]
    for name, g in zip(names, grads):
        if g is not None and not bool(torch.isfinite(g).all()):
            raise NonFiniteMetaGradientError(
                f"the meta-gradient of {name} has non-finite entries although the losses were finite: the "
                f"backward recursion overflowed (smaller step sizes, fewer inner steps, or float64 would tell); "
                f"pass check_finite=False to get it anyway")


def _backward(ctx, grad_out: Tensor):
    """``MetaGradient.backward``'s body."""
    if ctx.task_grads is not None:  # computed task by task in the forward pass: weight and sum
        w = grad_out.detach()
        return (None, *[None if rows[0] is None else torch.einsum("t,t...->...", w.to(rows[0].dtype), rows)
                        for rows in ctx.task_grads])
    cfg = ctx.cfg
    n_f = cfg.n_f
    theta_a, fixed, lr_tensors, per_step = split_inputs(cfg, ctx.saved_tensors)
    w = grad_out.detach()  # [T]
    gq_a, gq_f = ctx.gq
    grad_lr = [None] * len(lr_tensors)
    grad_f = [(_per_task(w, g) * g).sum(0) for g in gq_f] if n_f else []
    if cfg.algorithm == "reptile":
        grad_a = [(_per_task(w, p) * (th.unsqueeze(0) - p)).sum(0) for th, p in zip(theta_a, ctx.phi_k)]
        grad_f = [None] * n_f  # Reptile does not move what the inner loop does not adapt
        return (None, *grad_a, *grad_f, *grad_lr)

    # [T, ...] each (LowRank factors stay factored while only scaled, dotted, summed)
    v = [g.scale(w) if isinstance(g, LowRank) else _per_task(w, g) * g for g in gq_a]
    tm = cfg.task_model
    guard = FDGuard() if cfg.hvp_mode in ("fd_forward", "fd_central") else None
    v, v_summed = _backward_steps(ctx, cfg, tm, w, v, fixed, per_step, grad_lr, grad_f, guard)
    grad_a = ([vi if v_summed else vi.sum_tasks() if isinstance(vi, LowRank) else vi.sum(0) for vi in v]
              if not tm.context else [])
    lr_out = [None if g is None else g.to(t.dtype) for g, t in zip(grad_lr, lr_tensors)]
    return (None, *grad_a, *grad_f, *lr_out)


def _backward_steps(ctx, cfg, tm, w, v, fixed, per_step, grad_lr, grad_f, guard):
    """The recursion ``v_k = v_{k+1} - H(phi_k) (alpha_k v_{k+1})`` from the last step down; fills
    ``grad_lr`` and ``grad_f`` in place; returns ``(v_0, whether it is summed over tasks)``."""
    v_summed = False
    for k in range(len(ctx.history) - 1, -1, -1):
        phi_k, g_k, gf_k, shared_k = ctx.history[k]
        step = per_step[k]
        # d/dalpha_k = -sum_t v_{k+1} * g_k
        for a_ref, a, vi, gi in zip(cfg.per_step[k], step, v, g_k):
            if isinstance(a_ref, LrRef):
                if a.numel() == 1 and isinstance(vi, LowRank):
                    red = vi.task_dot(gi).sum()
                elif a.numel() == 1 and isinstance(gi, LowRank):
                    red = gi.task_dot(vi).sum()
                else:
                    prod = dense(vi) * dense(gi)
                    red = prod.sum() if a.numel() == 1 else prod.sum(0)
                j = int(a_ref)
                grad_lr[j] = -red.reshape(a.shape) if grad_lr[j] is None else grad_lr[j] - red.reshape(a.shape)
        if cfg.algorithm == "fomaml":
            continue
        if k == len(ctx.history) - 1 and ctx.last_hvp is not None:
            # H(phi_{K-1}) (alpha * w_t gq_t) = w_t H (alpha * gq_t), computed in the forward pass
            hq_a, hq_f = ctx.last_hvp
            v = [dense(vi) - _per_task(w, h) * h for vi, h in zip(v, hq_a)]
            for i, h in enumerate(hq_f):
                grad_f[i] = grad_f[i] - (_per_task(w, h) * h).sum(0)
            ctx.history[k] = ctx.last_hvp = None
            continue
        u = [vi.scale(a) if isinstance(vi, LowRank) and (not isinstance(a, Tensor) or a.numel() == 1)
             else dense(vi) * a for vi, a in zip(v, step)]  # alpha_k * v_{k+1}
        # At the shared start (k = 0) only sum_t v_0 is used: ask for sum_t H u directly (the
        # fused MLP path then forms no per-task Hessian blocks).
        first_graph = ctx.first_graph if k == 0 else None
        summed = shared_k and first_graph is None
        if first_graph is not None:  # step 0's graph, kept since the forward pass
            ctx.first_graph = None
            hv_a, hv_f = kept_graph_hvp(first_graph, [dense(x) for x in u])
        else:
            # finite differences are per task anyway: the guard checks them before the sum;
            # a model with dropout draws this step's forward-pass masks again
            with replaying(ctx.rng, k), torch.enable_grad():
                hv_a, hv_f = hvp(tm.task_loss, phi_k, u, *cfg.support, fixed=fixed, mode=cfg.hvp_mode,
                                 saved_grad=(g_k + gf_k) if ctx.fd_reuse else None, fd_dtype=cfg.fd_dtype,
                                 shared_params=shared_k, batching=cfg.batching,
                                 sum_tasks=summed and guard is None)
        if guard is not None and first_graph is None:
            bad = guard.check(hv_a, u)
            if bad:  # redo those tasks' HVPs exactly: the FD ones are off by jump / r
                hv_a, hv_f = _exact_hvp_for(tm, cfg, phi_k, u, fixed, bad, hv_a, hv_f, shared_k)
                _warn_fd_outliers(cfg, k, bad)
            if summed:
                hv_a, hv_f = [h.sum(0) for h in hv_a], [h.sum(0) for h in hv_f]
        if summed:
            v = [(vi.sum_tasks() if isinstance(vi, LowRank) else vi.sum(0)) - h
                 for vi, h in zip(v, hv_a)]  # sum_t (v - H u)
            v_summed = True
        else:
            v = task_axpby([dense(vi) for vi in v], hv_a, 1.0, check_finite=False)  # v - H u
        for i, h in enumerate(hv_f):
            grad_f[i] = grad_f[i] - (h if summed else h.sum(0))
        ctx.history[k] = None  # free phi_k, g_k as soon as they are used
    return v, v_summed


def _exact_hvp_for(tm, cfg, phi_k, u, fixed, tasks: list[int], hv_a, hv_f, shared: bool = False):
    """``hv_a``, ``hv_f`` with the rows of ``tasks`` replaced by exact HVPs (``shared``: ``phi_k``
    has no task dimension, the first step's theta)."""
    idx = torch.tensor(tasks, device=hv_a[0].device)
    with torch.enable_grad():
        ex_a, ex_f = hvp(tm.task_loss, phi_k if shared else [p[idx] for p in phi_k], [dense(x)[idx] for x in u],
                         *[a[idx] for a in cfg.support], fixed=fixed, mode="exact", batching=cfg.batching,
                         shared_params=shared)
    return ([h.index_copy(0, idx, e.to(h.dtype)) for h, e in zip(hv_a, ex_a)],
            [h.index_copy(0, idx, e.to(h.dtype)) for h, e in zip(hv_f, ex_f)])


def _warn_fd_outliers(cfg, step: int, tasks: list[int]) -> None:
    """Report finite-difference HVPs the guard flagged (``info["fd_suspect"]``: (step, task) pairs)."""
    cfg.info.setdefault("fd_suspect", []).extend((step, t) for t in tasks)
    warnings.warn(f"hvp_mode={cfg.hvp_mode!r}: the finite-difference HVP at inner step {step} of task(s) {tasks} was "
                  f"over {FD_OUTLIER_RATIO:.0f}x the curvature of the other HVPs of this call (a ReLU / max-pool "
                  "kink crossed, most likely); it was recomputed exactly (docs/meta.md, 'HVP modes')",
                  RuntimeWarning, stacklevel=3)


def _reuses_last_step(ctx, cfg: EngineConfig, phi0, fixed) -> bool:
    """Whether the forward pass computes the backward's first HVP on the last step's own graph
    (``loop_last_step``): second-order MAML with a double-backward HVP under the loop batching,
    a query, K >= 1, and a gradient to compute (else the HVP would be wasted work)."""
    if not (cfg.reuse_last_step and cfg.algorithm == "maml" and cfg.query is not None and cfg.per_step
            and cfg.hvp_mode in ("exact", "reverse_over_reverse") and any(ctx.needs_input_grad[1:])):
        return False
    if resolve_batching(cfg.batching, cfg.support) != "loop":
        return False  # vmap: autograd over vmap(grad) is the composition that is wrong through BN
    return fused_plan(cfg.batching, cfg.task_model.task_loss, phi0, fixed, cfg.support, True) is None


class _TaskContext:
    """What ``_forward`` and ``_backward`` use of an autograd context, for one task's slice."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad
        self.saved_tensors = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _task_major_batching(ctx, cfg: EngineConfig, phi0, fixed) -> Optional[str]:
    """The batching with which second-order MAML runs task by task, the backward of each task right
    after its forward (``_forward_task_major``), or None.

    Taken where tasks are processed one at a time anyway (the per-task loop, the fused conv path)
    and a gradient is wanted: the per-step points and gradients (``2 K P`` floats) are then kept
    for one task, not ``T``, and each task leaves its weighted-sum-ready meta-gradient (``P``
    floats). Not for finite differences (the guard compares a step's HVPs across tasks) or other
    algorithms (nothing per step to save in FOMAML's and Reptile's, iMAML is another Function).
    """
    if not cfg.task_major or cfg.algorithm != "maml" or cfg.hvp_mode not in _EXACT_MODES or cfg.query is None:
        return None
    num_tasks = cfg.support[0].shape[0]
    if num_tasks < 2 or not any(ctx.needs_input_grad[1:]) or not cfg.per_step:
        return None
    if cfg.task_major == "auto":
        kept = 2 * len(cfg.per_step) * num_tasks * sum(p.numel() * p.element_size() for p in phi0)
        if kept <= TASK_BY_TASK_BYTES:
            return None
    plan = fused_plan(cfg.batching, cfg.task_model.task_loss, phi0, fixed, cfg.support, True)
    if plan is not None:
        return "fused_conv" if isinstance(plan, fused_conv.ConvPlan) else None
    return "loop" if resolve_batching(cfg.batching, cfg.support) == "loop" else None


def _forward_task_major(ctx, cfg: EngineConfig, inputs, batching: str):
    """Forward and backward of each task's slice in turn; the backward (linear in each task's
    incoming gradient ``w_t``) is taken for ``w_t = 1`` and weighted in ``_backward``."""
    num_tasks = cfg.support[0].shape[0]
    losses, support_losses, rows = [], [], []
    for t in range(num_tasks):
        sub = dataclasses.replace(cfg, support=tuple(a[t:t + 1] for a in cfg.support),
                                  query=tuple(a[t:t + 1] for a in cfg.query), batching=batching, info={})
        task_ctx = _TaskContext(ctx.needs_input_grad)
        with numbering_tasks_from(t):
            loss = _forward(task_ctx, sub, *inputs)
            rows.append(_backward(task_ctx, loss.new_ones(1))[1:])
        losses.append(loss)
        support_losses.append(sub.info["support_losses"])
        del task_ctx  # this task's per-step points and gradients go now
    cfg.info["support_losses"] = torch.cat(support_losses, dim=1)
    ctx.cfg = cfg
    ctx.task_grads = [None if row[0] is None else torch.stack(row) for row in zip(*rows)]
    return torch.cat(losses)


def _random_draws(rng: RngLog, cfg: EngineConfig) -> Optional[RngLog]:
    """``rng`` when the forward pass drew random numbers (dropout) and the backward will
    recompute support passes (second-order MAML, iMAML), else None."""
    if cfg.algorithm not in ("maml", "imaml") or not rng.drew():
        return None
    if cfg.hvp_mode in ("fd_forward", "fd_central"):
        raise ValueError(
            f"hvp_mode={cfg.hvp_mode!r}: the model draws random numbers in its support pass (dropout?); finite "
            "differences evaluate each task's gradient more than once and would compare different masks. Use "
            "hvp_mode='exact' (the recomputed passes replay the forward pass's masks), or put the random layers "
            "in eval mode")
    return rng


def _forward_reusing_last_step(ctx, cfg: EngineConfig, phi0, fixed, per_step, theta_a, lr_tensors, rng: RngLog):
    """``MetaGradient.forward`` when the last step's graph is reused: K - 1 steps as usual, then
    the last step, the query gradient and ``H(phi_{K-1}) (alpha * gq)`` task by task."""
    tm = cfg.task_model
    n_f = cfg.n_f
    ctx.first_graph = None
    with torch.enable_grad():
        if cfg.keep_first_graph and len(per_step) > 1:
            # step 0 with its graph, kept for the backward's last HVP (at theta)
            rng.mark()  # (not replayed: step 0 is not recomputed; keeps the log's steps aligned)
            loss0, g0, ctx.first_graph = loop_grad_keep_graph(tm.task_loss, phi0, fixed, cfg.support, shared=True,
                                                              wrt_fixed=n_f > 0)
            if cfg.check_finite:
                check_losses_finite(loss0, "inner step 0 (support loss)")
            phi = _step_from_shared(phi0, g0, detached_step(per_step[0]))
            history = [(phi0, g0, [], True)]
            phi, more, sup_more = run_inner_loop(tm, phi, fixed, cfg.support, per_step[1:-1], keep_history=True,
                                                 check_finite=cfg.check_finite, batching=cfg.batching, first_step=1,
                                                 rng_log=rng)
            history += more
            sup_losses = torch.cat([loss0.unsqueeze(0), sup_more])
            shared = False
        elif len(per_step) > 1:
            phi, history, sup_losses = run_inner_loop(tm, phi0, fixed, cfg.support, per_step[:-1], keep_history=True,
                                                      check_finite=cfg.check_finite, shared_start=True,
                                                      batching=cfg.batching, rng_log=rng)
            shared = False
        else:
            phi, history, sup_losses, shared = phi0, [], phi0[0].new_zeros(0, cfg.support[0].shape[0]), True
        out = loop_last_step(tm.task_loss, phi, fixed, cfg.support, cfg.query, detached_step(per_step[-1]),
                             shared=shared, wrt_fixed=n_f > 0)
    if cfg.check_finite:
        check_losses_finite(out["support_losses"], f"inner step {len(per_step) - 1} (support loss)")
        check_losses_finite(out["query_losses"], "query loss after the inner loop")
    # phi_{K-1} is not needed any more: the step sizes' gradient uses g_{K-1}, the HVP is done
    history.append((None, out["grads"], [], shared))
    cfg.info["support_losses"] = torch.cat([sup_losses, out["support_losses"].unsqueeze(0)])
    ctx.cfg = cfg
    ctx.history = history
    ctx.phi_k = None
    ctx.gq = (out["query_grads"], out["query_grads_fixed"])
    ctx.fd_reuse = False
    ctx.last_hvp = (out["hvp"], out["hvp_fixed"])
    ctx.save_for_backward(*theta_a, *fixed, *lr_tensors)
    return out["query_losses"].detach()
