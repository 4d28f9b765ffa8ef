"""The merged batch-norm + 2x2 max-pool layer's derivative kernels (csrc/cpu/bn_pool_cpu.cpp).

Specification: given the forward's ``code`` (max_pool2x2), ``mean`` and ``invstd``
(batch_norm_train), the backward, the pooled output's tangent and the tangent of the backward
equal ``fastmaml.reference.bn_pool`` (torch.func over F.batch_norm and F.max_pool2d): 1e-12
relative in float64, 1e-5 in float32, on even and odd image sizes (an odd last row or column is
in the statistics but in no window); bad shapes and dtypes are refused naming the argument.
"""
import pytest
import torch

import fastmaml  # noqa: F401 (loads the compiled module)
from fastmaml.ops import bn_pool  # noqa: F401 (fakes for opcheck)
from fastmaml.ops._native_cpu import native_available
from fastmaml.reference.bn_pool import (batch_norm_pool2x2_backward_reference,
                                        batch_norm_pool2x2_hvp_backward_reference, batch_norm_pool2x2_jvp_reference)

pytestmark = pytest.mark.skipif(not native_available("batch_norm_pool2x2_hvp_backward"),
                                reason="the compiled module is not built")
ops = torch.ops.fastmaml
EPS = 1e-5
SHAPES = [(3, 4, 6, 6), (2, 3, 7, 5), (1, 2, 2, 3)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def layer_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype) * 2 + 0.5
    w, b = torch.randn(shape[1], generator=g, dtype=dtype), torch.randn(shape[1], generator=g, dtype=dtype)
    a, mean, invstd = ops.batch_norm_train(x, w, b, EPS)
    out, code = ops.max_pool2x2(a)
    tangents = [torch.randn(t.shape, generator=g, dtype=dtype) for t in (x, w, b, out, out)]
    return x, w, b, out, code, mean, invstd, tangents


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_equals_the_reference(shape, dtype):
    x, w, b, out, code, mean, invstd, (_, _, _, g, _) = layer_inputs(shape, dtype)
    got = ops.batch_norm_pool2x2_backward(g, code, x, w, mean, invstd)
    ref = batch_norm_pool2x2_backward_reference(g, x, w, b, EPS)
    for a, r in zip(got, ref):
        assert rel(a, r) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_jvp_equals_the_reference(shape, dtype):
    x, w, b, out, code, mean, invstd, (dx, dw, db, _, _) = layer_inputs(shape, dtype)
    got = ops.batch_norm_pool2x2_jvp(dx, code, x, w, dw, db, mean, invstd)
    assert rel(got, batch_norm_pool2x2_jvp_reference(dx, dw, db, x, w, b, EPS)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_tangent_of_the_backward_equals_the_reference(shape, dtype):
    x, w, b, out, code, mean, invstd, (dx, dw, _, g, dg) = layer_inputs(shape, dtype)
    dgx, gx, hw, hb = ops.batch_norm_pool2x2_hvp_backward(g, dg, code, dx, x, w, dw, mean, invstd, True)
    ref = batch_norm_pool2x2_hvp_backward_reference(g, dg, dx, dw, x, w, b, EPS)
    for a, r in zip((dgx, gx, hw, hb), ref):
        assert rel(a, r) < TOL[dtype]
    alone = ops.batch_norm_pool2x2_hvp_backward(g, dg, code, dx, x, w, dw, mean, invstd, False)
    assert torch.equal(alone[0], dgx) and alone[1].numel() == 0


def test_registered_shapes_pass_opcheck():
    x, w, b, out, code, mean, invstd, (dx, dw, db, g, dg) = layer_inputs((2, 3, 6, 4), torch.float64)
    torch.library.opcheck(ops.batch_norm_pool2x2_backward, (g, code, x, w, mean, invstd))
    torch.library.opcheck(ops.batch_norm_pool2x2_jvp, (dx, code, x, w, dw, db, mean, invstd))
    torch.library.opcheck(ops.batch_norm_pool2x2_hvp_backward, (g, dg, code, dx, x, w, dw, mean, invstd, True))


@pytest.mark.parametrize("bad", ["g_shape", "code_dtype", "x_rank", "mean_dtype", "dw_shape"])
def test_bad_arguments_are_named(bad):
    x, w, b, out, code, mean, invstd, (dx, dw, db, g, dg) = layer_inputs((2, 3, 6, 4), torch.float64)
    args = dict(g=g, dg=dg, code=code, dx=dx, x=x, weight=w, dw=dw, mean=mean, invstd=invstd)
    name = bad.split("_")[0]
    if bad == "g_shape":
        args["g"] = g[:, :2]
    elif bad == "code_dtype":
        args["code"] = code.long()
    elif bad == "x_rank":
        args["x"] = x.flatten(2)
        name = "x"
    elif bad == "mean_dtype":
        args["mean"] = mean.float()
    else:
        args["dw"] = dw[:2]
    with pytest.raises(RuntimeError, match=name):
        ops.batch_norm_pool2x2_hvp_backward(*args.values(), True)


class _Layer(torch.autograd.Function):
    """max_pool2x2(batch_norm_train(x, w, b)) with the merged kernels as its backward and its jvp."""

    @staticmethod
    def forward(ctx, x, w, b):
        a, mean, invstd = ops.batch_norm_train(x, w, b, EPS)
        out, code = ops.max_pool2x2(a)
        ctx.save_for_backward(x, w, code, mean, invstd)
        ctx.save_for_forward(x, w, code, mean, invstd)
        return out

    @staticmethod
    def backward(ctx, g):
        x, w, code, mean, invstd = ctx.saved_tensors
        return ops.batch_norm_pool2x2_backward(g.contiguous(), code, x, w, mean, invstd)

    @staticmethod
    def jvp(ctx, dx, dw, db):
        x, w, code, mean, invstd = ctx.saved_tensors
        zero = torch.zeros_like(w)
        return ops.batch_norm_pool2x2_jvp(torch.zeros_like(x) if dx is None else dx, code, x, w,
                                          zero if dw is None else dw, zero if db is None else db, mean, invstd)


class _LayerBackward(torch.autograd.Function):
    """(x, w, g) -> the layer's backward (gx, gw, gb), with the R-operator kernel as its jvp."""

    @staticmethod
    def forward(ctx, x, w, b, g):
        a, mean, invstd = ops.batch_norm_train(x, w, b, EPS)
        code = ops.max_pool2x2(a)[1]
        ctx.save_for_forward(x, w, g, code, mean, invstd)
        return ops.batch_norm_pool2x2_backward(g, code, x, w, mean, invstd)

    @staticmethod
    def jvp(ctx, dx, dw, db, dg):
        x, w, g, code, mean, invstd = ctx.saved_tensors
        dgx, _, hw, hb = ops.batch_norm_pool2x2_hvp_backward(
            g, torch.zeros_like(g) if dg is None else dg, code, torch.zeros_like(x) if dx is None else dx, x, w,
            torch.zeros_like(w) if dw is None else dw, mean, invstd, False)
        return dgx, hw, hb


def test_kernels_pass_gradcheck_as_the_derivatives_of_the_layer_and_of_its_backward():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 3, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_Layer.apply, (x, w, b), check_forward_ad=True)
    assert torch.autograd.gradcheck(_LayerBackward.apply, (x, w, b, gy), check_forward_ad=True,
                                    check_backward_ad=False, check_undefined_grad=False, check_batched_grad=False)
