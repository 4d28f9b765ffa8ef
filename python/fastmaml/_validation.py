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
    dtype, device = first.dtype, first.device
    if like is not None and (dtype != like[0].dtype or device != like[0].device):
        raise TypeError(f"{name}[0] is {dtype} on {device}, expected {like[0].dtype} on {like[0].device}")
    # One cheap pass (this runs on every inner step); the slow diagnosis only when it fails.
    for i, t in enumerate(tensors):
        shape = t.shape
        if (
            t.dtype != dtype
            or t.device != device
            or not shape
            or shape[0] != num_tasks
            or (like is not None and shape != like[i].shape)
        ):
            _diagnose_task_tensor(t, i, name, dtype, device, num_tasks, like)
    return num_tasks


def _diagnose_task_tensor(t: Tensor, i: int, name: str, dtype, device, num_tasks: int, like) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name}[{i}] has dtype {t.dtype}, expected {dtype} like {name}[0]")
    if t.device != device:
        raise ValueError(f"{name}[{i}] is on {t.device}, expected {device} like {name}[0]")
    if t.dim() < 1 or t.shape[0] != num_tasks:
        raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}; expected a leading task dimension of {num_tasks}")
    raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, expected {tuple(like[i].shape)}")


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
