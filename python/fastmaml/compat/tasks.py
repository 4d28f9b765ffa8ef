"""From a list of per-task batches to the stacked ``[T, ...]`` batches of the batched engine."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["stack_tasks"]

_SLOTS = ("xs", "ys", "xq", "yq")


def stack_tasks(tasks: Sequence[Sequence[Tensor]]) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Stack T tasks ``(xs, ys, xq, yq)`` into the support and query batches of ``maml_loss``.

    Every task must have the same shapes (same ways, shots and query size): the batched engine
    runs all tasks as one ``[T, N, ...]`` tensor. Tasks of different sizes must be bucketed by
    shape (one ``maml_loss`` call per bucket, weighted by the bucket's share of the tasks).

    Args:
        tasks: a list of T tuples ``(xs, ys, xq, yq)``: support inputs ``[N, ...]`` and targets
            ``[N, ...]``, query inputs ``[M, ...]`` and targets ``[M, ...]``.

    Returns:
        ``((xs [T, N, ...], ys [T, N, ...]), (xq [T, M, ...], yq [T, M, ...]))``.

    Raises:
        TypeError: ``tasks`` is not a list of 4-tuples of tensors, or dtypes differ between tasks,
            or between the support and the query.
        ValueError: no tasks, shapes differ between tasks (ragged), a task's inputs and targets
            have different batch sizes, or tensors are on different devices.

    Example:
        >>> support, query = stack_tasks([(xs, ys, xq, yq) for xs, ys, xq, yq in batch])
        >>> loss = maml_loss(net, F.cross_entropy, support, query, num_steps=5, lr=0.4)
    """
    if isinstance(tasks, Tensor) or not isinstance(tasks, (list, tuple)):
        raise TypeError(f"tasks must be a list of (xs, ys, xq, yq) tuples, got {type(tasks).__name__}")
    if len(tasks) == 0:
        raise ValueError("tasks is empty; expected at least one (xs, ys, xq, yq) tuple")
    for t, task in enumerate(tasks):
        if isinstance(task, Tensor) or not isinstance(task, (list, tuple)) or len(task) != 4:
            got = f"length {len(task)}" if isinstance(task, (list, tuple)) else type(task).__name__
            raise TypeError(f"tasks[{t}] must be a tuple (xs, ys, xq, yq), got {got}")
        for name, x in zip(_SLOTS, task):
            if not isinstance(x, Tensor):
                raise TypeError(f"tasks[{t}] {name} must be a tensor, got {type(x).__name__}")
            if x.dim() < 1:
                raise ValueError(f"tasks[{t}] {name} must have a batch dimension [N, ...], got a 0-dim tensor")
        xs, ys, xq, yq = task
        for (a, b), (na, nb) in (((xs, ys), ("xs", "ys")), ((xq, yq), ("xq", "yq"))):
            if a.shape[0] != b.shape[0]:
                raise ValueError(f"tasks[{t}] {na} has {a.shape[0]} samples but {nb} has {b.shape[0]}; "
                                 f"expected the same batch size")

    first = tasks[0]
    device = first[0].device
    for t, task in enumerate(tasks):
        for name, x, ref in zip(_SLOTS, task, first):
            if x.device != device:
                raise ValueError(f"tasks[{t}] {name} is on {x.device} but tasks[0] xs is on {device}; "
                                 f"move all tasks to one device")
            if x.dtype != ref.dtype:
                raise TypeError(f"tasks[{t}] {name} has dtype {x.dtype} but tasks[0] {name} has {ref.dtype}; "
                                f"expected one dtype per slot")
            if x.shape != ref.shape:
                raise ValueError(
                    f"ragged tasks: tasks[{t}] {name} has shape {tuple(x.shape)} but tasks[0] {name} has "
                    f"{tuple(ref.shape)}; stacking as [T, ...] needs equal shapes (bucket tasks by shape)")
    for a, b in ((0, 2), (1, 3)):
        if first[a].dtype != first[b].dtype:
            raise TypeError(f"{_SLOTS[a]} has dtype {first[a].dtype} but {_SLOTS[b]} has {first[b].dtype}; "
                            f"support and query must have the same dtypes")
        if first[a].shape[1:] != first[b].shape[1:]:
            raise ValueError(f"{_SLOTS[a]} samples have shape {tuple(first[a].shape[1:])} but {_SLOTS[b]} samples "
                             f"have {tuple(first[b].shape[1:])}; support and query must have the same sample shape")
    xs, ys, xq, yq = (torch.stack([task[i] for task in tasks]) for i in range(4))
    return (xs, ys), (xq, yq)
