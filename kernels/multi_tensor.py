"""Triton kernels for the multi-tensor task ops (task_axpby, task_dot).

One launch covers every tensor of a call: a small int64 table on the device holds each tensor's
addresses and sizes, and each program looks up its tensor and offset in it. For the conv4
parameter set (18 tensors) that is 1 launch instead of 18-36 with per-tensor or foreach kernels.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 1024  # elements per program: 4 KB of float32 per stream, enough to hide latency

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


@triton.jit
def _task_axpby_kernel(
    table_ptr,  # int64 [7, n_tensors]: x, y, alpha, out addresses; inner; alpha numel; numel
    block_tensor_ptr,  # int32 [n_blocks]
    block_start_ptr,  # int64 [n_blocks]
    x_scale_ptr,  # [T] or dummy
    y_scale_ptr,  # [T] or dummy
    n_tensors,
    HAS_X_SCALE: tl.constexpr,
    HAS_Y_SCALE: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.load(block_tensor_ptr + pid)
    start = tl.load(block_start_ptr + pid)
    x_ptr = tl.load(table_ptr + i).to(tl.pointer_type(DTYPE))
    y_ptr = tl.load(table_ptr + n_tensors + i).to(tl.pointer_type(DTYPE))
    a_ptr = tl.load(table_ptr + 2 * n_tensors + i).to(tl.pointer_type(DTYPE))
    o_ptr = tl.load(table_ptr + 3 * n_tensors + i).to(tl.pointer_type(DTYPE))
    inner = tl.load(table_ptr + 4 * n_tensors + i)
    a_numel = tl.load(table_ptr + 5 * n_tensors + i)
    numel = tl.load(table_ptr + 6 * n_tensors + i)

    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
    y = tl.load(y_ptr + offs, mask=mask, other=0).to(ACC)
    # 64-bit divisions only where they are needed: a scalar step size is one broadcast address,
    # and the task index only matters when there are per-task scales.
    a_idx = offs * 0
    if a_numel != 1:
        a_idx = offs % inner
    a = tl.load(a_ptr + a_idx, mask=mask, other=0).to(ACC)
    if HAS_X_SCALE or HAS_Y_SCALE:
        task = offs // inner
        if HAS_X_SCALE:
            x = x * tl.load(x_scale_ptr + task, mask=mask, other=0).to(ACC)
        if HAS_Y_SCALE:
            a = a * tl.load(y_scale_ptr + task, mask=mask, other=0).to(ACC)
    tl.store(o_ptr + offs, (x - a * y).to(DTYPE), mask=mask)


@triton.jit
def _task_dot_kernel(
    table_ptr,  # int64 [3, n_tensors]: a, b addresses; inner
    block_tensor_ptr,  # int32 [n_blocks]
    block_task_ptr,  # int64 [n_blocks]
    block_begin_ptr,  # int64 [n_blocks]
    partial_ptr,  # float32/float64 [n_blocks]
    n_tensors,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.load(block_tensor_ptr + pid)
    task = tl.load(block_task_ptr + pid)
    begin = tl.load(block_begin_ptr + pid)
    inner = tl.load(table_ptr + 2 * n_tensors + i)
    a_ptr = tl.load(table_ptr + i).to(tl.pointer_type(DTYPE)) + task * inner
    b_ptr = tl.load(table_ptr + n_tensors + i).to(tl.pointer_type(DTYPE)) + task * inner
    offs = begin + tl.arange(0, BLOCK)
    mask = offs < inner
    a = tl.load(a_ptr + offs, mask=mask, other=0).to(ACC)
    b = tl.load(b_ptr + offs, mask=mask, other=0).to(ACC)
    tl.store(partial_ptr + pid, tl.sum(a * b, axis=0))


_layout_cache: dict = {}


def _axpby_blocks(numels: tuple, device: torch.device):
    key = ("axpby", numels, device)
    if key not in _layout_cache:
        tensor_ids, starts = [], []
        for i, n in enumerate(numels):
            for s in range(0, n, _BLOCK):
                tensor_ids.append(i)
                starts.append(s)
        _layout_cache[key] = (
            torch.tensor(tensor_ids, dtype=torch.int32, device=device),
            torch.tensor(starts, dtype=torch.int64, device=device),
        )
    return _layout_cache[key]


def _dot_blocks(inners: tuple, num_tasks: int, device: torch.device):
    # Task-major order: each task has the same number of programs, so partial sums reshape to
    # [T, programs_per_task] and reduce in a fixed, deterministic order.
    key = ("dot", inners, num_tasks, device)
    if key not in _layout_cache:
        tensor_ids, tasks, begins = [], [], []
        for t in range(num_tasks):
            for i, n in enumerate(inners):
                for s in range(0, n, _BLOCK):
                    tensor_ids.append(i)
                    tasks.append(t)
                    begins.append(s)
        _layout_cache[key] = (
            torch.tensor(tensor_ids, dtype=torch.int32, device=device),
            torch.tensor(tasks, dtype=torch.int64, device=device),
            torch.tensor(begins, dtype=torch.int64, device=device),
        )
    return _layout_cache[key]


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _table(rows, device) -> Tensor:
    return torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)


def task_axpby_triton(
    x: Sequence[Tensor],
    y: Sequence[Tensor],
    alpha: Sequence[Tensor],
    x_scale: Optional[Tensor],
    y_scale: Optional[Tensor],
    out: Optional[Sequence[Tensor]] = None,
) -> list[Tensor]:
    """Launch ``_task_axpby_kernel`` over all tensors; inputs are checked by the caller.

    ``out`` may be ``x`` itself (in place): each program loads its block before storing it.
    """
    device, dtype = x[0].device, x[0].dtype
    num_tasks = x[0].shape[0]
    out = [torch.empty_like(t) for t in x] if out is None else list(out)
    numels = tuple(t.numel() for t in x)
    rows = (
        [t.data_ptr() for t in x]
        + [t.data_ptr() for t in y]
        + [t.data_ptr() for t in alpha]
        + [t.data_ptr() for t in out]
        + [n // num_tasks for n in numels]
        + [t.numel() for t in alpha]
        + list(numels)
    )
    block_tensor, block_start = _axpby_blocks(numels, device)
    if block_tensor.numel() == 0:
        return out
    table = _table(rows, device)
    dummy = x[0]
    _task_axpby_kernel[(block_tensor.numel(),)](
        table,
        block_tensor,
        block_start,
        x_scale if x_scale is not None else dummy,
        y_scale if y_scale is not None else dummy,
        len(x),
        HAS_X_SCALE=x_scale is not None,
        HAS_Y_SCALE=y_scale is not None,
        DTYPE=_TL_DTYPES[dtype],
        ACC=_acc(dtype),
        BLOCK=_BLOCK,
    )
    return out


def task_dot_triton(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Launch ``_task_dot_kernel``: per-program partial sums, then a fixed-order sum per task."""
    device, dtype = a[0].device, a[0].dtype
    num_tasks = a[0].shape[0]
    inners = tuple(t.numel() // num_tasks for t in a)
    block_tensor, block_task, block_begin = _dot_blocks(inners, num_tasks, device)
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if block_tensor.numel() == 0:
        return torch.zeros(num_tasks, dtype=dtype, device=device)
    partial = torch.empty(block_tensor.numel(), dtype=acc_dtype, device=device)
    table = _table([t.data_ptr() for t in a] + [t.data_ptr() for t in b] + list(inners), device)
    _task_dot_kernel[(block_tensor.numel(),)](
        table,
        block_tensor,
        block_task,
        block_begin,
        partial,
        len(a),
        DTYPE=_TL_DTYPES[dtype],
        ACC=_acc(dtype),
        BLOCK=_BLOCK,
    )
    return partial.view(num_tasks, -1).sum(1, dtype=torch.float64).to(dtype)
