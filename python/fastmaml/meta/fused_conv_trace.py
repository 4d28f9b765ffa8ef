"""The layer chain of a model with its own ``forward``, read by ``torch.fx``, for the fused conv path.

``fastmaml.meta.fused_conv`` knows ``Conv4`` and plain ``nn.Sequential`` chains directly. Models
written the way learn2learn's are (a ``ConvBlock`` module whose ``forward`` calls its conv, batch
norm, ReLU and pool in turn; ``Lambda(lambda x: x.mean(dim=[2, 3]))``; a ``Flatten`` doing
``x.view(x.size(0), -1)``) run the same layers through their own ``forward``. Here the forward is
traced symbolically and accepted when the traced graph is one chain: each step takes the previous
step's output as its only tensor and is one of

* a call of a supported module (``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.ReLU``, ``nn.MaxPool2d``,
  ``nn.Flatten``, ``nn.Linear``, ``nn.Identity``, ``nn.AdaptiveAvgPool2d(1)``; ``fused_conv``
  checks their settings),
* ``F.relu`` / ``torch.relu`` / ``x.relu()``, ``F.max_pool2d``, ``torch.flatten(x, 1)`` /
  ``x.flatten(1)``,
* ``x.mean((2, 3))`` / ``torch.mean`` over the two spatial dimensions, ``F.adaptive_avg_pool2d(x, 1)``,
* ``x.view(...)`` / ``x.reshape(...)`` with integer sizes and ``x.size(0)`` / ``x.shape[0]``.

Anything else (a second input, a branch the tracer cannot follow, a residual connection, a
parameter used outside its module, another function) gives ``(None, reason)`` and the generic
path runs. The forward must take the input alone: an argument with a default could take the
traced branch only for that default.
"""
from __future__ import annotations

import operator
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class _SpatialMeanModule(nn.Module):
    """Stands for a mean over the spatial dimensions in a traced chain."""

    def __init__(self, keepdim: bool):
        super().__init__()
        self.keepdim = keepdim


class _ReshapeModule(nn.Module):
    """Stands for ``view`` / ``reshape`` in a traced chain (``"N"`` = the sample count)."""

    def __init__(self, spec: tuple):
        super().__init__()
        self.spec = spec


_N = "N"  # a size that is the input's x.size(0)
_SHAPE = object()  # x.shape of the current activation


def _is_spatial(dims) -> bool:
    if isinstance(dims, int) or not isinstance(dims, (tuple, list)):
        return False
    return sorted(d % 4 if d < 0 else d for d in dims) == [2, 3] and all(type(d) is int for d in dims)


def _pool_module(args, kwargs) -> Optional[nn.Module]:
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    values = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names or k in values:
            return None
        values[k] = v
    if "kernel_size" not in values:
        return None
    return nn.MaxPool2d(**values)


def _size_spec(args) -> Optional[tuple]:
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = tuple(args[0])
    if not args or not all(a == _N if isinstance(a, str) else type(a) is int for a in args):
        return None
    return tuple(args)


_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def traced_chain(model: nn.Module):
    """``([(key, module), ...], None)``: the chain ``model``'s forward applies, with functional
    steps as stand-in modules; or ``(None, reason)``. Cached per model (a trace takes 6-8 ms on
    a 4-block CNN, and ``maml_loss(module, ...)`` builds a new ``TaskModel`` per call) until its
    modules change."""
    key = tuple((id(m), type(m), tuple(m._modules), m.training) for m in model.modules())
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    result = _trace(model)
    _CACHE[model] = (key, result)
    return result


def _trace(model: nn.Module):
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # data-dependent control flow, unsupported Python: not a chain
        return None, f"the forward of {type(model).__name__} could not be traced ({type(exc).__name__}: {exc})"
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None, f"the forward of {type(model).__name__} takes more than the input"
    modules = dict(model.named_modules())
    current = inputs[0]  # the node whose value is the activation
    helpers = {}  # node -> _N or _SHAPE
    chain = []

    def value(a):
        """A non-activation argument: a constant or a helper; None when it is not allowed."""
        if isinstance(a, torch.fx.Node):
            return helpers.get(a)
        if isinstance(a, (tuple, list)):
            vals = [value(e) for e in a]
            return None if any(v is None for v in vals) else type(a)(vals)
        return a

    for node in nodes[1:]:
        if node.op == "output":
            if node.args[0] is not current:
                return None, "the forward's output is not the last step of a chain"
            break
        args, kwargs = node.args, dict(node.kwargs)
        if (node.op == "call_function" and node.target is operator.getitem and len(args) == 2
                and helpers.get(args[0]) is _SHAPE and args[1] == 0):  # x.shape[0]
            helpers[node] = _N
            continue
        if not args or args[0] is not current:
            return None, f"step {node.name!r} does not take the previous step's output first (not a chain)"
        rest = [value(a) for a in args[1:]]
        kw = {k: value(v) for k, v in kwargs.items()}
        if any(v is None for v in rest) or any(v is None for k, v in kw.items() if kwargs[k] is not None):
            return None, f"step {node.name!r} uses another tensor or an unsupported argument"
        target = node.target
        step = None
        if node.op == "call_method" and target == "size" and rest == [0] and not kw:
            helpers[node] = _N
            continue
        if node.op == "call_function" and target is getattr and rest == ["shape"]:
            helpers[node] = _SHAPE
            continue
        if node.op == "call_module":
            if rest or kw:
                return None, f"module {target!r} is called with more than its input"
            step = modules[target]
            if type(step) is nn.AdaptiveAvgPool2d:
                if step.output_size not in (1, (1, 1)):
                    return None, f"AdaptiveAvgPool2d {target!r} does not pool to 1x1"
                step = _SpatialMeanModule(keepdim=True)
        elif node.op in ("call_function", "call_method"):
            step = _functional_step(node.op, target, rest, kw)
            if step is None:
                return None, f"step {node.name!r} ({getattr(target, '__name__', target)}) is not supported"
        else:
            return None, f"step {node.name!r} ({node.op}) is not supported"
        chain.append((target if node.op == "call_module" else node.name, step))
        current = node
    # each activation fed only the next step (as its first argument; any other use of a tensor
    # is refused above) and size helpers: the graph is a chain
    return chain, None


def _functional_step(op: str, target, rest: list, kw: dict) -> Optional[nn.Module]:
    if (op == "call_function" and target in (F.relu, torch.relu)) or (op == "call_method" and target == "relu"):
        if rest or any(k != "inplace" for k in kw):
            return None
        return nn.ReLU()
    if op == "call_function" and target is F.max_pool2d:
        return _pool_module(rest, kw)
    if (op == "call_function" and target is torch.flatten) or (op == "call_method" and target == "flatten"):
        start = rest[0] if rest else kw.get("start_dim", 0)
        end = rest[1] if len(rest) > 1 else kw.get("end_dim", -1)
        return nn.Flatten(start, end)
    if (op == "call_method" and target == "mean") or (op == "call_function" and target is torch.mean):
        dims = rest[0] if rest else kw.get("dim")
        keepdim = rest[1] if len(rest) > 1 else kw.get("keepdim", False)
        if not _is_spatial(dims) or type(keepdim) is not bool or set(kw) - {"dim", "keepdim"}:
            return None
        return _SpatialMeanModule(keepdim)
    if op == "call_function" and target is F.adaptive_avg_pool2d:
        size = rest[0] if rest else kw.get("output_size")
        return _SpatialMeanModule(True) if size in (1, (1, 1), [1, 1]) else None
    if op == "call_method" and target in ("view", "reshape") and not kw:
        spec = _size_spec(rest)
        return None if spec is None else _ReshapeModule(spec)
    return None
