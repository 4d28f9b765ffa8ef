"""Models whose modules or parameters are reachable by more than one name.

Specification: a module registered under two paths (learn2learn's ``OmniglotCNN`` holds its conv
blocks as ``base`` and inside ``features``) and a parameter assigned to two modules (tied
weights) are run with the engine's tensors in every slot and left exactly as they were: after any
call the model holds its own parameter objects, a second call gives the same result as the first,
and meta-gradients equal those of an oracle that does not share (the same network built without
the second path) or that is written out by hand (the tied weight used twice).
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmaml.compat import MAML, per_task_forward
from fastmaml.meta import fused_conv
from fastmaml.meta.front import maml_loss
from fastmaml.meta.functional import TaskModel, call_with, tensor_slots

sys.path.insert(0, str(Path(__file__).parent))
from _meta_util import rel_err  # noqa: E402

F64 = torch.float64
TOL = 1e-10
HAVE_KERNELS = all(fused_conv.native_available(op) for op in fused_conv._KERNELS)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.normalize = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.normalize(self.conv(x)))


class TwoPathCNN(nn.Module):
    """The blocks as ``base`` and as ``features.0`` (``shared=True``), or only the latter."""

    def __init__(self, shared=True):
        super().__init__()
        base = nn.Sequential(Block(2, 4, 1), Block(4, 5, 2))
        if shared:
            self.base = base
        self.features = nn.Sequential(base, nn.Flatten())
        self.classifier = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        return self.classifier(self.features(x))


def twins():
    """The two-path model and a copy of it with one path (parameters in the same order)."""
    torch.manual_seed(0)
    shared = TwoPathCNN(shared=True).double()
    single = TwoPathCNN(shared=False).double()
    with torch.no_grad():
        for a, b in zip(single.parameters(), shared.parameters(), strict=True):
            a.copy_(b)
    return shared, single


def episode(num_tasks=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(num_tasks, 6, 2, 8, 8, dtype=F64, generator=g)
    xq = torch.randn(num_tasks, 9, 2, 8, 8, dtype=F64, generator=g)
    ys = torch.randint(0, 3, (num_tasks, 6), generator=g)
    yq = torch.randint(0, 3, (num_tasks, 9), generator=g)
    return (xs, ys), (xq, yq)


def identities(model):
    return [id(t) for t in model.parameters()] + [id(t) for t in model.buffers()]


def test_tensor_slots_name_each_module_attribute_once():
    shared, _ = twins()
    slots = tensor_slots(shared)
    assert slots["base.0.conv.weight"] == ("base.0.conv.weight",)  # one slot, though two paths reach it
    tied = TiedMLP()
    assert tensor_slots(tied)["0.weight"] == ("0.weight", "2.weight")  # one tensor, two slots


def test_call_with_runs_the_given_tensors_and_restores_every_slot():
    shared, _ = twins()
    before = identities(shared)
    x = torch.randn(4, 2, 8, 8, dtype=F64)
    doubled = {n: 2 * p.detach() for n, p in shared.named_parameters()}
    out = call_with(shared, doubled, (x,))
    assert identities(shared) == before
    with torch.no_grad():
        for p in shared.parameters():
            p.mul_(2)
        expected = shared(x)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batching", ["auto", "loop", "vmap", "fused_conv"])  # "stacked" refuses Block
def test_two_path_model_meta_gradients_equal_the_single_path_copy(batching):
    if batching == "fused_conv" and not HAVE_KERNELS:
        pytest.skip("the compiled layer kernels are not built")
    shared, single = twins()
    support, query = episode()
    ref = torch.autograd.grad(maml_loss(single, F.cross_entropy, support, query, num_steps=2, lr=0.3,
                                        engine="autograd"), list(single.parameters()))
    before = identities(shared)
    results = []
    for _ in range(2):  # the first call must leave the model as it found it
        loss = maml_loss(shared, F.cross_entropy, support, query, num_steps=2, lr=0.3, batching=batching)
        results.append(torch.autograd.grad(loss, list(shared.parameters())))
        assert identities(shared) == before
    for got in results:
        assert rel_err(got, ref) < TOL


def test_the_fused_conv_path_takes_the_two_path_model():
    if not HAVE_KERNELS:
        pytest.skip("the compiled layer kernels are not built")
    shared, _ = twins()
    assert fused_conv.why_not(TaskModel(shared, F.cross_entropy)) is None


class TiedMLP(nn.Sequential):
    """3 -> 3 -> 3 -> 1 with the second layer's weight the first's (one tensor, two modules)."""

    def __init__(self):
        torch.manual_seed(2)
        super().__init__(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
        self[2].weight = self[0].weight
        self.double()


def tied_by_hand(params, x):
    w1, b1, b2, w3, b3 = params
    return F.linear(torch.tanh(F.linear(torch.tanh(F.linear(x, w1, b1)), w1, b2)), w3, b3)


def tied_meta_grad_by_hand(net, support, query, lr, num_steps):
    """Second-order MAML written out: the tied weight is one tensor used twice."""
    theta = list(net.parameters())  # [0.weight, 0.bias, 2.bias, 4.weight, 4.bias]
    total = 0.0
    for t in range(support[0].shape[0]):
        phi = theta
        for _ in range(num_steps):
            loss = F.mse_loss(tied_by_hand(phi, support[0][t]), support[1][t])
            grads = torch.autograd.grad(loss, phi, create_graph=True)
            phi = [p - lr * g for p, g in zip(phi, grads)]
        total = total + F.mse_loss(tied_by_hand(phi, query[0][t]), query[1][t])
    return torch.autograd.grad(total / support[0].shape[0], theta)


@pytest.mark.parametrize("batching", ["auto", "loop", "vmap", "stacked"])
def test_tied_weight_meta_gradients_equal_the_hand_written_ones(batching):
    net = TiedMLP()
    assert len(list(net.parameters())) == 5
    g = torch.Generator().manual_seed(3)
    support = (torch.randn(4, 7, 3, dtype=F64, generator=g), torch.randn(4, 7, 1, dtype=F64, generator=g))
    query = (torch.randn(4, 5, 3, dtype=F64, generator=g), torch.randn(4, 5, 1, dtype=F64, generator=g))
    ref = tied_meta_grad_by_hand(net, support, query, 0.2, 2)
    before = identities(net)
    loss = maml_loss(net, F.mse_loss, support, query, num_steps=2, lr=0.2, batching=batching)
    got = torch.autograd.grad(loss, list(net.parameters()))
    assert identities(net) == before and net[2].weight is net[0].weight
    assert rel_err(got, ref) < TOL


def test_compat_learners_leave_a_two_path_model_as_it_was():
    shared, single = twins()
    (xs, ys), (xq, yq) = episode(num_tasks=1)
    before = identities(shared)
    grads = []
    for net in (shared, single):
        maml = MAML(net, lr=0.3)
        learner = maml.clone()
        learner.adapt(F.cross_entropy(learner(xs[0]), ys[0]))
        grads.append(torch.autograd.grad(F.cross_entropy(learner(xq[0]), yq[0]), list(net.parameters())))
    assert identities(shared) == before
    assert rel_err(grads[0], grads[1]) < TOL


def test_per_task_forward_leaves_a_two_path_model_as_it_was():
    shared, single = twins()
    (xs, _), _ = episode()
    before = identities(shared)
    params = {n: torch.stack([p.detach() * (1 + 0.1 * t) for t in range(3)]) for n, p in shared.named_parameters()}
    got = per_task_forward(shared, params, xs)
    assert identities(shared) == before
    single_params = {n: v for n, v in zip([n for n, _ in single.named_parameters()], params.values())}
    assert torch.allclose(got, per_task_forward(single, single_params, xs), rtol=1e-12, atol=1e-12)
