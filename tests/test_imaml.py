"""iMAML: batched conjugate gradient and the implicit meta-gradient against a dense solve."""
import pytest
import torch
import torch.nn.functional as F

from fastmaml.meta.front import maml_loss
from fastmaml.meta.functional import TaskModel
from fastmaml.meta.imaml import batched_cg
from fastmaml.meta.inner_loop import normalize_step_sizes
from fastmaml.meta.models import MLP, CaviaMLP, Conv4, mse_loss
from fastmaml.ops.multi_tensor import task_axpby
from fastmaml.reference.meta import imaml_grad_reference

F64 = torch.float64


def rel_err(got, ref):
    a = torch.cat([t.reshape(-1) for t in got])
    b = torch.cat([t.reshape(-1) for t in ref])
    return ((a - b).norm() / b.norm()).item()


def spd_problem(num_tasks, sizes=(4, 3), cond=50.0, seed=0):
    """Random SPD A_t acting on a list of tensors, and right-hand sides."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    mats = []
    for _ in range(num_tasks):
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
        eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=F64)
        mats.append(q @ torch.diag(eig) @ q.T)
    a = torch.stack(mats)  # [T, n, n]

    def matvec(p):
        flat = torch.cat([t.reshape(num_tasks, -1) for t in p], 1)
        out = torch.einsum("tij,tj->ti", a, flat)
        return list(out.split(list(sizes), 1))

    b = [torch.randn(num_tasks, s, generator=gen, dtype=F64) for s in sizes]
    return a, matvec, b


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
def test_batched_cg_solves_spd_systems(num_tasks):
    a, matvec, b = spd_problem(num_tasks)
    x, info = batched_cg(matvec, b, max_iter=50, tol=1e-12)
    ref = torch.linalg.solve(a, torch.cat(b, 1))
    torch.testing.assert_close(torch.cat(x, 1), ref, rtol=1e-9, atol=1e-10)
    assert bool(info["converged"].all())
    assert info["iterations"] <= 7 + 2  # n = 7: CG converges in at most n steps in exact arithmetic
    assert info["task_iterations"].shape == (num_tasks,)
    assert bool((info["residual"] <= 1e-12).all())


def test_batched_cg_reports_unconverged_residuals():
    _, matvec, b = spd_problem(3, cond=1e4)
    _, info = batched_cg(matvec, b, max_iter=2, tol=1e-12)
    assert info["iterations"] == 2
    assert not bool(info["converged"].any())
    assert bool((info["residual"] > 1e-12).all())


def test_batched_cg_flags_indefinite_tasks():
    def matvec(p):  # task 0: -I (indefinite), task 1: 2 I
        s = torch.tensor([-1.0, 2.0], dtype=F64)
        return task_axpby(p, p, 0.0, x_scale=s)

    b = [torch.ones(2, 3, dtype=F64)]
    x, info = batched_cg(matvec, b, max_iter=5)
    assert info["indefinite"].tolist() == [True, False]
    torch.testing.assert_close(x[0][1], torch.full((3,), 0.5, dtype=F64))


def build(kind, adapt, num_tasks, seed=0):
    torch.manual_seed(seed)
    if kind == "conv":
        net = Conv4(1, 2, 3, 16).double()  # 2 filters: the dense Hessian reference stays cheap
        tm = TaskModel(net, F.cross_entropy, adapt=adapt)
        mk = lambda n: (torch.randn(num_tasks, n, 1, 16, 16, dtype=F64), torch.randint(0, 3, (num_tasks, n)))  # noqa
    else:
        net = (CaviaMLP(3, 4, (6,), 2, torch.nn.Tanh) if adapt == "context" else MLP(3, (6,), 2, torch.nn.Tanh)).double()
        tm = TaskModel(net, mse_loss, adapt=adapt)
        mk = lambda n: (torch.randn(num_tasks, n, 3, dtype=F64), torch.randn(num_tasks, n, 2, dtype=F64))  # noqa
    return tm, mk(6), mk(5)


# The conv net's support Hessian has negative eigenvalues at init: lam must exceed them for CG.
@pytest.mark.parametrize("kind,adapt,num_tasks,num_steps,lam", [("mlp", "all", 3, 5, 2.0), ("mlp", "head", 1, 2, 2.0),
                                                                ("mlp", "context", 3, 3, 2.0),
                                                                ("conv", "all", 1, 2, 50.0)])
def test_imaml_gradient_matches_dense_solve(kind, adapt, num_tasks, num_steps, lam):
    tm, sup, qry = build(kind, adapt, num_tasks)
    info = {}
    loss = maml_loss(tm, support=sup, query=qry, num_steps=num_steps, lr=0.1, algorithm="imaml",
                     imaml_lambda=lam, cg_iters=200, cg_tol=1e-12, info=info)
    params = list(tm.model.parameters())
    got = torch.autograd.grad(loss, params)
    per_step, _ = normalize_step_sizes(0.1, num_steps, [(tm.context_dim,)] if tm.context else
                                       [p.shape for p in tm.theta_adapted()])
    w = torch.full((num_tasks,), 1.0 / num_tasks, dtype=F64)
    g_a, g_f = imaml_grad_reference(tm, sup, qry, per_step, lam, w)
    named = dict(zip([n for n, _ in tm.model.named_parameters()], got))
    ref = dict(zip(tm.fixed_names, g_f))
    if not tm.context:
        ref.update(zip(tm.adapt_names, g_a))
    order = list(named)
    assert rel_err([named[n] for n in order], [ref[n] for n in order]) < 1e-8
    assert info["cg_iterations"] >= 1
    assert bool(info["cg_converged"].all())
    assert info["cg_residual"].shape == (num_tasks,)
    assert info["support_losses"].shape == (num_steps, num_tasks)


def test_imaml_warns_on_indefinite_system():
    tm, sup, qry = build("conv", "all", 2)
    info = {}
    with pytest.warns(RuntimeWarning, match="indefinite"):
        maml_loss(tm, support=sup, query=qry, num_steps=2, lr=0.1, algorithm="imaml", imaml_lambda=2.0,
                  info=info).backward()
    assert bool(info["cg_indefinite"].any())


def test_imaml_cg_iteration_cap_is_reported():
    tm, sup, qry = build("mlp", "all", 3)
    info = {}
    maml_loss(tm, support=sup, query=qry, num_steps=2, lr=0.1, algorithm="imaml", imaml_lambda=0.5,
              cg_iters=2, cg_tol=1e-14, info=info).backward()
    assert info["cg_iterations"] == 2
    assert bool((info["cg_residual"] > 1e-14).all())


def test_imaml_warns_when_cg_stops_far_from_the_solution():
    """A convex task loss (a linear model with MSE: I + H/lam is positive definite): one CG step
    leaves a residual above 1e-3 and is warned, naming the tasks; enough steps are silent."""
    import warnings

    torch.manual_seed(0)
    net = torch.nn.Linear(6, 2).double()
    g = torch.Generator().manual_seed(1)
    sup = (torch.randn(3, 8, 6, dtype=F64, generator=g) * torch.logspace(0, 1, 6, dtype=F64),
           torch.randn(3, 8, 2, dtype=F64, generator=g))
    qry = (torch.randn(3, 5, 6, dtype=F64, generator=g), torch.randn(3, 5, 2, dtype=F64, generator=g))
    kw = dict(num_steps=2, lr=0.01, algorithm="imaml", imaml_lambda=0.5, batching="vmap")
    info = {}
    with pytest.warns(RuntimeWarning, match=r"stopped after cg_iters=1 iterations .* for tasks \[0, 1, 2\]"):
        maml_loss(net, mse_loss, sup, qry, cg_iters=1, info=info, **kw).backward()
    assert not bool(info["cg_indefinite"].any()) and bool((info["cg_residual"] > 1e-3).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        maml_loss(net, mse_loss, sup, qry, cg_iters=50, cg_tol=1e-12, info=info, **kw).backward()
    assert bool(info["cg_converged"].all())


def test_imaml_finite_difference_hvps_are_close():
    tm, sup, qry = build("mlp", "all", 3)
    params = list(tm.model.parameters())
    kw = dict(support=sup, query=qry, num_steps=3, lr=0.1, algorithm="imaml", imaml_lambda=1.0, cg_iters=100)
    exact = torch.autograd.grad(maml_loss(tm, **kw), params)
    fd = torch.autograd.grad(maml_loss(tm, hvp_mode="fd_central", **kw), params)
    assert rel_err(fd, exact) < 1e-5
