"""Meta-gradient engine: batched MAML / FOMAML / Reptile / iMAML with exact and finite-difference HVPs.

Front door: ``maml_loss(model, loss_fn, support, query, ...)`` and the ``MAML`` module. Pieces:
``TaskModel`` (a module as a per-task function), ``hvp`` (batched HVPs), ``adapt`` (the batched
inner loop), ``batched_cg``. References (plain autograd) live in ``fastmaml.reference.meta``.
"""
from .front import MAML, maml_loss
from .functional import NonFiniteLossError, TaskModel, batch_stats_only, recompute_batch_norm_stats
from .hvp import HVP_MODES, batched_grad, hvp, hvp_fd_step
from .imaml import batched_cg
from .inner_loop import adapt, lslr_step_sizes, meta_sgd_step_sizes, normalize_step_sizes
from .maml import ALGORITHMS, NonFiniteMetaGradientError

__all__ = [
    "ALGORITHMS",
    "HVP_MODES",
    "MAML",
    "NonFiniteLossError",
    "NonFiniteMetaGradientError",
    "TaskModel",
    "adapt",
    "batch_stats_only",
    "batched_cg",
    "batched_grad",
    "hvp",
    "hvp_fd_step",
    "lslr_step_sizes",
    "maml_loss",
    "meta_sgd_step_sizes",
    "normalize_step_sizes",
    "recompute_batch_norm_stats",
]
