"""CPU memory blocks reused within a meta-gradient call instead of fresh pages from the OS.

PyTorch's CPU allocator gives large blocks back to the OS when a tensor dies, so the engine's
per-task, per-step activations keep landing in fresh pages that the kernel faults in and zeroes
(40-60k minor faults in one second-order call on workload A at K = 10). Inside
``reuse_cpu_blocks()`` every CPU allocation of at least 32 KB goes through a reusing allocator
(compiled in ``csrc/cpu/block_reuse.cpp``): freed blocks are handed out again to requests of
their size class, kept and live blocks together stay within the scope's peak of live blocks (no
more memory than without reuse), and when the outermost scope ends the previous allocator is
back and the kept blocks are returned to the OS. ``MetaGradient`` and ``IMAMLGradient`` run
their forward and backward passes inside it, and so do the functional ``batched_grad`` and
``hvp`` (``fastmaml.meta.hvp``).

Off: ``FASTMAML_CPU_BLOCK_REUSE_MB=0`` (the limit on kept bytes, default 1024, read at the first
use), ``set_block_reuse_limit(0)``, inside ``no_block_reuse()``, under
``FASTMAML_BACKEND=reference``, or without the compiled module.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

from .._extension import _C
from ._native_cpu import references_requested

_enabled = contextvars.ContextVar("fastmaml_block_reuse", default=True)


@contextlib.contextmanager
def reuse_cpu_blocks():
    """Context: CPU allocations reuse the blocks freed inside it (nestable; see the module doc)."""
    if _C is None or not _enabled.get() or references_requested():
        yield
        return
    _C.block_reuse_enter()  # opens the scope even when it reports inactive: exit is paired
    try:
        yield
    finally:
        _C.block_reuse_exit()


@contextlib.contextmanager
def no_block_reuse():
    """Within this context ``reuse_cpu_blocks()`` does nothing (for comparisons)."""
    token = _enabled.set(False)
    try:
        yield
    finally:
        _enabled.reset(token)


def block_reuse_stats() -> dict:
    """``active`` (a scope is open and its allocator serves CPU allocations), ``depth``,
    ``cached_bytes`` / ``cached_blocks`` (kept free blocks), ``peak_cached_bytes``,
    ``live_blocks`` / ``live_bytes`` (its blocks in use), ``peak_live_bytes`` (in the current or
    last scope), ``limit_bytes``, ``hits``, ``misses`` (zeros without the compiled module)."""
    if _C is None:
        return {k: 0 for k in ("active", "depth", "cached_bytes", "cached_blocks", "peak_cached_bytes",
                               "live_blocks", "live_bytes", "peak_live_bytes", "limit_bytes", "hits", "misses")}
    return dict(_C.block_reuse_stats())


def set_block_reuse_limit(megabytes: float) -> None:
    """At most ``megabytes`` of freed blocks are kept inside a scope (0 turns the reuse off)."""
    if isinstance(megabytes, bool) or not isinstance(megabytes, (int, float)) or not megabytes >= 0:
        raise ValueError(f"megabytes must be a number >= 0, got {megabytes!r}")
    if _C is not None:
        _C.block_reuse_set_limit(int(megabytes * 2**20))


def reusing_cpu_blocks(fn):
    """Decorator: ``fn`` runs inside ``reuse_cpu_blocks()``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with reuse_cpu_blocks():
            return fn(*args, **kwargs)
    return wrapper
