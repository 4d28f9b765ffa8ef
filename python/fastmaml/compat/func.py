"""For ``torch.func`` users: parameter dicts of ``[T, ...]`` tensors in, parameter dicts out.

``torch.func`` MAML code keeps parameters as a dict ``{name: tensor}``, adapts them with a
``grad(...)`` loop inside ``vmap`` and calls the network with ``functional_call``. The training
step maps to one ``fastmaml.meta.maml_loss`` call (see ``docs/dropin.md``); these two helpers cover
the rest (adaptation for evaluation, and running the adapted networks), with the same dict layout.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from ..meta.functional import AdaptSpec, TaskModel, batch_stats_only, call_with, tensor_slots
from ..meta.inner_loop import StepSpec, adapt

__all__ = ["adapted_params", "per_task_forward"]


def adapted_params(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], support: tuple[Tensor, Tensor],
                   num_steps: int, lr: StepSpec, *, adapt_what: AdaptSpec = "all",
                   create_graph: bool = False) -> dict[str, Tensor]:
    """The inner loop for T stacked tasks, as a dict of adapted parameters ``{name: [T, ...]}``.

    Replaces ``vmap(inner_loop)(params, xs, ys)`` where ``inner_loop`` runs K steps of
    ``p = p - lr * grad(loss)(p, x, y)``. Batch-norm layers use each task's batch statistics and
    their running statistics are not touched (the convention of ``fastmaml.meta``).

    Args:
        model: the network (its parameters are the starting point ``theta``).
        loss_fn: ``loss_fn(output, target) -> scalar`` for one task.
        support: ``(xs [T, N, ...], ys [T, N, ...])``.
        num_steps: inner steps K >= 0.
        lr: inner step sizes (any form ``fastmaml.meta.maml_loss`` accepts).
        adapt_what: which parameters adapt: ``"all"``, ``"head"`` (ANIL), names or a predicate.
        create_graph: keep the graph through the steps (differentiable w.r.t. ``model``'s
            parameters, plain-autograd memory); without it the result carries no graph.

    Returns:
        ``{name: [T, ...]}`` for the adapted parameters only.

    Example:
        >>> phi = adapted_params(net, F.cross_entropy, (xs, ys), num_steps=10, lr=0.4)
        >>> logits = per_task_forward(net, phi, xq)       # [T, M, n_way]
    """
    if isinstance(adapt_what, str) and adapt_what == "context":
        raise ValueError("adapt_what='context' (CAVIA) has no parameter dict; use fastmaml.meta.adapt directly")
    tm = TaskModel(model, loss_fn, adapt=adapt_what)
    phi = adapt(tm, support, num_steps, lr, create_graph=create_graph)
    return dict(zip(tm.adapt_names, phi))


def per_task_forward(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Run task t's parameters on task t's inputs, for every t: ``[T, M, ...]`` outputs.

    Replaces ``vmap(lambda p, x: functional_call(model, p, (x,)))(params, x)``. Parameters missing
    from ``params`` are ``model``'s own (shared by the tasks). Batch-norm layers use each task's
    batch statistics and leave the running statistics untouched.

    Args:
        model: the network.
        params: ``{name: [T, ...]}``, e.g. from ``adapted_params``.
        x: inputs ``[T, M, ...]``.

    Returns:
        The stacked outputs ``[T, M, ...]``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict {{name: [T, ...] tensor}}, got {type(params).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor of inputs [T, M, ...], got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"x must be inputs [T, M, ...] with T >= 1, got shape {tuple(x.shape)}")
    known = dict(model.named_parameters())
    num_tasks = x.shape[0]
    for name, p in params.items():
        if name not in known:
            raise ValueError(f"params[{name!r}] is not a parameter of the model; known: {list(known)}")
        if not isinstance(p, Tensor) or p.shape != (num_tasks, *known[name].shape):
            shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
            raise ValueError(f"params[{name!r}] has shape {shape}; expected {(num_tasks, *known[name].shape)} "
                             f"(T = {num_tasks} from x)")
    outputs = []
    slots = tensor_slots(model)
    with batch_stats_only(model):
        for t in range(num_tasks):
            task = dict(known)
            task.update((n, p[t]) for n, p in params.items())
            outputs.append(call_with(model, task, (x[t],), slots=slots))
    return torch.stack(outputs)
