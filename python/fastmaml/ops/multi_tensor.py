"""The multi-tensor task ops: one call updates or reduces every tensor of every task.

``task_axpby``: ``out_i[t] = x_scale[t] * x_i[t] - alpha_i * y_scale[t] * y_i[t]``
``task_dot``:   ``out[t] = sum_i <a_i[t], b_i[t]>``

They are the arithmetic under the inner-loop update, the finite-difference HVP and batched
conjugate gradient. Backward passes are written with the same ops (and plain torch ops), so every
derivative is itself differentiable: second order comes for free.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _validation as V
from .._extension import _C
from ..backend import resolve_backend
from ..reference.multi_tensor import _per_task, task_axpby_reference, task_dot_reference

StepSizes = Union[float, Tensor, Sequence[Union[float, Tensor]]]


# ----------------------------------------------------------------------------------------------
# Backward formulas, shared by every non-reference backend (the reference is plain autograd).
# ----------------------------------------------------------------------------------------------
def _axpby_setup_context(ctx, inputs, output):
    x, y, alpha, x_scale, y_scale = inputs
    n = len(x)
    ctx.n = n
    ctx.has_xs = x_scale is not None
    ctx.has_ys = y_scale is not None
    ctx.x_needs = any(t.requires_grad for t in x)
    ctx.x_scale_needs = x_scale is not None and x_scale.requires_grad
    # x is only needed for d/dx_scale; skip keeping it alive otherwise.
    saved_x = list(x) if ctx.x_scale_needs else []
    ctx.n_saved_x = len(saved_x)
    extra = [s for s in (x_scale, y_scale) if s is not None]
    ctx.save_for_backward(*saved_x, *y, *alpha, *extra)


def _axpby_backward(ctx, grads):
    n = ctx.n
    saved = ctx.saved_tensors
    x = saved[: ctx.n_saved_x]
    y = saved[ctx.n_saved_x : ctx.n_saved_x + n]
    alpha = saved[ctx.n_saved_x + n : ctx.n_saved_x + 2 * n]
    rest = list(saved[ctx.n_saved_x + 2 * n :])
    x_scale = rest.pop(0) if ctx.has_xs else None
    y_scale = rest.pop(0) if ctx.has_ys else None
    grads = [g if g is not None else torch.zeros_like(yi) for g, yi in zip(grads, y)]
    need_x, need_y, need_alpha, need_xs, need_ys = ctx.needs_input_grad

    grad_x = grad_y = grad_alpha = grad_xs = grad_ys = None
    if need_x:
        if x_scale is None:
            grad_x = list(grads)  # identity: no copy
        else:
            zero = [grads[0].new_zeros(())] * n
            grad_x = task_axpby(grads, grads, zero, x_scale=x_scale, check_finite=False)
    if need_y:
        # -alpha * y_scale * g in one fused pass (x = y = g, x_scale = 0).
        zeros = grads[0].new_zeros(grads[0].shape[0])
        grad_y = task_axpby(grads, grads, list(alpha), x_scale=zeros, y_scale=y_scale, check_finite=False)
    if need_alpha:
        grad_alpha = []
        for g, yi, ai in zip(grads, y, alpha):
            prod = g * yi if y_scale is None else _per_task(y_scale, g) * g * yi
            red = prod.sum() if ai.numel() == 1 else prod.sum(0)
            grad_alpha.append(-red.reshape(ai.shape))
    if need_xs:
        grad_xs = task_dot(grads, list(x))
    if need_ys:
        scaled_y = [(ai.reshape(()) if ai.numel() == 1 else ai.reshape(yi.shape[1:])) * yi for ai, yi in zip(alpha, y)]
        grad_ys = -task_dot(grads, scaled_y)
    return grad_x, grad_y, grad_alpha, grad_xs, grad_ys


def _dot_setup_context(ctx, inputs, output):
    a, b = inputs
    ctx.n = len(a)
    ctx.save_for_backward(*a, *b)


def _dot_backward(ctx, grad_out):
    saved = ctx.saved_tensors
    a, b = saved[: ctx.n], saved[ctx.n :]
    need_a, need_b = ctx.needs_input_grad
    grad_a = [_per_task(grad_out, bi) * bi for bi in b] if need_a else None
    grad_b = [_per_task(grad_out, ai) * ai for ai in a] if need_b else None
    return grad_a, grad_b


def _register_native_autograd():
    from .._extension import HAS_NATIVE

    if not HAS_NATIVE:
        return
    torch.library.register_autograd("fastmaml::task_axpby", _axpby_backward, setup_context=_axpby_setup_context)
    torch.library.register_autograd("fastmaml::task_dot", _dot_backward, setup_context=_dot_setup_context)

    @torch.library.register_fake("fastmaml::task_axpby")
    def _(x, y, alpha, x_scale, y_scale):
        return [torch.empty_like(t) for t in x]

    @torch.library.register_fake("fastmaml::task_dot")
    def _(a, b):
        return a[0].new_empty(a[0].shape[0])

    @torch.library.register_fake("fastmaml::task_axpby_")
    def _(x, y, alpha, x_scale, y_scale):
        return None


_register_native_autograd()


# ----------------------------------------------------------------------------------------------
# Triton ops (custom ops defined in Python, so autograd attaches the same way).
# ----------------------------------------------------------------------------------------------
_triton_ops = None


def _get_triton_ops():
    global _triton_ops
    if _triton_ops is None:
        from ..kernels import multi_tensor as K

        @torch.library.custom_op("fastmaml::task_axpby_triton", mutates_args=())
        def task_axpby_triton(
            x: list[Tensor], y: list[Tensor], alpha: list[Tensor], x_scale: Optional[Tensor], y_scale: Optional[Tensor]
        ) -> list[Tensor]:
            return K.task_axpby_triton(x, y, alpha, x_scale, y_scale)

        @task_axpby_triton.register_fake
        def _(x, y, alpha, x_scale, y_scale):
            return [torch.empty_like(t) for t in x]

        @torch.library.custom_op("fastmaml::task_dot_triton", mutates_args=())
        def task_dot_triton(a: list[Tensor], b: list[Tensor]) -> Tensor:
            return K.task_dot_triton(a, b)

        @task_dot_triton.register_fake
        def _(a, b):
            return a[0].new_empty(a[0].shape[0])

        @torch.library.custom_op("fastmaml::task_axpby_triton_", mutates_args=("x",))
        def task_axpby_triton_(
            x: list[Tensor], y: list[Tensor], alpha: list[Tensor], x_scale: Optional[Tensor], y_scale: Optional[Tensor]
        ) -> None:
            K.task_axpby_triton(x, y, alpha, x_scale, y_scale, out=x)

        task_axpby_triton.register_autograd(_axpby_backward, setup_context=_axpby_setup_context)
        task_dot_triton.register_autograd(_dot_backward, setup_context=_dot_setup_context)
        _triton_ops = (task_axpby_triton, task_dot_triton, task_axpby_triton_)
    return _triton_ops


# ----------------------------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------------------------
_CONSTANTS: dict = {}


def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached 0-dim tensor for a Python step size: saves a host-to-device copy per call."""
    if torch.compiler.is_compiling():  # traced code must create its constants, not capture ours
        return torch.tensor(value, dtype=dtype, device=device)
    key = (value, dtype, device)
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) > 256:  # step sizes are few; a schedule that sweeps many must not grow this
            _CONSTANTS.clear()
        with torch.inference_mode(False):  # an inference tensor could not be saved for backward later
            t = _CONSTANTS[key] = torch.tensor(value, dtype=dtype, device=device)
    return t


def _normalize_alpha(alpha: StepSizes, x: Sequence[Tensor], check_finite: bool, name: str = "alpha") -> list[Tensor]:
    """Turn a step size spec into one tensor per x_i: 1 element, or x_i.shape[1:]."""
    n, like = len(x), x[0]
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):  # the common case, kept cheap
        if check_finite and not math.isfinite(alpha):
            raise ValueError(f"{name} must be finite, got {alpha}")
        return [_constant(float(alpha), like.dtype, like.device)] * n
    if isinstance(alpha, (list, tuple)):
        if len(alpha) != n:
            raise ValueError(f"{name} must have one entry per tensor: expected {n}, got {len(alpha)}")
        items = list(alpha)
    else:
        items = [alpha] * n
    out = []
    dtype, device = like.dtype, like.device
    for i, a in enumerate(items):
        if isinstance(a, bool) or not isinstance(a, (int, float, Tensor)):
            raise TypeError(f"{name}[{i}] must be a float or a tensor, got {type(a).__name__}")
        if not isinstance(a, Tensor):
            if check_finite and not math.isfinite(a):
                raise ValueError(f"{name}[{i}] must be finite, got {a}")
            out.append(_constant(float(a), dtype, device))
            continue
        inner = tuple(x[i].shape[1:])
        if a.numel() != 1 and tuple(a.shape) != inner:
            raise ValueError(
                f"{name}[{i}] has shape {tuple(a.shape)}; expected a scalar or the parameter shape without "
                f"the task dimension {inner}"
            )
        if a.dtype != like.dtype or a.device != like.device:
            raise TypeError(f"{name}[{i}] is {a.dtype} on {a.device}, expected {like.dtype} on {like.device}")
        if check_finite:
            V.check_finite(a, f"{name}[{i}]")
        out.append(a if a.is_contiguous() else a.contiguous())
    return out


def _contiguous(ts: Sequence[Tensor]) -> list[Tensor]:
    return [t if t.is_contiguous() else t.contiguous() for t in ts]


def task_axpby(
    x: Sequence[Tensor],
    y: Sequence[Tensor],
    alpha: StepSizes,
    x_scale: Optional[Tensor] = None,
    y_scale: Optional[Tensor] = None,
    *,
    backend: str = "auto",
    check_finite: bool = True,
) -> list[Tensor]:
    """Fused multi-tensor ``out_i[t] = x_scale[t] * x_i[t] - alpha_i * y_scale[t] * y_i[t]``.

    One pass over all tensors of all tasks (one kernel launch on GPU).

    Args:
        x: tensors ``[T, ...]``, one floating dtype and device.
        y: tensors shaped like ``x``.
        alpha: a float, a scalar tensor, or a list with one entry per tensor, each a float, a
            scalar tensor or a tensor shaped ``x_i.shape[1:]`` (per element, shared by the tasks).
        x_scale: optional ``[T]`` per-task factor on ``x`` (1 if omitted).
        y_scale: optional ``[T]`` per-task factor on ``y`` (1 if omitted).
        backend: ``"auto" | "cpu" | "cuda" | "triton" | "reference"``.
        check_finite: reject non-finite step sizes (costs a device sync for tensor step sizes).

    Returns:
        A list of new tensors shaped like ``x``. Differentiable in every tensor input, to any order.

    Example:
        >>> theta = [torch.randn(4, 3, 5), torch.randn(4, 5)]
        >>> grads = [torch.randn_like(t) for t in theta]
        >>> phi = task_axpby(theta, grads, 0.1)  # theta - 0.1 * grads
    """
    x, y = _check_pair(x, y)
    return _task_axpby_checked(x, y, alpha, x_scale, y_scale, backend, check_finite)


def _check_pair(x, y, x_name: str = "x", y_name: str = "y") -> tuple[list[Tensor], list[Tensor]]:
    x = V.check_tensor_list(x, x_name)
    y = V.check_tensor_list(y, y_name)
    V.check_same_length(**{x_name: x, y_name: y})
    V.check_task_tensors(x[:1], x_name)
    # One compiled pass over every tensor's dtype, device and shape (~1 us for conv4's 18 tensors
    # against ~20 us of Python attribute reads); the Python checks run when it finds a problem (or
    # without the compiled module), and they raise the error that names it.
    if _C is None or _C.first_mismatched_pair(x, y) >= 0:
        V.check_task_tensors(x, x_name)
        V.check_task_tensors(y, y_name, like=x)
    return x, y


def _task_axpby_checked(x, y, alpha, x_scale, y_scale, backend, check_finite, alpha_name="alpha") -> list[Tensor]:
    """``task_axpby`` once ``x`` and ``y`` have passed ``_check_pair`` (callers that checked them
    under their own argument names skip a second pass over every tensor)."""
    num_tasks = x[0].shape[0]
    alpha = _normalize_alpha(alpha, x, check_finite, alpha_name)
    if x_scale is not None:
        x_scale = V.check_task_vector(x_scale, "x_scale", num_tasks, x[0]).contiguous()
    if y_scale is not None:
        y_scale = V.check_task_vector(y_scale, "y_scale", num_tasks, x[0]).contiguous()
    chosen = resolve_backend(x[0].device, backend)
    if chosen == "reference":
        return task_axpby_reference(x, y, alpha, x_scale, y_scale)
    x, y = _contiguous(x), _contiguous(y)
    if chosen == "triton":
        return list(_get_triton_ops()[0](x, y, alpha, x_scale, y_scale))
    if not _needs_graph(x, y, alpha, x_scale, y_scale):
        with torch._C._AutoDispatchBelowAutograd():  # skips the Python autograd wrapper (~12 us a call)
            return list(torch.ops.fastmaml.task_axpby.default(x, y, alpha, x_scale, y_scale))
    return list(torch.ops.fastmaml.task_axpby(x, y, alpha, x_scale, y_scale))


def _needs_graph(*groups) -> bool:
    """Whether autograd must record a call on these tensors (lists of tensors or single tensors/None)."""
    if not torch.is_grad_enabled():
        return False
    for g in groups:
        if isinstance(g, Tensor):
            if g.requires_grad:
                return True
        elif g is not None and any(t.requires_grad for t in g):
            return True
    return False


def task_dot(a: Sequence[Tensor], b: Sequence[Tensor], *, backend: str = "auto") -> Tensor:
    """Per-task inner product over a list of tensors: ``out[t] = sum_i <a_i[t], b_i[t]>``.

    Args:
        a: tensors ``[T, ...]``.
        b: tensors shaped like ``a``.
        backend: ``"auto" | "cpu" | "cuda" | "triton" | "reference"``.

    Returns:
        ``[T]`` tensor in the inputs' dtype (accumulated in float64 on the native backends).

    Example:
        >>> g = [torch.randn(8, 10), torch.randn(8, 3, 3)]
        >>> sq_norms = task_dot(g, g)  # [8]
    """
    a = V.check_tensor_list(a, "a")
    b = V.check_tensor_list(b, "b")
    V.check_same_length(a=a, b=b)
    V.check_task_tensors(a, "a")
    V.check_task_tensors(b, "b", like=a)
    chosen = resolve_backend(a[0].device, backend)
    if chosen == "reference":
        return task_dot_reference(a, b)
    a, b = _contiguous(a), _contiguous(b)
    if chosen == "triton":
        return _get_triton_ops()[1](a, b)
    return torch.ops.fastmaml.task_dot(a, b)


def _check_inplace_allowed(x: Sequence[Tensor], others: dict, x_name: str = "x", listed=()) -> None:
    """The in-place update must never overwrite what autograd needs, nor read what it writes.

    ``others`` maps argument names to tensor lists; its first entry is the one read alongside ``x``.
    ``listed``: names of the other arguments that were given as lists (errors index into them).
    """
    y_name, y = next(iter(others.items()))
    listed = (x_name, y_name, *listed)
    if torch.is_grad_enabled():
        for name, tensors in {x_name: x, **others}.items():
            for i, t in enumerate(tensors):
                if t is not None and t.requires_grad:
                    label = f"{name}[{i}]" if len(tensors) > 1 or name in listed else name
                    raise ValueError(
                        f"{label} requires grad: the in-place update would overwrite values autograd "
                        "needs. Use the out-of-place op (e.g. inner_sgd_step), or call this one under "
                        "torch.no_grad() to update parameters as an optimizer does."
                    )
    if _C is not None and _C.first_unsafe_inplace_pair(x, y) < 0:  # the checks below, in one compiled pass
        return
    for i, t in enumerate(x):
        if not t.is_contiguous():
            raise ValueError(f"{x_name}[{i}] must be contiguous to be updated in place, got strides {t.stride()}")
    for i, (xi, yi) in enumerate(zip(x, y)):
        # x is contiguous (checked above) and y is made contiguous before the kernel reads it, so
        # the byte ranges say whether they share memory; the exact same tensor is harmless.
        x_start, y_start = xi.data_ptr(), yi.data_ptr()
        if x_start != y_start and yi.is_contiguous():
            size = xi.numel() * xi.element_size()
            if x_start < y_start + size and y_start < x_start + size:
                raise ValueError(f"{y_name}[{i}] overlaps {x_name}[{i}] in memory; the in-place update needs "
                                 "separate tensors")


def task_axpby_(
    x: Sequence[Tensor],
    y: Sequence[Tensor],
    alpha: StepSizes,
    x_scale: Optional[Tensor] = None,
    y_scale: Optional[Tensor] = None,
    *,
    backend: str = "auto",
    check_finite: bool = True,
) -> list[Tensor]:
    """In-place ``task_axpby``: writes ``x_scale[t] * x_i[t] - alpha_i * y_scale[t] * y_i[t]`` into ``x``.

    For first-order and no-grad inner loops, where the intermediate parameters need not be kept:
    no allocation, 3 memory streams per element. Refuses (``ValueError``) any input that requires
    grad while grad mode is on, since autograd would need the overwritten values; under
    ``torch.no_grad()`` it bumps the tensors' version counters, so a later backward through a
    graph that saved them fails loudly instead of using corrupted values.

    Args and step-size forms as ``task_axpby``.

    Returns:
        ``x`` (the same tensor objects, updated).

    Example:
        >>> theta = [torch.randn(4, 10)]
        >>> with torch.no_grad():
        ...     task_axpby_(theta, [torch.randn(4, 10)], 0.1)
    """
    x, y = _check_pair(x, y)
    return _task_axpby_inplace_checked(x, y, alpha, x_scale, y_scale, backend, check_finite)


def _task_axpby_inplace_checked(x, y, alpha, x_scale, y_scale, backend, check_finite, alpha_name="alpha",
                                x_name="x", y_name="y") -> list[Tensor]:
    """``task_axpby_`` once ``x`` and ``y`` have passed ``_check_pair`` (names: the caller's arguments)."""
    num_tasks = x[0].shape[0]
    if isinstance(alpha, (list, tuple)):
        alpha_tensors = [a for a in alpha if isinstance(a, Tensor)]
    else:
        alpha_tensors = [alpha] if isinstance(alpha, Tensor) else []
    _check_inplace_allowed(x, {y_name: y, alpha_name: alpha_tensors, "x_scale": [x_scale], "y_scale": [y_scale]},
                           x_name, listed=(alpha_name,) if isinstance(alpha, (list, tuple)) else ())
    alpha = _normalize_alpha(alpha, x, check_finite, alpha_name)
    if x_scale is not None:
        x_scale = V.check_task_vector(x_scale, "x_scale", num_tasks, x[0]).contiguous()
    if y_scale is not None:
        y_scale = V.check_task_vector(y_scale, "y_scale", num_tasks, x[0]).contiguous()
    chosen = resolve_backend(x[0].device, backend)
    y = _contiguous(y)
    with torch.no_grad():
        if chosen == "reference":
            for xi, oi in zip(x, task_axpby_reference(x, y, alpha, x_scale, y_scale)):
                xi.copy_(oi)
            return x
        if chosen == "triton":
            _get_triton_ops()[2](x, y, alpha, x_scale, y_scale)
        else:
            with torch._C._AutoDispatchBelowAutograd():  # nothing to record: no grad mode, checked above
                torch.ops.fastmaml.task_axpby_.default(x, y, alpha, x_scale, y_scale)
            # A compiled op has no ADInplaceOrView kernel: bump the versions as x.add_() would.
            torch.autograd.graph.increment_version(x)
    return x
