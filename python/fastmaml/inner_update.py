"""The batched inner-loop update and the finite-difference HVP arithmetic, on the fused ops."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _validation as V
from .ops.multi_tensor import (
    StepSizes,
    _check_pair,
    _task_axpby_checked,
    _task_axpby_inplace_checked,
    task_dot,
)
from .reference.inner_update import CLIP_EPS

_FD_SCHEMES = ("central", "forward")


def _task_norm(tensors: Sequence[Tensor], backend: str) -> Tensor:
    sq = task_dot(tensors, tensors, backend=backend)
    # clamp keeps d||g||/dg finite at g = 0 (where the norm has no derivative anyway)
    return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()


def inner_sgd_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    lr: StepSizes,
    *,
    max_grad_norm: Optional[float] = None,
    backend: str = "auto",
    check_finite: bool = True,
) -> list[Tensor]:
    """One inner-loop SGD step for a batch of tasks: ``phi_i = theta_i - lr_i * c_t * g_i``.

    All tensors of all tasks are updated in one fused pass. Differentiable with respect to
    ``params``, ``grads`` and tensor step sizes, to any order (the MAML inner loop differentiates
    through it).

    Args:
        params: parameter tensors ``[T, ...]`` (one per model tensor, leading task dimension).
        grads: their gradients, shaped like ``params``.
        lr: the step size. A float or scalar tensor (plain MAML); a list with one scalar per tensor
            (MAML++ per-layer-per-step: pass that step's list); or a list of tensors shaped like
            each parameter without the task dimension (Meta-SGD per-element step sizes).
        max_grad_norm: if given, each task's gradient (all tensors together) is scaled by
            ``c_t = min(1, max_grad_norm / (||g_t|| + 1e-6))``, as ``clip_grad_norm_`` does per task.
        backend: ``"auto" | "cpu" | "cuda" | "triton" | "reference"``.
        check_finite: reject non-finite step sizes.

    Returns:
        The updated parameters, a list shaped like ``params``.

    Example:
        >>> theta = [torch.randn(8, 64, 1, 3, 3), torch.randn(8, 64)]
        >>> grads = [torch.randn_like(t) for t in theta]
        >>> phi = inner_sgd_step(theta, grads, [0.4, 0.1])  # per-tensor step sizes
    """
    params, grads, scale = _prepare_step(params, grads, max_grad_norm, backend)
    return _task_axpby_checked(params, grads, lr, None, scale, backend, check_finite, "lr")


def inner_sgd_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    lr: StepSizes,
    *,
    max_grad_norm: Optional[float] = None,
    backend: str = "auto",
    check_finite: bool = True,
) -> list[Tensor]:
    """In-place ``inner_sgd_step``: ``params`` are overwritten with ``phi``.

    For first-order MAML, Reptile and test-time fine-tuning, where the intermediate parameters
    need not be kept: no allocation, one pass. Raises ``ValueError`` if grad mode is on and any
    input requires grad (autograd would need the overwritten values); use it under
    ``torch.no_grad()``. Arguments as ``inner_sgd_step``.

    Returns:
        ``params``, updated.

    Example:
        >>> phi = [t.clone() for t in theta]
        >>> with torch.no_grad():
        ...     for _ in range(10):
        ...         inner_sgd_step_(phi, support_grads(phi), 0.01)
    """
    params, grads, scale = _prepare_step(params, grads, max_grad_norm, backend)
    return _task_axpby_inplace_checked(params, grads, lr, None, scale, backend, check_finite, "lr", "params", "grads")


def _prepare_step(params, grads, max_grad_norm, backend):
    params, grads = _check_pair(params, grads, "params", "grads")
    scale = None
    if max_grad_norm is not None:
        if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
            raise TypeError(f"max_grad_norm must be a positive float, got {type(max_grad_norm).__name__}")
        if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a positive finite float, got {max_grad_norm}")
        scale = (max_grad_norm / (_task_norm(grads, backend) + CLIP_EPS)).clamp(max=1.0)
    return params, grads, scale


def _check_scheme(scheme: str) -> None:
    if scheme not in _FD_SCHEMES:
        raise ValueError(f"scheme must be one of {_FD_SCHEMES}, got {scheme!r}")


def fd_step_size(
    params: Sequence[Tensor], v: Sequence[Tensor], *, scheme: str = "central", backend: str = "auto"
) -> Tensor:
    """Per-task finite-difference step ``r_t`` for ``Hv ~ (g(x + r v) - g(x -/+ ...)) / ...``.

    ``r_t = c * (1 + ||x_t||) / ||v_t||`` with ``c = sqrt(eps)`` for forward differences and
    ``c = eps^(1/3)`` for central differences (``eps`` the dtype's machine epsilon).

    Error model: with ``L3`` a bound on the third derivative and ``||g||`` the gradient size, the
    forward difference errs by about ``r ||v||^2 L3 / 2 + 2 eps ||g|| / r`` and the central one by
    ``r^2 ||v||^3 L3 / 6 + eps ||g|| / r`` (truncation + rounding, relative to ``||v||``). The
    choices above balance the two terms when ``||g||`` and ``L3`` are of the order of
    ``1 + ||x||``. Where they are not (piecewise-linear nets, where the Hessian jumps), pass an
    explicit ``r`` to ``fd_perturb`` instead.

    Args:
        params: ``x``, tensors ``[T, ...]``.
        v: the direction, shaped like ``params``.
        scheme: ``"central"`` or ``"forward"``.
        backend: backend of the norm reductions.

    Returns:
        ``[T]`` step sizes (for a zero direction, the step for ``||v|| = 1``).
    """
    _check_scheme(scheme)
    params = V.check_tensor_list(params, "params")
    v = V.check_tensor_list(v, "v")
    V.check_same_length(params=params, v=v)
    V.check_task_tensors(params, "params")
    V.check_task_tensors(v, "v", like=params)
    eps = torch.finfo(params[0].dtype).eps
    c = math.sqrt(eps) if scheme == "forward" else eps ** (1.0 / 3.0)
    with torch.no_grad():  # a step size is a constant of the difference formula
        x_norm = task_dot(params, params, backend=backend).sqrt()
        v_norm = task_dot(v, v, backend=backend).sqrt()
        v_norm = torch.where(v_norm > 0, v_norm, torch.ones_like(v_norm))
        return c * (1 + x_norm) / v_norm


def fd_perturb(
    params: Sequence[Tensor], v: Sequence[Tensor], r: Tensor, *, sign: float = 1.0, backend: str = "auto"
) -> list[Tensor]:
    """``x_i + sign * r_t * v_i`` for every tensor of every task, in one fused pass.

    Args:
        params: ``x``, tensors ``[T, ...]``.
        v: the direction, shaped like ``params``.
        r: ``[T]`` per-task steps (see ``fd_step_size``).
        sign: ``+1.0`` or ``-1.0``.
        backend: ``"auto" | "cpu" | "cuda" | "triton" | "reference"``.
    """
    params, v = _check_pair(params, v, "params", "v")
    V.check_task_vector(r, "r", params[0].shape[0], params[0])
    if sign not in (1.0, -1.0):
        raise ValueError(f"sign must be +1.0 or -1.0, got {sign}")
    return _task_axpby_checked(params, v, -float(sign), None, r, backend, True)


def fd_combine(
    g_plus: Sequence[Tensor],
    g_base: Sequence[Tensor],
    r: Tensor,
    *,
    scheme: str = "central",
    backend: str = "auto",
) -> list[Tensor]:
    """Combine gradients into the finite-difference HVP.

    ``scheme="central"``: ``(g(x + r v) - g(x - r v)) / (2 r)`` with ``g_base = g(x - r v)``.
    ``scheme="forward"``: ``(g(x + r v) - g(x)) / r`` with ``g_base`` the saved ``g(x)``.

    Args:
        g_plus: ``g(x + r v)``, tensors ``[T, ...]``.
        g_base: ``g(x - r v)`` (central) or ``g(x)`` (forward), shaped like ``g_plus``.
        r: ``[T]`` per-task steps used for the perturbation.
        scheme: ``"central"`` or ``"forward"``.
        backend: ``"auto" | "cpu" | "cuda" | "triton" | "reference"``.
    """
    _check_scheme(scheme)
    g_plus, g_base = _check_pair(g_plus, g_base, "g_plus", "g_base")
    V.check_task_vector(r, "r", g_plus[0].shape[0], g_plus[0])
    if bool((r.detach() == 0).any()) or not bool(torch.isfinite(r.detach()).all()):
        raise ValueError("r must be finite and nonzero for every task")
    inv = 1.0 / (2 * r if scheme == "central" else r)
    return _task_axpby_checked(g_plus, g_base, 1.0, inv, inv, backend, True)
