"""Input checks shared by the public ops: errors name the argument, what came and what was expected."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def check_tensor_list(tensors, name: str) -> list[Tensor]:
    if isinstance(tensors, Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{name} must hold at least one tensor, got an empty list")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return tensors


def check_task_tensors(tensors: Sequence[Tensor], name: str, like: Sequence[Tensor] | None = None) -> int:
    """Check a list of [T, ...] tensors: one floating dtype, one device, one T. Returns T."""
    first = tensors[0]
    if not first.is_floating_point():
        raise TypeError(f"{name}[0] must be a floating point tensor, got dtype {first.dtype}")
    if first.dim() < 1:
        raise ValueError(f"{name}[0] must have a leading task dimension [T, ...], got a 0-dim tensor")
    num_tasks = first.shape[0]
    if num_tasks < 1:
        raise ValueError(f"{name}[0] has T = 0 tasks; expected at least one task")
    for i, t in enumerate(tensors):
        if t.dtype != first.dtype:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}, expected {first.dtype} like {name}[0]")
        if t.device != first.device:
            raise ValueError(f"{name}[{i}] is on {t.device}, expected {first.device} like {name}[0]")
        if t.dim() < 1 or t.shape[0] != num_tasks:
            raise ValueError(
                f"{name}[{i}] has shape {tuple(t.shape)}; expected a leading task dimension of {num_tasks}"
            )
        if like is not None and t.shape != like[i].shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, expected {tuple(like[i].shape)}")
        if like is not None and (t.dtype != like[i].dtype or t.device != like[i].device):
            raise TypeError(
                f"{name}[{i}] is {t.dtype} on {t.device}, expected {like[i].dtype} on {like[i].device}"
            )
    return num_tasks


def check_same_length(**lists) -> None:
    lengths = {k: len(v) for k, v in lists.items()}
    if len(set(lengths.values())) > 1:
        got = ", ".join(f"len({k}) = {n}" for k, n in lengths.items())
        raise ValueError(f"tensor lists must have the same length, got {got}")


def check_task_vector(v, name: str, num_tasks: int, like: Tensor) -> Tensor:
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a [T] tensor, got {type(v).__name__}")
    if v.shape != (num_tasks,):
        raise ValueError(f"{name} must have shape [{num_tasks}] (one value per task), got {tuple(v.shape)}")
    if v.dtype != like.dtype or v.device != like.device:
        raise TypeError(f"{name} must be {like.dtype} on {like.device}, got {v.dtype} on {v.device}")
    return v


def check_finite(t: Tensor, name: str) -> None:
    bad = ~torch.isfinite(t.detach())
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise ValueError(f"{name} must be finite, found {t.detach().flatten()[bad.flatten()][0].item()} at index {where}")
