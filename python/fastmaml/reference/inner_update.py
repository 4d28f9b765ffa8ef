"""Reference inner-loop update and finite-difference HVP arithmetic, one tensor at a time."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .multi_tensor import _broadcast_alpha, _per_task

StepSize = Union[float, Tensor, Sequence[Union[float, Tensor]]]

# The clipping scale is max_norm / (norm + CLIP_EPS), as in torch.nn.utils.clip_grad_norm_.
CLIP_EPS = 1e-6


def _task_norms(tensors: Sequence[Tensor]) -> Tensor:
    sq = sum((t.reshape(t.shape[0], -1) ** 2).sum(1) for t in tensors)
    return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()


def clip_scale_reference(grads: Sequence[Tensor], max_grad_norm: float) -> Tensor:
    """Per-task factor ``min(1, max_grad_norm / (||g_t|| + 1e-6))`` over all tensors of task t."""
    return (max_grad_norm / (_task_norms(grads) + CLIP_EPS)).clamp(max=1.0)


def inner_sgd_step_reference(
    params: Sequence[Tensor],  # each [T, ...]
    grads: Sequence[Tensor],  # each like params
    lr: StepSize,
    max_grad_norm: Optional[float] = None,
) -> list[Tensor]:
    """``phi_i = theta_i - lr_i * c_t * g_i`` with ``c_t`` the optional per-task clip factor."""
    lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(params)
    scale = None if max_grad_norm is None else clip_scale_reference(grads, max_grad_norm)
    out = []
    for p, g, a in zip(params, grads, lrs):
        a = a if isinstance(a, Tensor) else torch.tensor(a, dtype=p.dtype, device=p.device)
        step = _broadcast_alpha(a, p) * g
        if scale is not None:
            step = _per_task(scale, g) * step
        out.append(p - step)
    return out


def fd_step_size_reference(params: Sequence[Tensor], v: Sequence[Tensor], scheme: str = "central") -> Tensor:
    """``r_t = eps^(1/2 or 1/3) * (1 + ||x_t||) / ||v_t||`` (see fastmaml.fd_step_size)."""
    eps = torch.finfo(params[0].dtype).eps
    c = eps ** 0.5 if scheme == "forward" else eps ** (1.0 / 3.0)
    xn = _task_norms(params)
    vn = _task_norms(v)
    return c * (1 + xn) / vn


def fd_perturb_reference(params: Sequence[Tensor], v: Sequence[Tensor], r: Tensor, sign: float = 1.0) -> list[Tensor]:
    """``x_i + sign * r_t * v_i``."""
    return [p + sign * _per_task(r, p) * vi for p, vi in zip(params, v)]


def fd_combine_reference(
    g_plus: Sequence[Tensor], g_base: Sequence[Tensor], r: Tensor, scheme: str = "central"
) -> list[Tensor]:
    """Central ``(g(x+rv) - g(x-rv)) / (2r)`` or forward ``(g(x+rv) - g(x)) / r``."""
    denom = 2 * r if scheme == "central" else r
    return [(gp - gb) / _per_task(denom, gp) for gp, gb in zip(g_plus, g_base)]
