"""fastmaml.compat.MetaSGD: learn2learn's Meta-SGD wrapper (a learnable step size per parameter entry).

Specification: the meta-gradients of the network's parameters and of the step sizes equal a
hand-written Meta-SGD loop (``phi = phi - lrs * grad``, ``create_graph`` unless first order) in
float64; learn2learn's own ``MetaSGD`` when it can be loaded; the batched engine given
``lr=list(meta.lrs)`` (the way from the per-task API to all tasks at once); the step sizes start at
``lr``, are listed by ``parameters()`` after the network's and are trained by one optimizer; bad
``lrs`` are named.
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmaml.compat import MetaSGD, stack_tasks
from fastmaml.meta import maml_loss

sys.path.insert(0, os.path.dirname(__file__))
from test_compat import NETS, hand_written_meta_grad, learn2learn_class, learner_loop_grads, make_tasks  # noqa: E402

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def random_lrs(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(0.1 + 0.4 * torch.rand(p.shape, generator=g, dtype=DT)).requires_grad_() for p in model.parameters()]


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("net", list(NETS))
def test_meta_gradients_of_weights_and_step_sizes_match_the_hand_written_loop(net, first_order):
    build, by_hand, sample_shape = NETS[net]
    torch.manual_seed(1)
    model = build()
    tasks = make_tasks(sample_shape, num_tasks=3)
    lrs = random_lrs(model)
    expected = hand_written_meta_grad(model, by_hand, tasks, 3, lrs, first_order)
    meta = MetaSGD(model, first_order=first_order, lrs=nn.ParameterList([nn.Parameter(a.detach().clone())
                                                                         for a in lrs]))
    got = learner_loop_grads(meta, tasks, 3)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)


def test_the_batched_engine_gives_the_same_meta_gradients():
    torch.manual_seed(2)
    model = NETS["conv_bn"][0]()
    tasks = make_tasks((1, 8, 8), num_tasks=3)
    meta = MetaSGD(model, lrs=nn.ParameterList([nn.Parameter(a.detach()) for a in random_lrs(model)]))
    expected = learner_loop_grads(meta, tasks, 2)
    meta.zero_grad()
    support, query = stack_tasks(tasks)
    maml_loss(meta.module, F.cross_entropy, support, query, num_steps=2, lr=list(meta.lrs)).backward()
    for g, p in zip(expected, meta.parameters()):
        torch.testing.assert_close(p.grad, g, **TOL)


def test_step_sizes_start_at_lr_and_train_with_the_network():
    torch.manual_seed(3)
    model = NETS["mlp"][0]()
    meta = MetaSGD(model, lr=0.25)
    n = len(list(model.parameters()))
    params = list(meta.parameters())
    assert len(params) == 2 * n and all(a is b for a, b in zip(params[:n], model.parameters()))
    assert all(torch.equal(a, torch.full_like(p, 0.25)) for a, p in zip(meta.lrs, model.parameters()))
    opt = torch.optim.SGD(meta.parameters(), lr=0.1)
    xs, ys, xq, yq = make_tasks((3,), num_tasks=1)[0]
    learner = meta.clone()
    assert [n for n, _ in learner.named_parameters()][-1] == f"lrs.{n - 1}"
    learner.adapt(F.cross_entropy(learner(xs), ys))
    F.cross_entropy(learner(xq), yq).backward()
    before = [a.detach().clone() for a in meta.lrs]
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(meta.lrs, before))


def test_bad_step_sizes_are_named():
    model = NETS["mlp"][0]()
    with pytest.raises(ValueError, match="one per parameter"):
        MetaSGD(model, lrs=[torch.ones(3)])
    shapes = [torch.ones_like(p) for p in model.parameters()]
    shapes[2] = torch.ones(2, 2, dtype=DT)
    with pytest.raises(ValueError, match=r"lrs\[2\] has shape \(2, 2\)"):
        MetaSGD(model, lrs=shapes)
    with pytest.raises(TypeError, match="list of tensors"):
        MetaSGD(model, lrs=torch.ones(3))


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_meta_gradients_match_learn2learn(first_order):
    L2LMetaSGD = learn2learn_class("meta_sgd", "MetaSGD")
    torch.manual_seed(4)
    model = NETS["conv_bn"][0]()
    tasks = make_tasks((1, 8, 8), num_tasks=2)
    got = learner_loop_grads(MetaSGD(model, lr=0.3, first_order=first_order), tasks, 2)
    theirs = learner_loop_grads(L2LMetaSGD(model, lr=0.3, first_order=first_order), tasks, 2)
    assert len(got) == len(theirs)
    for g, t in zip(got, theirs):
        torch.testing.assert_close(g, t, **TOL)
