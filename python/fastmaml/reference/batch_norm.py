"""Batch norm on batch statistics and its two derivatives: the specification of
``fastmaml.ops.batch_norm``.

Written with plain torch ops from the formulas (not through torch's batch-norm op), so every
function here is differentiable to any order in all its arguments: the kernels' Functions fall
back to them when a derivative of the double backward is asked for. ``x`` is ``[N, C, *]``;
statistics are per channel over the other dims, ``invstd = 1 / sqrt(biased var + eps)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _channel_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def _normalized(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x^, invstd as [1, C, 1, ...])."""
    dims = _channel_dims(x)
    centered = x - x.mean(dims, keepdim=True)
    invstd = torch.rsqrt((centered * centered).mean(dims, keepdim=True) + eps)
    return centered * invstd, invstd


def _project(g: Tensor, xhat: Tensor) -> Tensor:
    """P(g) = g - E[g] - x^ E[g x^] (per channel): the normalisation's own Jacobian, self-adjoint."""
    dims = _channel_dims(g)
    return g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True)


def batch_norm_train_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)``."""
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)


def batch_norm_train_backward_reference(gy: Tensor, x: Tensor, weight: Tensor, eps: float = 1e-5):
    """(gx, gw, gb): the gradient of ``<gy, batch_norm(x, weight, bias)>`` w.r.t. x, weight, bias,
    with the statistics' dependence on x included."""
    dims = _channel_dims(x)
    xhat, invstd = _normalized(x, eps)
    gx = _per_channel(weight, x) * invstd * _project(gy, xhat)
    return gx, (gy * xhat).sum(dims), gy.sum(dims)


def batch_norm_train_double_backward_reference(ggx: Tensor, ggw: Tensor, ggb: Tensor, gy: Tensor, x: Tensor,
                                               weight: Tensor, eps: float = 1e-5):
    """(dL/dx, dL/dweight, dL/dgy) for ``L = <ggx, gx> + <ggw, gw> + <ggb, gb>``, (gx, gw, gb) the
    backward above: the double backward of batch norm."""
    dims = _channel_dims(x)
    count = x.numel() // x.shape[1]
    xhat, r = _normalized(x, eps)
    w = _per_channel(weight, x)

    def mean(t):
        return t.mean(dims, keepdim=True)

    e_gg_xh, e_gy_xh = mean(ggx * xhat), mean(gy * xhat)
    q = mean(ggx * gy) - mean(ggx) * mean(gy) - e_gg_xh * e_gy_xh
    a = _per_channel(ggw, x) - w * r * e_gg_xh
    c = -w * r * e_gy_xh
    grad_x = r * (a * _project(gy, xhat) + c * _project(ggx, xhat)) - w * r * r * q * xhat
    grad_w = (r * q).reshape(-1) * count
    grad_gy = _per_channel(ggb, x) + _per_channel(ggw, x) * xhat + w * r * _project(ggx, xhat)
    return grad_x, grad_w, grad_gy
