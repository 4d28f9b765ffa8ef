"""The stacked batching (all tasks in one forward pass) against the per-task loop, and its fallbacks."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmaml.meta import TaskModel, batched_grad, hvp, maml_loss, meta_sgd_step_sizes
from fastmaml.meta.models import MLP, CaviaMLP, Conv4, mse_loss
from fastmaml.meta.stacked import supports_stacking

F64 = torch.float64


def rel_err(got, ref):
    a = torch.cat([t.reshape(-1) for t in got])
    b = torch.cat([t.reshape(-1) for t in ref])
    return ((a - b).norm() / b.norm()).item()


def conv_case(num_tasks, seed=0):
    torch.manual_seed(seed)
    net = Conv4(1, 3, 3, 16).to(F64)
    data = lambda n: (torch.randn(num_tasks, n, 1, 16, 16, dtype=F64), torch.randint(0, 3, (num_tasks, n)))  # noqa
    return net, F.cross_entropy, data(4), data(7)


def mlp_case(num_tasks, seed=0):
    torch.manual_seed(seed)
    net = MLP(3, (17, 9), 2, nn.Tanh).to(F64)
    data = lambda n: (torch.randn(num_tasks, n, 3, dtype=F64), torch.randn(num_tasks, n, 2, dtype=F64))  # noqa
    return net, mse_loss, data(5), data(6)


def meta_grad(net, loss_fn, support, query, **kw):
    net.zero_grad()
    maml_loss(net, loss_fn, support, query, **kw).backward()
    return [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("case", [mlp_case, conv_case])
@pytest.mark.parametrize("num_tasks", [1, 3])
@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("algorithm", ["maml", "imaml"])
def test_stacked_meta_gradient_matches_the_loop(case, num_tasks, adapt, algorithm):
    net, loss_fn, support, query = case(num_tasks)
    kw = dict(num_steps=2, lr=0.1, adapt=adapt, algorithm=algorithm, imaml_lambda=50.0)
    ref = meta_grad(net, loss_fn, support, query, batching="loop", **kw)
    got = meta_grad(net, loss_fn, support, query, batching="stacked", **kw)
    assert rel_err(got, ref) < 1e-10


def test_stacked_matches_the_autograd_reference_with_learned_per_element_step_sizes():
    net, loss_fn, support, query = mlp_case(3)
    tm = TaskModel(net, loss_fn)
    lr = meta_sgd_step_sizes(tm, 0.05, dtype=F64)
    params = list(net.parameters()) + list(lr.parameters())
    ref = torch.autograd.grad(maml_loss(tm, support=support, query=query, num_steps=3, lr=lr, engine="autograd"),
                              params)
    got = torch.autograd.grad(maml_loss(tm, support=support, query=query, num_steps=3, lr=lr, batching="stacked"),
                              params)
    assert rel_err(got, ref) < 1e-10


@pytest.mark.parametrize("case", [mlp_case, conv_case])
def test_stacked_gradients_and_hvps_match_vmap(case):
    net, loss_fn, (xs, ys), _ = case(3)
    tm = TaskModel(net, loss_fn)
    torch.manual_seed(1)
    phi = [p + 0.05 * torch.randn_like(p) for p in tm.initial_adapted(tm.theta_adapted(), 3)]
    v = [torch.randn_like(p) for p in phi]
    losses_s, g_s, _ = batched_grad(tm.task_loss, phi, [], xs, ys, batching="stacked")
    losses_v, g_v, _ = batched_grad(tm.task_loss, phi, [], xs, ys, batching="vmap")
    torch.testing.assert_close(losses_s, losses_v)
    assert rel_err(g_s, g_v) < 1e-12
    hv_s, _ = hvp(tm.task_loss, phi, v, xs, ys, mode="exact", batching="stacked")
    hv_v, _ = hvp(tm.task_loss, phi, v, xs, ys, mode="forward_over_reverse", batching="vmap")
    assert rel_err(hv_s, hv_v) < 1e-12


def test_stacked_leaves_batch_norm_running_stats_untouched():
    net, loss_fn, support, query = conv_case(3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    meta_grad(net, loss_fn, support, query, num_steps=1, lr=0.1, batching="stacked")
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_auto_never_stacks_and_the_check_accepts_supported_models():
    net, loss_fn, (xs, ys), _ = mlp_case(3)
    tm = TaskModel(net, loss_fn)
    assert supports_stacking(tm, tm.theta_adapted(), [], xs, ys, shared=True)
    from fastmaml.meta.hvp import choose_batching

    assert choose_batching("auto", tm.task_loss, tm.theta_adapted(), [], (xs, ys), True) in ("vmap", "loop")
    assert choose_batching("stacked", tm.task_loss, tm.theta_adapted(), [], (xs, ys), True) == "stacked"


class UsesWeightDirectly(nn.Module):
    """A forward that multiplies by a parameter without F.linear: the stacked forward cannot batch it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 2, dtype=F64))

    def forward(self, x):
        return x @ self.w


def test_models_the_stacked_forward_cannot_run_are_refused_when_asked_for():
    torch.manual_seed(0)
    for net, adapt, data in [
        (UsesWeightDirectly(), "all", lambda n: (torch.randn(3, n, 3, dtype=F64), torch.randn(3, n, 2, dtype=F64))),
        (CaviaMLP(3, 4, (6,), 2).to(F64), "context",
         lambda n: (torch.randn(3, n, 3, dtype=F64), torch.randn(3, n, 2, dtype=F64))),
    ]:
        support, query = data(5), data(4)
        ref = meta_grad(net, mse_loss, support, query, num_steps=1, lr=0.1, adapt=adapt, batching="loop")
        got = meta_grad(net, mse_loss, support, query, num_steps=1, lr=0.1, adapt=adapt, batching="auto")
        assert rel_err(got, ref) < 1e-10
        with pytest.raises(ValueError, match="batching='stacked' needs a TaskModel"):
            meta_grad(net, mse_loss, support, query, num_steps=1, lr=0.1, adapt=adapt, batching="stacked")
