"""batch_norm_train: batch norm on batch statistics (MAML's inner loop) with compiled derivatives.

Specification: on random inputs (channel means away from zero, so centring matters) in float64 and
float32, for 2-d, 3-d and 4-d inputs, both instruction sets, values, gradients and the double
backward agree with torch's own ``F.batch_norm`` in float64 (to 1e-12 relative to the largest
entry), and in float32 are as accurate as torch's float32 (error from the float64 result at most
3x torch's own, or 5e-7); the compiled ops agree with the differentiable formulas of
``fastmaml.reference.batch_norm``; ``gradcheck``, ``gradgradcheck`` and a third-order check pass;
non-finite input stays in its channel; bad input is refused naming it (tests/test_cpu_kernels.py
covers where the engine routes calls to it).
"""
import pytest
import torch
import torch.nn.functional as F

import fastmaml
from fastmaml.ops.batch_norm import batch_norm_train, kernel_takes
from fastmaml.reference.batch_norm import (
    batch_norm_train_backward_reference,
    batch_norm_train_double_backward_reference,
    batch_norm_train_reference,
)

native = pytest.mark.skipif(not fastmaml.HAS_NATIVE, reason="compiled module not built")
SHAPES = [(5, 8, 28, 28), (3, 4, 3, 3), (7, 3), (4, 6, 10), (2, 5, 9, 13), (75, 2, 12, 12)]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}  # relative to the largest entry


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(shape[1], generator=g, dtype=torch.float64).mul(3).reshape((1, -1) + (1,) * (len(shape) - 2))
    scale = torch.rand(shape[1], generator=g, dtype=torch.float64).add(0.2).reshape(offset.shape)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


def _close(got, want, dtype):
    err = _err(got, want.double())
    assert err <= TOL[dtype], err


def _args(shape, dtype, seed=0):
    c = shape[1]
    g = torch.Generator().manual_seed(seed + 1)
    x = _rand(shape, dtype, seed)
    w, b = (torch.randn(c, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    gy, ggx = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    ggw, ggb = (torch.randn(c, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    return x, w, b, gy, ggx, ggw, ggb


def _torch_derivatives(x, w, b, gy, ggx, ggw, ggb):
    """torch's values, gradients (x, w, b) and double backward (x, w, gy) of F.batch_norm."""
    xr, wr, br, gyr = (t.clone().requires_grad_() for t in (x, w, b, gy))
    y = F.batch_norm(xr, None, None, wr, br, training=True)
    grads = torch.autograd.grad(y, (xr, wr, br), gyr, create_graph=True)
    double = torch.autograd.grad(grads, (xr, wr, gyr), (ggx, ggw, ggb))
    return y.detach(), [t.detach() for t in grads], double


def _ours(x, w, b, gy, ggx, ggw, ggb):
    xk, wk, bk, gyk = (t.clone().requires_grad_() for t in (x, w, b, gy))
    y = batch_norm_train(xk, wk, bk, backend="cpu")
    grads = torch.autograd.grad(y, (xk, wk, bk), gyk, create_graph=True)
    double = torch.autograd.grad(grads, (xk, wk, gyk), (ggx, ggw, ggb))
    return [y.detach()] + [t.detach() for t in grads] + list(double)


def _err(got, want):
    return float((got.double() - want).abs().max() / want.abs().max())


@native
@pytest.mark.parametrize("shape", SHAPES)
def test_values_gradients_and_double_backward_agree_with_torch(instruction_set, shape):
    """y, (gx, gw, gb), and the double backward (d/dx, d/dw, d/dgy)."""
    args64 = _args(shape, torch.float64)
    y, grads, double = _torch_derivatives(*args64)
    truth = [y] + grads + list(double)
    for got, want in zip(_ours(*args64), truth):
        assert _err(got, want) <= 1e-12
    args32 = [t.float() for t in args64]
    y, grads, double = _torch_derivatives(*args32)
    for ours, torchs, want in zip(_ours(*args32), [y] + grads + list(double), truth):
        assert _err(ours, want) <= max(3 * _err(torchs, want), 5e-7), (_err(ours, want), _err(torchs, want))


@native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_ops_agree_with_the_reference_formulas(dtype):
    x, w, b, gy, ggx, ggw, ggb = _args((4, 6, 7, 5), dtype, seed=3)
    y, mean, invstd = torch.ops.fastmaml.batch_norm_train(x, w, b, 1e-3)
    _close(y, batch_norm_train_reference(x, w, b, 1e-3), dtype)
    dims = [0, 2, 3]
    assert mean.dtype == invstd.dtype == torch.float64  # saved in float64 whatever x's dtype
    _close(mean, x.double().mean(dims), dtype)
    _close(invstd, torch.rsqrt(x.double().var(dims, unbiased=False) + 1e-3), dtype)
    got = torch.ops.fastmaml.batch_norm_train_backward(gy, x, w, mean, invstd)
    for g, r in zip(got, batch_norm_train_backward_reference(gy, x, w, 1e-3)):
        _close(g, r, dtype)
    got = torch.ops.fastmaml.batch_norm_train_double_backward(ggx, ggw, ggb, gy, x, w, mean, invstd)
    for g, r in zip(got, batch_norm_train_double_backward_reference(ggx, ggw, ggb, gy, x, w, 1e-3)):
        _close(g, r, dtype)


@native
def test_gradcheck_gradgradcheck_and_third_order():
    x, w, b, gy, *_ = _args((4, 3, 5), torch.float64, seed=5)
    x, w, b, gy = (t.requires_grad_() for t in (x, w, b, gy))
    f = lambda x, w, b: batch_norm_train(x, w, b, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))

    def gradients(x, w, gy):  # differentiated twice more: the third derivative runs the reference formulas
        return torch.autograd.grad(batch_norm_train(x, w, b, backend="cpu"), (x, w, b), gy, create_graph=True)

    assert torch.autograd.gradgradcheck(gradients, (x, w, gy))


@native
def test_no_affine_parameters_and_constant_channels():
    x = _rand((6, 4, 5, 5), torch.float64, seed=7)
    x[:, 2] = 1.5  # zero variance: normalised to 0, gradient through 1 / sqrt(eps)
    xr, xk = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = F.batch_norm(xr, None, None, training=True), batch_norm_train(xk, backend="cpu")
    assert torch.allclose(y, y_ref, rtol=0, atol=1e-12) and torch.equal(y[:, 2], torch.zeros_like(y[:, 2]))
    g = torch.randn_like(x)
    (gr,), (gk,) = torch.autograd.grad(y_ref, xr, g), torch.autograd.grad(y, xk, g)
    assert torch.allclose(gk, gr, rtol=0, atol=1e-9 * gr.abs().max())


@native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_non_finite_input_stays_in_its_channel(dtype):
    x = _rand((3, 4, 6, 6), dtype, seed=9)
    x[1, 2, 3, 3] = float("nan")
    x[0, 0, 0, 0] = float("inf")
    y = batch_norm_train(x, backend="cpu")
    assert y[:, 2].isnan().all() and y[:, 0].isnan().any()  # inf - mean(inf) = nan, as torch
    assert torch.isfinite(y[:, [1, 3]]).all()
    _close(y[:, [1, 3]], F.batch_norm(x, None, None, training=True)[:, [1, 3]], dtype)


@native
def test_ops_pass_opcheck():
    x, w, b, gy, ggx, ggw, ggb = _args((3, 4, 5, 6), torch.float64, seed=11)
    y, mean, invstd = torch.ops.fastmaml.batch_norm_train(x, w, b, 1e-5)
    torch.library.opcheck(torch.ops.fastmaml.batch_norm_train.default, (x, w, b, 1e-5))
    torch.library.opcheck(torch.ops.fastmaml.batch_norm_train_backward.default, (gy, x, w, mean, invstd))
    torch.library.opcheck(torch.ops.fastmaml.batch_norm_train_double_backward.default,
                          (ggx, ggw, ggb, gy, x, w, mean, invstd))


@native
def test_compiled_ops_reject_bad_input_naming_it():
    x, w, b, gy, ggx, ggw, ggb = _args((3, 4, 5), torch.float32)
    y, mean, invstd = torch.ops.fastmaml.batch_norm_train(x, w, b, 1e-5)
    ops = torch.ops.fastmaml
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.batch_norm_train(x.half(), w.half(), b.half(), 1e-5)
    with pytest.raises(RuntimeError, match=r"weight must be a CPU Float tensor of shape \[4\]"):
        ops.batch_norm_train(x, w[:3], b, 1e-5)
    with pytest.raises(RuntimeError, match="bias must be a CPU Float"):
        ops.batch_norm_train(x, w, b.double(), 1e-5)
    with pytest.raises(RuntimeError, match="more than one value per channel"):
        ops.batch_norm_train(x[:1, :, :1], w, b, 1e-5)
    with pytest.raises(RuntimeError, match="eps must be >= 0"):
        ops.batch_norm_train(x, w, b, -1.0)
    with pytest.raises(RuntimeError, match="gy must be a CPU Float tensor of shape"):
        ops.batch_norm_train_backward(gy[:2], x, w, mean, invstd)
    with pytest.raises(RuntimeError, match="ggw must be"):
        ops.batch_norm_train_double_backward(ggx, ggw[:2], ggb, gy, x, w, mean, invstd)


def test_public_op_checks_its_arguments():
    x = torch.randn(4, 3, 5)
    with pytest.raises(TypeError, match="x must be a tensor"):
        batch_norm_train([[1.0]])
    with pytest.raises(ValueError, match="at least 2 dims"):
        batch_norm_train(torch.randn(5))
    with pytest.raises(ValueError, match=r"weight must be None or a tensor of shape \(3,\)"):
        batch_norm_train(x, torch.randn(4))
    with pytest.raises(ValueError, match="bias must be None"):
        batch_norm_train(x, None, torch.randn(3, 1))
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        batch_norm_train(x, eps=-1e-5)
    with pytest.raises(ValueError, match="more than one value per channel"):
        batch_norm_train(torch.randn(1, 3))
    with pytest.raises(ValueError, match="backend must be one of"):
        batch_norm_train(x, backend="gpu")
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run"):
        batch_norm_train(x.half(), backend="cpu")
    ref = F.batch_norm(x, None, None, training=True)
    assert torch.equal(batch_norm_train(x, backend="reference"), ref)
    assert torch.equal(batch_norm_train(x.half()), F.batch_norm(x.half(), None, None, training=True))  # torch's


def test_kernel_takes_plain_float_cpu_tensors_outside_transforms_and_forward_ad():
    x = torch.randn(4, 3, 5)
    assert kernel_takes(x) and kernel_takes(x, torch.ones(3), torch.zeros(3))
    assert not kernel_takes(x.half()) and not kernel_takes(x, torch.ones(3).double())
    assert not kernel_takes(x, torch.ones(4)) and not kernel_takes(torch.randn(1, 3))
    assert not torch.func.vmap(lambda t: torch.tensor(kernel_takes(t)))(x.unsqueeze(0)).item()
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        assert not kernel_takes(x)
