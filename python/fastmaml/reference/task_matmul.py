"""Per-task products with a thin side: the specification of ``fastmaml.ops.task_matmul``."""
from torch import Tensor


def task_matmul_nt_reference(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b^T`` per task: ``a`` ``[T, m, d]``, ``b`` ``[T, c, d]`` -> ``[T, m, c]``."""
    return a @ b.mT


def task_matmul_tn_reference(g: Tensor, a: Tensor) -> Tensor:
    """``g^T @ a`` per task: ``g`` ``[T, m, c]``, ``a`` ``[T, m, d]`` -> ``[T, c, d]``."""
    return g.mT @ a
