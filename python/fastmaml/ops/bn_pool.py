"""Batch norm followed by a 2x2 max-pool, differentiated as one layer (the fused conv path's).

``torch.ops.fastmaml.batch_norm_pool2x2_backward``, ``..._jvp`` and ``..._hvp_backward``
(``csrc/cpu/bn_pool_cpu.cpp``) take the ``code`` of ``max_pool2x2`` and the ``mean`` / ``invstd``
of ``batch_norm_train`` from the forward pass and read the pool's gradients and tangents only at
the windows' argmaxes; ``fastmaml.reference.bn_pool`` is their specification. They are called by
``fastmaml.meta.fused_conv`` only (no autograd Function: the fused path has no graph). This
module registers their shapes for ``torch.library.opcheck`` and tracing.
"""
from __future__ import annotations

import torch


def _register_native_fakes() -> None:
    from .._extension import HAS_NATIVE

    if not HAS_NATIVE:
        return

    @torch.library.register_fake("fastmaml::batch_norm_pool2x2_backward")
    def _(g, code, x, weight, mean, invstd):
        c = x.shape[1]
        return x.new_empty(x.shape), x.new_empty((c,)), x.new_empty((c,))

    @torch.library.register_fake("fastmaml::batch_norm_pool2x2_jvp")
    def _(dx, code, x, weight, dw, db, mean, invstd):
        return x.new_empty(code.shape)

    @torch.library.register_fake("fastmaml::batch_norm_pool2x2_hvp_backward")
    def _(g, dg, code, dx, x, weight, dw, mean, invstd, want_gx):
        c = x.shape[1]
        return (x.new_empty(x.shape), x.new_empty(x.shape) if want_gx else x.new_empty((0,)), x.new_empty((c,)),
                x.new_empty((c,)))


_register_native_fakes()
