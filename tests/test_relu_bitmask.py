"""relu_bitmask: torch.relu that saves one bit per element for its backward.

Specification: bit-identical to ``torch.relu`` (values, first and second derivatives, forward-mode
derivatives) on random inputs in float64 and float32, with zeros, -0.0, NaN and infinities, sizes
that are not a multiple of 8 or of the vector width, both instruction sets; ``gradcheck`` and
``gradgradcheck`` pass; the saved state is one bit per element; bad input is refused naming it.
"""
import pytest
import torch

import fastmaml
from fastmaml.ops.relu import relu_bitmask
from fastmaml.reference.relu import relu_reference

native = pytest.mark.skipif(not fastmaml.HAS_NATIVE, reason="compiled module not built")
SHAPES = [(1,), (7,), (8,), (9,), (3, 5, 17), (2, 32, 11, 13), (75, 3, 8, 8)]


def _rand(shape, dtype, seed, specials=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x = torch.where(x.abs() < 0.2, torch.zeros_like(x), x)  # exact zeros: the boundary of the bit
    if specials and x.numel() >= 8:
        flat = x.view(-1)
        idx = torch.randperm(flat.numel(), generator=g)
        flat[idx[0]], flat[idx[1]], flat[idx[2]], flat[idx[3]] = float("nan"), float("inf"), float("-inf"), -0.0
    return x.to(dtype)


def _same(a, b):
    """Equal bit for bit, NaN included."""
    return torch.equal(a.view(-1).view(torch.int64 if a.dtype == torch.float64 else torch.int32),
                       b.view(-1).view(torch.int64 if b.dtype == torch.float64 else torch.int32))


@native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradients_are_torchs_bit_for_bit(instruction_set, dtype, shape):
    x = _rand(shape, dtype, seed=1, specials=True)
    xr, xk = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, out = relu_reference(xr), relu_bitmask(xk, backend="cpu")
    assert _same(out, ref)
    g = torch.randn(shape, dtype=dtype)
    g.view(-1)[0] = float("nan")  # a NaN gradient passes exactly where torch passes it
    g_r, g_k = g.clone().requires_grad_(), g.clone().requires_grad_()
    (dr,) = torch.autograd.grad(ref, xr, g_r, create_graph=True)
    (dk,) = torch.autograd.grad(out, xk, g_k, create_graph=True)
    assert _same(dk, dr)
    h = torch.randn(shape, dtype=dtype)
    assert _same(torch.autograd.grad((dk * h).sum(), g_k)[0], torch.autograd.grad((dr * h).sum(), g_r)[0])


@native
def test_saves_one_bit_per_element():
    x = _rand((3, 4, 10, 10), torch.float32, seed=2)
    y, bits = torch.ops.fastmaml.relu_bitmask(x)
    assert bits.dtype == torch.uint8 and bits.shape == ((x.numel() + 7) // 8,)
    unpacked = ((bits.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).view(-1)[: x.numel()].bool()
    assert torch.equal(unpacked, ~(y.view(-1) <= 0))


@native
def test_gradcheck_and_gradgradcheck():
    x = _rand((3, 11), torch.float64, seed=3)
    x = torch.where(x == 0, torch.full_like(x, 0.7), x).requires_grad_()  # away from the kink
    fn = lambda t: relu_bitmask(t, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@native
def test_forward_mode_matches_torch():
    import torch.autograd.forward_ad as fwAD

    x = _rand((5, 13), torch.float64, seed=4)
    t = torch.randn_like(x)
    with fwAD.dual_level():
        ours = fwAD.unpack_dual(relu_bitmask(fwAD.make_dual(x, t), backend="cpu")).tangent
        ref = fwAD.unpack_dual(torch.relu(fwAD.make_dual(x, t))).tangent
    assert torch.equal(ours, ref)


@native
def test_ops_pass_opcheck():
    x = _rand((2, 3, 9), torch.float64, seed=5)
    y, bits = torch.ops.fastmaml.relu_bitmask(x)
    torch.library.opcheck(torch.ops.fastmaml.relu_bitmask.default, (x,))
    torch.library.opcheck(torch.ops.fastmaml.bitmask_select.default, (torch.randn_like(x), bits))


@native
def test_bad_input_is_refused_naming_it():
    x = torch.randn(2, 9)
    y, bits = torch.ops.fastmaml.relu_bitmask(x)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.fastmaml.relu_bitmask(x.half())
    with pytest.raises(RuntimeError, match="bits has 3 bytes, expected 5"):
        torch.ops.fastmaml.bitmask_select(torch.randn(5, 7), bits)
    with pytest.raises(RuntimeError, match="uint8"):
        torch.ops.fastmaml.bitmask_select(x, bits.int())
    with pytest.raises(TypeError, match="x must be a tensor"):
        relu_bitmask(1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        relu_bitmask(x, backend="gpu")
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run"):
        relu_bitmask(x.half(), backend="cpu")
    assert torch.equal(relu_bitmask(x.half()), torch.relu(x.half()))  # auto: torch's
