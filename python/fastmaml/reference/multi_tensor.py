"""Reference multi-tensor task ops, written tensor by tensor with plain PyTorch."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def _per_task(scale: Tensor, like: Tensor) -> Tensor:
    """View a [T] tensor so that it broadcasts over a [T, ...] tensor."""
    return scale.reshape((-1,) + (1,) * (like.dim() - 1))


def _broadcast_alpha(alpha: Tensor, like: Tensor) -> Tensor:
    """A step size of 1 element, or one per row element (shape ``like.shape[1:]``)."""
    return alpha.reshape(()) if alpha.numel() == 1 else alpha.reshape(like.shape[1:])


def task_axpby_reference(
    x: Sequence[Tensor],  # each [T, ...]
    y: Sequence[Tensor],  # each like x
    alpha: Sequence[Tensor],  # each 1 element or x_i.shape[1:]
    x_scale: Optional[Tensor] = None,  # [T]
    y_scale: Optional[Tensor] = None,  # [T]
) -> list[Tensor]:
    """``out_i[t] = x_scale[t] * x_i[t] - alpha_i * y_scale[t] * y_i[t]`` (missing scales are 1)."""
    out = []
    for xi, yi, ai in zip(x, y, alpha):
        step = _broadcast_alpha(ai, xi) * yi
        if y_scale is not None:
            step = _per_task(y_scale, yi) * step
        base = xi if x_scale is None else _per_task(x_scale, xi) * xi
        out.append(base - step)
    return out


def task_dot_reference(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``out[t] = sum_i <a_i[t], b_i[t]>``, shape [T]."""
    total = None
    for ai, bi in zip(a, b):
        part = (ai * bi).reshape(ai.shape[0], -1).sum(1)
        total = part if total is None else total + part
    return total
