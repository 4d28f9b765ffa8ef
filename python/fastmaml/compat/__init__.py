"""Drop-in paths for existing MAML code (learn2learn-style and torch.func-style).

* ``MAML``: learn2learn's ``MAML`` wrapper (``clone`` / ``adapt`` / call), one task at a time, with
  a functional (never mutated) network on fastmaml's layer kernels; ``MetaSGD``: the same with
  learn2learn's learnable per-entry step sizes.
* ``stack_tasks``: a list of per-task ``(xs, ys, xq, yq)`` to the stacked ``[T, ...]`` support and
  query of ``fastmaml.meta.maml_loss``, which batches all tasks in one call.
* ``adapted_params`` / ``per_task_forward``: the ``torch.func`` parameter-dict view of the batched
  inner loop.

See ``docs/dropin.md`` for the recipes and measurements.

Example:
    >>> from fastmaml.compat import MAML          # instead of learn2learn.algorithms.MAML
"""
from .func import adapted_params, per_task_forward
from .maml import MAML, MetaSGD
from .tasks import stack_tasks

__all__ = ["MAML", "MetaSGD", "adapted_params", "per_task_forward", "stack_tasks"]
