"""fastmaml.compat: the learn2learn-style ``MAML`` wrapper, ``stack_tasks`` and the torch.func helpers.

Order: the wrapper's meta-gradients against a hand-written ``create_graph`` loop (networks written
with ``torch.nn.functional``, no ``functional_call``), in float64, second and first order ->
learn2learn itself when it can be imported -> clone independence and the learn2learn API ->
``stack_tasks`` errors -> the batched recipe (``maml_loss`` on stacked tasks, the torch.func
helpers) against the per-task loop.
"""
import importlib
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmaml.compat import MAML, adapted_params, per_task_forward, stack_tasks
from fastmaml.meta import maml_loss

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: extra threads only add synchronization (and stalls on a busy machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# -- networks and their hand-written functional twins ---------------------------------------------
def mlp():
    return nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 4)).to(DT)


def mlp_by_hand(p, x):
    h = torch.tanh(F.linear(x, p[0], p[1]))
    h = torch.relu(F.linear(h, p[2], p[3]))
    return F.linear(h, p[4], p[5])


def conv_bn():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).to(DT)


def conv_bn_by_hand(p, x):
    h = F.conv2d(x, p[0], p[1], padding=1)
    h = F.batch_norm(h, None, None, p[2], p[3], training=True)  # training mode: batch statistics
    h = F.max_pool2d(torch.relu(h), 2)
    return F.linear(h.flatten(1), p[4], p[5])


NETS = {"mlp": (mlp, mlp_by_hand, (3,)), "conv_bn": (conv_bn, conv_bn_by_hand, (1, 8, 8))}


def make_tasks(sample_shape, num_tasks, n_support=6, n_query=9, n_way=4, seed=0, dtype=DT):
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(num_tasks):
        xs = torch.randn(n_support, *sample_shape, generator=gen, dtype=dtype)
        xq = torch.randn(n_query, *sample_shape, generator=gen, dtype=dtype)
        ys = torch.randint(0, n_way, (n_support,), generator=gen)
        yq = torch.randint(0, n_way, (n_query,), generator=gen)
        tasks.append((xs, ys, xq, yq))
    return tasks


def hand_written_meta_grad(model, forward, tasks, num_steps, lr, first_order):
    """The plain loop: per task, K steps of p - lr * grad (create_graph unless first order), mean query
    loss. ``lr``: a float, a 0-dim tensor, or a list of one tensor per parameter (Meta-SGD); the
    gradients of the tensors among them follow the parameters'."""
    theta = list(model.parameters())
    lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(theta)
    total = 0.0
    for xs, ys, xq, yq in tasks:
        phi = theta
        for _ in range(num_steps):
            grads = torch.autograd.grad(F.cross_entropy(forward(phi, xs), ys), phi, create_graph=not first_order)
            phi = [p - a * g for p, a, g in zip(phi, lrs, grads)]
        total = total + F.cross_entropy(forward(phi, xq), yq)
    wrt = theta + (list(lr) if isinstance(lr, (list, tuple)) else [lr] if isinstance(lr, torch.Tensor) else [])
    return torch.autograd.grad(total / len(tasks), wrt)


def learner_loop_grads(wrapper, tasks, num_steps):
    """The learn2learn pattern: clone, adapt K times, backward the query loss; the ``.grad`` of
    every parameter of the wrapper (the network's, then its own step sizes if any)."""
    wrapper.zero_grad()
    for xs, ys, xq, yq in tasks:
        learner = wrapper.clone()
        for _ in range(num_steps):
            learner.adapt(F.cross_entropy(learner(xs), ys))
        (F.cross_entropy(learner(xq), yq) / len(tasks)).backward()
    return [p.grad.clone() for p in wrapper.parameters()]


def compat_meta_grad(model, tasks, num_steps, lr, first_order):
    """The learn2learn pattern on fastmaml.compat.MAML."""
    return learner_loop_grads(MAML(model, lr=lr, first_order=first_order), tasks, num_steps)


# -- meta-gradients against the hand-written loop -------------------------------------------------
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("net", list(NETS))
def test_meta_gradient_matches_hand_written_loop(net, first_order):
    build, by_hand, sample_shape = NETS[net]
    torch.manual_seed(1)
    model = build()
    tasks = make_tasks(sample_shape, num_tasks=3)
    expected = hand_written_meta_grad(model, by_hand, tasks, 3, 0.4, first_order)
    got = compat_meta_grad(model, tasks, 3, 0.4, first_order)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)
    # the two orders really differ (the test would not notice a dropped create_graph otherwise)
    other = hand_written_meta_grad(model, by_hand, tasks, 3, 0.4, not first_order)
    assert max((a - b).abs().max().item() for a, b in zip(other, expected)) > 1e-6


def test_learnable_step_size_gets_its_meta_gradient():
    torch.manual_seed(2)
    model = mlp()
    tasks = make_tasks((3,), num_tasks=2)
    lr = torch.tensor(0.3, dtype=DT, requires_grad=True)
    *expected, expected_lr = hand_written_meta_grad(model, mlp_by_hand, tasks, 2, lr, False)
    got = compat_meta_grad(model, tasks, 2, lr, False)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)
    torch.testing.assert_close(lr.grad, expected_lr, **TOL)


def learn2learn_class(module: str, name: str):
    """``learn2learn.algorithms.<module>.<name>``: installed, or loaded from FASTMAML_L2L_PATH (the
    package directory) without the package's dataset dependencies."""
    try:
        return getattr(importlib.import_module(f"learn2learn.algorithms.{module}"), name)
    except ImportError:
        pass
    root = os.environ.get("FASTMAML_L2L_PATH")
    if not root:
        pytest.skip("learn2learn is not installed (set FASTMAML_L2L_PATH to its package directory to compare)")
    saved = {k: v for k, v in sys.modules.items() if k.startswith("learn2learn")}
    try:
        for stub_name, sub in (("learn2learn", ""), ("learn2learn.algorithms", "algorithms")):
            stub = types.ModuleType(stub_name)
            stub.__path__ = [os.path.join(root, sub)]
            sys.modules[stub_name] = stub
        return getattr(importlib.import_module(f"learn2learn.algorithms.{module}"), name)
    finally:
        for k in [k for k in sys.modules if k.startswith("learn2learn")]:
            del sys.modules[k]
        sys.modules.update(saved)


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_meta_gradient_matches_learn2learn(first_order):
    L2LMAML = learn2learn_class("maml", "MAML")
    torch.manual_seed(3)
    model = conv_bn()
    tasks = make_tasks((1, 8, 8), num_tasks=2)
    got = compat_meta_grad(model, tasks, 2, 0.4, first_order)
    model.zero_grad()
    maml = L2LMAML(model, lr=0.4, first_order=first_order)
    for xs, ys, xq, yq in tasks:
        learner = maml.clone()
        for _ in range(2):
            learner.adapt(F.cross_entropy(learner(xs), ys))
        (F.cross_entropy(learner(xq), yq) / len(tasks)).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, **TOL)


# -- clones and the learn2learn API ---------------------------------------------------------------
def test_clones_are_independent():
    torch.manual_seed(4)
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    (xs, ys, xq, _), = make_tasks((3,), num_tasks=1)
    maml = MAML(model, lr=0.5)
    a, b = maml.clone(), maml.clone()
    a.adapt(F.cross_entropy(a(xs), ys))
    a_params = [p.detach().clone() for p in a.parameters()]
    c = a.clone()
    c.adapt(F.cross_entropy(c(xs), ys))
    for p, q in zip(model.parameters(), before):  # the original is untouched, bit for bit
        assert torch.equal(p, q)
    for p, q in zip(b.parameters(), before):      # so is the other clone
        assert torch.equal(p.detach(), q)
    torch.testing.assert_close(b(xq), model(xq), rtol=0, atol=0)
    for p, q in zip(a.parameters(), a_params):    # a clone of a learner does not change the learner
        assert torch.equal(p.detach(), q)
    assert any(not torch.equal(p, q) for p, q in zip(a_params, before))
    assert any(not torch.equal(p.detach(), q) for p, q in zip(c.parameters(), a_params))
    # a learner's query loss reaches the original parameters
    F.cross_entropy(c(xq), _).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_learner_api():
    torch.manual_seed(5)
    model = conv_bn()
    maml = MAML(model, lr=0.1)
    assert maml.module is model
    assert [n for n, _ in maml.named_parameters()] == [f"module.{n}" for n, _ in model.named_parameters()]
    (xs, ys, xq, _), = make_tasks((1, 8, 8), num_tasks=1)
    learner = maml.clone()
    learner.adapt(F.cross_entropy(learner(xs), ys))
    assert isinstance(learner, MAML)
    params = list(learner.parameters())
    assert len(params) == len(list(model.parameters())) and not any(p.is_leaf for p in params)
    assert [n for n, _ in learner.named_parameters()] == [n for n, _ in maml.named_parameters()]
    torch.testing.assert_close(learner.module(xq), learner(xq), rtol=0, atol=0)
    # submodules of the view run with the learner's tensors too
    feats = learner.module[4](learner.module[3](learner.module[2](learner.module[1](learner.module[0](xq)))))
    torch.testing.assert_close(learner.module[5](feats), learner(xq), rtol=0, atol=0)
    assert learner.module[5].weight is learner._adapted["5.weight"]
    with pytest.raises(AttributeError, match="read-only"):
        learner.module.foo = 1
    # adapt on the wrapper itself turns it into a learner; the network keeps its parameters
    w = model[5].weight.detach().clone()
    maml.adapt(F.cross_entropy(maml(xs), ys))
    assert torch.equal(model[5].weight, w) and not torch.equal(maml.module[5].weight.detach(), w)


def test_learner_updates_batch_norm_running_stats_like_the_module():
    """learn2learn's clones share the BN buffers with the original: running stats move on every call
    (by the same update as torch's; the compiled batch norm adds its sums in another order)."""
    torch.manual_seed(6)
    model = conv_bn()
    twin = conv_bn()
    twin.load_state_dict(model.state_dict())
    (xs, ys, _, _), = make_tasks((1, 8, 8), num_tasks=1)
    learner = MAML(model, lr=0.1).clone()
    learner(xs)
    twin(xs)
    for name, buf in model.named_buffers():
        torch.testing.assert_close(buf, dict(twin.named_buffers())[name], rtol=1e-12, atol=1e-14)
    assert model[1].num_batches_tracked.item() == 1


def test_allow_nograd_and_allow_unused():
    torch.manual_seed(7)
    (xs, ys, _, _), = make_tasks((3,), num_tasks=1)
    model = mlp()
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"\['0.weight'\] do not require grad.*allow_nograd=True"):
        MAML(model, 0.1).clone().adapt(F.cross_entropy(model(xs), ys))
    learner = MAML(model, 0.1, allow_nograd=True).clone()
    learner.adapt(F.cross_entropy(learner(xs), ys))
    assert torch.equal(learner._adapted["0.weight"], model[0].weight)
    assert not torch.equal(learner._adapted["0.bias"].detach(), model[0].bias.detach())

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 4).to(DT), nn.Linear(3, 4).to(DT)

        def forward(self, x):
            return self.used(x)

    net = TwoHeads()
    learner = MAML(net, 0.1).clone()
    with pytest.raises(ValueError, match=r"\['unused.weight', 'unused.bias'\] were not used.*allow_unused=True"):
        learner.adapt(F.cross_entropy(learner(xs), ys))
    learner = MAML(net, 0.1, allow_unused=True).clone()
    learner.adapt(F.cross_entropy(learner(xs), ys))
    assert torch.equal(learner._adapted["unused.weight"], net.unused.weight)


def test_bad_arguments():
    model = mlp()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        MAML(lambda x: x, 0.1)
    with pytest.raises(TypeError, match="lr must be a float"):
        MAML(model, "0.1")
    with pytest.raises(ValueError, match="lr must be finite"):
        MAML(model, float("nan"))
    with pytest.raises(ValueError, match="lr must be a float or a 0-dim"):
        MAML(model, torch.ones(2, dtype=DT))
    with pytest.raises(TypeError, match="first_order must be a bool"):
        MAML(model, 0.1, first_order=1)
    learner = MAML(model, 0.1).clone()
    x = torch.randn(4, 3, dtype=DT)
    with pytest.raises(ValueError, match="loss must be a scalar"):
        learner.adapt(learner(x).sum(1))
    with pytest.raises(TypeError, match="loss must be a scalar tensor"):
        learner.adapt(1.0)
    with pytest.raises(ValueError, match="loss does not require grad"):
        learner.adapt(learner(x).detach().sum())


# -- stack_tasks ----------------------------------------------------------------------------------
def test_stack_tasks_stacks():
    tasks = make_tasks((1, 8, 8), num_tasks=3)
    (xs, ys), (xq, yq) = stack_tasks(tasks)
    assert xs.shape == (3, 6, 1, 8, 8) and ys.shape == (3, 6) and xq.shape == (3, 9, 1, 8, 8) and yq.shape == (3, 9)
    for t, (a, b, c, d) in enumerate(tasks):
        assert torch.equal(xs[t], a) and torch.equal(ys[t], b) and torch.equal(xq[t], c) and torch.equal(yq[t], d)


def _replace(tasks, t, slot, value):
    tasks = [list(task) for task in tasks]
    tasks[t][slot] = value
    return [tuple(task) for task in tasks]


@pytest.mark.parametrize("bad, error, match", [
    (lambda ts: ts[0], TypeError, r"tasks\[0\] must be a tuple"),            # one task, not a list of tasks
    (lambda ts: torch.zeros(3), TypeError, "tasks must be a list"),
    (lambda ts: [], ValueError, "tasks is empty"),
    (lambda ts: [ts[0][:3]] + ts[1:], TypeError, r"tasks\[0\] must be a tuple \(xs, ys, xq, yq\), got length 3"),
    (lambda ts: _replace(ts, 1, 1, [0, 1]), TypeError, r"tasks\[1\] ys must be a tensor"),
    (lambda ts: _replace(ts, 2, 0, torch.randn(7, 1, 8, 8, dtype=DT)), ValueError,
     r"tasks\[2\] xs has 7 samples but ys has 6"),
    (lambda ts: _replace(_replace(ts, 2, 0, torch.randn(7, 1, 8, 8, dtype=DT)), 2, 1, torch.zeros(7).long()),
     ValueError, r"ragged tasks: tasks\[2\] xs has shape \(7, 1, 8, 8\) but tasks\[0\] xs has \(6, 1, 8, 8\)"),
    (lambda ts: _replace(ts, 1, 2, ts[1][2].float()), TypeError,
     r"tasks\[1\] xq has dtype torch.float32 but tasks\[0\] xq has torch.float64"),
    (lambda ts: [(a, b, c.float(), d) for a, b, c, d in ts], TypeError,
     "xs has dtype torch.float64 but xq has torch.float32"),
    (lambda ts: [(a, b, c, d.int()) for a, b, c, d in ts], TypeError,
     "ys has dtype torch.int64 but yq has torch.int32"),
    (lambda ts: [(a, b, c[..., :4], d) for a, b, c, d in ts], ValueError,
     r"xs samples have shape \(1, 8, 8\) but xq samples have \(1, 8, 4\)"),
    (lambda ts: _replace(ts, 0, 3, torch.tensor(1)), ValueError, r"tasks\[0\] yq must have a batch dimension"),
])
def test_stack_tasks_errors(bad, error, match):
    tasks = make_tasks((1, 8, 8), num_tasks=3)
    with pytest.raises(error, match=match):
        stack_tasks(bad(tasks))


# -- the batched recipe against the per-task loop -------------------------------------------------
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_batched_recipe_matches_per_task_loop(first_order):
    torch.manual_seed(8)
    model = conv_bn()
    tasks = make_tasks((1, 8, 8), num_tasks=3)
    expected = compat_meta_grad(model, tasks, 3, 0.4, first_order)
    model.zero_grad()
    support, query = stack_tasks(tasks)
    loss = maml_loss(model, F.cross_entropy, support, query, num_steps=3, lr=0.4,
                     algorithm="fomaml" if first_order else "maml")
    loss.backward()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, **TOL)


def test_torch_func_recipe_matches():
    """The torch.func pattern (vmap over tasks of a grad loop, backward through it) -> one maml_loss call."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(9)
    model = mlp()
    (xs, ys), (xq, yq) = stack_tasks(make_tasks((3,), num_tasks=4))
    params = dict(model.named_parameters())

    def loss_at(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    def task_query_loss(p, xs, ys, xq, yq):
        for _ in range(3):
            g = grad(loss_at)(p, xs, ys)
            p = {k: p[k] - 0.4 * g[k] for k in p}
        return loss_at(p, xq, yq)

    expected = torch.autograd.grad(vmap(task_query_loss, in_dims=(None, 0, 0, 0, 0))(params, xs, ys, xq, yq).mean(),
                                   list(params.values()))
    got = torch.autograd.grad(maml_loss(model, F.cross_entropy, (xs, ys), (xq, yq), num_steps=3, lr=0.4),
                              list(params.values()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)


def test_adapted_params_and_per_task_forward_match_learners():
    torch.manual_seed(10)
    model = conv_bn()
    tasks = make_tasks((1, 8, 8), num_tasks=3)
    (xs, ys), (xq, _) = stack_tasks(tasks)
    running = model[1].running_mean.clone()
    phi = adapted_params(model, F.cross_entropy, (xs, ys), 2, 0.3)
    logits = per_task_forward(model, phi, xq)
    assert torch.equal(model[1].running_mean, running)  # the batched helpers leave running stats alone
    assert list(phi) == [n for n, _ in model.named_parameters()] and logits.shape == (3, 9, 4)
    maml = MAML(model, 0.3, first_order=True)
    for t, (a, b, c, _) in enumerate(tasks):
        learner = maml.clone()
        for _ in range(2):
            learner.adapt(F.cross_entropy(learner(a), b))
        for name, p in learner._adapted.items():
            torch.testing.assert_close(phi[name][t], p.detach(), **TOL)
        torch.testing.assert_close(logits[t], learner(c).detach(), **TOL)
    with pytest.raises(ValueError, match=r"params\['0.weight'\] has shape \(3, 3, 1, 3, 3\); "
                                         r"expected \(2, 3, 1, 3, 3\)"):
        per_task_forward(model, phi, xq[:2])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        per_task_forward(model, {"nope": phi["5.weight"]}, xq)
