"""relu that keeps one bit per element for its backward, differentiable to any order.

``torch.relu`` saves its float output for the backward (``threshold_backward``). In a conv4 MAML
step the largest saved tensor of the query pass is the first block's relu output
(``[75, 32, 84, 84]`` float32, 65 MB per task on workload B), alive until the backward reaches
it. ``relu_bitmask`` keeps ``!(y <= 0)`` as packed bits instead (2 MB there; ``python -m
fastmaml.bench.meta --workload layers``): the backward is
``where(bit, g, 0)``, which is linear in ``g`` with the same bits, so it is also its own
derivative (the double backward of an inner step). The bit is torch's own test, so values and
gradients are bit-identical to ``torch.relu``'s (reference: ``fastmaml.reference.relu``).
Compiled kernel: ``csrc/cpu/relu_mask_cpu.cpp`` (AVX2 for float32).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._extension import has_native_device
from ..reference.relu import relu_reference
from ._native_cpu import native_available, plain_cpu_float

_BACKENDS = ("auto", "cpu", "reference")


class _ReluBits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y, bits = torch.ops.fastmaml.relu_bitmask(x)
        ctx.save_for_backward(bits)
        ctx.save_for_forward(bits)
        return y

    @staticmethod
    def backward(ctx, grad):
        (bits,) = ctx.saved_tensors
        return _SelectBits.apply(grad, bits)

    @staticmethod
    def jvp(ctx, x_t):
        (bits,) = ctx.saved_tensors
        return _SelectBits.apply(x_t, bits)


class _SelectBits(torch.autograd.Function):
    """``g -> where(bit, g, 0)``: linear, its own adjoint."""

    @staticmethod
    def forward(ctx, g, bits):
        ctx.save_for_backward(bits)
        ctx.save_for_forward(bits)
        return torch.ops.fastmaml.bitmask_select(g, bits)

    @staticmethod
    def backward(ctx, gg):
        (bits,) = ctx.saved_tensors
        return _SelectBits.apply(gg, bits), None

    @staticmethod
    def jvp(ctx, g_t, bits_t):
        (bits,) = ctx.saved_tensors
        return _SelectBits.apply(g_t, bits)


def relu_bitmask(x: Tensor, *, backend: str = "auto") -> Tensor:
    """``torch.relu(x)`` that saves one bit per element for its backward (compiled CPU kernel,
    float32/float64, no ``torch.func`` transform active); elsewhere torch's relu
    (``backend="auto"``). ``backend="cpu"`` raises a ``RuntimeError`` when the kernel cannot take
    ``x``; ``"reference"`` always runs torch's.

    Example:
        >>> x = torch.randn(4, 5)
        >>> torch.equal(relu_bitmask(x), torch.relu(x))
        True
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if backend == "reference":
        return relu_reference(x)
    fits = plain_cpu_float(x)
    if backend == "cpu":
        if not (fits and has_native_device("cpu", "relu_bitmask")):
            raise RuntimeError("backend 'cpu' cannot run relu_bitmask here: it needs the compiled module and a "
                               f"float32/float64 CPU tensor outside torch.func transforms; got {x.dtype} on {x.device}")
        return _ReluBits.apply(x)
    return _ReluBits.apply(x) if fits and native_available("relu_bitmask") else relu_reference(x)


def _register_native_fakes() -> None:
    from .._extension import HAS_NATIVE

    if not HAS_NATIVE:
        return

    @torch.library.register_fake("fastmaml::relu_bitmask")
    def _(x):
        return x.new_empty(x.shape), x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)

    @torch.library.register_fake("fastmaml::bitmask_select")
    def _(g, bits):
        return g.new_empty(g.shape)


_register_native_fakes()
