"""A 2-d convolution whose input needs no gradient (a network's first layer on data), with a
double backward that skips the input's gradient.

In a second-order MAML step the first convolution's weight gradient ``gW = corr(x, gy)`` is
differentiated again. torch's double backward of a convolution (torch 2.13) also computes a
transposed convolution for the gradient of the *input* even when the input is data that needs
none (`[5, 64, 28, 28] x [64, 1, 3, 3] -> [5, 1, 28, 28]` on conv4's support set). Here the
backward is a Function of its own whose derivative is only what is needed: ``gW`` is linear in
``gy`` with ``x`` fixed, so the derivative of ``<ggW, gW> + <ggb, gb>`` w.r.t. ``gy`` is the forward
convolution ``conv2d(x, ggW) + ggb``. Every step runs the same torch convolution ops torch's own
autograd runs, so values and first and second derivatives are bit-identical to ``F.conv2d``'s
(tests/test_conv_fixed_input.py); the exact HVP of conv4's support loss measured ~5% faster (one
thread, T = 8: 152.6 / 147.8 ms -> 146.7 / 138.7 ms over two alternations).

Reference: ``torch.nn.functional.conv2d`` itself (this is a different autograd structure for the
same op, not a different kernel). ``fastmaml.ops.cpu_kernels.cpu_kernels()`` routes the
qualifying calls here.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from ._native_cpu import plain_cpu_float


def _pair(v) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


class _ConvFixedInput(torch.autograd.Function):
    """y = conv2d(x, w, b): gradients for w and b only."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conv = (bias is not None, stride, padding, dilation, groups)
        return torch.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gw, gb = _ConvWeightGrad.apply(gy, x, weight, *ctx.conv)
        return None, gw, gb, None, None, None, None


class _ConvWeightGrad(torch.autograd.Function):
    """gy -> (gW, gb) at a fixed input: linear in gy; its adjoint is the forward convolution."""

    @staticmethod
    def forward(ctx, gy, x, weight, has_bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x)
        ctx.conv = (stride, padding, dilation, groups)
        _, gw, gb = torch.ops.aten.convolution_backward(
            gy, x, weight, [weight.shape[0]] if has_bias else None, _pair(stride), _pair(padding), _pair(dilation),
            False, [0, 0], groups, [False, True, has_bias])
        return gw, gb

    @staticmethod
    def backward(ctx, ggw, ggb):
        (x,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        ggy = torch.conv2d(x, ggw, None, stride, padding, dilation, groups)
        if ggb is not None:  # added after the convolution, as torch's double backward does (same rounding)
            ggy = ggy + ggb.reshape(1, -1, 1, 1)
        return ggy, None, None, None, None, None, None, None


def _int_pair(v) -> bool:
    if isinstance(v, int) and not isinstance(v, bool):
        return True
    return isinstance(v, (tuple, list)) and len(v) == 2 and all(type(e) is int for e in v)


def takes(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> bool:
    """Whether a ``conv2d`` call is one this Function computes: a plain float CPU ``[N, C, H, W]``
    input that needs no gradient, a weight that does, autograd recording, numeric (not string)
    padding, no forward-mode AD or ``torch.func`` transform active."""
    return (isinstance(input, Tensor) and isinstance(weight, Tensor) and plain_cpu_float(input)
            and input.dim() == 4 and not input.requires_grad and weight.requires_grad and torch.is_grad_enabled()
            and plain_cpu_float(weight) and weight.dtype == input.dtype
            and (bias is None or (plain_cpu_float(bias) and bias.dtype == input.dtype))
            and all(_int_pair(v) for v in (stride, padding, dilation)) and type(groups) is int
            and forward_ad._current_level < 0)


def conv2d_fixed_input(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                       groups: int = 1) -> Tensor:
    """``F.conv2d`` for an input that needs no gradient (bit-identical values and derivatives),
    through the Functions above when ``takes`` accepts the call, else ``F.conv2d``. Raises
    ``TypeError`` / ``ValueError`` naming the argument for inputs that are not tensors, not 4-d, or
    whose channels, groups or bias do not fit the weight.

    Example:
        >>> x, w = torch.randn(2, 1, 8, 8), torch.randn(4, 1, 3, 3, requires_grad=True)
        >>> torch.equal(conv2d_fixed_input(x, w, padding=1), torch.nn.functional.conv2d(x, w, padding=1))
        True
    """
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if input.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"input must be [N, C, H, W] and weight [C_out, C / groups, kH, kW], got input "
                         f"{tuple(input.shape)} and weight {tuple(weight.shape)}")
    if type(groups) is not int or groups < 1 or input.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"input has {input.shape[1]} channels: weight [C_out, {weight.shape[1]}, ...] with groups="
                         f"{groups!r} needs {weight.shape[1]} * groups of them")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],)):
        shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"bias must be None or a tensor of shape ({weight.shape[0]},), got {shape}")
    if takes(input, weight, bias, stride, padding, dilation, groups):
        return _ConvFixedInput.apply(input, weight, bias, stride, padding, dilation, groups)
    return torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)
