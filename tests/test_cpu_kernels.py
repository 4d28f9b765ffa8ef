"""cpu_kernels(): where the engine runs a network's own layers through fastmaml's kernels.

Specification: inside ``cpu_kernels()`` exactly the calls the kernels compute are routed (2x2 /
stride-2 max-pools of contiguous float CPU tensors; out-of-place relus of tensors that need a
gradient; training-mode batch norm of float CPU tensors, running statistics updated as torch
does), every other call (other pooling arguments, dtypes, layouts, in-place relu, eval-mode batch
norm, torch.func transforms, forward AD, ``stock_kernels()``, ``FASTMAML_BACKEND=reference``) runs
torch's op; convolutions of data (no input gradient) take ``conv_fixed_input``; the
meta-gradient engine's results are bit-identical with and without the max-pool, relu and
convolution routes, agree to 1e-12 in float64 with the batch-norm kernels too (whose channel sums
are added in another order), and the kernels reduce what a query pass keeps.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml
from fastmaml.ops import max_pool as mp
from fastmaml.ops import cpu_kernels as ck
from fastmaml.ops import relu as rl
from fastmaml.ops.cpu_kernels import cpu_kernels, stock_kernels

native = pytest.mark.skipif(not fastmaml.HAS_NATIVE, reason="compiled module not built")


@pytest.fixture
def routed(monkeypatch):
    """Records which kernel each routed call reached."""
    calls = []
    pool, relu, bn = mp._Pool.apply, rl._ReluBits.apply, ck._bn.batch_norm_train_apply
    monkeypatch.setattr(mp._Pool, "apply", lambda x: calls.append("pool") or pool(x))
    monkeypatch.setattr(rl._ReluBits, "apply", lambda x: calls.append("relu") or relu(x))
    monkeypatch.setattr(ck._bn, "batch_norm_train_apply", lambda *a: calls.append("batch_norm") or bn(*a))
    conv = ck._conv._ConvFixedInput.apply
    monkeypatch.setattr(ck._conv._ConvFixedInput, "apply", lambda *a: calls.append("conv") or conv(*a))
    return calls


@native
def test_routes_exactly_the_max_pools_the_kernel_computes(routed):
    x, odd = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 9, 8)
    taken = [lambda: F.max_pool2d(x, 2), lambda: F.max_pool2d(x, (2, 2), stride=2), lambda: nn.MaxPool2d(2)(x),
             lambda: F.max_pool2d(x, 2, 2, 0, 1), lambda: torch.max_pool2d(x, 2), lambda: F.max_pool2d(x[0], 2),
             lambda: F.max_pool2d(x, 2, ceil_mode=True)]  # even sizes: ceil mode is the same op
    not_taken = [lambda: F.max_pool2d(x, 3), lambda: F.max_pool2d(x, 2, stride=1), lambda: F.max_pool2d(x, 2, padding=1),
                 lambda: F.max_pool2d(x, 2, dilation=2), lambda: F.max_pool2d(x, 2, return_indices=True)[0],
                 lambda: F.max_pool2d(odd, 2, ceil_mode=True), lambda: F.max_pool2d(x.half(), 2).float(),
                 lambda: F.max_pool2d(x.transpose(-1, -2), 2),
                 lambda: F.max_pool2d(x.to(memory_format=torch.channels_last), 2), lambda: F.avg_pool2d(x, 2)]
    for fn in taken:
        with cpu_kernels():
            got = fn()
        assert torch.equal(got, fn()) and routed == ["pool"], fn
        routed.clear()
    for fn in not_taken:
        with cpu_kernels():
            got = fn()
        assert torch.equal(got, fn()) and not routed, fn


@native
def test_routes_out_of_place_relus_that_need_a_gradient(routed):
    x = torch.randn(ck.RELU_MIN_ELEMENTS, requires_grad=True)
    for fn in (lambda: F.relu(x), lambda: nn.ReLU()(x), lambda: torch.relu(x), lambda: x.relu()):
        with cpu_kernels():
            got = fn()
        assert torch.equal(got, fn()) and routed == ["relu"], fn
        routed.clear()
    y = torch.randn(4, 6)
    with cpu_kernels():
        F.relu(y)  # no gradient needed: torch's (nothing to save)
        F.relu(x[:-1])  # below RELU_MIN_ELEMENTS: torch's (the Function's overhead outweighs the saving)
        with torch.no_grad():
            F.relu(x)
        z = x * 1
        F.relu(z, inplace=True)  # in place: torch's
        nn.ReLU(inplace=True)(x * 1)
        cl = F.relu(torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last).requires_grad_())
    assert not routed
    assert cl.is_contiguous(memory_format=torch.channels_last)  # torch's relu keeps the layout


@native
def test_routes_training_mode_batch_norm_and_updates_running_stats_as_torch(routed):
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5) * 2 + 1
    w, b = torch.randn(4), torch.randn(4)

    def close(got, want):
        return torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))

    taken = [lambda: F.batch_norm(x, None, None, w, b, training=True),
             lambda: F.batch_norm(x, None, None, training=True, eps=1e-3),
             lambda: nn.BatchNorm2d(4, track_running_stats=False)(x),
             lambda: nn.BatchNorm1d(4)(x[:, :, 0].contiguous()), lambda: nn.BatchNorm1d(4)(x[:, :, :, 0].contiguous()),
             lambda: F.batch_norm(x.double(), None, None, w.double(), b.double(), training=True)]
    for fn in taken:
        torch.manual_seed(1)
        with cpu_kernels():
            got = fn()
        torch.manual_seed(1)
        assert close(got, fn()) and routed == ["batch_norm"], fn
        routed.clear()
    # a layer that tracks running statistics: the same updates as torch's (unbiased variance, momentum)
    ours, stock = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
    for _ in range(3):
        with cpu_kernels():
            ours(x)
        stock(x)
    assert routed == ["batch_norm"] * 3
    assert close(ours.running_mean, stock.running_mean) and close(ours.running_var, stock.running_var)
    assert ours.num_batches_tracked == stock.num_batches_tracked == 3
    routed.clear()
    cumulative, stock = nn.BatchNorm2d(4, momentum=None), nn.BatchNorm2d(4, momentum=None)  # cumulative average
    for scale in (1.0, 3.0):
        with cpu_kernels():
            cumulative(x * scale)
        stock(x * scale)
    assert close(cumulative.running_var, stock.running_var)
    routed.clear()
    ours.eval()
    with cpu_kernels():
        ours(x)  # eval mode: normalised with the running statistics, torch's op
        F.batch_norm(x.half(), None, None, training=True)  # dtype the kernels do not take
        F.batch_norm(x, torch.zeros(4), torch.ones(4), w, b, training=False)
        cl = F.batch_norm(x.to(memory_format=torch.channels_last), None, None, w, b, training=True)
        F.batch_norm(x[:, :, 0], None, None, w, b, training=True)  # not contiguous: torch's
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            nn.BatchNorm1d(4)(torch.randn(1, 4))  # torch's own error
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            dual = fwAD.make_dual(x, torch.randn_like(x))
            tangent = fwAD.unpack_dual(F.batch_norm(dual, None, None, w, b, training=True)).tangent
        assert tangent is not None
    assert not routed
    assert cl.is_contiguous(memory_format=torch.channels_last)  # torch's batch norm keeps the layout


def test_routes_convolutions_of_data_that_need_no_input_gradient(routed):
    x = torch.randn(2, 3, 8, 8)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    with cpu_kernels():
        y = conv(x)  # the first layer: routed
        assert routed == ["conv"] and torch.equal(y, F.conv2d(x, conv.weight, conv.bias, padding=1))
        routed.clear()
        conv(y)  # its input needs a gradient: torch's conv
        F.conv2d(x, conv.weight.detach(), padding=1)  # nothing to differentiate
        with torch.no_grad():
            conv(x)
        F.conv2d(x, conv.weight, padding="same")
    assert not routed


@native
def test_transforms_stock_kernels_and_the_reference_backend_turn_routing_off(routed, monkeypatch):
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(3, 3, 3, 3, requires_grad=True)
    with cpu_kernels():  # under a torch.func transform: torch's ops (the Functions have no batching rules)
        torch.func.vmap(lambda t: F.max_pool2d(F.relu(t), 2))(x.detach())
        torch.func.grad(lambda v: F.conv2d(x.detach(), v, padding=1).sum())(w.detach())
        torch.func.grad(lambda t: F.max_pool2d(F.relu(t), 2).sum())(x.detach())
        torch.func.vmap(lambda t: F.batch_norm(t, None, None, training=True))(x.detach().unsqueeze(0))
    with stock_kernels(), cpu_kernels():
        F.max_pool2d(F.relu(F.batch_norm(F.conv2d(x.detach(), w, padding=1), None, None, training=True)), 2)
    monkeypatch.setenv("FASTMAML_BACKEND", "reference")
    with cpu_kernels():
        F.max_pool2d(F.relu(F.batch_norm(F.conv2d(x.detach(), w, padding=1), None, None, training=True)), 2)
    assert not routed


def _conv4_task(seed=0):
    from fastmaml.meta.models import Conv4

    torch.manual_seed(seed)
    net = Conv4(1, 8, 5, 28).double()
    xs, ys = torch.randn(3, 5, 1, 28, 28, dtype=torch.float64), torch.arange(5).repeat(3, 1)
    xq, yq = torch.randn(3, 10, 1, 28, 28, dtype=torch.float64), torch.arange(5).repeat(3, 2)
    return net, (xs, ys), (xq, yq)


ENGINE_CASES = [("maml", {}), ("maml", {"reuse_last_step": False}), ("maml", {"keep_first_graph": True}),
                ("fomaml", {}), ("imaml", {})]


def _engine_meta_grads(algorithm, kw):
    from fastmaml.meta import maml_loss

    net, support, query = _conv4_task()
    lr = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)  # a learnable step size too
    params = list(net.parameters()) + [lr]
    loss = maml_loss(net, F.cross_entropy, support, query, num_steps=3, lr=lr, algorithm=algorithm,
                     batching="loop", **kw)
    return torch.autograd.grad(loss, params, allow_unused=True)


@native
@pytest.mark.parametrize("algorithm,kw", ENGINE_CASES)
def test_meta_gradients_are_bit_identical_with_the_pool_relu_and_conv_routes(routed, monkeypatch, algorithm, kw):
    monkeypatch.setattr(ck, "RELU_MIN_ELEMENTS", 0)  # this small net's relus routed too
    monkeypatch.setattr(ck._bn, "kernel_takes", lambda *a: False)  # batch norm: torch's (not bit-identical)
    fast = _engine_meta_grads(algorithm, kw)
    assert {"pool", "relu", "conv"} <= set(routed)  # the engine did run them
    routed.clear()
    with stock_kernels():
        stock = _engine_meta_grads(algorithm, kw)
    assert not routed
    for a, b in zip(fast, stock):
        assert (a is None and b is None) or torch.equal(a, b)


@native
@pytest.mark.parametrize("algorithm,kw", ENGINE_CASES)
def test_meta_gradients_agree_in_float64_with_all_kernels(routed, monkeypatch, algorithm, kw):
    monkeypatch.setattr(ck, "RELU_MIN_ELEMENTS", 0)
    fast = _engine_meta_grads(algorithm, kw)
    assert {"pool", "relu", "batch_norm", "conv"} <= set(routed)
    routed.clear()
    with stock_kernels():
        stock = _engine_meta_grads(algorithm, kw)
    assert not routed
    scale = max(float(b.abs().max()) for b in stock if b is not None)
    for a, b in zip(fast, stock):
        # relative to the largest entry of all: the conv biases' exact gradients are 0 (BN removes them)
        assert (a is None and b is None) or float((a - b).abs().max()) <= 1e-12 * scale


@native
def test_a_query_pass_keeps_less_with_the_kernels(monkeypatch):
    """What autograd saves for one conv4 query loss: torch's relu keeps its float output and its
    max-pool int64 indices; the kernels keep 1 bit and 1 byte."""
    net, _, (xq, yq) = _conv4_task()
    net = net.float()

    def saved_bytes():
        seen, total = set(), 0

        def pack(t):
            nonlocal total
            key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
            if key not in seen and t.data_ptr() != xq.data_ptr():
                seen.add(key)
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            F.cross_entropy(net(xq[0].float()), yq[0])
        return total

    monkeypatch.setattr(ck, "RELU_MIN_ELEMENTS", 0)  # this small net's relus routed too
    with cpu_kernels():
        ours = saved_bytes()
    stock = saved_bytes()
    assert ours < 0.6 * stock, (ours, stock)
