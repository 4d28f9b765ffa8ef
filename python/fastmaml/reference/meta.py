"""Plain-autograd references of the meta-gradient engines (``fastmaml.meta``): the test oracle.

Everything here loops over tasks one at a time and differentiates with ``torch.autograd`` (no
``vmap``, no custom backward): second-order MAML keeps the graph of every inner step
(``create_graph=True``, the learn2learn pattern), the Hessian is built densely. Slow and memory
hungry by design; exact.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def _alpha(a, like: Tensor):
    return a if isinstance(a, Tensor) else torch.tensor(a, dtype=like.dtype, device=like.device)


def inner_loop_reference(task_model, support: tuple[Tensor, Tensor], per_step: Sequence[Sequence],
                         *, create_graph: bool = True, first_order: bool = False,
                         prox: Optional[float] = None) -> list[Tensor]:
    """K inner steps, task by task, with ``torch.autograd.grad``; returns ``phi_K`` stacked ``[T, ...]``.

    Args:
        task_model: a ``fastmaml.meta.TaskModel``.
        support: ``(x, y)`` stacked ``[T, N, ...]``.
        per_step: ``per_step[k][i]`` step sizes (``fastmaml.meta.inner_loop.normalize_step_sizes``).
        create_graph: keep the graph through the steps (second order).
        first_order: detach the inner gradients (FOMAML: the step sizes still get their
            first-order gradient through ``-alpha * g``).
        prox: iMAML's ``lam``: minimize ``L + lam/2 ||phi - phi_0||^2``.
    """
    xs, ys = support
    fixed = task_model.theta_fixed()
    theta_a = task_model.theta_adapted()
    out = []
    for t in range(xs.shape[0]):
        if task_model.context:
            phi = [fixed[0].new_zeros(task_model.context_dim).requires_grad_()]
        else:
            phi = list(theta_a)
        center = [p.detach() for p in phi]
        for step in per_step:
            loss = task_model.task_loss(phi, fixed, xs[t], ys[t])
            grads = torch.autograd.grad(loss, phi, create_graph=create_graph and not first_order)
            if first_order:
                grads = [g.detach() for g in grads]
            if prox is not None:
                grads = [g + prox * (p - c) for g, p, c in zip(grads, phi, center)]
            phi = [p - _alpha(a, p) * g for p, g, a in zip(phi, grads, step)]
        out.append(phi)
    return [torch.stack([phi[i] for phi in out]) for i in range(len(out[0]))]


def maml_loss_reference(task_model, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor],
                        per_step: Sequence[Sequence], *, first_order: bool = False) -> Tensor:
    """Per-task query losses ``[T]`` after K inner steps, with the whole graph (MAML / FOMAML).

    ``torch.autograd.grad(losses.mean(), theta + step sizes)`` is the reference meta-gradient.
    """
    xs, ys = support
    xq, yq = query
    fixed = task_model.theta_fixed()
    losses = []
    for t in range(xs.shape[0]):
        phi_t = inner_loop_reference(task_model, (xs[t:t + 1], ys[t:t + 1]), per_step, first_order=first_order)
        losses.append(task_model.task_loss([p[0] for p in phi_t], fixed, xq[t], yq[t]))
    return torch.stack(losses)


def reptile_grad_reference(task_model, support, per_step, weights: Tensor) -> list[Tensor]:
    """Reptile's meta-gradient ``sum_t w_t (theta - phi_K,t)`` for the adapted tensors."""
    with torch.enable_grad():
        phi = inner_loop_reference(task_model, support, per_step, create_graph=False)
    theta = task_model.theta_adapted()
    return [(w_shape(weights, p) * (th.detach().unsqueeze(0) - p.detach())).sum(0) for th, p in zip(theta, phi)]


def w_shape(weights: Tensor, like: Tensor) -> Tensor:
    return weights.reshape((-1,) + (1,) * (like.dim() - 1))


def flat_hessian_reference(task_model, adapted: Sequence[Tensor], fixed: Sequence[Tensor], x: Tensor, y: Tensor):
    """Dense Hessian of one task's loss w.r.t. ``adapted + fixed`` (flattened), by ``autograd.functional``."""
    shapes = [t.shape for t in list(adapted) + list(fixed)]
    sizes = [s.numel() for s in shapes]
    n_a = len(adapted)
    flat0 = torch.cat([t.detach().reshape(-1) for t in list(adapted) + list(fixed)])

    def f(flat):
        parts = [c.reshape(s) for c, s in zip(flat.split(sizes), shapes)]
        return task_model.task_loss(parts[:n_a], parts[n_a:], x, y)

    # Row by row with plain autograd, on purpose: torch.func.hessian (jacfwd of jacrev) disagrees
    # with it by ~1e-3 relative through batch norm on torch 2.13 CPU (vmap over BN's double backward).
    return torch.autograd.functional.hessian(f, flat0)


def hvp_reference(task_model, params: Sequence[Tensor], v: Sequence[Tensor], x: Tensor, y: Tensor,
                  fixed: Sequence[Tensor] = ()):
    """``(H v)`` per task from the dense Hessian: returns ``(hv_params, hv_fixed)`` stacked ``[T, ...]``."""
    n_a = len(params)
    out = []
    for t in range(params[0].shape[0]):
        h = flat_hessian_reference(task_model, [p[t] for p in params], fixed, x[t], y[t])
        vt = torch.cat([vi[t].reshape(-1) for vi in v] + [f.new_zeros(f.numel()) for f in fixed])
        hv = h @ vt
        shapes = [p.shape[1:] for p in params] + [f.shape for f in fixed]
        out.append([c.reshape(s) for c, s in zip(hv.split([s.numel() for s in shapes]), shapes)])
    stacked = [torch.stack([o[i] for o in out]) for i in range(len(out[0]))]
    return stacked[:n_a], stacked[n_a:]


def imaml_grad_reference(task_model, support, query, per_step, lam: float, weights: Tensor):
    """iMAML's meta-gradient with a dense solve of ``(I + H/lam) x = g_query`` per task.

    Returns ``(grad_theta_adapted, grad_fixed)``, summed over tasks with ``weights``; the fixed part
    is ``d/dfixed L_query - H_fa x / lam`` (the implicit gradient through phi*(fixed)).
    """
    xs, ys = support
    xq, yq = query
    fixed = task_model.theta_fixed()
    phi = inner_loop_reference(task_model, support, per_step, create_graph=False, prox=lam)
    phi = [p.detach() for p in phi]
    n_a = len(phi)
    g_a = [torch.zeros_like(p[0]) for p in phi]
    g_f = [torch.zeros_like(f) for f in fixed]
    for t in range(xs.shape[0]):
        pa = [p[t].clone().requires_grad_() for p in phi]
        fx = [f.detach().requires_grad_() for f in fixed]
        lq = task_model.task_loss(pa, fx, xq[t], yq[t])
        gq = torch.autograd.grad(lq, pa + fx, allow_unused=True)
        gq = [torch.zeros_like(p) if g is None else g for g, p in zip(gq, pa + fx)]
        h = flat_hessian_reference(task_model, [p[t] for p in phi], fixed, xs[t], ys[t])
        na = sum(p[0].numel() for p in phi)
        haa = h[:na, :na]
        hfa = h[na:, :na]
        b = torch.cat([g.reshape(-1) for g in gq[:n_a]])
        x = torch.linalg.solve(torch.eye(na, dtype=h.dtype, device=h.device) + haa / lam, b)
        xs_parts = x.split([p[0].numel() for p in phi])
        for i, c in enumerate(xs_parts):
            g_a[i] += weights[t] * c.reshape(phi[i].shape[1:])
        if fixed:
            corr = hfa @ x / lam
            sizes = [f.numel() for f in fixed]
            for i, (c, g) in enumerate(zip(corr.split(sizes), gq[n_a:])):
                g_f[i] += weights[t] * (g - c.reshape(fixed[i].shape))
    return g_a, g_f
