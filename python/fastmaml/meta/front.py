"""The front door: ``maml_loss`` (functional) and ``MAML`` (an ``nn.Module`` wrapper).

Both return the query loss; its ``.backward()`` fills ``.grad`` of the model's parameters and of
learnable step sizes with the meta-gradient of the chosen algorithm.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .functional import AdaptSpec, TaskModel, autocast_active, check_task_data
from .hvp import resolve_batching, resolve_hvp_mode
from .imaml import IMAMLGradient
from .inner_loop import StepSpec, _adapted_shapes, check_num_steps, lslr_step_sizes, meta_sgd_step_sizes, \
    normalize_step_sizes
from .maml import ALGORITHMS, EngineConfig, LrRef, MetaGradient

_REDUCTIONS = ("mean", "sum", "none")


def maml_loss(model, loss_fn: Optional[Callable] = None, support=None, query=None, *, num_steps: int = 1,
              lr: StepSpec = 0.01, algorithm: str = "maml", hvp_mode: str = "exact",
              adapt: AdaptSpec = "all", engine: str = "recursion", reduction: str = "mean",
              fd_dtype: Optional[torch.dtype] = None, imaml_lambda: float = 1.0, cg_iters: int = 20,
              cg_tol: float = 1e-10, check_finite: bool = True, batching: str = "auto",
              reuse_last_step: bool = True, keep_first_graph: bool = False,
              task_by_task: Optional[bool] = None, info: Optional[dict] = None) -> Tensor:
    """Query loss after a batched inner loop; ``.backward()`` gives the meta-gradients.

    Args:
        model: an ``nn.Module`` (its parameters are ``theta``; they must all require grad) or a
            ``TaskModel`` (then ``loss_fn`` and ``adapt`` come from it).
        loss_fn: ``loss_fn(output, target) -> scalar`` for one task.
        support: ``(x, y)`` with T tasks stacked: ``x [T, N, ...]``, ``y [T, N, ...]``.
        query: ``(x, y)`` stacked the same way (same T). Optional for Reptile.
        num_steps: inner steps K >= 0.
        lr: inner step sizes: float / scalar tensor, per-tensor list, per-element list (Meta-SGD)
            or per-step lists (MAML++ LSLR); tensors that require grad get meta-gradients.
        algorithm: ``"maml"`` (second order), ``"fomaml"``, ``"reptile"`` or ``"imaml"``.
        hvp_mode: HVPs of the second-order backward and of iMAML's CG: ``"exact"`` (default: the
            faster exact mode for the batching), ``"forward_over_reverse"``, ``"reverse_over_reverse"``,
            ``"fd_forward"``, ``"fd_central"``.
        adapt: ``"all"`` (MAML), ``"head"`` (ANIL), ``"context"`` (CAVIA), names or a predicate.
        engine: ``"recursion"`` (the custom backward: memory flat in activations) or
            ``"autograd"`` (the plain reference: a per-task loop with ``create_graph=True``;
            MAML and FOMAML only).
        reduction: ``"mean"`` / ``"sum"`` over tasks, or ``"none"`` for the ``[T]`` losses.
        fd_dtype: dtype of finite-difference gradient evaluations (``torch.float64`` recommended
            for float32 ReLU nets, see ``fastmaml.meta.hvp``).
        imaml_lambda: iMAML's proximal weight ``lam``.
        cg_iters, cg_tol: iMAML's CG iteration cap and relative residual tolerance.
        check_finite: raise (naming the task and step) when a loss is NaN or infinite.
        batching: how calls are batched over tasks: ``"vmap"`` (``torch.func.vmap``), ``"loop"``
            (plain autograd task by task), ``"fused_mlp"`` (hand-written gradients and HVPs as
            batched matmuls for a plain ``nn.Sequential`` of Linear layers and elementwise
            activations with an MSE / cross-entropy loss, ``fastmaml.meta.fused_mlp``; other
            models and losses take the ``"auto"`` choice), ``"fused_conv"`` (the same for conv /
            batch norm / ReLU / 2x2 max-pool nets with a linear head on the CPU, such as conv4,
            ``fastmaml.meta.fused_conv``) or ``"auto"`` (a fused path where one applies, else on
            the CPU a loop for image-like samples (``[T, N, C, H, W]``), T <= 16 or per-task
            batches of 32 samples or more, else vmap; on GPUs vmap;
            the same results either way, see ``resolve_batching``), or ``"stacked"`` (all tasks in
            one forward pass, ``fastmaml.meta.stacked``; never chosen by ``"auto"``).
        reuse_last_step: second-order MAML with a double-backward HVP (``"exact"`` or
            ``"reverse_over_reverse"``) under the loop batching: run the last inner step with its
            graph, task by task, and take the backward's first HVP (at ``phi_{K-1}``) through that
            graph during the forward pass instead of recomputing the support pass in the backward
            (one support forward + backward less per call; holds one task's support graph at a
            time, not one per step). ``False`` recomputes it like every other step. Ignored elsewhere.
        keep_first_graph: with ``reuse_last_step`` in effect and K >= 2, also keep the first inner
            step's graph (all tasks, at ``theta``) from the forward pass to the backward's last HVP,
            instead of recomputing it: one more support forward + backward saved, for one step's
            activations held for the whole call (constant in K, ~45 MB on workload A). Off by default.
        task_by_task: second-order MAML with an exact HVP where tasks are processed one at a time
            anyway (the loop batching, the fused conv path): ``True`` runs each task's inner loop
            and its backward recursion before the next task's, in the forward pass, so the kept
            per-step points and gradients are one task's (``2 K P`` floats, not ``2 K T P``) plus
            each task's meta-gradient (``P``); ``False`` runs step by step over all tasks (about
            8% faster on workload A); ``None`` (default) takes it when ``2 K T P`` would pass
            ``fastmaml.meta.maml.TASK_BY_TASK_BYTES`` (256 MiB). Same results (to rounding).
        info: a dict filled with ``support_losses [K, T]`` and, after backward, iMAML's
            ``cg_iterations``, ``cg_task_iterations``, ``cg_residual``, ``cg_converged``; in the
            finite-difference HVP modes ``fd_suspect``: ``(step, task)`` pairs whose HVP looked like
            a crossed ReLU / max-pool kink and was recomputed exactly (also warned,
            ``fastmaml.meta.fd_guard``).

    Returns:
        The reduced query loss (``[T]`` with ``reduction="none"``).

    Example:
        >>> net = Conv4(1, 64, 5, 28)
        >>> loss = maml_loss(net, F.cross_entropy, (xs, ys), (xq, yq), num_steps=5, lr=0.4)
        >>> loss.backward()          # net's .grad now hold the second-order meta-gradient
    """
    if isinstance(model, TaskModel):
        tm = model
    else:
        if loss_fn is None:
            raise TypeError("loss_fn is required when model is an nn.Module")
        tm = TaskModel(model, loss_fn, adapt=adapt)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if engine not in ("recursion", "autograd"):
        raise ValueError(f"engine must be 'recursion' or 'autograd', got {engine!r}")
    hvp_mode = resolve_hvp_mode(hvp_mode)
    resolve_batching(batching, ())
    for name, flag in (("reuse_last_step", reuse_last_step), ("keep_first_graph", keep_first_graph)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if task_by_task is not None and not isinstance(task_by_task, bool):
        raise TypeError(f"task_by_task must be a bool or None, got {type(task_by_task).__name__}")
    if support is None:
        raise TypeError("support (x, y) is required")
    if query is None and algorithm != "reptile":
        raise TypeError(f"query (x, y) is required for algorithm={algorithm!r}")
    check_task_data(support, query)
    num_steps = check_num_steps(num_steps)
    per_step, lr_tensors = normalize_step_sizes(lr, num_steps, _adapted_shapes(tm))
    theta_a, fixed = tm.theta_adapted(), tm.theta_fixed()
    like = (theta_a or fixed)[0]
    for j, t in enumerate(lr_tensors):
        if t.dtype != like.dtype or t.device != like.device:
            raise TypeError(f"step size tensor {j} is {t.dtype} on {t.device}; expected {like.dtype} on {like.device} "
                            f"like the model's parameters")
    _check_data_like(support, query, like)
    info = {} if info is None else info
    if autocast_active() and engine == "recursion":
        warnings.warn("maml_loss runs in the dtype of the model's parameters: torch.autocast is turned off inside "
                      "it (its forward and backward passes)", UserWarning, stacklevel=2)

    if engine == "autograd":
        if algorithm not in ("maml", "fomaml"):
            raise ValueError(f"engine='autograd' implements 'maml' and 'fomaml', not {algorithm!r}")
        from ..reference.meta import maml_loss_reference

        losses = maml_loss_reference(tm, support, query, per_step, first_order=algorithm == "fomaml")
    else:
        index = {id(t): LrRef(j) for j, t in enumerate(lr_tensors)}
        refs = [[index[id(a)] if isinstance(a, Tensor) else a for a in step] for step in per_step]
        cfg = EngineConfig(task_model=tm, support=tuple(support), query=None if query is None else tuple(query),
                           per_step=refs, n_a=len(theta_a), n_f=len(fixed), n_lr=len(lr_tensors),
                           algorithm=algorithm, hvp_mode=hvp_mode, fd_dtype=fd_dtype, check_finite=check_finite,
                           batching=batching, reuse_last_step=reuse_last_step and torch.is_grad_enabled(),
                           keep_first_graph=keep_first_graph,
                           task_major=(task_by_task if task_by_task is not None else "auto")
                           if torch.is_grad_enabled() else False, info=info)
        if algorithm == "imaml":
            if not (isinstance(imaml_lambda, (int, float)) and imaml_lambda > 0):
                raise ValueError(f"imaml_lambda must be a positive float, got {imaml_lambda!r}")
            losses = IMAMLGradient.apply(cfg, float(imaml_lambda), cg_iters, cg_tol, *theta_a, *fixed, *lr_tensors)
        else:
            losses = MetaGradient.apply(cfg, *theta_a, *fixed, *lr_tensors)
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def _check_data_like(support, query, like: Tensor) -> None:
    """Samples per task, and the data's dtype and device against the parameters' (named)."""
    for name, batch in (("support", support), ("query", query)):
        if batch is None:
            continue
        for part, t in zip(("x", "y"), batch):
            if t.dim() >= 2 and t.shape[1] == 0:
                raise ValueError(f"{name} {part} has shape {tuple(t.shape)}: no samples per task (N = 0)")
            if t.device != like.device:
                raise ValueError(f"{name} {part} is on {t.device}; expected {like.device}, where the model's "
                                 f"parameters are")
        x = batch[0]
        if x.is_floating_point() and x.dtype != like.dtype:
            raise TypeError(f"{name} x is {x.dtype}; expected {like.dtype} like the model's parameters (cast the data "
                            f"or the model)")


class MAML(nn.Module):
    """A model with its (optionally learnable) inner-loop step sizes and meta-learning settings.

    Args:
        model: the network (meta-parameters ``theta``).
        loss_fn: per-task loss ``loss_fn(output, target) -> scalar``.
        num_steps: inner steps K.
        lr: initial inner step size.
        lr_form: ``"fixed"`` (a float, not learned), ``"scalar"`` (one learnable scalar),
            ``"lslr"`` (MAML++: per tensor per step) or ``"meta_sgd"`` (per element).
        algorithm, hvp_mode, adapt, engine, fd_dtype, imaml_lambda, cg_iters, batching, reuse_last_step,
            keep_first_graph, task_by_task: see ``maml_loss``.

    Example:
        >>> maml = MAML(Conv4(1, 64, 5, 28), F.cross_entropy, num_steps=5, lr=0.4, lr_form="lslr")
        >>> opt = torch.optim.Adam(maml.parameters(), 1e-3)  # theta and the step sizes
        >>> loss = maml(support, query)
        >>> loss.backward(); opt.step()
        >>> maml.last_info["support_losses"]   # [K, T]
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, *, num_steps: int = 1, lr: float = 0.01,
                 lr_form: str = "fixed", algorithm: str = "maml", hvp_mode: str = "exact",
                 adapt: AdaptSpec = "all", engine: str = "recursion", fd_dtype: Optional[torch.dtype] = None,
                 imaml_lambda: float = 1.0, cg_iters: int = 20, batching: str = "auto",
                 reuse_last_step: bool = True, keep_first_graph: bool = False,
                 task_by_task: Optional[bool] = None):
        super().__init__()
        self.model = model
        self.task_model = TaskModel(model, loss_fn, adapt=adapt)
        self.num_steps = check_num_steps(num_steps)
        like = next(model.parameters())
        kw = dict(dtype=like.dtype, device=like.device)
        if lr_form == "fixed":
            self.lr = float(lr)
        elif lr_form == "scalar":
            self.lr = nn.Parameter(torch.tensor(float(lr), **kw))
        elif lr_form == "lslr":
            self.lr = lslr_step_sizes(self.task_model, num_steps, lr, **kw)
        elif lr_form == "meta_sgd":
            self.lr = meta_sgd_step_sizes(self.task_model, lr, **kw)
        else:
            raise ValueError(f"lr_form must be 'fixed', 'scalar', 'lslr' or 'meta_sgd', got {lr_form!r}")
        self.settings = dict(algorithm=algorithm, hvp_mode=hvp_mode, engine=engine, fd_dtype=fd_dtype,
                             imaml_lambda=imaml_lambda, cg_iters=cg_iters, batching=batching,
                             reuse_last_step=reuse_last_step, keep_first_graph=keep_first_graph,
                             task_by_task=task_by_task)
        self.last_info: dict = {}

    def forward(self, support, query=None, reduction: str = "mean") -> Tensor:
        """The query loss (see ``maml_loss``); the info of the call goes to ``self.last_info``."""
        self.last_info = {}
        return maml_loss(self.task_model, support=support, query=query, num_steps=self.num_steps, lr=self.lr,
                         reduction=reduction, info=self.last_info, **self.settings)

    def adapt(self, support, create_graph: bool = False):
        """The adapted parameters ``phi_K`` for every task ``[T, ...]`` (for evaluation)."""
        from .inner_loop import adapt

        return adapt(self.task_model, support, self.num_steps, self.lr, create_graph=create_graph)
