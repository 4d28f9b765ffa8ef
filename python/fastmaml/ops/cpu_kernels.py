"""Where the engine runs the network's own layers through fastmaml's CPU kernels.

Inside ``cpu_kernels()`` (a ``TorchFunctionMode``), four kinds of calls of any model are routed to
fastmaml's implementations, faster or in less memory. Max-pool, relu and the first convolution
compute exactly what torch computes (bit-identical values and gradients); batch norm computes the
same arithmetic with the channel sums in another order (float64 within ~1e-15, float32 ~2e-7
relative of torch's):

* ``F.max_pool2d`` / ``nn.MaxPool2d`` / ``torch.max_pool2d`` with 2x2 windows, stride 2, no
  padding or dilation, no indices returned, on a contiguous ``[N, C, H, W]`` or ``[C, H, W]``
  tensor -> ``fastmaml.ops.max_pool.max_pool2x2`` (~15x faster forward here, 1-byte argmax);
* ``F.relu`` / ``nn.ReLU`` / ``torch.relu`` / ``Tensor.relu`` (not in place) of a contiguous tensor
  of at least ``RELU_MIN_ELEMENTS`` elements that needs a gradient ->
  ``fastmaml.ops.relu.relu_bitmask`` (saves 1 bit per element instead of its
  output);
* ``F.batch_norm`` / ``nn.BatchNorm*d`` in training mode (batch statistics: what MAML's inner loop
  runs) of a contiguous tensor -> ``fastmaml.ops.batch_norm`` (forward, backward and double backward
  compiled; with forward and backward 5-7x torch's in the layers benchmark; running
  statistics, when the layer tracks them, updated as torch does);
* ``F.conv2d`` / ``nn.Conv2d`` of an input that needs no gradient (the first layer, on data) with a
  weight that does -> ``fastmaml.ops.conv_fixed_input`` (torch's own convolution ops, bit-identical;
  its double backward skips the input gradient torch's computes anyway).

Only plain float32/float64 CPU tensors are routed, and nothing while a ``torch.func`` transform
(vmap, grad, jvp) is active; every other call runs torch's own op unchanged. The meta-gradient
engine enters the context around its per-task autograd passes (the ``"loop"`` batching); the
plain-autograd reference engine never does. ``stock_kernels()`` switches the routing off (the
benchmark's ``fastmaml_stock_ops`` rows), and with it the fused conv path, as does
``FASTMAML_BACKEND=reference``.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ._native_cpu import native_available, plain_cpu_float, references_requested
from . import batch_norm as _bn
from . import conv_fixed_input as _conv
from .max_pool import _Pool, kernel_takes
from .relu import _ReluBits

_enabled = contextvars.ContextVar("fastmaml_cpu_kernels", default=True)
_RELUS = (F.relu, torch.relu, Tensor.relu)
# Below this the autograd Function's overhead costs more than the saved memory is worth:
# `python -m fastmaml.bench.meta --workload layers` (one thread, two runs) measured relu_bitmask
# fwd+bwd at 0.56-0.87x torch's speed on [5, 64, 28, 28] (251k elements, 1 MB of saved floats)
# and 0.99x on [75, 32, 84, 84] (17M elements, 65 MB saved by torch, 2 MB here).
RELU_MIN_ELEMENTS = 1 << 19


def _pair_is(v, n) -> bool:
    if isinstance(v, int) and not isinstance(v, bool):
        return v == n
    return isinstance(v, (tuple, list)) and len(v) == 2 and all(type(e) is int and e == n for e in v)


def is_2x2_stride_2(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                    return_indices=False) -> bool:
    """Whether ``max_pool2d``'s arguments describe the op ``max_pool2x2`` computes."""
    if return_indices or not _pair_is(kernel_size, 2) or not _pair_is(padding, 0) or not _pair_is(dilation, 1):
        return False
    if not (stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) or _pair_is(stride, 2)):
        return False
    if ceil_mode and not (isinstance(input, Tensor) and input.shape[-1] % 2 == 0 and input.shape[-2] % 2 == 0):
        return False  # ceil mode pools a last partial window; on even sizes there is none
    return True


def _is_plain_relu(input, inplace=False) -> bool:
    return inplace is False


def _conv_args(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return input, weight, bias, stride, padding, dilation, groups


def _batch_norm_call(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                     eps=1e-5):
    """The kernels' result for an ``F.batch_norm`` call they take, else None."""
    if not training or momentum is None or not _bn.kernel_takes(input, weight, bias):
        return None
    if not input.is_contiguous():  # e.g. channels_last: torch's op keeps the layout, the kernel would not
        return None
    if (running_mean is None) != (running_var is None):
        return None
    if running_mean is not None and not all(
            type(t) is Tensor and t.device.type == "cpu" and t.is_floating_point() and t.shape == (input.shape[1],)
            for t in (running_mean, running_var)):
        return None
    y, mean, invstd = _bn.batch_norm_train_apply(input, weight, bias, eps)
    if running_mean is not None:
        _bn.update_running_stats(running_mean, running_var, mean, invstd, input.numel() // input.shape[1],
                                 momentum, eps)
    return y


class _CPUKernelMode(TorchFunctionMode):
    def __init__(self, pool: bool, relu: bool, batch_norm: bool = False, conv: bool = True):
        super().__init__()
        self.pool, self.relu, self.batch_norm, self.conv = pool, relu, batch_norm, conv

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and isinstance(args[0], Tensor):
            x = args[0]
            if self.pool and (func is F.max_pool2d or func is torch.max_pool2d):
                try:
                    takes = is_2x2_stride_2(*args, **kwargs)
                except TypeError:  # arguments torch itself will reject: let it
                    takes = False
                if takes and kernel_takes(x):
                    return _Pool.apply(x)
            elif self.relu and func in _RELUS:
                try:
                    takes = _is_plain_relu(*args, **kwargs)
                except TypeError:
                    takes = False
                if (takes and x.requires_grad and x.numel() >= RELU_MIN_ELEMENTS and torch.is_grad_enabled()
                        and plain_cpu_float(x) and x.is_contiguous()):
                    return _ReluBits.apply(x)
            elif self.conv and func is F.conv2d and not x.requires_grad:
                try:
                    takes = _conv.takes(*args, **kwargs)
                except TypeError:
                    takes = False
                if takes:
                    return _conv._ConvFixedInput.apply(*_conv_args(*args, **kwargs))
            elif self.batch_norm and func is F.batch_norm:
                try:
                    y = _batch_norm_call(*args, **kwargs)
                except TypeError:
                    y = None
                if y is not None:
                    return y
        return func(*args, **kwargs)


def cpu_kernels():
    """A context in which the calls listed in the module docstring run fastmaml's kernels; a no-op
    when the compiled module is missing, under ``FASTMAML_BACKEND=reference`` or inside
    ``stock_kernels()``."""
    if not _enabled.get():
        return contextlib.nullcontext()
    pool, relu = native_available("max_pool2x2"), native_available("relu_bitmask")
    batch_norm = native_available("batch_norm_train")
    conv = not references_requested()  # torch's own ops, arranged differently: no compiled module needed
    return _CPUKernelMode(pool, relu, batch_norm, conv) if pool or relu or batch_norm or conv else contextlib.nullcontext()


def layer_kernels_enabled() -> bool:
    """False inside ``stock_kernels()`` and under ``FASTMAML_BACKEND=reference``: then the fused
    conv path (``fastmaml.meta.fused_conv``, built on these kernels) steps aside too."""
    return _enabled.get() and not references_requested()


@contextlib.contextmanager
def stock_kernels():
    """Within this context ``cpu_kernels()`` does nothing: torch's own ops run (the benchmark uses it
    to show what the kernels contribute)."""
    token = _enabled.set(False)
    try:
        yield
    finally:
        _enabled.reset(token)
