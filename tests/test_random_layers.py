"""Models that draw random numbers in their support pass (dropout in training mode).

Specification: the second-order engines recompute each inner step's support pass in the backward;
those recomputations draw the same masks as the forward pass did, so the meta-gradient is the
exact gradient of the loss with the masks the forward pass drew. Oracle: second-order MAML written
out with plain autograd (``create_graph=True``), drawing its masks in the same order as the engine
(under the loop batching step by step over the tasks, the last step with each task's query pass;
with ``task_by_task=True`` each task's K steps and query pass in turn; under vmap one draw per step
for all tasks, then the query pass). The caller's random stream
is not rewound by the backward. Finite-difference HVP modes, which would evaluate a task's gradient
under two different masks, refuse such a model with an error that says why.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from fastmaml.meta.front import maml_loss

F64 = torch.float64
P_DROP = 0.3


def dropout_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(P_DROP), nn.Linear(16, 1)).double()


def episode(num_tasks=3):
    g = torch.Generator().manual_seed(3)
    support = (torch.randn(num_tasks, 7, 3, dtype=F64, generator=g), torch.randn(num_tasks, 7, 1, dtype=F64, generator=g))
    query = (torch.randn(num_tasks, 5, 3, dtype=F64, generator=g), torch.randn(num_tasks, 5, 1, dtype=F64, generator=g))
    return support, query


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def rel_err(a, b):
    return float((flat(a) - flat(b)).norm() / flat(b).norm())


def loop_oracle(net, support, query, num_steps, lr):
    """Plain autograd in the loop batching's order of draws, step by step over the tasks: the first
    K - 1 steps of every task, then each task's last step and query pass (that step's graph is
    reused for its HVP)."""
    theta = dict(net.named_parameters())
    (xs, ys), (xq, yq) = support, query
    num_tasks = xs.shape[0]

    def loss(params, x, y):
        return F.mse_loss(functional_call(net, params, (x,)), y)

    def step(params, t):
        g = torch.autograd.grad(loss(params, xs[t], ys[t]), list(params.values()), create_graph=True)
        return {n: p - lr * gi for (n, p), gi in zip(params.items(), g)}

    phis = [dict(theta) for _ in range(num_tasks)]
    for _ in range(num_steps - 1):
        phis = [step(phis[t], t) for t in range(num_tasks)]
    total = 0.0
    for t in range(num_tasks):
        total = total + loss(step(phis[t], t), xq[t], yq[t])
    return torch.autograd.grad(total / num_tasks, list(theta.values()))


def task_by_task_oracle(net, support, query, num_steps, lr):
    """Plain autograd in the order of ``task_by_task=True``: each task's K steps and query pass."""
    theta = dict(net.named_parameters())
    (xs, ys), (xq, yq) = support, query

    def loss(params, x, y):
        return F.mse_loss(functional_call(net, params, (x,)), y)

    total = 0.0
    for t in range(xs.shape[0]):
        phi = dict(theta)
        for _ in range(num_steps):
            g = torch.autograd.grad(loss(phi, xs[t], ys[t]), list(phi.values()), create_graph=True)
            phi = {n: p - lr * gi for (n, p), gi in zip(phi.items(), g)}
        total = total + loss(phi, xq[t], yq[t])
    return torch.autograd.grad(total / xs.shape[0], list(theta.values()))


def vmap_oracle(net, support, query, num_steps, lr):
    """Plain autograd through torch.func's vmapped inner loop: one draw per step for all tasks."""
    theta = dict(net.named_parameters())

    def loss(params, x, y):
        return F.mse_loss(functional_call(net, params, (x,)), y)

    def task(params, xs, ys, xq, yq):
        for _ in range(num_steps):
            g = grad(loss)(params, xs, ys)
            params = {n: params[n] - lr * g[n] for n in params}
        return loss(params, xq, yq)

    losses = vmap(task, in_dims=(None, 0, 0, 0, 0), randomness="different")(theta, *support, *query)
    return torch.autograd.grad(losses.mean(), list(theta.values()))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                               reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_steps", [1, 3])
@pytest.mark.parametrize("batching,task_by_task,oracle", [("loop", False, loop_oracle), ("vmap", None, vmap_oracle),
                                                          ("loop", True, task_by_task_oracle)])
def test_meta_gradient_is_exact_for_the_masks_the_forward_pass_drew(batching, task_by_task, oracle, num_steps,
                                                                    device):
    net = dropout_mlp().to(device)
    support, query = [tuple(t.to(device) for t in batch) for batch in episode()]
    torch.manual_seed(7)
    ref = oracle(net, support, query, num_steps, 0.2)
    torch.manual_seed(7)
    loss = maml_loss(net, F.mse_loss, support, query, num_steps=num_steps, lr=0.2, batching=batching,
                     task_by_task=task_by_task)
    got = torch.autograd.grad(loss, list(net.parameters()))
    assert rel_err(got, ref) < 1e-10


def test_the_backward_does_not_rewind_the_callers_random_stream():
    net = dropout_mlp()
    support, query = episode()
    torch.manual_seed(7)
    loss = maml_loss(net, F.mse_loss, support, query, num_steps=3, lr=0.2, batching="loop")
    after_forward = torch.get_rng_state()
    loss.backward()
    assert torch.equal(torch.get_rng_state(), after_forward)


def test_a_model_without_random_layers_leaves_the_stream_alone():
    net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 1)).double()
    support, query = episode()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    maml_loss(net, F.mse_loss, support, query, num_steps=3, lr=0.2, batching="loop").backward()
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("mode", ["fd_forward", "fd_central"])
def test_finite_difference_modes_refuse_random_layers(mode):
    net = dropout_mlp()
    support, query = episode()
    with pytest.raises(ValueError, match="draws random numbers"):
        maml_loss(net, F.mse_loss, support, query, num_steps=2, lr=0.2, hvp_mode=mode, batching="loop")


def test_imaml_solves_one_system_per_task_under_dropout():
    """Every conjugate-gradient product replays the same masks: the solve converges to 1e-10."""
    net = dropout_mlp()
    support, query = episode()
    info = {}
    torch.manual_seed(7)
    loss = maml_loss(net, F.mse_loss, support, query, num_steps=3, lr=0.2, algorithm="imaml", imaml_lambda=2.0,
                     cg_iters=60, cg_tol=1e-10, batching="loop", info=info)
    loss.backward()
    assert bool(info["cg_converged"].all()), info["cg_residual"]


def test_first_order_modes_need_no_replay_and_match_the_plain_loop():
    net = dropout_mlp()
    support, query = episode()
    torch.manual_seed(7)
    got = torch.autograd.grad(maml_loss(net, F.mse_loss, support, query, num_steps=2, lr=0.2, algorithm="fomaml",
                                        batching="loop"), list(net.parameters()))
    torch.manual_seed(7)
    again = torch.autograd.grad(maml_loss(net, F.mse_loss, support, query, num_steps=2, lr=0.2, algorithm="fomaml",
                                          batching="loop"), list(net.parameters()))
    assert rel_err(got, again) == 0.0


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_standalone_finite_difference_hvp_compares_gradients_under_the_same_masks(batching):
    """``hvp(mode="fd_central")`` evaluates two gradients: both draw the masks the first drew, so
    on a smooth net it agrees with the exact HVP drawn from the same state."""
    from fastmaml.meta.functional import TaskModel
    from fastmaml.meta.hvp import hvp

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(P_DROP), nn.Linear(16, 1)).double()
    tm = TaskModel(net, F.mse_loss)
    (xs, ys), _ = episode()
    phi = tm.initial_adapted(tm.theta_adapted(), 3)
    v = [torch.randn_like(p) for p in phi]
    torch.manual_seed(11)
    exact, _ = hvp(tm.task_loss, phi, v, xs, ys, mode="exact", batching=batching)
    torch.manual_seed(11)
    fd, _ = hvp(tm.task_loss, phi, v, xs, ys, mode="fd_central", batching=batching)
    assert rel_err(fd, exact) < 1e-6
