"""Stacked batching: all tasks in one forward pass, per-task weights as a leading task dimension.

``vmap`` and the per-task loop pay per op (vmap's batching rules, jvp of grad) or per task (Python
and small kernels); for many small tasks both dominate the arithmetic (the 1000-task sinusoid
MLP: ~30 ms under vmap for ~1 MFLOP of work). Here the tasks' data are merged into one batch
``[T*N, ...]`` and the model runs once, unchanged, through ``functional_call`` with parameters
``[T, ...]``; a ``TorchFunctionMode`` rewrites the few ops that touch a per-task weight:

* ``F.linear`` with a weight ``[T, out, in]``: one ``baddbmm`` over the tasks;
* ``F.conv2d`` with a weight ``[T, out, in, kh, kw]``: one grouped convolution (``groups = T``);
* ``F.batch_norm``: per-task batch statistics (what MAML uses), with per-task or shared affine.

Every other op (activations, pooling, ``flatten(1)``) works per sample and needs no change. The
per-task losses are ``vmap(loss_fn)`` over the outputs viewed as ``[T, N, ...]``; gradients and
Hessian-vector products are plain autograd (double backward) on the stacked parameters: tasks are
independent, so the gradient of the summed loss is each task's own gradient.

Models whose forward touches a parameter through any other op cannot be stacked this way. Each
TaskModel is checked once, numerically, against the per-task loss on the first batch it sees; a
model that fails (or raises) is refused with a ValueError.

On the 2-core CPU of the development machine it is not the faster choice (``python -m
fastmaml.bench.meta --workload C --providers fastmaml_exact fastmaml_stacked ...``, see
docs/meta.md): sinusoid MLP, T = 1000, 52 vs 36 ms for ``"auto"`` (vmap batches the shared first
step as plain matmuls, the stacked forward as per-task bmm's); T = 25, 3.4 vs 7.6 ms; conv nets
run grouped convolutions, slower here than the per-task loop. ``batching="auto"`` therefore never
picks it; it is there as ``batching="stacked"`` for accelerators, where one batched kernel per
layer is the point, and is tested against the loop to 1e-10 in float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap
from torch.overrides import TorchFunctionMode

# Modules the stacked forward knows how to batch (those with parameters), and parameter-free
# modules known to act on each sample alone.
_PARAM_MODULES = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
_PER_SAMPLE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus,
                       nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Sequential)


def stackable_modules(model: nn.Module) -> bool:
    """A first, structural filter: every submodule is one the stacked forward supports."""
    for m in model.modules():
        if m is model and not isinstance(m, nn.Sequential):
            continue  # the root's own forward is checked numerically
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            return False
        if not isinstance(m, _PARAM_MODULES + _PER_SAMPLE_MODULES):
            return False  # unknown: it may use its parameters or mix samples in ways not rewritten
    return True


class StackedTasks(TorchFunctionMode):
    """Inside this mode, ops on merged ``[T*N, ...]`` inputs with ``[T, ...]`` weights run per task."""

    def __init__(self, num_tasks: int):
        super().__init__()
        self.num_tasks = num_tasks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return self._linear(*args, **kwargs)
        if func is F.conv2d:
            return self._conv2d(*args, **kwargs)
        if func is F.batch_norm:
            return self._batch_norm(*args, **kwargs)
        return func(*args, **kwargs)

    def _split(self, x: Tensor) -> Tensor:
        if x.shape[0] % self.num_tasks:
            raise RuntimeError(f"stacked forward: batch {x.shape[0]} is not a multiple of T = {self.num_tasks}")
        return x.reshape(self.num_tasks, x.shape[0] // self.num_tasks, *x.shape[1:])

    def _linear(self, x, weight, bias=None):
        if weight.dim() == 2:
            return F.linear(x, weight, bias)
        xt = self._split(x).flatten(1, -2) if x.dim() > 2 else self._split(x)  # [T, N', in]
        out = torch.bmm(xt, weight.transpose(1, 2)) if bias is None else torch.baddbmm(bias.unsqueeze(1), xt,
                                                                                        weight.transpose(1, 2))
        return out.reshape(*x.shape[:-1], weight.shape[1])

    def _conv2d(self, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if weight.dim() == 4:
            return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        if groups != 1:
            raise RuntimeError("stacked forward: grouped convolutions are not supported")
        T = self.num_tasks
        xt = self._split(x)  # [T, N, C, H, W]
        n = xt.shape[1]
        merged = xt.transpose(0, 1).reshape(n, T * xt.shape[2], *xt.shape[3:])  # [N, T*C, H, W]
        out = F.conv2d(merged, weight.reshape(T * weight.shape[1], *weight.shape[2:]),
                       None if bias is None else bias.reshape(-1), stride, padding, dilation, groups=T)
        out = out.reshape(n, T, weight.shape[1], *out.shape[2:]).transpose(0, 1)
        return out.reshape(T * n, *out.shape[2:])

    def _batch_norm(self, x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                    eps=1e-5):
        if not training and running_mean is not None:
            raise RuntimeError("stacked forward: batch norm with running statistics is not supported")
        xt = self._split(x)  # [T, N, C, ...]
        dims = (1,) + tuple(range(3, xt.dim()))
        mean = xt.mean(dim=dims, keepdim=True)
        var = (xt - mean).pow(2).mean(dim=dims, keepdim=True)
        out = (xt - mean) * torch.rsqrt(var + eps)
        shape = [1] * xt.dim()
        shape[2] = xt.shape[2]
        for p, combine in ((weight, torch.mul), (bias, torch.add)):
            if p is None:
                continue
            if p.dim() == 1:
                out = combine(out, p.reshape(shape))
            else:  # [T, C]: per-task affine
                out = combine(out, p.reshape(self.num_tasks, *shape[1:]))
        return out.reshape(x.shape)


def stacked_task_losses(task_model, adapted, fixed, x: Tensor, y: Tensor) -> Tensor:
    """``[T]`` losses of all tasks in one forward pass; ``adapted`` and ``fixed`` may be ``[T, ...]``
    (per task) or unbatched (shared); ``x`` is ``[T, N, ...]``, ``y`` ``[T, N, ...]``."""
    num_tasks, n = x.shape[0], x.shape[1]
    merged = x.reshape(num_tasks * n, *x.shape[2:])
    with StackedTasks(num_tasks):
        out = task_model.forward(adapted, fixed, merged)
    out = out.reshape(num_tasks, n, *out.shape[1:])
    losses = vmap(task_model.loss_fn)(out, y)
    if losses.shape != (num_tasks,):
        raise ValueError(f"loss_fn must return a scalar per task, got per-task shape {tuple(losses.shape[1:])}")
    return losses


def supports_stacking(task_model, adapted, fixed, x: Tensor, y: Tensor, shared: bool) -> bool:
    """Whether the stacked forward gives this model's per-task losses (checked once per TaskModel)."""
    cached = getattr(task_model, "_stacked_ok", None)
    if cached is not None:
        return cached
    ok = False
    if not task_model.context and x.dim() >= 2 and stackable_modules(task_model.model):
        try:
            with torch.no_grad():
                count = min(x.shape[0], 3)
                # per-task weights as the real calls pass them (a shared start is expanded too)
                a = [p.unsqueeze(0).expand(count, *p.shape) if shared else p[:count] for p in adapted]
                # fixed tensors are expanded too when their per-task gradients are asked for
                f = [q.unsqueeze(0).expand(count, *q.shape) for q in fixed]
                got = stacked_task_losses(task_model, a, f, x[:count], y[:count])
                want = torch.stack([task_model.task_loss([p[t] for p in a], fixed, x[t], y[t])
                                    for t in range(count)])
            tol = 1e-4 if got.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
            ok = bool(torch.allclose(got, want, rtol=tol, atol=tol * (1 + float(want.abs().max()))))
        except Exception:  # an op the stacked forward does not cover: use vmap or the loop
            ok = False
    task_model._stacked_ok = ok
    return ok
