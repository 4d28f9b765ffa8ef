"""2x2 max-pool with stride 2 on the CPU, differentiable to any order.

The conv4 backbone of the meta-learning literature pools with ``nn.MaxPool2d(2)`` after every
block. On the CPU build measured here the stock ``max_pool2d`` forward was ~20% of a second-order
MAML step on conv4. The compiled kernel (``csrc/cpu/max_pool_cpu.cpp``) runs it 11-14x faster on
conv4's activations (``python -m fastmaml.bench.meta --workload layers``, one thread) and keeps a
one-byte argmax code per output instead of an 8-byte index.

* ``max_pool2x2(x)``: the op, with autograd to any order (the backward is a scatter of the output
  gradient to the argmax entries, whose derivative is the matching gather, whose derivative is the
  scatter again), forward-mode AD too. Results and gradients are bit-identical to
  ``F.max_pool2d(x, 2)`` (same window rule: first maximum, NaN propagates); the reference is
  ``fastmaml.reference.max_pool.max_pool2x2_reference``.

``fastmaml.ops.cpu_kernels.cpu_kernels()`` routes the ``F.max_pool2d`` / ``nn.MaxPool2d`` calls
this kernel computes exactly to it; the meta-gradient engine enters it around its per-task
autograd passes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._extension import has_native_device
from ..reference.max_pool import max_pool2x2_reference
from ._native_cpu import native_available, plain_cpu_float

_BACKENDS = ("auto", "cpu", "reference")


def kernel_takes(x: Tensor) -> bool:
    """Whether the compiled kernel computes ``F.max_pool2d(x, 2)`` for this tensor."""
    return (plain_cpu_float(x) and x.dim() in (3, 4) and x.shape[-1] >= 2 and x.shape[-2] >= 2
            and x.is_contiguous())


class _Pool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out, code = torch.ops.fastmaml.max_pool2x2(x)
        ctx.save_for_backward(code)
        ctx.save_for_forward(code)
        ctx.in_hw = tuple(x.shape[-2:])
        return out

    @staticmethod
    def backward(ctx, grad):
        (code,) = ctx.saved_tensors
        return _Scatter.apply(grad, code, ctx.in_hw)

    @staticmethod
    def jvp(ctx, x_t):
        (code,) = ctx.saved_tensors
        return _Gather.apply(x_t, code)


class _Scatter(torch.autograd.Function):
    """``grad [..., h, w] -> [..., H, W]``: each value put at its window's argmax, zeros elsewhere."""

    @staticmethod
    def forward(ctx, grad, code, in_hw):
        ctx.save_for_backward(code)
        ctx.save_for_forward(code)
        ctx.in_hw = in_hw
        return torch.ops.fastmaml.max_pool2x2_scatter(grad, code, *in_hw)

    @staticmethod
    def backward(ctx, g):
        (code,) = ctx.saved_tensors
        return _Gather.apply(g, code), None, None

    @staticmethod
    def jvp(ctx, grad_t, code_t, in_hw_t):
        (code,) = ctx.saved_tensors
        return _Scatter.apply(grad_t, code, ctx.in_hw)


class _Gather(torch.autograd.Function):
    """``src [..., H, W] -> [..., h, w]``: each window's argmax entry (the adjoint of the scatter)."""

    @staticmethod
    def forward(ctx, src, code):
        ctx.save_for_backward(code)
        ctx.save_for_forward(code)
        ctx.in_hw = tuple(src.shape[-2:])
        return torch.ops.fastmaml.max_pool2x2_gather(src, code)

    @staticmethod
    def backward(ctx, g):
        (code,) = ctx.saved_tensors
        return _Scatter.apply(g, code, ctx.in_hw), None

    @staticmethod
    def jvp(ctx, src_t, code_t):
        (code,) = ctx.saved_tensors
        return _Gather.apply(src_t, code)


def max_pool2x2(x: Tensor, *, backend: str = "auto") -> Tensor:
    """``F.max_pool2d(x, 2)`` for ``x`` ``[N, C, H, W]`` or ``[C, H, W]``, through the compiled CPU
    kernel where it applies (``backend="auto"``), else torch's; ``backend="cpu"`` raises a
    ``RuntimeError`` when the kernel cannot take ``x``, ``"reference"`` always runs torch's.

    Example:
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.equal(max_pool2x2(x), F.max_pool2d(x, 2))
        True
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor [N, C, H, W] or [C, H, W], got {type(x).__name__}")
    if backend == "reference":
        return max_pool2x2_reference(x)
    fits = kernel_takes(x)
    if backend == "cpu":
        if not (fits and has_native_device("cpu", "max_pool2x2")):
            raise RuntimeError("backend 'cpu' cannot run max_pool2x2 here: it needs the compiled module and a "
                               "contiguous float32/float64 CPU tensor [N, C, H, W] or [C, H, W] with H, W >= 2, "
                               f"outside torch.func transforms; got {x.dtype} {tuple(x.shape)} on {x.device}")
        return _Pool.apply(x)
    return _Pool.apply(x) if fits and native_available("max_pool2x2") else max_pool2x2_reference(x)


def _register_native_fakes() -> None:
    """Output shapes of the compiled ops, for meta tensors and torch.compile (opcheck checks them)."""
    from .._extension import HAS_NATIVE

    if not HAS_NATIVE:
        return

    def pooled(t):
        return t.shape[:-2] + (t.shape[-2] // 2, t.shape[-1] // 2)

    @torch.library.register_fake("fastmaml::max_pool2x2")
    def _(x):
        return x.new_empty(pooled(x)), x.new_empty(pooled(x), dtype=torch.uint8)

    @torch.library.register_fake("fastmaml::max_pool2x2_scatter")
    def _(grad, code, height, width):
        return grad.new_empty(grad.shape[:-2] + (height, width))

    @torch.library.register_fake("fastmaml::max_pool2x2_gather")
    def _(src, code):
        return src.new_empty(pooled(src))


_register_native_fakes()
