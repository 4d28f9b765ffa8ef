"""The derivatives of ``max_pool2x2(batch_norm_train(x, w, b))`` taken as one layer: the
specification of the ``fastmaml::batch_norm_pool2x2_*`` kernels (``csrc/cpu/bn_pool_cpu.cpp``).

Written with ``torch.func`` over torch's own ``F.batch_norm`` (batch statistics) and
``F.max_pool2d`` (2x2, stride 2): ``g`` is the gradient at the pooled output, ``dg`` its tangent,
``(dx, dw, db)`` the tangents of ``(x, w, b)``.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.func import jvp, vjp


def batch_norm_pool2x2_layer(eps: float = 1e-5):
    """``(x, w, b) -> max_pool2d(batch_norm(x, w, b), 2)`` with torch's ops (batch statistics)."""
    def f(x, w, b):
        return F.max_pool2d(F.batch_norm(x, None, None, w, b, training=True, eps=eps), 2)
    return f


def batch_norm_pool2x2_backward_reference(g: Tensor, x: Tensor, w: Tensor, b: Tensor, eps: float = 1e-5):
    """``(gx, gw, gb)``: the gradient of ``<g, layer(x, w, b)>``."""
    return vjp(batch_norm_pool2x2_layer(eps), x, w, b)[1](g)


def batch_norm_pool2x2_jvp_reference(dx: Tensor, dw: Tensor, db: Tensor, x: Tensor, w: Tensor, b: Tensor,
                                     eps: float = 1e-5) -> Tensor:
    """The pooled output's tangent along ``(dx, dw, db)``."""
    return jvp(batch_norm_pool2x2_layer(eps), (x, w, b), (dx, dw, db))[1]


def batch_norm_pool2x2_hvp_backward_reference(g: Tensor, dg: Tensor, dx: Tensor, dw: Tensor, x: Tensor, w: Tensor,
                                              b: Tensor, eps: float = 1e-5):
    """``(dgx, gx, hw, hb)``: the tangent of the backward ``(gx, gw, gb)`` along ``(dx, dw, dg)``
    (``db`` does not enter it), and the primal ``gx``."""
    f = batch_norm_pool2x2_layer(eps)

    def grads(x_, w_, g_):
        return vjp(f, x_, w_, b)[1](g_)

    primal, tangent = jvp(grads, (x, w, g), (dx, dw, dg))
    return tangent[0], primal[0], tangent[1], tangent[2]
