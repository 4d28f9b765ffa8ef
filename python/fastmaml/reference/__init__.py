"""Pure-PyTorch references: the specification of every op and the oracle of the tests."""
from .inner_update import (
    fd_combine_reference,
    fd_perturb_reference,
    fd_step_size_reference,
    inner_sgd_step_reference,
)
from .multi_tensor import task_axpby_reference, task_dot_reference

__all__ = [
    "fd_combine_reference",
    "fd_perturb_reference",
    "fd_step_size_reference",
    "inner_sgd_step_reference",
    "task_axpby_reference",
    "task_dot_reference",
]
