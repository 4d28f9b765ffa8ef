"""Helpers shared by the heads: input checks and the first-order-only autograd guard."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable, Optional

import torch
from torch import Tensor
from torch._C import _functions

from .. import _validation as V


class DeferredChecks:
    """Value checks of device tensors, read back to the host in one synchronisation.

    Each check of a CUDA tensor's values (finite? positive definite?) costs a round trip that
    drains the GPU's queue, after which the next kernels start from an empty queue (the R2-D2 head
    made 9 of them per call). Checks are collected as 0-dim bool tensors and verified together;
    only a failure pays for the diagnosis, which raises the same error as the immediate check, the
    first failed check in order.
    """

    def __init__(self):
        self._flags: list[Tensor] = []
        self._diagnoses: list[Callable[[], None]] = []

    def add(self, ok: Tensor, diagnose: Callable[[], None]) -> None:
        """``ok``: 0-dim bool tensor; ``diagnose()`` raises the detailed error (called only if not ok)."""
        self._flags.append(ok.reshape(()))
        self._diagnoses.append(diagnose)

    def verify(self) -> None:
        if not self._flags:
            return
        if bool(torch.stack(self._flags).all()):  # the one synchronisation
            return
        for ok, diagnose in zip(self._flags, self._diagnoses):
            if not bool(ok):
                diagnose()
        raise AssertionError("a deferred check failed but its diagnosis did not raise")  # pragma: no cover


def check_batched(t, name: str, ndim: int, shape_doc: str, checks: Optional[DeferredChecks] = None,
                  values: bool = True) -> Tensor:
    """``t`` is a floating tensor of rank ``ndim`` with at least one task; names ``shape_doc`` on error.

    The finite-values check runs now, or joins ``checks`` when given; ``values=False`` leaves it to
    the caller (who checks a product of ``t`` that cannot be finite unless ``t`` is)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor (float32 or float64), got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc} (rank {ndim}), got shape {tuple(t.shape)}")
    if t.shape[0] < 1:
        raise ValueError(f"{name} has T = 0 tasks; expected shape {shape_doc} with T >= 1")
    if values:
        check_values(t, name, checks)
    return t


def check_values(t: Tensor, name: str, checks: Optional[DeferredChecks] = None) -> None:
    """``t`` is finite: checked now, or joins ``checks`` when given; skipped for a tensor whose
    caller has just verified it (``values_verified``)."""
    if _already_verified(t):
        return
    if checks is None:
        check_finite_fast(t, name)
    else:
        checks.add(torch.isfinite(t.detach().sum()), lambda: V.check_finite(t, name))


def check_finite_through(product: Tensor, t: Tensor, name: str, what: str, checks: DeferredChecks) -> None:
    """``t``'s finite-values check, done on ``product``, a small result of a pass that read every
    entry of ``t`` and cannot be finite where ``t`` is not (a Gram diagonal: sums of squares; a
    product by the compiled thin kernels, which multiply every entry). Saves a pass over a large
    ``t``. If ``t`` is finite and the product is not, ``what`` overflowed, and that is the error."""
    def diagnose():
        V.check_finite(t, name)
        raise ValueError(f"{name}: {what} overflows {t.dtype} (entries too large); rescale the features")

    if not _already_verified(t):
        checks.add(torch.isfinite(product.detach()).all(), diagnose)


# Tensors whose values a caller has just verified (a head module before calling the functional
# op): the op skips its own pass over them. The features are the largest inputs (123 MB of query
# features at T = 256, d = 1600) and a second finite-check pass costs ~6% of the call.
_verified: contextvars.ContextVar[tuple] = contextvars.ContextVar("fastmaml_heads_verified", default=())


def _already_verified(t: Tensor) -> bool:
    return any(t is v for v in _verified.get())


@contextlib.contextmanager
def values_verified(*tensors: Tensor):
    """Inside the block, ``check_batched`` skips the finite-values check of these exact tensor
    objects (their shapes and dtypes are still checked). Only for values just verified."""
    token = _verified.set(_verified.get() + tensors)
    try:
        yield
    finally:
        _verified.reset(token)


def check_finite_fast(t: Tensor, name: str) -> None:
    """NaN/Inf check in one reduction pass without a mask tensor (the features are large).

    A NaN or Inf entry always makes the sum non-finite; only then (or on overflow of the sum) does
    the exact check run, which finds and names the entry.
    """
    if not bool(torch.isfinite(t.detach().sum())):
        V.check_finite(t, name)


def check_like(t: Tensor, name: str, like: Tensor, like_name: str) -> None:
    if t.dtype != like.dtype or t.device != like.device:
        raise TypeError(f"{name} is {t.dtype} on {t.device}, expected {like.dtype} on {like.device} like {like_name}")


def per_task_scalar(v, name: str, num_tasks: int, like: Tensor, allow_zero: bool = True,
                    checks: Optional[DeferredChecks] = None) -> Tensor:
    """A python number, 0-dim or [T] tensor -> a [T] tensor of ``like``'s dtype; must be finite and >= 0.

    A python number is checked on the host; a tensor's values now, or with ``checks`` when given."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v}")
        if v < 0 or (v == 0 and not allow_zero):
            raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {v}")
        # torch.full fills on the device: no host-to-device copy
        return torch.full((num_tasks,), v, dtype=like.dtype, device=like.device)
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a float or a tensor of shape [] or [{num_tasks}], got {type(v).__name__}")
    if v.dim() == 0:
        v = v.expand(num_tasks)
    if v.shape != (num_tasks,):
        raise ValueError(f"{name} must be a scalar or have shape [{num_tasks}] (one per task), got {tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {v.dtype}")
    if v.device != like.device:
        raise ValueError(f"{name} is on {v.device}, expected {like.device}")

    def diagnose():
        V.check_finite(v, name)
        bad = (v.detach() < 0) if allow_zero else (v.detach() <= 0)
        if bool(bad.any()):
            rel = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{name} must be {rel}, got {v.detach().min().item()} (task {int(bad.nonzero()[0])})")

    d = v.detach()
    ok = (torch.isfinite(d) & ((d >= 0) if allow_zero else (d > 0))).all()
    if checks is None:
        if not bool(ok):
            diagnose()
    else:
        checks.add(ok, diagnose)
    return v.to(like.dtype)


def check_labels(labels, name: str, num_tasks: int, n: int, n_way: int, device,
                 checks: Optional[DeferredChecks] = None) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be an int64 tensor of shape [T, n], got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype torch.int64, got {labels.dtype}")
    if labels.shape != (num_tasks, n):
        raise ValueError(f"{name} must have shape [{num_tasks}, {n}] (T, n_support), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device}, expected {device}")
    if labels.numel():
        lo, hi = torch.aminmax(labels)

        def diagnose():
            raise ValueError(f"{name} must lie in [0, n_way) = [0, {n_way}), got values in [{int(lo)}, {int(hi)}]")

        if checks is not None:
            checks.add((lo >= 0) & (hi < n_way), diagnose)
        elif int(lo) < 0 or int(hi) >= n_way:
            diagnose()
    return labels


def check_n_way(n_way) -> int:
    if isinstance(n_way, bool) or not isinstance(n_way, int):
        raise TypeError(f"n_way must be an int, got {type(n_way).__name__}")
    if n_way < 1:
        raise ValueError(f"n_way must be >= 1, got {n_way}")
    return n_way


def first_order_only(op_name: str):
    """Like ``torch.autograd.function.once_differentiable``, with an error that names the op.

    The backward runs without building a graph; differentiating its result again raises
    ``RuntimeError`` mentioning ``op_name`` (instead of silently returning wrong second derivatives).
    """
    message = (
        f"{op_name} is first-order only: its backward (implicit differentiation of the KKT conditions) "
        "cannot be differentiated again. Detach its output or use a head with second-order support "
        "(the ridge heads)."
    ).encode()

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(ctx, *args):
            with torch.no_grad():
                outputs = fn(ctx, *args)
            if not torch.is_grad_enabled():
                return outputs
            # create_graph=True: every gradient we return gets a node that raises if it is ever
            # differentiated (whether or not the incoming gradients require grad).
            outs = outputs if isinstance(outputs, tuple) else (outputs,)
            if all(v is None for v in outs):
                return outputs
            err_fn = _functions.DelayedError(message, len(outs))
            # Tie the error node to the forward's inputs saved in ctx, so that differentiating the
            # gradients w.r.t. those inputs reaches it (and raises) instead of "unused input".
            anchors = [t for t in ctx.saved_tensors if isinstance(t, Tensor) and t.requires_grad]

            def fake(v):
                if v is None:
                    return None
                v = v.detach()
                if anchors:
                    return v + sum(a.reshape(-1)[:1].sum() * 0 for a in anchors)
                return v.requires_grad_()

            res = err_fn(*[fake(v) for v in outs])
            return res

        return wrapper

    return deco
