"""Batch norm on batch statistics (training mode), with compiled forward, backward and double backward.

What MAML's inner loop runs is batch norm on each task's own batch statistics, and second-order
MAML differentiates it twice. On the CPU build measured here (torch 2.13, one thread) torch's
double backward of batch norm is a chain of ~30 broadcasting ops: 7.8 ms on a ``[5, 64, 28, 28]``
activation (conv4's first block on a 5-image support set), against 0.11 ms for the compiled
kernel (``csrc/cpu/batch_norm_cpu.cpp``), and it runs once per task and inner step in the backward
of the engine. The forward is ~6x faster than torch's too, the backward about as fast.

``batch_norm_train(x, weight, bias, eps)`` computes ``F.batch_norm(x, None, None, weight, bias,
training=True, eps=eps)`` (the same arithmetic up to rounding: the channel sums are added in a
different order; float64 agrees to ~1e-15, float32 to ~2e-7 relative). Derivatives: the backward
and double backward run the kernels; a third derivative (a ``create_graph=True`` double
backward) runs the differentiable formulas of ``fastmaml.reference.batch_norm``. Forward-mode AD is
not implemented: under an active ``forward_ad.dual_level`` torch's op runs.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor

from .._extension import has_native_device
from ..reference.batch_norm import batch_norm_train_double_backward_reference
from ._native_cpu import native_available, plain_cpu_float

_BACKENDS = ("auto", "cpu", "reference")


class _BatchNormTrain(torch.autograd.Function):
    """(x, weight, bias) -> y, with mean and invstd (non-differentiable) for running statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, invstd = torch.ops.fastmaml.batch_norm_train(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)
        return y, mean, invstd

    @staticmethod
    def backward(ctx, gy, _mean_grad, _invstd_grad):
        x, weight, mean, invstd = ctx.saved_tensors
        gx, gw, gb = _BatchNormTrainBackward.apply(gy, x, weight, mean, invstd, ctx.eps)
        return gx, gw, gb, None


class _BatchNormTrainBackward(torch.autograd.Function):
    """(gy, x, weight) -> (gx, gw, gb), the statistics' dependence on x included."""

    @staticmethod
    def forward(ctx, gy, x, weight, mean, invstd, eps):
        ctx.save_for_backward(gy, x, weight, mean, invstd)
        ctx.eps = eps
        return torch.ops.fastmaml.batch_norm_train_backward(gy, x, weight, mean, invstd)

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        gy, x, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the result will be differentiated again, so build it from ops
            # autograd can differentiate (the statistics recomputed from x)
            dx, dw, dgy = batch_norm_train_double_backward_reference(ggx, ggw, ggb, gy, x, weight, ctx.eps)
        else:
            dx, dw, dgy = torch.ops.fastmaml.batch_norm_train_double_backward(ggx, ggw, ggb, gy, x, weight, mean,
                                                                              invstd)
        return dgy, dx, dw, None, None, None


def _affine_or_none(t, x: Tensor) -> bool:
    return t is None or (plain_cpu_float(t) and t.dtype == x.dtype and t.dim() == 1 and t.shape[0] == x.shape[1])


def kernel_takes(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> bool:
    """Whether the compiled kernels compute batch norm of these tensors: plain float32/float64 CPU
    tensors outside ``torch.func`` transforms and forward-mode AD, ``x`` ``[N, C, *]`` with more than
    one value per channel, ``weight`` / ``bias`` ``[C]`` of ``x``'s dtype or None."""
    return (plain_cpu_float(x) and x.dim() >= 2 and x.numel() > x.shape[1] and forward_ad._current_level < 0
            and _affine_or_none(weight, x) and _affine_or_none(bias, x))


def batch_norm_train_apply(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """The kernels' (y, mean, invstd) for arguments ``kernel_takes`` accepts (no further checks)."""
    c = x.shape[1]
    w = weight if weight is not None else x.new_ones(c)
    b = bias if bias is not None else x.new_zeros(c)
    return _BatchNormTrain.apply(x, w, b, float(eps))


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, invstd: Tensor, count: int,
                         momentum: float, eps: float) -> None:
    """torch's running-statistics update in place (unbiased variance), from the kernel's mean and
    invstd (variance recovered in float64 as 1 / invstd^2 - eps)."""
    with torch.no_grad():
        var = invstd.double().pow(-2).sub_(eps).clamp_(min=0) * (count / max(count - 1, 1))
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)


def batch_norm_train(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5, *,
                     backend: str = "auto") -> Tensor:
    """Batch norm of ``x`` ``[N, C, *]`` on its own batch statistics:
    ``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)``, through the compiled CPU
    kernels where they apply (``backend="auto"``, see ``kernel_takes``), else torch's;
    ``backend="cpu"`` raises a ``RuntimeError`` when the kernels cannot take the arguments,
    ``"reference"`` always runs torch's.

    Example:
        >>> x, w, b = torch.randn(5, 3, 4, 4), torch.randn(3), torch.randn(3)
        >>> y = batch_norm_train(x, w, b)
        >>> torch.allclose(y, F.batch_norm(x, None, None, w, b, training=True), atol=1e-6)
        True
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor [N, C, *], got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must be [N, C, *] (at least 2 dims), got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (not isinstance(t, Tensor) or t.shape != (x.shape[1],)):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be None or a tensor of shape ({x.shape[1]},) (x's channels), got {shape}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if x.numel() <= x.shape[1]:
        raise ValueError(f"batch statistics need more than one value per channel, got x of shape {tuple(x.shape)}")
    if backend == "reference":
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    fits = kernel_takes(x, weight, bias)
    if backend == "cpu":
        if not (fits and has_native_device("cpu", "batch_norm_train")):
            raise RuntimeError("backend 'cpu' cannot run batch_norm_train here: it needs the compiled module and "
                               "float32/float64 CPU tensors of one dtype outside torch.func transforms and forward "
                               f"AD; got x {x.dtype} on {x.device}")
        return batch_norm_train_apply(x, weight, bias, eps)[0]
    if fits and native_available("batch_norm_train"):
        return batch_norm_train_apply(x, weight, bias, eps)[0]
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)


def _register_native_fakes() -> None:
    from .._extension import HAS_NATIVE

    if not HAS_NATIVE:
        return

    @torch.library.register_fake("fastmaml::batch_norm_train")
    def _(x, weight, bias, eps):
        c = x.shape[1]
        return x.new_empty(x.shape), x.new_empty((c,), dtype=torch.float64), x.new_empty((c,), dtype=torch.float64)

    @torch.library.register_fake("fastmaml::batch_norm_train_backward")
    def _(gy, x, weight, mean, invstd):
        c = x.shape[1]
        return x.new_empty(x.shape), x.new_empty((c,)), x.new_empty((c,))

    @torch.library.register_fake("fastmaml::batch_norm_train_double_backward")
    def _(ggx, ggw, ggb, gy, x, weight, mean, invstd):
        return x.new_empty(x.shape), x.new_empty((x.shape[1],)), x.new_empty(x.shape)


_register_native_fakes()
