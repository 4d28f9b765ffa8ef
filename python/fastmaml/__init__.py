"""fastmaml: batched, differentiable kernels for optimization-based meta-learning.

``fastmaml.meta``: batched MAML / FOMAML / Reptile / iMAML meta-gradients and HVPs (front door
``fastmaml.meta.maml_loss`` and ``fastmaml.meta.MAML``). ``fastmaml.heads``: R2-D2 ridge, MetaOptNet
SVM and ProtoNet heads on batched ridge and QP solvers. Top level: the fused multi-tensor ops, and
``cpu_kernels()``, a context in which a model's 2x2 max-pools, relus, training-mode batch norms and
convolutions of data run on fastmaml's CPU implementations (the engine uses it, any autograd code
can).

Every op has a pure-PyTorch reference (``fastmaml.reference``) and fast backends (C++ CPU, CUDA,
Triton) chosen by one selector (``fastmaml.backend``). All ops take a batch of T tasks: tensors
carry a leading task dimension ``[T, ...]``.
"""
import torch  # noqa: F401  (the compiled module links libc10: torch must be imported first)

from . import backend, heads, meta
from ._extension import HAS_NATIVE, build_info
from .inner_update import fd_combine, fd_perturb, fd_step_size, inner_sgd_step, inner_sgd_step_
from .ops.cpu_kernels import cpu_kernels, stock_kernels
from .ops.multi_tensor import task_axpby, task_axpby_, task_dot

__version__ = "0.1.0"

__all__ = [
    "HAS_NATIVE",
    "backend",
    "build_info",
    "cpu_kernels",
    "fd_combine",
    "fd_perturb",
    "fd_step_size",
    "heads",
    "inner_sgd_step",
    "inner_sgd_step_",
    "meta",
    "stock_kernels",
    "task_axpby",
    "task_axpby_",
    "task_dot",
]
