"""Per-task products with a thin side, the feature products of the few-shot heads.

``task_matmul_nt(a, b) = a @ b^T`` (``a`` ``[T, m, d]``, ``b`` ``[T, c, d]``) gives query logits
from per-task weights; ``task_matmul_tn(g, a) = g^T @ a`` (``g`` ``[T, m, c]``) gives the gradient
of those weights. With ``c`` a handful of classes and ``d`` thousands of features, both read the
large ``a`` once at 2 c flops per element: memory-bound products that the CPU's batched GEMM runs
well below the memory speed. The compiled CPU kernels (``csrc/cpu/task_matmul_cpu.cpp``) stream
``a`` once; elsewhere (GPUs, ``c > 16``, other dtypes, no compiled module) the reference runs, i.e.
``torch.bmm``. No autograd: these are building blocks of the heads' own backward passes.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .._extension import has_native_device
from ..backend import ENV_VAR
from ..reference.task_matmul import task_matmul_nt_reference, task_matmul_tn_reference

MAX_THIN = 16  # the compiled kernels' largest c
_BACKENDS = ("auto", "cpu", "reference")


def _kernel_takes(a: Tensor, thin: int) -> bool:
    """What the compiled kernels take (given operands that match ``a``)."""
    return a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64) and 1 <= thin <= MAX_THIN


def _auto_allows(op: str) -> bool:
    return os.environ.get(ENV_VAR) != "reference" and has_native_device("cpu", op)


def _native(a: Tensor, other: Tensor, shapes_match: bool, thin: int, backend: str, op: str) -> bool:
    """Whether the compiled kernel runs. Anything it would refuse goes to the reference instead
    (whose errors are torch's own), so the compiled op's checks never have to throw."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    fits = (shapes_match and other.device == a.device and other.dtype == a.dtype and _kernel_takes(a, thin)
            and not (torch.is_grad_enabled() and (a.requires_grad or other.requires_grad)))
    if backend == "reference":
        return False
    if backend == "cpu":
        if not (fits and has_native_device("cpu", op)):
            raise RuntimeError(f"backend 'cpu' cannot run {op} here: it needs the compiled module and matching "
                               f"[T, ., d] float32/float64 CPU tensors that need no graph, with 1 to "
                               f"{MAX_THIN} thin columns")
        return True
    return fits and _auto_allows(op)


def runs_compiled(a: Tensor, thin: int) -> bool:
    """Whether ``task_matmul_nt(a, b)`` / ``task_matmul_tn(g, a)`` with ``thin`` columns and
    matching operands run the compiled kernel under ``backend="auto"`` where no graph is needed
    (inside an autograd Function's forward or backward)."""
    return _kernel_takes(a, thin) and _auto_allows("task_matmul_nt")


def task_matmul_nt(a: Tensor, b: Tensor, *, backend: str = "auto") -> Tensor:
    """``a @ b.mT`` per task: ``a`` ``[T, m, d]``, ``b`` ``[T, c, d]`` -> ``[T, m, c]``.

    Example:
        >>> a, b = torch.randn(2, 7, 300), torch.randn(2, 5, 300)
        >>> torch.allclose(task_matmul_nt(a, b), a @ b.mT, atol=1e-4)
        True
    """
    match = a.dim() == 3 and b.dim() == 3 and b.shape[0] == a.shape[0] and b.shape[2] == a.shape[2]
    if _native(a, b, match, b.shape[1] if match else 0, backend, "task_matmul_nt"):
        return torch.ops.fastmaml.task_matmul_nt(a, b)
    return task_matmul_nt_reference(a, b)


def task_matmul_tn(g: Tensor, a: Tensor, *, backend: str = "auto") -> Tensor:
    """``g.mT @ a`` per task: ``g`` ``[T, m, c]``, ``a`` ``[T, m, d]`` -> ``[T, c, d]``.

    Example:
        >>> g, a = torch.randn(2, 7, 5), torch.randn(2, 7, 300)
        >>> torch.allclose(task_matmul_tn(g, a), g.mT @ a, atol=1e-4)
        True
    """
    match = a.dim() == 3 and g.dim() == 3 and g.shape[:2] == a.shape[:2]
    if _native(a, g, match, g.shape[2] if match else 0, backend, "task_matmul_tn"):
        return torch.ops.fastmaml.task_matmul_tn(g, a)
    return task_matmul_tn_reference(g, a)


def _register_native_fakes() -> None:
    """Output shapes of the compiled ops, for meta tensors and torch.compile (opcheck checks them)."""
    from .._extension import HAS_NATIVE

    if not HAS_NATIVE:
        return

    @torch.library.register_fake("fastmaml::task_matmul_nt")
    def _(a, b):
        return a.new_empty(a.shape[0], a.shape[1], b.shape[1])

    @torch.library.register_fake("fastmaml::task_matmul_tn")
    def _(g, a):
        return a.new_empty(a.shape[0], g.shape[2], a.shape[2])


_register_native_fakes()
