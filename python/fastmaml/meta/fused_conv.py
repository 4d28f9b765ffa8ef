"""Fused path for conv-BN-ReLU-pool nets: per-task gradients and exact HVPs written out by hand.

The conv4 backbone of MAML / ANIL / MAML++ (``conv -> batch norm -> ReLU -> 2x2 max-pool`` blocks,
then a linear head) spends, under the generic loop, several milliseconds per task and inner step
in Python and in the autograd engine: building the graph of each op, running the Python
``autograd.Function`` of each compiled layer kernel, building the double-backward graph of the
HVP: the engine on conv4 with 4 filters on 16x16 images, where the arithmetic is negligible, took
1.3 s at K = 20 (higher: 0.8 s), against 4.2 s on workload A. Here each task's gradient is one explicit
forward and backward pass over the layer kernels (no graph), and the exact HVP is Pearlmutter's
R-operator written out: a forward pass carrying the tangent of every activation, then a backward
pass carrying the gradient and its tangent.

Per layer (``d`` = tangent, ``g`` = gradient, ``x`` the layer input, ``z`` its output):

* conv ``z = conv(x, W) + b``: ``dz = conv(dx, W) + conv(x, dW) + db``; backward ``g_x =
  conv^T(g_z, W)``, ``g_W = x * g_z`` (correlation); its tangent ``dg_W = dx * g_z + x * dg_z``,
  ``dg_x = conv^T(dg_z, W) + conv^T(g_z, dW)``. The first conv's input is data (``dx = 0``,
  no ``g_x``).
* batch norm on batch statistics ``a = w x^ + b``: its Jacobian in ``x`` is ``w r P`` with ``P``
  self-adjoint, so the forward tangent is the backward kernel applied to ``dz``; the tangent of
  the backward is the backward kernel applied to ``dg_a`` plus the double-backward kernel with
  ``(ggx, ggw) = (dz, dw)`` (the second derivative of ``<g_a, a(z, w)>`` is symmetric).
* ReLU (mask fixed, its tangent is zero almost everywhere) and max-pool (argmax fixed): linear
  maps applied to the tangents and gradients alike. ``ReLU -> pool`` runs as ``pool -> ReLU``
  (the same values and derivatives), and a batch norm followed by a pool is differentiated as one
  layer (``csrc/cpu/bn_pool_cpu.cpp``: the pool's gradients and tangents are read only at the
  argmaxes).
* linear head and cross-entropy / MSE: as in ``fastmaml.meta.fused_mlp``.

Supported (``plan_for``; anything else goes to the generic path, never an error):

* model: ``fastmaml.meta.models.Conv4``, an ``nn.Sequential`` (nested ones allowed), or any
  module whose ``forward`` applies one chain of steps (read by ``torch.fx`` tracing:
  ``fastmaml.meta.fused_conv_trace``; learn2learn's ``ConvBlock`` / ``Lambda`` / ``Flatten``
  style), of ``nn.Conv2d`` (zero padding as numbers, ``"valid"`` or ``"same"`` on odd-sized
  kernels; any stride and dilation; ``groups = 1``), ``nn.BatchNorm2d`` after a conv (batch
  statistics are used whatever the flags, as everywhere in the engine; running statistics never
  touched), ReLU (module or function),
  2x2 max-pool with stride 2 (no padding / dilation / ceil mode), global average pooling
  (``x.mean((2, 3))``, ``nn.AdaptiveAvgPool2d(1)``), ``nn.Flatten()`` / ``x.view(x.size(0), -1)``
  and other views / reshapes that keep the sample dimension first, ``nn.Identity``, and
  ``nn.Linear`` on flat features; at least one conv, a linear layer last; no hooks; every
  parameter belongs to one of these layers;
* loss: cross-entropy or MSE as ``fastmaml.meta.fused_mlp`` recognises them;
* data: ``x [T, N, ...]`` float32 / float64 on the CPU whose per-task shape the layers take
  (``output_shape``), targets as for the MLP path; the compiled layer kernels (``fastmaml._C``)
  available.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import bn_pool as _bn_pool  # noqa: F401 (the merged layer's kernels: their fakes)
from ..ops._native_cpu import native_available, plain_cpu_float
from ..ops.cpu_kernels import layer_kernels_enabled
from .fused_conv_trace import _ReshapeModule, _SpatialMeanModule, traced_chain as _traced_chain
from .fused_mlp import _global_hooks, _has_hooks, _loss_kind, cached_plan, call_tensors_fit, targets_fit, task_model_of
from .models import Conv4

_ops = torch.ops.fastmaml
_aten = torch.ops.aten


@dataclass(frozen=True)
class Conv:
    weight: tuple  # (is_adapted, index)
    bias: Optional[tuple]
    stride: tuple
    padding: tuple
    dilation: tuple
    first: bool = False  # its input is the data: no input gradient


@dataclass(frozen=True)
class BatchNorm:
    weight: Optional[tuple]
    bias: Optional[tuple]
    eps: float
    channels: int


@dataclass(frozen=True)
class BatchNormPool:
    """Batch norm followed by a 2x2 max-pool, run as one layer (``csrc/cpu/bn_pool_cpu.cpp``)."""
    weight: Optional[tuple]
    bias: Optional[tuple]
    eps: float
    channels: int


@dataclass(frozen=True)
class ReLU:
    pass


@dataclass(frozen=True)
class Pool:
    pass


@dataclass(frozen=True)
class Flatten:
    pass


@dataclass(frozen=True)
class SpatialMean:
    """``x.mean((2, 3))``: global average pooling (``keepdim`` keeps ``[N, C, 1, 1]``)."""
    keepdim: bool


@dataclass(frozen=True)
class Reshape:
    """``x.reshape(spec)`` / ``x.view(spec)``, ``"N"`` in ``spec`` standing for ``x.shape[0]``
    (``x.view(x.size(0), -1)``); the sample dimension must come out first and unchanged."""
    spec: tuple

    def shape_for(self, n: int) -> list:
        return [n if e == "N" else e for e in self.spec]


@dataclass(frozen=True)
class Dense:
    weight: tuple
    bias: Optional[tuple]


@dataclass(frozen=True)
class ConvPlan:
    """What the fused conv path runs: the layers in order (after the pool / ReLU reordering and the
    batch-norm + pool merge), the loss (``"cross_entropy"`` or ``"mse"``), the input channels, the
    parameter shapes by slot, and the model's own fixed tensors when a call passes none."""
    layers: tuple
    loss: str
    in_channels: int
    shapes: dict = field(default_factory=dict, compare=False)
    module_fixed: tuple = ()


def _chain(model: nn.Module):
    """The modules ``model`` applies in order, or ``None`` when its forward is not a known chain."""
    if type(model) is Conv4:
        inner = _chain(model.features)
        return None if inner is None else [(f"features.{k}", m) for k, m in inner] + [("", nn.Flatten()),
                                                                                        ("head", model.head)]
    if type(model).forward is not nn.Sequential.forward or type(model).__iter__ is not nn.Sequential.__iter__:
        return None
    out = []
    for key, m in model._modules.items():
        if m is None:
            return None
        if isinstance(m, nn.Sequential) and type(m) is not nn.Sequential:
            return None
        if type(m) is nn.Sequential:
            inner = _chain(m)
            if inner is None:
                return None
            out += [(f"{key}.{k}", c) for k, c in inner]
        else:
            out.append((key, m))
    return out


def _build(task_model):
    """``(plan, None)`` when this ``TaskModel`` can run fused, else ``(None, reason)``."""
    model = task_model.model
    if task_model.context:
        return None, "CAVIA (adapt='context') passes the context to forward"
    loss = _loss_kind(task_model.loss_fn)
    if loss is None:
        return None, "the loss is not cross-entropy or MSE as the fused paths recognise them"
    if _global_hooks() or any(_has_hooks(m) for m in model.modules()):
        return None, "a forward or backward hook is registered"
    chain = _chain(model)
    if chain is not None:
        plan, reason = _plan_from_chain(task_model, chain, loss)
        if plan is not None or all(type(m) in _LAYER_MODULES for _, m in chain):
            return plan, reason
    # a forward of its own somewhere (a custom module, a Sequential subclass): read it by tracing
    chain, reason = _traced_chain(model)
    if chain is None:
        return None, reason
    return _plan_from_chain(task_model, chain, loss)


_LAYER_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Identity, nn.MaxPool2d, nn.Flatten, nn.Linear)


def _plan_from_chain(task_model, chain, loss):
    """``(plan, None)`` for the modules ``chain`` applies in order, or ``(None, reason)``."""
    model = task_model.model
    slot = {name: (True, i) for i, name in enumerate(task_model.adapt_names)}
    slot.update({name: (False, i) for i, name in enumerate(task_model.fixed_names)})
    layers, used, seen, in_channels = [], set(), set(), None
    rank = 4  # of the activation: 4 = [N, C, H, W] images, 2 = [N, F] features

    def own(key, m, names):
        full = [f"{key}.{n}" for n in names if getattr(m, n) is not None]
        if any(n not in slot for n in full) or any(p is not None for n, p in m._parameters.items()
                                                  if n not in names):
            return None
        used.update(full)
        return [slot[f"{key}.{n}"] if getattr(m, n) is not None else None for n in names]

    for key, m in chain:
        if id(m) in seen and type(m) not in (nn.ReLU, nn.Flatten, nn.Identity):
            return None, f"module {key!r} appears twice"
        seen.add(id(m))
        kind = type(m)
        if rank == 4 and kind is nn.Conv2d:
            padding = _numeric_padding(m)
            if m.groups != 1 or m.padding_mode != "zeros" or padding is None or m.transposed or m.weight is None:
                return None, (f"Conv2d {key!r} has groups, padding='same' on an even-sized kernel, or a padding "
                              "mode the fused path lacks")
            where = own(key, m, ("weight", "bias"))
            if where is None:
                return None, f"the parameters of {key!r} are not (only) its own"
            if in_channels is None:
                in_channels = m.in_channels
            layers.append(Conv(where[0], where[1], tuple(m.stride), padding, tuple(m.dilation),
                               first=not any(isinstance(layer, Conv) for layer in layers)))
        elif rank == 4 and kind is nn.BatchNorm2d:
            if not layers or not isinstance(layers[-1], Conv):
                return None, f"BatchNorm2d {key!r} does not follow a Conv2d"
            where = own(key, m, ("weight", "bias"))
            if where is None:
                return None, f"the parameters of {key!r} are not (only) its own"
            layers.append(BatchNorm(where[0], where[1], float(m.eps), m.num_features))
        elif kind is nn.ReLU:
            layers.append(ReLU())
        elif kind is nn.Identity:
            continue
        elif rank == 4 and kind is nn.MaxPool2d:
            ks, st = m.kernel_size, m.stride if m.stride is not None else m.kernel_size
            if (ks not in (2, (2, 2)) or st not in (2, (2, 2)) or m.padding not in (0, (0, 0))
                    or m.dilation not in (1, (1, 1)) or m.ceil_mode or m.return_indices):
                return None, f"MaxPool2d {key!r} is not a plain 2x2 pool with stride 2"
            layers.append(Pool())
        elif rank == 4 and kind is _SpatialMeanModule:
            layers.append(SpatialMean(m.keepdim))
            rank = 4 if m.keepdim else 2
        elif kind is nn.Flatten:
            if m.start_dim != 1 or m.end_dim != -1:
                return None, f"Flatten {key!r} does not flatten all but the sample dimension"
            layers.append(Flatten())
            rank = 2
        elif kind is _ReshapeModule:
            if len(m.spec) not in (2, 4):
                return None, f"the reshape at {key!r} does not give [N, F] or [N, C, H, W]"
            layers.append(Reshape(m.spec))
            rank = len(m.spec)
        elif rank == 2 and kind is nn.Linear:
            where = own(key, m, ("weight", "bias"))
            if where is None:
                return None, f"the parameters of {key!r} are not (only) its own"
            layers.append(Dense(where[0], where[1]))
        else:
            return None, (f"module {key!r} ({kind.__name__}) is not supported here (on "
                          f"{'images' if rank == 4 else 'flat features'})")
    if rank != 2 or in_channels is None or not layers or not isinstance(layers[-1], Dense):
        return None, "the model is not convolutions, a flatten and a linear head"
    if used != set(slot):
        return None, "the model has parameters outside its layers"
    layers = _merge_batch_norm_pool(_pool_before_relu(layers))
    named = dict(model.named_parameters())
    shapes = {where: tuple(named[name].shape) for name, where in slot.items()}
    return ConvPlan(tuple(layers), loss, in_channels, shapes), None


def _numeric_padding(conv: nn.Conv2d) -> Optional[tuple]:
    """``conv``'s padding as two ints: ``"valid"`` is 0; ``"same"`` (stride 1) is half the kernel's
    extent ``dilation * (k - 1)`` when that is even (torch pads an odd extent one more on the
    right, which a symmetric padding cannot say: None)."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    extents = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if any(e % 2 for e in extents):
        return None
    return tuple(e // 2 for e in extents)


def _pool_before_relu(layers: list) -> list:
    """``relu -> max-pool`` as ``max-pool -> relu``: the same values and derivatives (ReLU is
    monotone, so the window's argmax is the same; a window with no positive entry gives 0 and a
    zero gradient either way), with the ReLU and its mask on a 4x smaller tensor. On conv4's first
    block (75 query images, ``[75, 64, 28, 28]``) the two ReLU ops took 8.8 ms of a task's 86 ms."""
    out = list(layers)
    for i in range(len(out) - 1):
        if isinstance(out[i], ReLU) and isinstance(out[i + 1], Pool):
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _merge_batch_norm_pool(layers: list) -> list:
    """``batch norm -> max-pool`` as one ``BatchNormPool`` layer: the pool's gradient and tangent
    are nonzero only at each window's argmax, so the pair's backward and R-operator read and write
    each dense tensor once (on conv4's first block a quarter of the work of the two apart)."""
    out = []
    for layer in layers:
        if isinstance(layer, Pool) and out and isinstance(out[-1], BatchNorm):
            bn = out.pop()
            out.append(BatchNormPool(bn.weight, bn.bias, bn.eps, bn.channels))
        else:
            out.append(layer)
    return out


def _fingerprint(task_model) -> tuple:
    model, loss_fn = task_model.model, task_model.loss_fn
    loss = (id(loss_fn), getattr(loss_fn, "reduction", None), getattr(loss_fn, "label_smoothing", None),
            id(getattr(loss_fn, "weight", None)))
    mods = tuple((id(m), type(m), _has_hooks(m), tuple((n, id(p)) for n, p in m._parameters.items()),
                  tuple(m._modules)) for m in model.modules())
    return (loss, mods, _global_hooks(), task_model.context, task_model.adapt_names)


def why_not(task_model) -> Optional[str]:
    return _build(task_model)[1]


def plan_for(task_model) -> Optional[ConvPlan]:
    """The fused plan for a ``TaskModel`` (cached, rebuilt when the model changes), or ``None``."""
    return cached_plan(task_model, "_fused_conv_plan", _fingerprint, _build)


# compiled ops the passes call
_KERNELS = ("batch_norm_train", "max_pool2x2", "relu_bitmask", "batch_norm_pool2x2_hvp_backward")


def plan_for_call(task_loss, params, fixed, task_args, shared_params: bool) -> Optional[ConvPlan]:
    """The plan when this call (a ``TaskModel.task_loss`` on ``(x, y)``) can run fused, else ``None``
    (parameters and targets checked as for the MLP path: ``fused_mlp.call_tensors_fit``,
    ``fused_mlp.targets_fit``)."""
    task_model = task_model_of(task_loss, task_args)
    if task_model is None or not (layer_kernels_enabled() and all(native_available(op) for op in _KERNELS)):
        return None
    plan = plan_for(task_model)
    if plan is None:
        return None
    x, y = task_args
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)) or x.dim() < 3 or x.shape[1] < 1:
        return None
    if not plain_cpu_float(x):  # plain: also no torch.func transform active
        return None
    num_tasks, n = x.shape[0], x.shape[1]
    outputs = plan.shapes[_last_dense(plan).weight][0]
    if output_shape(plan, tuple(x.shape[1:])) != (n, outputs):
        return None
    module_fixed = call_tensors_fit(task_model, plan.shapes, params, fixed, shared_params, num_tasks, x)
    if module_fixed is None or not targets_fit(plan.loss, y, x, num_tasks, n, outputs):
        return None
    return replace(plan, module_fixed=module_fixed) if module_fixed else plan


def output_shape(plan: ConvPlan, shape: tuple) -> Optional[tuple]:
    """The output shape for one task's input ``shape`` (``[N, ...]``), or ``None`` where a layer
    does not take its input (channels, ranks, a reshape that moves the sample dimension, a pool or
    batch norm on too few values): the call then runs on the generic path, which reports it."""
    n, shape = shape[0], list(shape)
    for layer in plan.layers:
        if isinstance(layer, Conv):
            cout, cin, *k = plan.shapes[layer.weight]
            if len(shape) != 4 or shape[1] != cin:
                return None
            hw = [(shape[2 + i] + 2 * layer.padding[i] - layer.dilation[i] * (k[i] - 1) - 1) // layer.stride[i] + 1
                  for i in range(2)]
            if min(hw) < 1:
                return None
            shape = [n, cout, *hw]
        elif isinstance(layer, (BatchNorm, BatchNormPool, Pool)):
            normed, pooled = not isinstance(layer, Pool), not isinstance(layer, BatchNorm)
            if len(shape) != 4:
                return None
            if normed and (shape[1] != layer.channels or n * shape[2] * shape[3] < 2):  # batch statistics
                return None
            if pooled:
                if min(shape[2:]) < 2:
                    return None
                shape = [n, shape[1], shape[2] // 2, shape[3] // 2]
        elif isinstance(layer, Flatten):
            shape = [n, math.prod(shape[1:])]
        elif isinstance(layer, SpatialMean):
            if len(shape) != 4:
                return None
            shape = [n, shape[1], 1, 1] if layer.keepdim else [n, shape[1]]
        elif isinstance(layer, Reshape):
            shape = _reshaped(shape, layer.shape_for(n))
            if shape is None or shape[0] != n:
                return None
        elif isinstance(layer, Dense):
            out_f, in_f = plan.shapes[layer.weight]
            if len(shape) != 2 or shape[1] != in_f:
                return None
            shape = [n, out_f]
    return tuple(shape)


def _reshaped(shape: list, spec: list) -> Optional[list]:
    """``spec`` with its ``-1`` resolved for a tensor of ``shape``, or None when it does not fit."""
    total, known = math.prod(shape), math.prod(e for e in spec if e != -1)
    free = spec.count(-1)
    if free > 1 or any(e < -1 for e in spec) or known == 0:
        return None
    if free:
        if total % known:
            return None
        spec = [total // known if e == -1 else e for e in spec]
    return spec if math.prod(spec) == total else None


def _last_dense(plan: ConvPlan) -> Dense:
    return next(layer for layer in reversed(plan.layers) if isinstance(layer, Dense))


# ---------------------------------------------------------------------------------------------
# One task's passes. ``P(where)`` is the task's tensor for a parameter slot (None: absent);
# directions ``D(where)`` may be None (zero: a fixed tensor, or ANIL's body).
# ---------------------------------------------------------------------------------------------
def _conv_args(layer: Conv):
    return layer.stride, layer.padding, layer.dilation


def _forward(plan: ConvPlan, P, x: Tensor, keep_xhat: bool):
    """Forward pass; returns the output and what the backward needs, per layer."""
    saved = []
    h = x
    for layer in plan.layers:
        h, s = _forward_layer(layer, P, h, keep_xhat)
        saved.append(s)
    return h, saved


def _forward_layer(layer, P, h: Tensor, keep_xhat: bool):
    """One layer's output and what its backward needs."""
    if isinstance(layer, Conv):
        return F.conv2d(h, P(layer.weight), P(layer.bias), *_conv_args(layer)), h
    if isinstance(layer, BatchNorm):
        w, b = _bn_affine(layer, P, h)
        if keep_xhat:  # the R-operator needs x^ itself: normalise with w = 1, b = 0, then scale
            xhat, mean, invstd = _ops.batch_norm_train(h, torch.ones_like(w), torch.zeros_like(b), layer.eps)
            out = torch.addcmul(b.view(1, -1, 1, 1), xhat, w.view(1, -1, 1, 1))
        else:
            out, mean, invstd = _ops.batch_norm_train(h, w, b, layer.eps)
            xhat = None
        return out, (h, w, mean, invstd, xhat)
    if isinstance(layer, BatchNormPool):
        w, b = _bn_affine(layer, P, h)
        # batch norm then the pool (their AVX2 / simd kernels): faster than the fused forward's
        # scalar window loop; the pair's derivatives run fused
        a, mean, invstd = _ops.batch_norm_train(h, w, b, layer.eps)
        out, code = _ops.max_pool2x2(a)
        return out, (h, w, mean, invstd, code)
    if isinstance(layer, ReLU):
        return _ops.relu_bitmask(h)
    if isinstance(layer, Pool):
        out, code = _ops.max_pool2x2(h)
        return out, (code, h.shape[-2], h.shape[-1])
    if isinstance(layer, Flatten):
        return h.reshape(h.shape[0], -1), h.shape
    if isinstance(layer, SpatialMean):
        return h.mean((2, 3), keepdim=layer.keepdim), h.shape
    if isinstance(layer, Reshape):
        return h.reshape(layer.shape_for(h.shape[0])), h.shape
    return F.linear(h, P(layer.weight), P(layer.bias)), h  # Dense


def _bn_directions(layer, D):
    """``(dw, db)`` of a batch norm's affine parameters (None where absent or zero)."""
    return (D(layer.weight) if layer.weight is not None else None,
            D(layer.bias) if layer.bias is not None else None)


def _bn_affine(layer: BatchNorm, P, h: Tensor):
    c = h.shape[1]
    w = P(layer.weight) if layer.weight is not None else h.new_ones(c)
    b = P(layer.bias) if layer.bias is not None else h.new_zeros(c)
    return w, b


def _loss_grad(plan: ConvPlan, out: Tensor, y: Tensor):
    """(loss, dloss/dout, softmax probabilities or None)."""
    if plan.loss == "cross_entropy":
        logp = torch.log_softmax(out, 1)
        loss = -logp.gather(1, y.long().unsqueeze(1)).mean()
        probs = logp.exp_()
        g = probs.clone()
        g[torch.arange(out.shape[0]), y.long()] -= 1.0
        return loss, g.div_(out.shape[0]), probs
    diff = out - y
    return diff.pow(2).mean(), diff.mul_(2.0 / out.numel()), None


def _loss_r(plan: ConvPlan, d_out: Tensor, probs: Optional[Tensor], n: int) -> Tensor:
    """Tangent of dloss/dout along the output tangent ``d_out``."""
    if plan.loss == "cross_entropy":
        pd = probs * d_out
        return (pd - probs * pd.sum(1, keepdim=True)).div_(n)
    return d_out * (2.0 / d_out.numel())


def _spread(g: Tensor, shape) -> Tensor:
    """The gradient of a spatial mean: ``g / (H W)`` at every position of the ``[N, C, H, W]`` input."""
    n, c, h, w = shape
    return g.reshape(n, c, 1, 1).div(h * w).expand(n, c, h, w).contiguous()


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a.add_(b)


def task_grad(plan: ConvPlan, P, x: Tensor, y: Tensor, want) -> tuple:
    """One task's loss and gradients ``{slot: tensor}`` for the slots ``want`` accepts."""
    out, saved = _forward(plan, P, x, keep_xhat=False)
    loss, g, _ = _loss_grad(plan, out, y)
    grads = {}
    for layer in reversed(plan.layers):
        s = saved.pop()  # dropped after its layer, as autograd frees saved tensors (peak memory)
        if isinstance(layer, Dense):
            if want(layer.weight):
                grads[layer.weight] = g.t().mm(s)
            if layer.bias is not None and want(layer.bias):
                grads[layer.bias] = g.sum(0)
            g = g.mm(P(layer.weight))
        elif isinstance(layer, (Flatten, Reshape)):
            g = g.reshape(s)
        elif isinstance(layer, SpatialMean):
            g = _spread(g, s)
        elif isinstance(layer, Pool):
            g = _ops.max_pool2x2_scatter(g, s[0], s[1], s[2])
        elif isinstance(layer, ReLU):
            g = _ops.bitmask_select(g, s)
        elif isinstance(layer, (BatchNorm, BatchNormPool)):
            h, w, mean, invstd, code = s
            if isinstance(layer, BatchNormPool):
                g, gw, gb = _ops.batch_norm_pool2x2_backward(g, code, h, w, mean, invstd)
            else:
                g, gw, gb = _ops.batch_norm_train_backward(g, h, w, mean, invstd)
            if layer.weight is not None and want(layer.weight):
                grads[layer.weight] = gw
            if layer.bias is not None and want(layer.bias):
                grads[layer.bias] = gb
        else:  # Conv
            wt = P(layer.weight)
            mask = [not layer.first, want(layer.weight), layer.bias is not None and want(layer.bias)]
            gx, gw, gb = _aten.convolution_backward(g, s, wt, [wt.shape[0]], *_conv_args(layer), False, [0, 0], 1,
                                                    mask)
            if mask[1]:
                grads[layer.weight] = gw
            if mask[2]:
                grads[layer.bias] = gb
            g = gx
            if layer.first:  # what comes before it (reshapes of the data) has no parameters
                break
    return loss, grads


def task_hvp(plan: ConvPlan, P, D, x: Tensor, y: Tensor, want) -> dict:
    """One task's ``H v`` ``{slot: tensor}`` (all slots ``want`` accepts, adapted and fixed) for
    the direction ``D`` (``D(slot)`` None where the direction is zero)."""
    # Forward and R-forward in one sweep, each layer's tangent right after its output (its
    # input still in cache): the tangent of every layer's output (None while zero)
    saved, tangents = [], []
    h, d = x, None
    for layer in plan.layers:
        h, s = _forward_layer(layer, P, h, keep_xhat=True)  # x^ for batch norms without a pool after them
        saved.append(s)
        if isinstance(layer, Conv):
            tangents.append(d)  # the input tangent, for the backward
            dw, db = D(layer.weight), (D(layer.bias) if layer.bias is not None else None)
            wt = P(layer.weight)
            dz = None
            if dw is not None:  # conv(x, dW) + db: the bias tangent rides as the conv's bias
                dz = F.conv2d(s, dw, db, *_conv_args(layer))
            elif db is not None:
                dz = s.new_zeros(s.shape[0], wt.shape[0], *_conv_out_hw(s, wt, layer)).add_(db.view(1, -1, 1, 1))
            if d is not None:
                dz = _add(dz, F.conv2d(d, wt, None, *_conv_args(layer)))
            d = dz
        elif isinstance(layer, BatchNorm):
            h_in, w, mean, invstd, xhat = s
            tangents.append(d)
            dw, db = _bn_directions(layer, D)
            da = None
            if d is not None:
                da = _ops.batch_norm_train_backward(d, h_in, w, mean, invstd)[0]  # w r P(dz)
            if dw is not None:
                da = _add(da, xhat * dw.view(1, -1, 1, 1))
            if db is not None:
                da = da.add_(db.view(1, -1, 1, 1)) if da is not None else (
                    db.view(1, -1, 1, 1).expand_as(xhat).clone())
            d = da
        elif isinstance(layer, BatchNormPool):
            h_in, w, mean, invstd, code = s
            tangents.append(d)
            dw, db = _bn_directions(layer, D)
            if d is not None or dw is not None or db is not None:
                zero_c = w.new_zeros(w.shape)
                d = _ops.batch_norm_pool2x2_jvp(d if d is not None else torch.zeros_like(h_in), code, h_in, w,
                                                zero_c if dw is None else dw, zero_c if db is None else db, mean,
                                                invstd)
        elif isinstance(layer, ReLU):
            tangents.append(None)
            d = None if d is None else _ops.bitmask_select(d, s)
        elif isinstance(layer, Pool):
            tangents.append(None)
            d = None if d is None else _ops.max_pool2x2_gather(d, s[0])
        elif isinstance(layer, Flatten):
            tangents.append(None)
            d = None if d is None else d.reshape(d.shape[0], -1)
        elif isinstance(layer, SpatialMean):
            tangents.append(None)
            d = None if d is None else d.mean((2, 3), keepdim=layer.keepdim)
        elif isinstance(layer, Reshape):
            tangents.append(None)
            d = None if d is None else d.reshape(layer.shape_for(d.shape[0]))
        else:  # Dense
            tangents.append(d)
            dw = D(layer.weight)
            db = D(layer.bias) if layer.bias is not None else None
            dz = None if d is None else F.linear(d, P(layer.weight))
            if dw is not None:
                dz = _add(dz, F.linear(s, dw))
            if db is not None:
                dz = dz.add_(db) if dz is not None else db.expand(s.shape[0], -1).clone()
            d = dz
    out = h
    n = out.shape[0]
    _, g, probs = _loss_grad(plan, out, y)
    dg = None if d is None else _loss_r(plan, d, probs, n)
    hv = {}
    # R-backward: g (gradient at the layer output) and dg (its tangent), from the head down
    for layer in reversed(plan.layers):
        s, dx = saved.pop(), tangents.pop()
        if isinstance(layer, Dense):
            wt = P(layer.weight)
            dw = D(layer.weight)
            if want(layer.weight):
                hw = None if dg is None else dg.t().mm(s)
                if dx is not None:
                    hw = _add(hw, g.t().mm(dx))
                hv[layer.weight] = hw
            if layer.bias is not None and want(layer.bias):
                hv[layer.bias] = None if dg is None else dg.sum(0)
            ndg = None if dg is None else dg.mm(wt)
            if dw is not None:
                ndg = _add(ndg, g.mm(dw))
            g, dg = g.mm(wt), ndg
        elif isinstance(layer, (Flatten, Reshape)):
            g = g.reshape(s)
            dg = None if dg is None else dg.reshape(s)
        elif isinstance(layer, SpatialMean):
            g = _spread(g, s)
            dg = None if dg is None else _spread(dg, s)
        elif isinstance(layer, Pool):
            g = _ops.max_pool2x2_scatter(g, s[0], s[1], s[2])
            dg = None if dg is None else _ops.max_pool2x2_scatter(dg, s[0], s[1], s[2])
        elif isinstance(layer, ReLU):
            g = _ops.bitmask_select(g, s)
            dg = None if dg is None else _ops.bitmask_select(dg, s)
        elif isinstance(layer, BatchNorm):
            h, w, mean, invstd, _ = s
            dw = _bn_directions(layer, D)[0]
            ngx = hw_ = hb = None
            if dg is not None:
                ngx, hw_, hb = _ops.batch_norm_train_backward(dg, h, w, mean, invstd)
            if dx is not None or dw is not None:
                zero_c = w.new_zeros(w.shape)
                ddx, ddw, _ = _ops.batch_norm_train_double_backward(
                    dx if dx is not None else torch.zeros_like(h), dw if dw is not None else zero_c, zero_c, g, h, w,
                    mean, invstd)
                ngx, hw_ = _add(ngx, ddx), _add(hw_, ddw)
            if layer.weight is not None and want(layer.weight):
                hv[layer.weight] = hw_
            if layer.bias is not None and want(layer.bias):
                hv[layer.bias] = hb
            g = _ops.batch_norm_train_backward(g, h, w, mean, invstd)[0] if not _is_first_block(plan, layer) else None
            dg = ngx
        elif isinstance(layer, BatchNormPool):
            h, w, mean, invstd, code = s
            dw = _bn_directions(layer, D)[0]
            first = _is_first_block(plan, layer)  # nobody needs the first block's primal input gradient
            if dg is None and dx is None and dw is None:  # no tangent reaches this block
                g = None if first else _ops.batch_norm_pool2x2_backward(g, code, h, w, mean, invstd)[0]
                continue
            dgx, gx, hw_, hb = _ops.batch_norm_pool2x2_hvp_backward(
                g, torch.zeros_like(g) if dg is None else dg, code, torch.zeros_like(h) if dx is None else dx, h, w,
                w.new_zeros(w.shape) if dw is None else dw, mean, invstd, not first)
            if layer.weight is not None and want(layer.weight):
                hv[layer.weight] = hw_
            if layer.bias is not None and want(layer.bias):
                hv[layer.bias] = hb
            g, dg = (None if first else gx), dgx
        else:  # Conv
            wt = P(layer.weight)
            dw = D(layer.weight)
            args = (*_conv_args(layer), False, [0, 0], 1)
            want_w = want(layer.weight)
            want_b = layer.bias is not None and want(layer.bias)
            ndg = hw = hb = None
            if dg is not None:
                ndg, hw, hb = _aten.convolution_backward(dg, s, wt, [wt.shape[0]], *args,
                                                         [not layer.first, want_w, want_b])
            if not layer.first and (dx is not None or dw is not None):
                a = _aten.convolution_backward(g, dx if dx is not None else s, dw if dw is not None else wt,
                                               [wt.shape[0]], *args,
                                               [dw is not None, want_w and dx is not None, False])
                if dw is not None:
                    ndg = _add(ndg, a[0])
                if want_w and dx is not None:
                    hw = _add(hw, a[1])
            if want_w:
                hv[layer.weight] = hw
            if want_b:
                hv[layer.bias] = hb
            if not layer.first:
                g = _aten.convolution_backward(g, s, wt, [wt.shape[0]], *args, [True, False, False])[0]
            dg = ndg
            if layer.first:  # what comes before it (reshapes of the data) has no parameters
                break
    return hv


def _is_first_block(plan: ConvPlan, bn) -> bool:
    """Whether ``bn`` follows the first conv (whose input gradient nobody needs)."""
    for layer in plan.layers:
        if isinstance(layer, (BatchNorm, BatchNormPool)):
            return layer is bn
    return False


def _conv_out_hw(x: Tensor, wt: Tensor, layer: Conv):
    out = []
    for i in range(2):
        size = x.shape[2 + i] + 2 * layer.padding[i] - layer.dilation[i] * (wt.shape[2 + i] - 1) - 1
        out.append(size // layer.stride[i] + 1)
    return out


# ---------------------------------------------------------------------------------------------
# Batched entry points (the loop over tasks).
# ---------------------------------------------------------------------------------------------
def _getter(plan: ConvPlan, params, fixed, t: int, shared: bool):
    fixed = fixed or plan.module_fixed

    def get(where):
        if where is None:
            return None
        adapted, i = where
        if adapted:
            return params[i] if shared else params[i][t]
        return fixed[i]
    return get


class _Rows:
    """The ``[T, ...]`` outputs of a loop over tasks (or their sums over tasks), written in place
    as each task finishes: no per-task list to stack at the end. A slot a task left out is zero."""

    def __init__(self, plan: ConvPlan, keys, num_tasks: int, like: Tensor, summed: bool = False):
        lead = () if summed else (num_tasks,)
        self.summed = summed
        self.out = {k: like.new_zeros(lead + plan.shapes[k]) if summed else like.new_empty(lead + plan.shapes[k])
                    for k in keys}

    def put(self, t: int, values: dict) -> None:
        for k, dst in self.out.items():
            h = values.get(k)
            if self.summed:
                if h is not None:
                    dst.add_(h)
            elif h is None:
                dst[t].zero_()
            else:
                dst[t].copy_(h)

    def lists(self, n_a: int, n_f: int):
        return [self.out[(True, i)] for i in range(n_a)], [self.out[(False, i)] for i in range(n_f) if (False, i)
                                                           in self.out]


def grad(plan: ConvPlan, params: Sequence[Tensor], fixed: Sequence[Tensor], x: Tensor, y: Tensor, *,
         wrt_fixed: bool = False, shared: bool = False):
    """Per-task losses and gradients, like ``hvp.batched_grad``: ``(losses [T], grads_params,
    grads_fixed)``."""
    n_a, n_f = len(params), len(plan.module_fixed or fixed)
    want = (lambda where: True) if wrt_fixed else (lambda where: where[0])
    num_tasks = x.shape[0]
    rows = _Rows(plan, [k for k in plan.shapes if want(k)], num_tasks, x)
    losses = x.new_empty(num_tasks)
    with torch.no_grad():
        for t in range(num_tasks):
            loss, g = task_grad(plan, _getter(plan, params, fixed, t, shared), x[t], y[t], want)
            losses[t] = loss
            rows.put(t, g)
        ga, gf = rows.lists(n_a, n_f)
        return losses, ga, (gf if wrt_fixed else [])


def hvp(plan: ConvPlan, params: Sequence[Tensor], fixed: Sequence[Tensor], v: Sequence[Tensor], x: Tensor,
        y: Tensor, *, shared: bool = False, sum_tasks: bool = False):
    """``H_t v_t`` per task restricted to the adapted tensors, and the mixed block with the fixed
    ones (``[]`` without fixed tensors), like ``hvp.hvp``; summed over tasks with ``sum_tasks``."""
    n_a = len(params)
    fixed_given = list(fixed)
    n_f = len(fixed_given)
    want = (lambda where: True) if n_f else (lambda where: where[0])
    rows = _Rows(plan, [k for k in plan.shapes if want(k)], x.shape[0], x, summed=sum_tasks)
    with torch.no_grad():
        for t in range(x.shape[0]):
            get = _getter(plan, params, fixed_given, t, shared)

            def direction(where, t=t):
                if where is None or not where[0]:
                    return None
                return v[where[1]][t]
            rows.put(t, task_hvp(plan, get, direction, x[t], y[t], want))
        return rows.lists(n_a, n_f)
