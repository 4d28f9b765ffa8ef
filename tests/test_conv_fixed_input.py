"""conv2d_fixed_input: a convolution of data (no input gradient) with a lean double backward.

Specification: for inputs that need no gradient, values, weight and bias gradients and the double
backward (the gradient of <v, gW> + <u, gb> w.r.t. the output gradient and through the network)
are bit-identical to ``F.conv2d``'s in float64 and float32, for strides, paddings, dilations,
groups and no bias; gradcheck / gradgradcheck / third order pass; calls it does not take (input
needing a gradient, no autograd, string padding, forward AD) run ``F.conv2d``; bad input is refused
naming it.
"""
import pytest
import torch
import torch.nn.functional as F

from fastmaml.ops.conv_fixed_input import _ConvFixedInput, conv2d_fixed_input, takes

CASES = [dict(padding=1), dict(stride=2, padding=0), dict(padding=2, dilation=2), dict(padding=1, groups=2),
         dict(padding=(1, 0), stride=(1, 2))]


def _derivatives(conv, x, w, b, gy, vw, vb, after):
    """y, (gW, gb) and the double backward w.r.t. (w, b, gy) of sum(after(y) * gy)."""
    y = conv(x, w, b)
    gw, *gb = torch.autograd.grad(after(y), [w] + ([b] if b is not None else []), gy, create_graph=True)
    outs = [gw] + gb
    dirs = [vw] + ([vb] if b is not None else [])
    targets = [w, gy] + ([b] if b is not None else [])
    return [y, *outs, *torch.autograd.grad(outs, targets, dirs, allow_unused=True)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_bit_identical_to_conv2d(dtype, kw, bias):
    g = torch.Generator().manual_seed(0)
    groups = kw.get("groups", 1)
    x = torch.randn(3, 4, 9, 10, generator=g, dtype=dtype)
    w = torch.randn(6, 4 // groups, 3, 3, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(6, generator=g, dtype=dtype).requires_grad_() if bias else None
    y = F.conv2d(x, w, b, **kw)
    gy = torch.randn(y.shape, generator=g, dtype=dtype).requires_grad_()
    vw, vb = torch.randn(w.shape, generator=g, dtype=dtype), torch.randn(6, generator=g, dtype=dtype)
    after = torch.tanh  # a nonlinearity after the conv: the double backward also runs the conv's forward graph
    ours = _derivatives(lambda x, w, b: conv2d_fixed_input(x, w, b, **kw), x, w, b, gy, vw, vb, after)
    stock = _derivatives(lambda x, w, b: F.conv2d(x, w, b, **kw), x, w, b, gy, vw, vb, after)
    for a, r in zip(ours, stock):
        assert (a is None and r is None) or torch.equal(a, r)


def test_gradcheck_gradgradcheck_and_third_order():
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    f = lambda w, b: torch.tanh(conv2d_fixed_input(x, w, b, padding=1))  # noqa: E731
    assert torch.autograd.gradcheck(f, (w, b)) and torch.autograd.gradgradcheck(f, (w, b))
    gy = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)

    def grads(w, b, gy):
        return torch.autograd.grad(f(w, b), (w, b), gy, create_graph=True)

    assert torch.autograd.gradgradcheck(grads, (w, b, gy))


def test_takes_only_data_inputs_under_autograd():
    x, w = torch.randn(2, 1, 6, 6), torch.randn(4, 1, 3, 3, requires_grad=True)
    assert takes(x, w, None, 1, 1)
    assert not takes(x.requires_grad_(), w)  # an input that needs a gradient: torch's conv
    x = x.detach()
    assert not takes(x, w.detach())  # nothing to differentiate
    assert not takes(x, w, None, 1, "same")  # string padding
    with torch.no_grad():
        assert not takes(x, w)
    assert not takes(x.half(), w.half())
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        assert not takes(x, w)
    y = conv2d_fixed_input(x, w.detach(), padding=1)  # not taken: F.conv2d, same value
    assert torch.equal(y, F.conv2d(x, w.detach(), padding=1)) and y.grad_fn is None
    assert type(conv2d_fixed_input(x, w, padding=1).grad_fn).__name__ == _ConvFixedInput.__name__ + "Backward"


def test_bad_input_is_refused_naming_it():
    x, w = torch.randn(2, 4, 6, 6), torch.randn(3, 4, 3, 3, requires_grad=True)
    with pytest.raises(TypeError, match="input must be a tensor"):
        conv2d_fixed_input(x.tolist(), w)
    with pytest.raises(TypeError, match="weight must be a tensor"):
        conv2d_fixed_input(x, None)
    with pytest.raises(ValueError, match=r"input must be \[N, C, H, W\]"):
        conv2d_fixed_input(x[0], w)
    with pytest.raises(ValueError, match="input has 3 channels"):
        conv2d_fixed_input(x[:, :3], w)
    with pytest.raises(ValueError, match="groups=2"):
        conv2d_fixed_input(x, w, groups=2)
    with pytest.raises(ValueError, match=r"bias must be None or a tensor of shape \(3,\)"):
        conv2d_fixed_input(x, w, torch.randn(4))
