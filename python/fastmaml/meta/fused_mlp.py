"""Fused batched path for plain MLPs: per-task gradients and exact HVPs as batched matmuls.

For small networks the generic paths (``vmap`` of ``grad`` / ``jvp``, or autograd per task) pay per
op and per task far more than the arithmetic costs. When the model is a plain ``nn.Sequential`` of
``nn.Linear`` layers and elementwise activations, and the loss is one this module knows, everything
is written out by hand on ``[T, N, width]`` tensors, without autograd or vmap:

* the forward pass ``z = h W^T + b``, ``h = f(z)``: one matmul over all ``T * N`` rows for weights
  shared by the tasks (the first step from ``theta``, ANIL's body), one batched matmul for per-task
  weights, broadcasts for layers with one input or output;
* each task's gradient by a hand-written backward pass (``dW_t = delta_t^T h_t``);
* exact Hessian-vector products by Pearlmutter's R-operator (forward-over-reverse written out): an
  R-forward pass ``R{z} = R{h} W^T + h dW^T + db``, ``R{h} = f'(z) R{z}`` and an R-backward pass
  ``R{delta_in} = R{delta} W + delta dW``, ``R{delta_z} = f'(z) R{delta_h} + f''(z) R{z} delta_h``,
  ``R{g_W} = R{delta}^T h + delta^T R{h}``. Per-task blocks of tensors shared by the tasks (ANIL's
  mixed block ``H_fa u``) come out of the same passes: the direction has no component on them.

Three shortcuts serve the engine's second-order MAML (``fastmaml.meta.maml``), each asked for
explicitly and ignored by the other batchings:

* ``LowRank``: a weight gradient on N samples is ``D^T H`` (rank <= N). The query gradient is only
  scaled, dotted, summed over tasks and used as an HVP direction, all of which work on the factors;
  so is the first inner step's gradient, and ``phi_1 = theta - alpha D^T H`` stays a
  ``ShiftedLowRank`` that the passes multiply by without forming it (only for layers wider than N).
* ``sum_tasks``: the last backward step only needs ``sum_t H_t u_t`` at ``theta``: its weight
  blocks are then one matmul over all rows instead of T outer products.
* ``keep_state``: the first inner step's pass at ``theta`` is kept (one step's activations) for that
  last HVP, at the same point, which then skips its own forward and backward pass.

Supported (``plan_for``, ``plan_for_call``; anything else goes to the generic path, never an error):

* model: ``type(model).forward is nn.Sequential.forward`` (``nn.Sequential`` and subclasses such as
  ``fastmaml.meta.models.MLP`` that do not override ``forward``), direct children of the exact types
  ``nn.Linear``, ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.Tanh``, ``nn.Sigmoid``, ``nn.Identity``, no
  module appearing twice, no forward / backward hooks (module or global), every parameter the
  weight or bias of one of these Linear layers; not CAVIA (its context enters ``forward``);
* loss: ``fastmaml.meta.models.mse_loss``, ``F.mse_loss``, ``F.cross_entropy`` (the function
  objects themselves, called with their defaults), ``nn.MSELoss()`` with ``reduction="mean"`` and
  ``nn.CrossEntropyLoss()`` with ``reduction="mean"``, no class weights and no label smoothing
  (exact types, no hooks). A lambda or any other wrapper is not recognised (it might do anything);
* data: ``x [T, N, in]`` with ``N >= 1`` in the parameters' dtype and device; MSE targets shaped
  like the output (no broadcasting); cross-entropy targets class indices ``[T, N]`` (int64 or
  uint8) in ``[0, C)`` (so no ``ignore_index`` entries).

Derivative conventions follow autograd's: ReLU'(0) = 0, LeakyReLU'(0) = the slope.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
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
    shapes: dict = field(default_factory=dict, compare=False)  # (is_adapted, index) -> parameter shape
    owner: object = field(default=None, compare=False)  # the TaskModel (holds the reusable first-step state)
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
    if type(model).forward is not nn.Sequential.forward or type(model).__iter__ is not nn.Sequential.__iter__:
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
    named = dict(model.named_parameters())
    shapes = {where: tuple(named[name].shape) for name, where in slot.items()}
    return MLPPlan(tuple(layers), loss, linears[0].in_features, linears[-1].out_features, shapes, task_model), None


def _fingerprint(task_model) -> tuple:
    """What ``_build`` depends on, cheaply (it runs on every call): module identities and types,
    parameter identities and shapes, hooks, the loss and its settings, the adapted names."""
    model, loss_fn = task_model.model, task_model.loss_fn
    loss = (id(loss_fn), getattr(loss_fn, "reduction", None), getattr(loss_fn, "label_smoothing", None),
            id(getattr(loss_fn, "weight", None)), isinstance(loss_fn, nn.Module) and _has_hooks(loss_fn))
    children = []
    for key, m in model._modules.items():
        if m is None:
            children.append(None)
            continue
        params = tuple((name, id(p), None if p is None else p.shape) for name, p in m._parameters.items())
        children.append((key, id(m), type(m), _has_hooks(m), params, len(m._modules),
                         getattr(m, "negative_slope", None)))
    return (loss, type(model), tuple(model._parameters), _has_hooks(model), _global_hooks(), task_model.context,
            task_model.adapt_names, tuple(children))


def why_not(task_model) -> Optional[str]:
    """``None`` when the fused path can run this ``TaskModel``, else the reason it cannot."""
    return _build(task_model)[1]


def cached_plan(task_model, attr: str, fingerprint, build):
    """``build(task_model)[0]``, cached on the TaskModel under ``attr`` and rebuilt when
    ``fingerprint(task_model)`` changes (the fused paths' plans)."""
    key = fingerprint(task_model)
    cached = getattr(task_model, attr, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = build(task_model)[0]
    setattr(task_model, attr, (key, plan))
    return plan


def plan_for(task_model) -> Optional[MLPPlan]:
    """The fused plan for a ``TaskModel``, or ``None`` when the model or loss is not supported
    (``why_not`` says why). Cached on the TaskModel and rebuilt when the model changes (children,
    parameters, hooks, loss settings)."""
    return cached_plan(task_model, "_fused_plan", _fingerprint, _build)


_INT_DTYPES = (torch.int64, torch.uint8)  # what F.cross_entropy takes as class indices


def task_model_of(task_loss, task_args):
    """The ``TaskModel`` when ``task_loss`` is its ``task_loss`` called on ``(x, y)``, else ``None``."""
    from .functional import TaskModel

    task_model = getattr(task_loss, "__self__", None)
    if (isinstance(task_model, TaskModel) and getattr(task_loss, "__func__", None) is TaskModel.task_loss
            and len(task_args) == 2):
        return task_model
    return None


def call_tensors_fit(task_model, shapes: dict, params, fixed, shared_params: bool, num_tasks: int, x: Tensor):
    """The model's own fixed tensors to use (``()`` when the call passes them or there are none)
    when a call's ``params`` / ``fixed`` have the plan's shapes (``[T, ...]`` per task unless
    shared) and ``x``'s dtype and device, else ``None``. With ``fixed`` empty while the model has
    fixed parameters, the model's own (detached) tensors stand in for them, as ``functional_call``
    does in the generic path."""
    if len(params) != len(task_model.adapt_names) or len(fixed) not in (0, len(task_model.fixed_names)):
        return None
    module_fixed = ()
    if not fixed and task_model.fixed_names:
        module_fixed = tuple(t.detach() for t in task_model.theta_fixed())
    for group, ts, per_task in ((True, params, not shared_params), (False, fixed or module_fixed, False)):
        for i, t in enumerate(ts):
            got = tuple(t.shape[1:]) if per_task else tuple(t.shape)
            if got != shapes[(group, i)] or (per_task and t.shape[0] != num_tasks):
                return None
            if t.dtype != x.dtype or t.device != x.device:
                return None
    return module_fixed


def targets_fit(loss: str, y: Tensor, x: Tensor, num_tasks: int, n: int, outputs: int) -> bool:
    """MSE targets shaped like the output (no broadcasting) in ``x``'s dtype; cross-entropy
    targets int64 / uint8 class indices ``[T, N]`` in ``[0, outputs)`` (out-of-range ones,
    ``ignore_index`` included, go to the generic path, which handles or rejects them)."""
    if loss == "mse":
        return y.shape == (num_tasks, n, outputs) and y.dtype == x.dtype
    return (y.shape == (num_tasks, n) and y.dtype in _INT_DTYPES and not bool((y < 0).any())
            and not bool((y >= outputs).any()))


def plan_for_call(task_loss, params: Sequence[Tensor], fixed: Sequence[Tensor], task_args: Sequence[Tensor],
                  shared_params: bool) -> Optional[MLPPlan]:
    """The plan when this call (a ``TaskModel.task_loss`` on ``(x, y)``) can run fused, else ``None``
    (see ``call_tensors_fit`` for calls that pass no fixed tensors)."""
    task_model = task_model_of(task_loss, task_args)
    plan = None if task_model is None else plan_for(task_model)
    if plan is None:
        return None
    x, y = task_args
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)) or x.dim() != 3 or x.shape[1] < 1:
        return None
    num_tasks, n = x.shape[0], x.shape[1]
    if x.shape[2] != plan.in_features or not x.is_floating_point():
        return None
    module_fixed = call_tensors_fit(task_model, plan.shapes, params, fixed, shared_params, num_tasks, x)
    if module_fixed is None or not targets_fit(plan.loss, y, x, num_tasks, n, plan.out_features):
        return None
    return replace(plan, module_fixed=module_fixed) if module_fixed else plan


class LowRank:
    """Per-task weight gradients ``G_t = D_t^T H_t`` kept as their factors.

    A linear layer's gradient on N samples has rank <= N: for the sinusoid net (N = 10, 40 x 40
    weights) the factors ``D [T, N, out]`` and ``H [T, N, in]`` are half the size of ``G [T, out,
    in]``, and what the backward of MAML does with the query gradient (scale it per task, take
    ``sum_t <G_t, g_t>``, use it as the HVP direction, sum it over tasks) never needs ``G`` itself.
    The engine asks ``batched_grad(..., low_rank=True)`` for it; only the fused path returns it.
    """

    __slots__ = ("d", "h")

    def __init__(self, d: Tensor, h: Tensor):
        self.d, self.h = d, h

    @property
    def shape(self):
        return torch.Size((self.d.shape[0], self.d.shape[2], self.h.shape[2]))

    def dense(self) -> Tensor:
        return torch.bmm(self.d.transpose(1, 2), self.h)

    def scale(self, a) -> "LowRank":
        """``a G_t`` for a float or a one-element tensor, or ``a_t G_t`` for a ``[T]`` tensor."""
        if isinstance(a, Tensor) and a.dim() == 1:
            a = a.reshape(-1, 1, 1)
        return LowRank(self.d * a, self.h)

    def task_dot(self, g) -> Tensor:
        """``<G_t, g_t>`` for every task (``[T]``), ``g`` dense ``[T, out, in]`` or another ``LowRank``."""
        if isinstance(g, LowRank):  # sum((D D'^T) * (H H'^T)): N x N' per task
            return (torch.bmm(self.d, g.d.transpose(1, 2)) * torch.bmm(self.h, g.h.transpose(1, 2))).sum((1, 2))
        return (torch.bmm(self.h, g.transpose(1, 2)) * self.d).sum((1, 2))  # sum_n d_n . (g h_n)

    def sum_tasks(self) -> Tensor:
        """``sum_t G_t``: one matmul over all tasks' samples."""
        return _outer(self.d, self.h, True)

    def times_transposed(self, x: Tensor) -> Tensor:
        """``x G_t^T`` per task (``x [T, M, in]``): ``(x H^T) D``."""
        return torch.bmm(torch.bmm(x, self.h.transpose(1, 2)), self.d)

    def times(self, x: Tensor) -> Tensor:
        """``x G_t`` per task (``x [T, M, out]``): ``(x D^T) H``."""
        return torch.bmm(torch.bmm(x, self.d.transpose(1, 2)), self.h)


class ShiftedLowRank:
    """Per-task weights ``W + G_t`` with ``W [out, in]`` shared by the tasks and ``G`` a ``LowRank``:
    the first inner step from ``theta`` (``phi_1 = theta - alpha g_0``) without forming ``phi_1``.

    The fused passes multiply by it as ``h W^T + (h H^T) D``: one matmul over all rows plus two
    small batched ones, cheaper than forming ``phi_1`` and two ``[T, out, in]`` batched matmuls.
    """

    __slots__ = ("base", "shift")

    def __init__(self, base: Tensor, shift: LowRank):
        self.base, self.shift = base, shift

    @property
    def shape(self):
        return self.shift.shape

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def device(self):
        return self.base.device

    def dense(self) -> Tensor:
        return self.shift.dense().add_(self.base)


def dense(t):
    """A ``LowRank`` or ``ShiftedLowRank`` as its ``[T, out, in]`` tensor; anything else unchanged."""
    return t.dense() if isinstance(t, (LowRank, ShiftedLowRank)) else t


def is_factored(t) -> bool:
    return isinstance(t, (LowRank, ShiftedLowRank))


# ---------------------------------------------------------------------------------------------
# Batched building blocks. Weights are [out, in] (shared by the tasks) or [T, out, in] (per task);
# biases [out] or [T, out]; activations [T, N, width]. Timings quoted: T = 1000, N = 10, width 40,
# 1 thread on the development CPU.
# ---------------------------------------------------------------------------------------------
def _rows(h: Tensor) -> Tensor:
    return h.reshape(-1, h.shape[-1])


def _affine(h: Tensor, w, b: Optional[Tensor]) -> Tensor:
    """``h W^T + b`` per task (``W`` may be a ``LowRank`` direction)."""
    if isinstance(w, LowRank):
        out = w.times_transposed(h)
        return out if b is None else out.add_(b.unsqueeze(1) if b.dim() == 2 else b)
    if isinstance(w, ShiftedLowRank):
        return _affine(h, w.base, b).add_(w.shift.times_transposed(h))
    num_tasks, n = h.shape[0], h.shape[1]
    out_f, in_f = w.shape[-2], w.shape[-1]
    if in_f == 1:  # an outer product (the sinusoid net's first layer): a broadcast, not a matmul
        out = h * (w.t() if w.dim() == 2 else w.mT)
    elif w.dim() == 2:  # shared: one matmul over all T * N rows
        if b is not None and b.dim() == 1:
            return torch.addmm(b, _rows(h), w.t()).reshape(num_tasks, n, out_f)
        out = torch.mm(_rows(h), w.t()).reshape(num_tasks, n, out_f)
    elif out_f == 1:  # one output per task: a dot product per row
        out = (h * w).sum(2, keepdim=True)
    else:
        # matmul with a transposed view, then the bias: ~0.75 ms; baddbmm ~1.2 ms
        out = torch.matmul(h, w.mT)
    if b is not None:
        out.add_(b.unsqueeze(1) if b.dim() == 2 else b)
    return out


def _back(delta: Tensor, w) -> Tensor:
    """``delta W`` per task: the gradient flowing into a linear layer's input."""
    if isinstance(w, LowRank):
        return w.times(delta)
    if isinstance(w, ShiftedLowRank):
        return _back(delta, w.base).add_(w.shift.times(delta))
    out_f, in_f = w.shape[-2], w.shape[-1]
    if out_f == 1:  # [T, N, 1] times [1, in]: a broadcast
        return delta * w
    if w.dim() == 2:
        return torch.mm(_rows(delta), w).reshape(delta.shape[0], delta.shape[1], in_f)
    if in_f == 1:
        return (delta * w.mT).sum(2, keepdim=True)
    return torch.bmm(delta, w)


def _outer(delta: Tensor, h: Tensor, sum_tasks: bool) -> Tensor:
    """``delta_t^T h_t`` for every task (``[T, out, in]``), or its sum over tasks: one matmul over
    all rows, no per-task tensor."""
    if sum_tasks:
        return torch.mm(_rows(delta).t(), _rows(h))
    if delta.shape[2] == 1:  # one output: sum over samples of delta_n h_n
        return (delta * h).sum(1).unsqueeze(1)
    if h.shape[2] == 1:
        return (delta * h).sum(1).unsqueeze(2)
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


class _State:
    """The forward and backward pass of one gradient call, kept for an HVP at the same point.

    The engine's first inner step takes the support gradient at ``theta`` (shared by the tasks);
    its backward recursion ends with an HVP at that same point. Keeping this pass (one step's
    activations) saves the HVP its own forward and backward pass.
    """

    __slots__ = ("key", "refs", "saved", "deltas", "probs", "stop")

    def __init__(self, key, refs, saved, deltas, probs, stop):
        self.key, self.refs, self.saved, self.deltas, self.probs, self.stop = key, refs, saved, deltas, probs, stop


def _state_key(tensors: Sequence[Tensor]) -> tuple:
    # Storage and version identify the data: the state holds references to these tensors, so no
    # other tensor can reuse their memory, and an in-place change bumps the version.
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype, t.device)
                 if isinstance(t, Tensor) else ("object", id(t)) for t in tensors)


def _point(params, fixed, plan, x, y) -> list:
    return [*params, *(fixed or plan.module_fixed), x, y]


def grad(plan: MLPPlan, params: Sequence[Tensor], fixed: Sequence[Tensor], x: Tensor, y: Tensor, *,
         wrt_fixed: bool = False, low_rank: bool = False, keep_state: bool = False):
    """Per-task losses and gradients, as ``fastmaml.meta.hvp.batched_grad`` returns them.

    Args:
        plan: from ``plan_for_call``.
        params: the adapted tensors, ``[T, ...]`` or without the task dimension (shared start).
        fixed: tensors shared by the tasks.
        x, y: the tasks' data ``[T, N, ...]``.
        wrt_fixed: also return the per-task gradients w.r.t. ``fixed``.
        low_rank: return the adapted weights' gradients as ``LowRank`` factors (copies of the
            backward signal and the layer input) instead of ``[T, out, in]`` tensors.
        keep_state: keep this pass on the plan's TaskModel for the next ``hvp`` at the same point
            (which consumes it).

    Returns:
        ``(losses [T], grads_params, grads_fixed)``, gradients ``[T, ...]``.
    """
    p = _Params(plan, params, fixed)
    report_fixed = wrt_fixed and len(fixed) > 0
    want = (lambda where: where is not None and (where[0] or report_fixed))  # noqa: E731
    out, saved = _forward(plan, p, x, second=keep_state)
    losses, delta, probs = _loss_and_delta(plan, out, y)
    grads = {}
    # with keep_state, the pass goes down to the first layer (the HVP's mixed block may need it)
    stop = _needed_from(plan, (lambda where: where is not None) if keep_state else want)  # noqa: E731
    deltas = [None] * len(plan.layers)
    for i in range(len(plan.layers) - 1, stop - 1, -1):
        layer = plan.layers[i]
        deltas[i] = delta
        if isinstance(layer, Linear):
            if want(layer.weight):
                # factors only pay where they are smaller than the block (thin layers broadcast instead)
                factored = low_rank and layer.weight[0] and min(layer.in_features, layer.out_features) > x.shape[1]
                grads[layer.weight] = LowRank(delta, saved[i]) if factored else _outer(delta, saved[i], False)
            if want(layer.bias):
                grads[layer.bias] = _bias_grad(delta, False)
            if i > stop:
                delta = _back(delta, p.get(layer.weight))
        else:
            d, c = saved[i]
            # in place, except where the state keeps delta_h for the f'' term of the HVP (a LowRank
            # factor only ever holds a Linear layer's output delta, which _back has already copied)
            delta = delta * d if (keep_state and c is not None) else delta.mul_(d)
    if keep_state and plan.owner is not None:
        point = _point(params, fixed, plan, x, y)
        plan.owner._fused_state = _State(_state_key(point), point, saved, deltas, probs, stop)
    ga = [grads[(True, i)] for i in range(len(params))]
    gf = [grads[(False, i)] for i in range(len(fixed))] if report_fixed else []
    return losses, ga, gf


def _take_state(plan: MLPPlan, params, fixed, x, y, stop: int) -> Optional[_State]:
    """The state kept by ``grad(keep_state=True)`` at this very point, removed from its owner."""
    state = getattr(plan.owner, "_fused_state", None)
    if state is None or state.stop > stop or state.key != _state_key(_point(params, fixed, plan, x, y)):
        return None
    plan.owner._fused_state = None
    return state


def hvp(plan: MLPPlan, params: Sequence[Tensor], fixed: Sequence[Tensor], v: Sequence[Tensor], x: Tensor,
        y: Tensor, *, sum_tasks: bool = False):
    """Exact per-task ``H v`` by the R-operator, as ``fastmaml.meta.hvp.hvp`` returns it.

    Args:
        plan: from ``plan_for_call``.
        params: the point, ``[T, ...]`` or shared (no task dimension).
        fixed: tensors shared by the tasks (no direction on them).
        v: the direction ``[T, ...]`` for ``params`` (tensors or ``LowRank``).
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
    stop = _needed_from(plan, want)
    state = _take_state(plan, params, fixed, x, y, stop)
    if state is not None:
        saved, deltas, probs = state.saved, state.deltas, state.probs
    else:
        out, saved = _forward(plan, p, x, second=True)
        _, delta, probs = _loss_and_delta(plan, out, y, want_losses=False)
        deltas = None
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
    n_out = plan.out_features
    r_delta = (x.new_zeros(x.shape[0], x.shape[1], n_out) if r_h is None else _loss_r(plan, r_h, probs))
    hv = {}
    for i in range(len(plan.layers) - 1, stop - 1, -1):
        layer = plan.layers[i]
        if deltas is not None:
            delta = deltas[i]
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
                if deltas is None:
                    delta = _back(delta, w)
        else:
            d, c = saved[i]
            r_z = r_saved[i]
            if c is not None and r_z is not None:  # f'' term: R{delta_z} = f' (R{delta_h} + c R{z} delta_h)
                r_delta = r_delta.add_(c * r_z * delta).mul_(d)
            else:
                r_delta = r_delta.mul_(d)
            if deltas is None:
                delta = delta.mul_(d)
    hv_a = [hv[(True, i)] for i in range(len(params))]
    hv_f = [hv[(False, i)] for i in range(len(fixed))] if fixed else []
    return hv_a, hv_f
