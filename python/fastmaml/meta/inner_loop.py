"""The batched inner loop: K steps of ``phi_{k+1} = phi_k - alpha_k * grad L_support(phi_k)`` for T tasks.

Step sizes (``lr``), in every form of ``fastmaml.inner_sgd_step``, learnable when they are tensors
that require grad:

* a float or a 0-dim tensor: one step size for every tensor and step (MAML);
* a list with one entry per adapted tensor, each a scalar or a tensor shaped like the parameter
  (Meta-SGD): the same for every step;
* a list of K such lists (MAML++ LSLR: per tensor, per step).

``lslr_step_sizes`` and ``meta_sgd_step_sizes`` build learnable ones.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..ops.multi_tensor import task_axpby
from .functional import TaskModel, check_losses_finite, without_autocast
from .fused_mlp import LowRank, ShiftedLowRank, dense
from .hvp import batched_grad

StepSpec = Union[float, Tensor, Sequence]


def check_num_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise TypeError(f"num_steps must be an int >= 0, got {type(num_steps).__name__}")
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0 (the number of inner steps K), got {num_steps}")
    return num_steps


def normalize_step_sizes(lr: StepSpec, num_steps: int, adapted_shapes: Sequence[tuple]):
    """Expand a step-size spec to ``per_step[k][i]`` (a float or a tensor) and list the tensors.

    Returns:
        ``(per_step, tensors)``: ``per_step`` has ``num_steps`` lists of ``len(adapted_shapes)``
        entries; ``tensors`` lists the distinct tensor entries (those can get meta-gradients), and
        ``per_step`` entries that are tensors are those same objects.
    """
    n = len(adapted_shapes)

    def entry(a, where):
        if isinstance(a, bool) or not isinstance(a, (int, float, Tensor)):
            raise TypeError(f"lr{where} must be a float or a tensor, got {type(a).__name__}")
        if isinstance(a, Tensor):
            if not a.is_floating_point():
                raise TypeError(f"lr{where} must be a floating point tensor, got {a.dtype}")
            return a
        if not math.isfinite(float(a)):
            raise ValueError(f"lr{where} must be finite, got {a}")
        return float(a)

    def per_tensor(spec, where):
        if isinstance(spec, (list, tuple, nn.ParameterList)):
            spec = list(spec)
            if len(spec) != n:
                raise ValueError(f"lr{where} must have one entry per adapted tensor: expected {n}, got {len(spec)}")
            out = []
            for i, (a, shape) in enumerate(zip(spec, adapted_shapes)):
                a = entry(a, f"{where}[{i}]")
                if isinstance(a, Tensor) and a.numel() != 1 and tuple(a.shape) != tuple(shape):
                    raise ValueError(f"lr{where}[{i}] has shape {tuple(a.shape)}; expected a scalar or the "
                                     f"parameter shape {tuple(shape)} (Meta-SGD)")
                out.append(a)
            return out
        a = entry(spec, where)
        if isinstance(a, Tensor) and a.numel() != 1:
            raise ValueError(f"lr{where} has shape {tuple(a.shape)}; a single step size must be a scalar "
                             f"(pass a list for per-tensor or per-element step sizes)")
        return [a] * n

    is_nested = isinstance(lr, nn.ModuleList) or (isinstance(lr, (list, tuple)) and (
        (len(lr) > 0 and isinstance(lr[0], (list, tuple, nn.ParameterList))) or (len(lr) == 0 and num_steps == 0)))
    if is_nested:
        if len(lr) != num_steps:
            raise ValueError(f"per-step lr (MAML++ LSLR) must have one list per inner step: expected "
                             f"{num_steps}, got {len(lr)}")
        per_step = [per_tensor(s, f"[{k}]") for k, s in enumerate(lr)]
    else:
        one = per_tensor(lr, "")
        per_step = [one for _ in range(num_steps)]
    tensors, seen = [], set()
    for step in per_step:
        for a in step:
            if isinstance(a, Tensor) and id(a) not in seen:
                seen.add(id(a))
                tensors.append(a)
    return per_step, tensors


def lslr_step_sizes(task_model: TaskModel, num_steps: int, init: float = 0.01, *, dtype=None, device=None):
    """Learnable MAML++ step sizes: one ``nn.Parameter`` scalar per adapted tensor per step.

    Returns:
        An ``nn.ModuleList`` of ``num_steps`` ``nn.ParameterList`` (pass it as ``lr``).

    Example:
        >>> lr = lslr_step_sizes(TaskModel(net, loss), num_steps=5, init=0.4)
    """
    shapes = _adapted_shapes(task_model)
    return nn.ModuleList([nn.ParameterList([nn.Parameter(torch.tensor(float(init), dtype=dtype, device=device))
                                            for _ in shapes]) for _ in range(check_num_steps(num_steps))])


def meta_sgd_step_sizes(task_model: TaskModel, init: float = 0.01, *, dtype=None, device=None):
    """Learnable Meta-SGD step sizes: one ``nn.Parameter`` per adapted tensor, shaped like it.

    Example:
        >>> lr = meta_sgd_step_sizes(TaskModel(net, loss), init=0.4)
    """
    return nn.ParameterList([nn.Parameter(torch.full(s, float(init), dtype=dtype, device=device))
                             for s in _adapted_shapes(task_model)])


def _adapted_shapes(task_model: TaskModel) -> list[tuple]:
    if task_model.context:
        return [(task_model.context_dim,)]
    return [tuple(t.shape) for t in task_model.theta_adapted()]


def detached_step(step: Sequence) -> list:
    return [a.detach() if isinstance(a, Tensor) else a for a in step]


def _step_from_shared(theta: Sequence[Tensor], grads: Sequence, step: Sequence) -> list:
    """``phi = theta - alpha * g`` when every task starts from the same ``theta``: a broadcast in
    plain torch ops (``task_axpby`` would first materialize ``theta`` T times; 1000 sinusoid-MLP
    tasks: 0.3 ms against 1.2-2.9 ms). A low-rank gradient of the fused MLP path with a scalar
    step size gives a ``ShiftedLowRank`` (``phi`` is never formed)."""
    out = []
    for th, g, a in zip(theta, grads, step):
        if isinstance(g, LowRank) and (not isinstance(a, Tensor) or a.numel() == 1):
            out.append(ShiftedLowRank(th, g.scale(-a)))
            continue
        g = dense(g)
        out.append(torch.add(th.unsqueeze(0), g, alpha=-a) if not isinstance(a, Tensor) else th.unsqueeze(0) - a * g)
    return out


def run_inner_loop(task_model: TaskModel, phi0: Sequence[Tensor], fixed: Sequence[Tensor],
                   support: tuple[Tensor, Tensor], per_step: Sequence[Sequence], *, keep_history: bool = False,
                   history_fixed_grads: bool = False, prox: Optional[float] = None,
                   check_finite: bool = True, shared_start: bool = False, batching: str = "auto",
                   keep_first_state: bool = False, low_rank_first_step: bool = False, first_step: int = 0,
                   rng_log=None):
    """K batched inner steps without an autograd graph (the forward pass of the meta-gradient engines).

    Args:
        task_model: the per-task loss.
        phi0: starting point, ``[T, ...]`` per adapted tensor, or without the task dimension
            when ``shared_start`` (every task starts from ``theta``: the first step then runs the
            layers once on all tasks' data, a plain conv / matmul instead of a grouped one).
        fixed: shared tensors the inner loop does not adapt.
        support: ``(x, y)`` stacked ``[T, N, ...]``.
        per_step: ``per_step[k][i]`` step sizes (floats or tensors, see ``normalize_step_sizes``).
        keep_history: return ``[(phi_k, grad_k, grad_fixed_k, shared_k)]`` for every step (the
            custom backward needs them; ``shared_k`` says ``phi_k`` has no task dimension).
        history_fixed_grads: also keep the per-task gradients w.r.t. ``fixed`` in the history.
        prox: iMAML's ``lam``: minimize ``L + lam/2 ||phi - phi0||^2`` instead.
        check_finite: raise naming the task when a support loss is not finite.
        shared_start: ``phi0`` has no task dimension.
        batching: ``"auto"``, ``"vmap"``, ``"loop"``, ``"stacked"``, ``"fused_mlp"`` or ``"fused_conv"`` over tasks
            (``fastmaml.meta.hvp``).
        keep_first_state: the fused MLP path keeps the first step's pass for an HVP at ``phi_0``
            (second-order MAML's last backward step); ignored by the other batchings.
        low_rank_first_step: the fused MLP path may return the first step's gradient as
            ``LowRank`` factors and ``phi_1`` as a ``ShiftedLowRank`` (in ``history`` and, for
            K = 1, the result): for callers that pass them only to ``batched_grad`` / ``hvp``,
            ``fastmaml.meta.fused_mlp.dense`` and ``LowRank.task_dot``.
        first_step: the index of the first of these steps in the caller's inner loop (for the
            messages of ``check_finite`` when a caller ran earlier steps itself).
        rng_log: a ``fastmaml.meta.rng.RngLog`` that records the random-number state before each
            step's support pass (for a backward that recomputes them).

    Returns:
        ``(phi_K, history, support_losses)``: ``phi_K`` is ``[T, ...]``; ``support_losses`` a
        ``[K, T]`` tensor (``[0, T]`` for K = 0).
    """
    num_tasks = support[0].shape[0]
    phi = [p.detach() for p in phi0]
    fixed = [f.detach() for f in fixed]
    shared = shared_start
    center = None
    history, losses = [], []
    for k, step in enumerate(per_step):
        if rng_log is not None:
            rng_log.mark()
        with torch.no_grad():
            first = k == 0 and shared and prox is None
            loss, g, gf = batched_grad(task_model.task_loss, phi, fixed, *support,
                                       wrt_fixed=history_fixed_grads, shared_params=shared, batching=batching,
                                       keep_state=keep_first_state and first, low_rank=low_rank_first_step and first)
        if check_finite:
            check_losses_finite(loss, f"inner step {first_step + k} (support loss)")
        losses.append(loss)
        if keep_history:
            history.append((phi, g, gf, shared))
        with torch.no_grad():
            if shared and prox is None:
                phi = _step_from_shared(phi, g, detached_step(step))
            else:
                phi = [dense(p) for p in phi]  # a ShiftedLowRank phi_1 from the first step
                if shared:
                    phi = [p.unsqueeze(0).expand(num_tasks, *p.shape) for p in phi]
                if prox is not None:
                    if center is None:
                        center = [p.contiguous() for p in phi]
                    # g + lam * (phi - center), fused
                    g = task_axpby(g, task_axpby(phi, center, 1.0, check_finite=False), -float(prox),
                                   check_finite=False)
                phi = task_axpby(phi, g, detached_step(step), check_finite=False)
            shared = False
    if shared:  # K = 0
        phi = [p.unsqueeze(0).expand(num_tasks, *p.shape) for p in phi]
    stacked = torch.stack(losses) if losses else phi[0].new_zeros(0, num_tasks)
    return phi, history, stacked


@without_autocast
def adapt(task_model: TaskModel, support: tuple[Tensor, Tensor], num_steps: int, lr: StepSpec,
          *, create_graph: bool = False):
    """The batched inner loop, differentiable when ``create_graph`` (the plain-autograd path).

    Args:
        task_model: the model and loss (``TaskModel``).
        support: ``(x, y)`` stacked ``[T, N, ...]``.
        num_steps: K >= 0.
        lr: step sizes (see the module docstring).
        create_graph: keep the graph of every step (second-order MAML by autograd; memory grows
            with K times the activations). Without it the result carries no graph.

    Returns:
        The adapted tensors ``phi_K``, each ``[T, ...]`` (CAVIA: the context ``[T, context_dim]``).

    Example:
        >>> tm = TaskModel(net, F.cross_entropy, adapt="head")
        >>> phi = adapt(tm, (xs, ys), num_steps=5, lr=0.4)
    """
    from .functional import check_task_data

    check_task_data(support, None)
    num_steps = check_num_steps(num_steps)
    theta_a = task_model.theta_adapted()
    per_step, _ = normalize_step_sizes(lr, num_steps, _adapted_shapes(task_model))
    fixed = task_model.theta_fixed()
    if not create_graph:
        phi = run_inner_loop(task_model, task_model.shared_start(theta_a), fixed, support, per_step,
                             shared_start=True)[0]
        return [p.contiguous() for p in phi]
    from ..reference.meta import inner_loop_reference

    return inner_loop_reference(task_model, support, per_step, create_graph=True)
