"""max_pool2x2: the conv4 backbone's 2x2 / stride-2 max-pool on the CPU.

Specification: bit-identical to ``F.max_pool2d(x, 2)`` (values, first and second derivatives,
forward-mode derivatives) on random inputs in float64 and float32, including ties, NaN and -inf,
odd sizes (an unpooled last row / column), widths that are not a multiple of the vector width,
both instruction sets; ``gradcheck`` and ``gradgradcheck`` pass; bad input is refused naming it
(tests/test_cpu_kernels.py covers where the engine routes calls to it).
"""
import pytest
import torch
import torch.nn.functional as F

import fastmaml
from fastmaml.ops.max_pool import max_pool2x2
from fastmaml.reference.max_pool import max_pool2x2_reference

native = pytest.mark.skipif(not fastmaml.HAS_NATIVE, reason="compiled module not built")
SHAPES = [(2, 3, 8, 8), (1, 2, 9, 11), (3, 4, 28, 28), (2, 5, 21, 21), (1, 1, 2, 2), (4, 7, 5, 34), (3, 6, 6)]


def _rand(shape, dtype, seed, ties=True, specials=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if ties:  # relu-like zeros, and repeated values inside windows
        x = torch.where(x < -0.3, torch.zeros_like(x), x)
        x[..., ::3, 1::4] = x[..., ::3, 0::4][..., : x[..., ::3, 1::4].shape[-1]]
    if specials:
        flat = x.view(-1)
        idx = torch.randperm(flat.numel(), generator=g)
        flat[idx[:3]] = float("nan")
        flat[idx[3:6]] = float("-inf")
        flat[idx[6:8]] = float("inf")
    return x.to(dtype)


def _equal_with_nan(a, b):
    return torch.equal(torch.nan_to_num(a, nan=1234.5), torch.nan_to_num(b, nan=1234.5)) and torch.equal(a.isnan(), b.isnan())


@native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradients_are_torchs_bit_for_bit(instruction_set, dtype, shape):
    x = _rand(shape, dtype, seed=1)
    xr = x.clone().requires_grad_()
    xk = x.clone().requires_grad_()
    ref, out = max_pool2x2_reference(xr), max_pool2x2(xk, backend="cpu")
    assert out.shape == ref.shape and torch.equal(out, ref)
    g = torch.randn(ref.shape, dtype=dtype)
    (gr,) = torch.autograd.grad(ref, xr, g, create_graph=True)
    (gk,) = torch.autograd.grad(out, xk, g, create_graph=True)
    assert torch.equal(gk, gr)
    # second order: d/dg <h, dx> through the backward (a gather), and the mixed term with x (zero)
    h = torch.randn(shape, dtype=dtype)
    g_r, g_k = g.clone().requires_grad_(), g.clone().requires_grad_()
    (dr,) = torch.autograd.grad(ref, xr, g_r, create_graph=True)
    (dk,) = torch.autograd.grad(out, xk, g_k, create_graph=True)
    assert torch.equal(torch.autograd.grad((dk * h).sum(), g_k)[0], torch.autograd.grad((dr * h).sum(), g_r)[0])


@native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nan_and_infinities_follow_torchs_window_rule(dtype):
    x = _rand((3, 4, 12, 18), dtype, seed=2, specials=True)
    out, code = torch.ops.fastmaml.max_pool2x2(x)
    ref, idx = F.max_pool2d(x, 2, return_indices=True)
    assert _equal_with_nan(out, ref)
    rows = torch.arange(out.shape[-2]).view(-1, 1)
    cols = torch.arange(out.shape[-1]).view(1, -1)
    flat = (2 * rows + (code.long() >> 1)) * x.shape[-1] + 2 * cols + (code.long() & 1)
    assert torch.equal(flat, idx)  # the same entry as torch's index, NaN windows included
    assert code.dtype == torch.uint8


@native
def test_gradcheck_and_gradgradcheck():
    x = _rand((2, 3, 7, 10), torch.float64, seed=3, ties=False).requires_grad_()
    fn = lambda t: max_pool2x2(t, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@native
def test_forward_mode_matches_torch():
    import torch.autograd.forward_ad as fwAD

    x = _rand((2, 3, 9, 8), torch.float64, seed=4)
    t = torch.randn_like(x)
    with fwAD.dual_level():
        ours = fwAD.unpack_dual(max_pool2x2(fwAD.make_dual(x, t), backend="cpu")).tangent
        ref = fwAD.unpack_dual(F.max_pool2d(fwAD.make_dual(x, t), 2)).tangent
    assert torch.equal(ours, ref)


@native
def test_ops_pass_opcheck():
    x = _rand((2, 3, 9, 10), torch.float64, seed=5, ties=False)
    out, code = torch.ops.fastmaml.max_pool2x2(x)
    torch.library.opcheck(torch.ops.fastmaml.max_pool2x2.default, (x,))
    torch.library.opcheck(torch.ops.fastmaml.max_pool2x2_scatter.default, (torch.randn_like(out), code, 9, 10))
    torch.library.opcheck(torch.ops.fastmaml.max_pool2x2_gather.default, (torch.randn_like(x), code))


@native
def test_compiled_ops_reject_bad_input_naming_it():
    x = torch.randn(2, 3, 8, 8)
    out, code = torch.ops.fastmaml.max_pool2x2(x)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.fastmaml.max_pool2x2(x.half())
    with pytest.raises(RuntimeError, match="at least 2x2"):
        torch.ops.fastmaml.max_pool2x2(torch.randn(2, 3, 1, 8))
    with pytest.raises(RuntimeError, match="code has shape"):
        torch.ops.fastmaml.max_pool2x2_gather(x, code[..., :3])
    with pytest.raises(RuntimeError, match="uint8"):
        torch.ops.fastmaml.max_pool2x2_scatter(out, code.long(), 8, 8)
    with pytest.raises(RuntimeError, match="expected last dims"):
        torch.ops.fastmaml.max_pool2x2_scatter(out, code, 12, 8)


def test_public_op_checks_its_arguments():
    with pytest.raises(TypeError, match="x must be a tensor"):
        max_pool2x2([[1.0]])
    with pytest.raises(ValueError, match="backend must be one of"):
        max_pool2x2(torch.randn(1, 1, 4, 4), backend="gpu")
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run"):
        max_pool2x2(torch.randn(1, 1, 4, 4).half(), backend="cpu")
    x = torch.randn(2, 2, 6, 6)
    assert torch.equal(max_pool2x2(x, backend="reference"), F.max_pool2d(x, 2))
    assert torch.equal(max_pool2x2(x.half()), F.max_pool2d(x.half(), 2))  # auto: not the kernel's, torch's
