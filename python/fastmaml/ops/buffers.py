"""Large CPU buffers for the heads' gradients, from a cache of freed blocks.

PyTorch's CPU allocator returns large blocks to the OS when a tensor dies, so a gradient as large
as the query features lands in fresh pages on every call, which the kernel must fault in and zero
first (here: 60 ms to write a [256, 75, 1600] float32 gradient into fresh memory, 12 ms into a
reused block). ``gradient_buffer`` takes its memory from a cache of the blocks of dead buffers,
as PyTorch's CUDA caching allocator does on GPUs (compiled in ``csrc/cpu/buffer_cache.cpp``).
The cache holds at most ``FASTMAML_CPU_BUFFER_CACHE_MB`` (default 2048, read at the first use;
0 turns it off) or what ``set_buffer_cache_limit`` sets; ``clear_buffer_cache`` gives its blocks
back to the OS. Elsewhere (GPUs, no compiled module) a plain ``new_empty``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .._extension import _C


_bypass = False  # set inside ``no_buffer_cache``: fresh allocations, the cached blocks kept


def gradient_buffer(like: Tensor, shape: Sequence[int]) -> Tensor:
    """Uninitialised tensor of ``shape`` with ``like``'s dtype and device (contiguous).

    Plain CPU tensors only: tensor subclasses (fake tensors while torch.compile traces, functional
    tensors) and compiled regions get ``new_empty``, which they know how to trace."""
    if (_C is not None and not _bypass and type(like) is torch.Tensor and like.device.type == "cpu"
            and not torch.compiler.is_compiling()):
        return _C.cached_empty(like, [int(s) for s in shape])
    return like.new_empty(tuple(shape))


def buffer_cache_stats() -> dict:
    """``cached_bytes``, ``cached_blocks``, ``limit_bytes``, ``hits``, ``misses`` (zeros without
    the compiled module)."""
    if _C is None:
        return {"cached_bytes": 0, "cached_blocks": 0, "limit_bytes": 0, "hits": 0, "misses": 0}
    return dict(_C.buffer_cache_stats())


def clear_buffer_cache() -> int:
    """Frees the cached blocks; returns how many bytes were freed."""
    return int(_C.buffer_cache_clear()) if _C is not None else 0


def set_buffer_cache_limit(megabytes: float) -> None:
    """At most ``megabytes`` of freed blocks are kept (0 turns the cache off)."""
    if isinstance(megabytes, bool) or not isinstance(megabytes, (int, float)) or not megabytes >= 0:
        raise ValueError(f"megabytes must be a number >= 0, got {megabytes!r}")
    if _C is not None:
        _C.buffer_cache_set_limit(int(megabytes * 2**20))


def bmm_into_gradient_buffer(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (``[T, m, k] @ [T, k, n]``) written into a ``gradient_buffer``; a plain product
    when a graph is needed (``out=`` products are not differentiable) or the dtypes differ."""
    if (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)) or a.dtype != b.dtype or a.dim() != 3:
        return a @ b
    return torch.bmm(a, b, out=gradient_buffer(a, (a.shape[0], a.shape[1], b.shape[2])))


class no_buffer_cache:
    """Context manager: inside it gradient buffers are fresh allocations, as PyTorch's allocator
    gives (for comparisons); the cached blocks stay for after it."""

    def __enter__(self):
        global _bypass
        self._outer = _bypass
        _bypass = True
        return self

    def __exit__(self, *exc):
        global _bypass
        _bypass = self._outer
        return False
