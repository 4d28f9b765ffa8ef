"""Fused batched path for plain MLPs: per-task gradients and exact HVPs as batched matmuls.

For a tiny network the generic paths (``vmap`` of ``grad`` / ``jvp``, or autograd per task) spend
their time in per-op overhead, not arithmetic (the 1000-task sinusoid MLP: ~1 MFLOP per call, ~30
ms under vmap). When the model is a plain ``nn.Sequential`` of ``nn.Linear`` layers and
elementwise activations, and the loss is one this module knows, everything is written out by hand
on ``[T, N, width]`` tensors, without autograd or vmap:

* the forward pass: ``z = h W^T + b`` (one ``baddbmm`` over the tasks for per-task weights, one
  ``addmm`` over all ``T * N`` rows for weights shared by the tasks), ``h = f(z)``;
* the gradient of each task's loss: the backward pass by hand (``dW_t = delta_t^T h_t``: one ``bmm``);
* exact Hessian-vector products by Pearlmutter's R-operator (forward-over-reverse written out):
  an R-forward pass ``R{z} = R{h} W^T + h dW^T + db``, ``R{h} = f'(z) R{z}`` and an R-backward
  pass ``R{delta_in} = R{delta} W + delta dW``, ``R{delta_z} = f'(z) R{delta_h} + f''(z) R{z} delta_h``,
  ``R{g_W} = R{delta}^T h + delta^T R{h}``.

Tasks are independent, so nothing mixes across the leading task dimension; parameters without a
task dimension (the shared first step from ``theta``, ANIL's fixed body) run as one matmul over
all tasks' samples. Per-task gradients of shared tensors (the mixed block ``H_fa u`` of ANIL) come
out of the same passes: the direction simply has no component on them.

Supported (``plan_for``; anything else goes to the generic path, never an error):

* model: ``type(model).forward is nn.Sequential.forward`` (``nn.Sequential`` and subclasses such as
  ``fastmaml.meta.models.MLP`` that do not override ``forward``), direct children of the exact types
  ``nn.Linear``, ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.Tanh``, ``nn.Sigmoid``, ``nn.Identity``, no
  module appearing twice, no forward / backward hooks (module or global), every parameter the
  weight or bias of one of these Linear layers;
* loss: ``fastmaml.meta.models.mse_loss``, ``F.mse_loss``, ``F.cross_entropy`` (the function
  objects themselves, called with their defaults), ``nn.MSELoss()`` with ``reduction="mean"`` and
  ``nn.CrossEntropyLoss()`` with ``reduction="mean"``, no class weights and no label smoothing
  (exact types, no hooks). A lambda or any other wrapper is not recognised (it might do anything);
* data: ``x [T, N, in]`` with ``N >= 1`` in the parameters' dtype; MSE targets shaped like the
  output (no broadcasting); cross-entropy targets integer class indices ``[T, N]`` in ``[0, C)``.

Derivative conventions follow autograd's: ReLU' (0) = 0, LeakyReLU'(0) = the slope.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from .models import mse_loss

_ACTIVATIONS = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}


@dataclass(frozen=True)
class Linear:
    """One linear layer: where its weight and bias live among ``(adapted, fixed)``.

    ``weight`` / ``bias`` are ``(is_adapted, index)``; ``bias`` is ``None`` without a bias.
    """
    weight: tuple
    bias: Optional[tuple]
    in_features: int
    out_features: int


@dataclass(frozen=True)
class Activation:
    kind: str  # "relu", "leaky_relu", "tanh", "sigmoid"
    slope: float = 0.0


@dataclass(frozen=True)
class MLPPlan:
    """What the fused path runs: the layers in order and the loss (``"mse"`` or ``"cross_entropy"``)."""
    layers: tuple
    loss: str
    in_features: int
    out_features: int
    module_fixed: tuple = ()  # the model's own fixed tensors, when a call passes none


def _has_hooks(m: nn.Module) -> bool:
    return any(len(getattr(m, name, None) or ()) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _global_hooks() -> bool:
    return any(len(getattr(_module_globals, name, None) or ()) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def _loss_kind(loss_fn) -> Optional[str]:
    if loss_fn is mse_loss or loss_fn is F.mse_loss:
        return "mse"
    if loss_fn is F.cross_entropy:
        return "cross_entropy"
    if type(loss_fn) is nn.MSELoss and loss_fn.reduction == "mean" and not _has_hooks(loss_fn):
        return "mse"
    if (type(loss_fn) is nn.CrossEntropyLoss and loss_fn.reduction == "mean" and loss_fn.weight is None
            and loss_fn.label_smoothing == 0.0 and not _has_hooks(loss_fn)):
        return "cross_entropy"  # ignore_index: targets are checked to lie in [0, C) on every call
    return None


def _build(task_model):
    """``(plan, None)`` when the fused path can run this ``TaskModel``, else ``(None, reason)``."""
    model = task_model.model
    if task_model.context:
        return None, "CAVIA (adapt='context') passes the context to forward"
    if type(model).forward is not nn.Sequential.forward:
        return None, f"the model ({type(model).__name__}) is not an nn.Sequential with the standard forward"
    loss = _loss_kind(task_model.loss_fn)
    if loss is None:
        name = getattr(task_model.loss_fn, "__name__", type(task_model.loss_fn).__name__)
        return None, (f"the loss {name} is not one the fused path knows (fastmaml.meta.models.mse_loss, "
                      f"F.mse_loss, F.cross_entropy, nn.MSELoss, nn.CrossEntropyLoss)")
    if _has_hooks(model) or _global_hooks():
        return None, "a forward or backward hook is registered"
    slot = {name: (True, i) for i, name in enumerate(task_model.adapt_names)}
    slot.update({name: (False, i) for i, name in enumerate(task_model.fixed_names)})
    layers, used, seen_modules, width = [], set(), set(), None
    for key, m in model._modules.items():  # exactly what Sequential.forward iterates
        if m is None or id(m) in seen_modules:
            return None, "a child module is None or appears twice"
        seen_modules.add(id(m))
        if _has_hooks(m):
            return None, f"module {key!r} has a hook"
        if type(m) is nn.Linear:
            if width is not None and m.in_features != width:
                return None, f"Linear {key!r} takes {m.in_features} features, the layer before gives {width}"
            names = [f"{key}.weight"] + ([f"{key}.bias"] if m.bias is not None else [])
            if any(n not in slot for n in names):
                return None, f"the parameters of {key!r} are not (only) its own"
            used.update(names)
            layers.append(Linear(slot[names[0]], slot[names[1]] if m.bias is not None else None,
                                 m.in_features, m.out_features))
            width = m.out_features
        elif type(m) in _ACTIVATIONS:
            slope = float(m.negative_slope) if type(m) is nn.LeakyReLU else 0.0
            layers.append(Activation(_ACTIVATIONS[type(m)], slope))
        elif type(m) is not nn.Identity:
            return None, f"module {key!r} ({type(m).__name__}) is not Linear or an elementwise activation"
    linears = [layer for layer in layers if isinstance(layer, Linear)]
    if not linears:
        return None, "the model has no Linear layer"
    if used != set(slot):
        return None, "the model has parameters outside its Linear layers"
    return MLPPlan(tuple(layers), loss, linears[0].in_features, linears[-1].out_features), None


def why_not(task_model) -> Optional[str]:
    """``None`` when the fused path can run this ``TaskModel``, else the reason it cannot."""
    return _build(task_model)[1]


def plan_for(task_model) -> Optional[MLPPlan]:
    """The fused plan for a ``TaskModel``, or ``None`` when the model or loss is not supported
    (``why_not`` says why). Rebuilt on every call (cheap): the model may gain hooks or change
    children between calls."""
    return _build(task_model)[0]


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def plan_for_call(task_loss, params: Sequence[Tensor], fixed: Sequence[Tensor], task_args: Sequence[Tensor],
                  shared_params: bool) -> Optional[MLPPlan]:
    """The plan when this call (a ``TaskModel.task_loss`` on ``(x, y)``) can run fused, else ``None``.

    With ``fixed`` empty while the model has fixed parameters, the model's own (detached) tensors
    stand in for them, as ``functional_call`` does in the generic path.
    """
    from .functional import TaskModel

    task_model = getattr(task_loss, "__self__", None)
    if not (isinstance(task_model, TaskModel) and getattr(task_loss, "__func__", None) is TaskModel.task_loss
            and len(task_args) == 2):
        return None
    plan = plan_for(task_model)
    if plan is None:
        return None
    x, y = task_args
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)) or x.dim() != 3 or x.shape[1] < 1:
        return None
    num_tasks, n = x.shape[0], x.shape[1]
    if x.shape[2] != plan.in_features or not x.is_floating_point():
        return None
    if len(params) != len(task_model.adapt_names) or len(fixed) not in (0, len(task_model.fixed_names)):
        return None
    shapes = _param_shapes(task_model)
    module_fixed = ()
    if not fixed and task_model.fixed_names:
        module_fixed = tuple(t.detach() for t in task_model.theta_fixed())
    for group, ts, per_task in ((True, params, not shared_params), (False, fixed or module_fixed, False)):
        for i, t in enumerate(ts):
            want = shapes[(group, i)]
            got = tuple(t.shape[1:]) if per_task else tuple(t.shape)
            if got != want or (per_task and t.shape[0] != num_tasks):
                return None
            if t.dtype != x.dtype or t.device != x.device:
                return None
    if plan.loss == "mse":
        if y.shape != (num_tasks, n, plan.out_features) or y.dtype != x.dtype:
            return None
    else:
        if y.shape != (num_tasks, n) or y.dtype not in _INT_DTYPES:
            return None
        # out-of-range targets (ignore_index included) go to the generic path, which handles or rejects them
        if bool((y < 0).any()) or bool((y >= plan.out_features).any()):
            return None
    return replace(plan, module_fixed=module_fixed) if module_fixed else plan


def _param_shapes(task_model) -> dict:
    named = dict(task_model.model.named_parameters())
    shapes = {(True, i): tuple(named[n].shape) for i, n in enumerate(task_model.adapt_names)}
    shapes.update({(False, i): tuple(named[n].shape) for i, n in enumerate(task_model.fixed_names)})
    return shapes


# ---------------------------------------------------------------------------------------------
# Batched building blocks. Weights are [out, in] (shared by the tasks) or [T, out, in] (per task);
# biases [out] or [T, out]; activations [T, N, width]. Timings quoted: T = 1000, N = 10, width 40,
# 1 thread on the development CPU.
# ---------------------------------------------------------------------------------------------
def _rows(h: Tensor) -> Tensor:
    return h.reshape(-1, h.shape[-1])


def _affine(h: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """``h W^T + b`` per task."""
    if w.dim() == 2:  # shared: one matmul over all T * N rows
        if b is not None and b.dim() == 1:
            return torch.addmm(b, _rows(h), w.t()).reshape(h.shape[0], h.shape[1], w.shape[0])
        out = torch.mm(_rows(h), w.t()).reshape(h.shape[0], h.shape[1], w.shape[0])
    else:
        # matmul with a transposed view, then the bias: ~0.75 ms; baddbmm ~1.2 ms
        out = torch.matmul(h, w.mT)
    if b is not None:
        out.add_(b.unsqueeze(1) if b.dim() == 2 else b)
    return out


def _back(delta: Tensor, w: Tensor) -> Tensor:
    """``delta W`` per task: the gradient flowing into a linear layer's input."""
    if w.dim() == 2:
        return torch.mm(_rows(delta), w).reshape(delta.shape[0], delta.shape[1], w.shape[1])
    return torch.bmm(delta, w)


def _outer(delta: Tensor, h: Tensor, sum_tasks: bool) -> Tensor:
    """``delta_t^T h_t`` for every task (``[T, out, in]``), or its sum over tasks: one matmul over
    all rows, no per-task tensor."""
    if sum_tasks:
        return torch.mm(_rows(delta).t(), _rows(h))
    return torch.bmm(delta.transpose(1, 2), h)


def _bias_grad(delta: Tensor, sum_tasks: bool) -> Tensor:
    return delta.sum((0, 1)) if sum_tasks else delta.sum(1)


def _act_derivatives(act: Activation, z: Tensor, second: bool):
    """``(f(z), f'(z), c)`` where ``f''(z) = c f'(z)`` (``c = None`` when ``f'' = 0``), as autograd
    defines them. ``z`` is overwritten (it is a temporary of the forward pass)."""
    if act.kind == "relu":
        h = torch.relu_(z)
        return h, torch.sign(h), None  # 0/1 as floats: ~10x faster to multiply by than a bool mask
    if act.kind == "leaky_relu":
        d = torch.where(z > 0, torch.ones((), dtype=z.dtype, device=z.device),
                        torch.full((), act.slope, dtype=z.dtype, device=z.device))
        return z.mul_(d), d, None
    if act.kind == "tanh":
        h = torch.tanh_(z)
        d = 1 - h * h
        return h, d, (-2 * h if second else None)  # tanh'' = -2 tanh tanh'
    h = torch.sigmoid_(z)  # sigmoid'' = (1 - 2 s) sigmoid'
    return h, h * (1 - h), ((1 - 2 * h) if second else None)


class _Params:
    """The weights and biases of the Linear layers, looked up from the (adapted, fixed) lists."""

    def __init__(self, plan: MLPPlan, params: Sequence[Tensor], fixed: Optional[Sequence[Tensor]]):
        # fixed=None: a direction, which has no component on the fixed tensors
        self.adapted = list(params)
        self.fixed = None if fixed is None else list(fixed or plan.module_fixed)

    def get(self, where):
        if where is None:
            return None
        if where[0]:
            return self.adapted[where[1]]
        return None if self.fixed is None else self.fixed[where[1]]


def _forward(plan: MLPPlan, p: _Params, x: Tensor, second: bool):
    """The forward pass; keeps what the backward passes need: each linear layer's input and each
    activation's derivatives."""
    h, saved = x, []
    for layer in plan.layers:
        if isinstance(layer, Linear):
            saved.append(h)
            h = _affine(h, p.get(layer.weight), p.get(layer.bias))
        else:
            h, d, c = _act_derivatives(layer, h.clone() if h is x else h, second)  # never overwrite the data
            saved.append((d, c))
    return h, saved


def _loss_and_delta(plan: MLPPlan, out: Tensor, y: Tensor, want_losses: bool = True):
    """Per-task losses ``[T]`` and ``dL_t / d out`` (``[T, N, C]``), plus the softmax for the R-pass."""
    n = out.shape[1]
    if plan.loss == "mse":
        r = out - y
        scale = 1.0 / (n * out.shape[2])
        losses = (r * r).sum((1, 2)) * scale if want_losses else None
        return losses, r.mul_(2.0 * scale), None
    lse = torch.logsumexp(out, dim=2, keepdim=True)
    probs = torch.exp(out - lse)
    index = y.long().unsqueeze(2)
    picked = out.gather(2, index)
    losses = (lse - picked).squeeze(2).mean(1) if want_losses else None
    delta = probs.scatter_add(2, index, torch.full_like(picked, -1.0)).div_(n)
    return losses, delta, probs


def _loss_r(plan: MLPPlan, r_out: Tensor, probs: Optional[Tensor]) -> Tensor:
    """R{dL/d out}: the loss Hessian (w.r.t. the output) times ``R{out}``."""
    n = r_out.shape[1]
    if plan.loss == "mse":
        return r_out * (2.0 / (n * r_out.shape[2]))
    sr = probs * r_out
    return sr.sub_(probs * sr.sum(2, keepdim=True)).div_(n)


def _needed_from(plan: MLPPlan, want) -> int:
    """Index of the first layer whose parameters are wanted: the backward pass stops there."""
    for i, layer in enumerate(plan.layers):
        if isinstance(layer, Linear) and (want(layer.weight) or want(layer.bias)):
            return i
    return len(plan.layers)


def grad(plan: MLPPlan, params: Sequence[Tensor], fixed: Sequence[Tensor], x: Tensor, y: Tensor, *,
         wrt_fixed: bool = False):
    """Per-task losses and gradients, as ``fastmaml.meta.hvp.batched_grad`` returns them.

    Args:
        plan: from ``plan_for_call``.
        params: the adapted tensors, ``[T, ...]`` or without the task dimension (shared start).
        fixed: tensors shared by the tasks.
        x, y: the tasks' data ``[T, N, ...]``.
        wrt_fixed: also return the per-task gradients w.r.t. ``fixed``.

    Returns:
        ``(losses [T], grads_params, grads_fixed)``, gradients ``[T, ...]``.
    """
    p = _Params(plan, params, fixed)
    report_fixed = wrt_fixed and len(fixed) > 0
    want = (lambda where: where is not None and (where[0] or report_fixed))  # noqa: E731
    out, saved = _forward(plan, p, x, second=False)
    losses, delta, _ = _loss_and_delta(plan, out, y)
    grads = {}
    stop = _needed_from(plan, want)
    for i in range(len(plan.layers) - 1, stop - 1, -1):
        layer = plan.layers[i]
        if isinstance(layer, Linear):
            if want(layer.weight):
                grads[layer.weight] = _outer(delta, saved[i], False)
            if want(layer.bias):
                grads[layer.bias] = _bias_grad(delta, False)
            if i > stop:
                delta = _back(delta, p.get(layer.weight))
        else:
            delta = delta.mul_(saved[i][0])  # delta is a temporary of this pass
    ga = [grads[(True, i)] for i in range(len(params))]
    gf = [grads[(False, i)] for i in range(len(fixed))] if report_fixed else []
    return losses, ga, gf


def hvp(plan: MLPPlan, params: Sequence[Tensor], fixed: Sequence[Tensor], v: Sequence[Tensor], x: Tensor,
        y: Tensor, *, sum_tasks: bool = False):
    """Exact per-task ``H v`` by the R-operator, as ``fastmaml.meta.hvp.hvp`` returns it.

    Args:
        plan: from ``plan_for_call``.
        params: the point, ``[T, ...]`` or shared (no task dimension).
        fixed: tensors shared by the tasks (no direction on them).
        v: the direction ``[T, ...]`` for ``params``.
        x, y: the tasks' data.
        sum_tasks: return ``sum_t H_t v_t`` (no task dimension): the weight blocks are then one
            matmul over all tasks' rows instead of T outer products.

    Returns:
        ``(hv_params, hv_fixed)``, ``[T, ...]`` each (or summed); ``hv_fixed`` (the mixed block
        ``H_fa v``) is ``[]`` when ``fixed`` is empty.
    """
    p = _Params(plan, params, fixed)
    direction = _Params(plan, v, None)
    # H_aa v for the adapted tensors and, when fixed ones are passed, the mixed block H_fa v
    want = (lambda where: where is not None and (where[0] or len(fixed) > 0))  # noqa: E731
    out, saved = _forward(plan, p, x, second=True)
    # R-forward: R{h} is None (zero) until the first layer with a direction
    r_h, r_saved = None, []
    for i, layer in enumerate(plan.layers):
        if isinstance(layer, Linear):
            r_saved.append(r_h)
            dw, db = direction.get(layer.weight), direction.get(layer.bias)
            r_z = None if r_h is None else _affine(r_h, p.get(layer.weight), None)
            if dw is not None:
                term = _affine(saved[i], dw, db)
                r_z = term if r_z is None else r_z.add_(term)
            elif db is not None:
                term = db.unsqueeze(1)
                r_z = term.expand(x.shape[0], x.shape[1], db.shape[-1]).clone() if r_z is None else r_z.add_(term)
            r_h = r_z
        else:
            d, c = saved[i]
            r_saved.append(r_h)  # R{z}, the activation's input: the f'' term needs it
            r_h = None if r_h is None else (r_h * d if c is not None else r_h.mul_(d))
    _, delta, probs = _loss_and_delta(plan, out, y, want_losses=False)
    r_delta = torch.zeros_like(delta) if r_h is None else _loss_r(plan, r_h, probs)
    hv = {}
    stop = _needed_from(plan, want)
    for i in range(len(plan.layers) - 1, stop - 1, -1):
        layer = plan.layers[i]
        if isinstance(layer, Linear):
            h_in, r_h_in = saved[i], r_saved[i]
            if want(layer.weight):
                hw = _outer(r_delta, h_in, sum_tasks)
                if r_h_in is not None:
                    hw.add_(_outer(delta, r_h_in, sum_tasks))
                hv[layer.weight] = hw
            if want(layer.bias):
                hv[layer.bias] = _bias_grad(r_delta, sum_tasks)
            if i > stop:
                w, dw = p.get(layer.weight), direction.get(layer.weight)
                r_delta = _back(r_delta, w)
                if dw is not None:
                    r_delta.add_(_back(delta, dw))
                delta = _back(delta, w)
        else:
            d, c = saved[i]
            r_z = r_saved[i]
            if c is not None and r_z is not None:  # f'' term: R{delta_z} = f' (R{delta_h} + c R{z} delta_h)
                r_delta = r_delta.add_(c * r_z * delta).mul_(d)
            else:
                r_delta = r_delta.mul_(d)
            delta = delta.mul_(d)
    hv_a = [hv[(True, i)] for i in range(len(params))]
    hv_f = [hv[(False, i)] for i in range(len(fixed))] if fixed else []
    return hv_a, hv_f
