"""Implicit MAML (Rajeswaran et al. 2019) with batched conjugate gradient on HVPs.

Inner problem per task: ``phi* = argmin L_support(phi) + lam/2 ||phi - theta||^2``, approximated by
K gradient steps from ``theta``. Meta-gradient: ``(I + H/lam)^-1 g_query`` with ``H`` the support
Hessian at ``phi_K``, solved for all tasks at once by CG (``task_dot`` / ``task_axpby`` make every
vector operation one fused call over all tensors of all tasks). Parameters the inner loop does not
adapt (ANIL body, CAVIA network) get ``d/dfixed L_query - H_fa x / lam``: the implicit gradient
through ``phi*(fixed)``. Step sizes get no meta-gradient (the implicit gradient does not depend on
the path to ``phi*``).
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..ops.block_reuse import reusing_cpu_blocks
from ..ops.multi_tensor import task_axpby, task_dot
from .functional import check_losses_finite, without_autocast
from .hvp import batched_grad, hvp
from .inner_loop import run_inner_loop
from .maml import EngineConfig, _per_task, _random_draws, check_meta_gradient_finite, split_inputs
from .rng import RngLog, replaying


def batched_cg(matvec: Callable[[list[Tensor]], list[Tensor]], b: Sequence[Tensor], *, max_iter: int = 20,
               tol: float = 1e-10):
    """Solve ``A_t x_t = b_t`` for every task by conjugate gradient (``A_t`` symmetric positive definite).

    Tasks converge independently: a task whose relative residual ``||r_t|| / ||b_t||`` falls below
    ``tol`` (or whose curvature ``p.Ap`` stops being positive) is frozen while the others go on.

    Args:
        matvec: ``x -> A x`` on lists of ``[T, ...]`` tensors (batched over tasks).
        b: right-hand sides, tensors ``[T, ...]``.
        max_iter: at most this many iterations (each one ``matvec``).
        tol: relative residual at which a task stops.

    Returns:
        ``(x, info)`` with ``info = {"iterations": int, "task_iterations": [T] long,
        "residual": [T] relative residual norms, "converged": [T] bool, "indefinite": [T] bool}``.

    Example:
        >>> x, info = batched_cg(lambda p: task_axpby(p, [a * q for q in p], -1.0), b, max_iter=50)
    """
    b = list(b)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
    num_tasks = b[0].shape[0]
    b_norm = task_dot(b, b).sqrt()
    safe_b = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rs = task_dot(r, r)
    active = (rs.sqrt() / safe_b) > tol
    indefinite = torch.zeros(num_tasks, dtype=torch.bool, device=b[0].device)
    task_iters = torch.zeros(num_tasks, dtype=torch.long, device=b[0].device)
    it = 0
    while it < max_iter and bool(active.any()):
        ap = matvec(p)
        pap = task_dot(p, ap)
        bad = active & (pap <= 0)
        indefinite |= bad
        active = active & ~bad
        a = torch.where(active, rs / torch.where(pap > 0, pap, torch.ones_like(pap)), torch.zeros_like(rs))
        x = task_axpby(x, p, -1.0, y_scale=a, check_finite=False)  # x + a p
        r = task_axpby(r, ap, 1.0, y_scale=a, check_finite=False)  # r - a A p
        rs_new = task_dot(r, r)
        task_iters += active.long()
        it += 1
        active = active & ((rs_new.sqrt() / safe_b) > tol)
        beta = torch.where(active, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p = task_axpby(r, p, -1.0, y_scale=beta, check_finite=False)  # r + beta p
        rs = rs_new
    residual = rs.sqrt() / safe_b
    return x, {"iterations": it, "task_iterations": task_iters, "residual": residual,
               "converged": residual <= tol, "indefinite": indefinite}


# An unconverged solve (cg_tol not reached in cg_iters) is always in info["cg_converged"]; it is
# also warned when its relative residual stays above this (below it the implicit gradient is off
# by less than 0.1%, and float32 often cannot reach a tight cg_tol at all)
CG_WARN_RESIDUAL = 1e-3


class IMAMLGradient(torch.autograd.Function):
    """``(theta_adapted..., theta_fixed..., lr tensors...) -> per-task query losses [T]`` (iMAML)."""

    @staticmethod
    @without_autocast
    @reusing_cpu_blocks
    def forward(ctx, cfg: EngineConfig, lam: float, cg_iters: int, cg_tol: float, *inputs):
        n_f = cfg.n_f
        theta_a, fixed, lr_tensors, per_step = split_inputs(cfg, inputs)
        tm = cfg.task_model
        rng = RngLog(cfg.support[0].device)
        with torch.enable_grad():
            phi, _, sup_losses = run_inner_loop(tm, tm.shared_start(theta_a), fixed, cfg.support, per_step,
                                                prox=lam, check_finite=cfg.check_finite, shared_start=True,
                                                batching=cfg.batching, rng_log=rng)
            q_losses, gq_a, gq_f = batched_grad(tm.task_loss, phi, fixed, *cfg.query, wrt_fixed=n_f > 0,
                                                batching=cfg.batching)
        if cfg.check_finite:
            check_losses_finite(q_losses, "query loss after the inner loop")
        cfg.info["support_losses"] = sup_losses
        ctx.cfg, ctx.lam, ctx.cg_iters, ctx.cg_tol = cfg, lam, cg_iters, cg_tol
        ctx.phi, ctx.gq = phi, (gq_a, gq_f)
        ctx.n_lr = len(lr_tensors)
        # a model that draws random numbers (dropout): every HVP of the CG solve replays the masks
        # of the last inner step, so that the solve sees one matrix
        ctx.rng = _random_draws(rng, cfg) if per_step else None
        ctx.save_for_backward(*fixed)
        return q_losses.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    @without_autocast
    @reusing_cpu_blocks
    def backward(ctx, grad_out: Tensor):
        cfg, lam = ctx.cfg, ctx.lam
        fixed = list(ctx.saved_tensors)
        w = grad_out.detach()
        gq_a, gq_f = ctx.gq
        tm = cfg.task_model
        b = [_per_task(w, g) * g for g in gq_a]
        mode = cfg.hvp_mode

        def matvec(p):  # (I + H/lam) p
            with replaying(ctx.rng, -1), torch.enable_grad():
                hp, _ = hvp(tm.task_loss, ctx.phi, p, *cfg.support, mode=mode, fd_dtype=cfg.fd_dtype,
                            batching=cfg.batching)
            return task_axpby(p, hp, -1.0 / lam, check_finite=False)

        x, info = batched_cg(matvec, b, max_iter=ctx.cg_iters, tol=ctx.cg_tol)
        cfg.info.update({"cg_" + k: v for k, v in info.items()})
        if bool(info["indefinite"].any()):
            bad = info["indefinite"].nonzero().flatten().tolist()
            warnings.warn(f"iMAML: I + H/lam is indefinite for tasks {bad} (CG stopped there with relative residual "
                          f"{info['residual'][bad].tolist()}); increase imaml_lambda", RuntimeWarning, stacklevel=2)
        slow = (~info["converged"]) & (~info["indefinite"]) & (info["residual"] > CG_WARN_RESIDUAL)
        if bool(slow.any()):
            bad = slow.nonzero().flatten().tolist()
            warnings.warn(f"iMAML: conjugate gradient stopped after cg_iters={ctx.cg_iters} iterations with relative "
                          f"residual {info['residual'][bad].tolist()} for tasks {bad} (above {CG_WARN_RESIDUAL:g}): "
                          f"their implicit gradients are that far off; raise cg_iters or imaml_lambda",
                          RuntimeWarning, stacklevel=2)
        grad_a = [xi.sum(0) for xi in x] if not tm.context else []
        grad_f = []
        if cfg.n_f:
            with replaying(ctx.rng, -1), torch.enable_grad():
                _, hf = hvp(tm.task_loss, ctx.phi, x, *cfg.support, fixed=fixed, mode=mode, fd_dtype=cfg.fd_dtype,
                            batching=cfg.batching)
            grad_f = [(_per_task(w, g) * g).sum(0) - h.sum(0) / lam for g, h in zip(gq_f, hf)]
        if cfg.check_finite:
            check_meta_gradient_finite(cfg, [*grad_a, *grad_f], grad_out)
        return (None, None, None, None, *grad_a, *grad_f, *([None] * ctx.n_lr))
