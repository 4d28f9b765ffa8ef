"""The fused MLP path (fastmaml.meta.fused_mlp): hand-written gradients and R-operator HVPs.

Specification: for a plain nn.Sequential of Linear layers and elementwise activations with a loss it
knows, the fused path gives the plain-autograd meta-gradient (float64, 1e-10 relative) for every
algorithm and step-size form the engine supports, without running the generic vmap / autograd
paths; for anything else it steps aside and the generic path gives the result.
"""
import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmaml.meta import fused_mlp
from fastmaml.meta.front import maml_loss
from fastmaml.meta.functional import TaskModel
from fastmaml.meta.hvp import batched_grad, hvp
from fastmaml.meta.models import MLP, CaviaMLP, mse_loss

hvp_module = importlib.import_module("fastmaml.meta.hvp")  # the package exports a function named hvp

sys.path.insert(0, str(Path(__file__).parent))
from _meta_util import GENERIC_PATHS, forbid, grads_of, make_lr, rel_err  # noqa: E402

F64 = torch.float64
TOL = 1e-10


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "leaky": lambda: nn.LeakyReLU(0.2)}


def make_net(act="relu", widths=(3, 17, 9, 4), dtype=F64, seed=0):
    """Linear -> act -> Linear -> act -> Linear with odd widths."""
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers).to(dtype)


def make_data(kind, num_tasks, n, widths=(3, 17, 9, 4), dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tasks, n, widths[0], generator=g, dtype=dtype)
    if kind == "mse":
        return x, torch.randn(num_tasks, n, widths[-1], generator=g, dtype=dtype)
    return x, torch.randint(0, widths[-1], (num_tasks, n), generator=g)


@pytest.fixture
def generic_paths_forbidden(monkeypatch):
    """Every generic batching (vmap, loop, stacked) raises: what passes ran fused only."""
    forbid(monkeypatch, hvp_module, GENERIC_PATHS, "the generic path ran where the fused MLP path should have")


@pytest.fixture
def fused_path_forbidden(monkeypatch):
    forbid(monkeypatch, fused_mlp, ("grad", "hvp"), "the fused path ran on a model or call it does not support")


# ---------------------------------------------------------------------------------------------
# Meta-gradients against the plain-autograd reference
# ---------------------------------------------------------------------------------------------
CASES = [  # (activation, loss, K, T, step sizes, adapt)
    ("relu", "mse", 1, 1, "fixed", "all"),
    ("relu", "mse", 1, 8, "scalar", "all"),
    ("relu", "ce", 2, 3, "lslr", "all"),
    ("relu", "mse", 5, 3, "meta_sgd", "all"),
    ("tanh", "mse", 2, 8, "scalar", "all"),
    ("tanh", "ce", 5, 1, "lslr", "all"),
    ("tanh", "ce", 1, 3, "meta_sgd", "all"),
    ("tanh", "mse", 5, 3, "fixed", "head"),
    ("sigmoid", "ce", 2, 3, "scalar", "all"),
    ("leaky", "mse", 2, 3, "meta_sgd", "head"),
    ("relu", "ce", 2, 3, "lslr", ["0.weight", "4.bias"]),  # first weight and last bias only
    # the middle layer (17 -> 9, wider than the 6 support samples: low-rank steps) between fixed ones
    ("relu", "mse", 1, 3, "scalar", ["2.weight", "2.bias"]),
    ("tanh", "ce", 2, 8, "lslr", ["2.weight", "2.bias"]),
]
# one input feature (the sinusoid net's first layer is an outer product: broadcasts, not matmuls)
CASES_1D = [("relu", "ce", 2, 3, "lslr", "all"), ("tanh", "mse", 5, 8, "meta_sgd", "all"),
            ("relu", "mse", 1, 8, "scalar", "all")]


def case_id(case):
    act, kind, num_steps, num_tasks, lr_form, adapt, widths = case
    adapt = adapt if isinstance(adapt, str) else "+".join(adapt)
    return f"{act}-{kind}-K{num_steps}-T{num_tasks}-{lr_form}-{adapt}-{'-'.join(map(str, widths))}"


ALL_CASES = [c + ((3, 17, 9, 4),) for c in CASES] + [c + ((1, 17, 9, 3),) for c in CASES_1D]


@pytest.mark.parametrize("act,kind,num_steps,num_tasks,lr_form,adapt,widths", ALL_CASES,
                         ids=[case_id(c) for c in ALL_CASES])
def test_second_order_matches_autograd_reference(act, kind, num_steps, num_tasks, lr_form, adapt, widths,
                                                 generic_paths_forbidden):
    net = make_net(act, widths)
    tm = TaskModel(net, mse_loss if kind == "mse" else F.cross_entropy, adapt=adapt)
    assert fused_mlp.why_not(tm) is None
    sup, qry = make_data(kind, num_tasks, 6, widths), make_data(kind, num_tasks, 5, widths, seed=2)
    lr, lrs = make_lr(lr_form, tm, num_steps)
    params = list(net.parameters()) + lrs
    ref = grads_of(maml_loss(tm, support=sup, query=qry, num_steps=num_steps, lr=lr, engine="autograd"), params)
    got = grads_of(maml_loss(tm, support=sup, query=qry, num_steps=num_steps, lr=lr, batching="fused_mlp"), params)
    assert rel_err(got, ref) < TOL
    if lrs:
        assert rel_err(got[-len(lrs):], ref[-len(lrs):]) < TOL


def test_auto_takes_the_fused_path(generic_paths_forbidden):
    net = make_net("relu")
    sup, qry = make_data("mse", 3, 6), make_data("mse", 3, 5, seed=2)
    params = list(net.parameters())
    auto = grads_of(maml_loss(net, mse_loss, sup, qry, num_steps=2, lr=0.3), params)
    fused = grads_of(maml_loss(net, mse_loss, sup, qry, num_steps=2, lr=0.3, batching="fused_mlp"), params)
    assert rel_err(auto, fused) < 1e-14


@pytest.mark.parametrize("kind,lr_form", [("mse", "lslr"), ("ce", "meta_sgd")])
def test_first_order_matches_autograd_first_order(kind, lr_form, generic_paths_forbidden):
    net = make_net("tanh")
    tm = TaskModel(net, mse_loss if kind == "mse" else F.cross_entropy)
    sup, qry = make_data(kind, 3, 6), make_data(kind, 3, 5, seed=2)
    lr, lrs = make_lr(lr_form, tm, 2)
    params = list(net.parameters()) + lrs
    ref = grads_of(maml_loss(tm, support=sup, query=qry, num_steps=2, lr=lr, engine="autograd",
                             algorithm="fomaml"), params)
    got = grads_of(maml_loss(tm, support=sup, query=qry, num_steps=2, lr=lr, algorithm="fomaml"), params)
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("mode", ["fd_forward", "fd_central"])
def test_finite_difference_modes_evaluate_their_gradients_fused(mode, generic_paths_forbidden):
    net = make_net("tanh")
    tm = TaskModel(net, F.cross_entropy)
    sup, qry = make_data("ce", 3, 6), make_data("ce", 3, 5, seed=2)
    lr, lrs = make_lr("scalar", tm, 2)
    params = list(net.parameters()) + lrs
    ref = grads_of(maml_loss(tm, support=sup, query=qry, num_steps=2, lr=lr, engine="autograd"), params)
    got = grads_of(maml_loss(tm, support=sup, query=qry, num_steps=2, lr=lr, hvp_mode=mode), params)
    assert rel_err(got, ref) < 1e-5  # the documented bound of the float64 finite differences


@pytest.mark.parametrize("algorithm", ["reptile", "imaml"])
def test_reptile_and_imaml_match_the_generic_path(algorithm, monkeypatch):
    net = make_net("tanh")
    tm = TaskModel(net, mse_loss)
    sup, qry = make_data("mse", 3, 6), make_data("mse", 3, 5, seed=2)
    params = list(net.parameters())
    kw = dict(support=sup, query=qry, num_steps=3, lr=0.1, algorithm=algorithm, imaml_lambda=2.0, cg_iters=50)
    ref = grads_of(maml_loss(tm, batching="vmap", **kw), params)
    got = grads_of(maml_loss(tm, batching="fused_mlp", **kw), params)
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_sinusoid_workload_in_float32_matches_float64_reference(num_tasks, generic_paths_forbidden):
    """The benchmark's case: MLP 1-40-40-1 (ReLU), the engine's mse_loss and F.mse_loss, K = 1."""
    torch.manual_seed(3)
    net = MLP(1, (40, 40), 1)
    xs, xq = torch.rand(num_tasks, 10, 1) * 10 - 5, torch.rand(num_tasks, 10, 1) * 10 - 5
    sup, qry = (xs, torch.sin(xs)), (xq, torch.sin(xq))
    net64 = MLP(1, (40, 40), 1).double()
    net64.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    ref = grads_of(maml_loss(net64, mse_loss, tuple(t.double() for t in sup), tuple(t.double() for t in qry),
                             lr=0.01, engine="autograd"), list(net64.parameters()))
    for loss_fn in (mse_loss, F.mse_loss):
        got = grads_of(maml_loss(net, loss_fn, sup, qry, lr=0.01), list(net.parameters()))
        assert all(g.dtype == torch.float32 for g in got)
        assert rel_err([g.double() for g in got], ref) < 1e-5


def test_zero_inner_steps_is_the_query_gradient(generic_paths_forbidden):
    net = make_net("relu")
    sup, qry = make_data("ce", 3, 6), make_data("ce", 3, 5, seed=2)
    params = list(net.parameters())
    got = grads_of(maml_loss(net, F.cross_entropy, sup, qry, num_steps=0, lr=0.1), params)
    ref = grads_of(torch.stack([F.cross_entropy(net(qry[0][t]), qry[1][t]) for t in range(3)]).mean(), params)
    assert rel_err(got, ref) < TOL


def test_gradcheck_through_the_meta_gradient_function():
    """MetaGradient (the engine's autograd Function) on the fused path: the analytical gradient of the
    summed query loss w.r.t. every parameter and the step size against central differences, element
    by element. (torch.autograd.gradcheck itself runs backward twice on one graph to test
    reentrancy, and the engine frees its per-step history during the first backward.)"""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    sup, qry = make_data("ce", 2, 4, widths=(2, 5, 3)), make_data("ce", 2, 3, widths=(2, 5, 3), seed=2)
    lr = torch.tensor(0.5, dtype=F64, requires_grad=True)
    inputs = list(net.parameters()) + [lr]

    def loss():
        return maml_loss(net, F.cross_entropy, sup, qry, num_steps=2, lr=lr, batching="fused_mlp", reduction="sum")

    assert fused_mlp.why_not(TaskModel(net, F.cross_entropy)) is None
    analytical = grads_of(loss(), inputs)
    eps = 1e-6
    with torch.no_grad():
        for t, g in zip(inputs, analytical):
            flat, gflat = t.view(-1), g.reshape(-1)
            for i in range(flat.numel()):
                flat[i] += eps
                up = loss().item()
                flat[i] -= 2 * eps
                down = loss().item()
                flat[i] += eps
                assert abs((up - down) / (2 * eps) - gflat[i].item()) < 1e-7 * (1 + abs(gflat[i].item()))


# ---------------------------------------------------------------------------------------------
# The building blocks: per-task gradients and HVPs
# ---------------------------------------------------------------------------------------------
def flat_task_hvp(tm, point, v, x, y):
    """One task's H v by torch.autograd.functional.hvp on the flattened parameters."""
    shapes = [p.shape for p in point]
    sizes = [p.numel() for p in point]

    def f(flat):
        parts = [c.reshape(s) for c, s in zip(flat.split(sizes), shapes)]
        return tm.task_loss(parts, [], x, y)

    flat = torch.cat([p.reshape(-1) for p in point])
    _, hv = torch.autograd.functional.hvp(f, flat, torch.cat([w.reshape(-1) for w in v]))
    return [c.reshape(s) for c, s in zip(hv.split(sizes), shapes)]


@pytest.mark.parametrize("act,kind", [("relu", "mse"), ("tanh", "ce"), ("sigmoid", "mse"), ("leaky", "ce")])
@pytest.mark.parametrize("shared", [False, True])
def test_hvp_matches_autograd_functional_hvp(act, kind, shared, generic_paths_forbidden):
    net = make_net(act)
    tm = TaskModel(net, mse_loss if kind == "mse" else F.cross_entropy)
    num_tasks = 3
    x, y = make_data(kind, num_tasks, 7)
    torch.manual_seed(5)
    theta = [p.detach() for p in net.parameters()]
    point = theta if shared else [p.unsqueeze(0) + 0.3 * torch.randn(num_tasks, *p.shape, dtype=F64) for p in theta]
    v = [torch.randn(num_tasks, *p.shape, dtype=F64) for p in theta]
    got, _ = hvp(tm.task_loss, point, v, x, y, mode="exact", shared_params=shared, batching="fused_mlp")
    for t in range(num_tasks):
        at = point if shared else [p[t] for p in point]
        ref = flat_task_hvp(tm, at, [w[t] for w in v], x[t], y[t])
        assert rel_err([g[t] for g in got], ref) < TOL
    summed, _ = hvp(tm.task_loss, point, v, x, y, shared_params=shared, batching="fused_mlp", sum_tasks=True)
    assert rel_err(summed, [g.sum(0) for g in got]) < 1e-13
    # symmetry: u.Hv == v.Hu per task
    u = [torch.randn_like(w) for w in v]
    hu, _ = hvp(tm.task_loss, point, u, x, y, shared_params=shared, batching="fused_mlp")
    uhv = sum((a * b).flatten(1).sum(1) for a, b in zip(u, got))
    vhu = sum((a * b).flatten(1).sum(1) for a, b in zip(v, hu))
    torch.testing.assert_close(uhv, vhu, rtol=1e-11, atol=1e-12)


def test_hvp_mixed_block_matches_the_generic_path():
    """ANIL: H_aa v for the head and the mixed block H_fa v for the body, against double backward."""
    net = make_net("tanh")
    tm = TaskModel(net, F.cross_entropy, adapt="head")
    x, y = make_data("ce", 3, 6)
    torch.manual_seed(6)
    point = [p.detach().unsqueeze(0) + 0.2 * torch.randn(3, *p.shape, dtype=F64) for p in tm.theta_adapted()]
    v = [torch.randn_like(p) for p in point]
    fixed = [p.detach() for p in tm.theta_fixed()]
    ref_a, ref_f = hvp(tm.task_loss, point, v, x, y, fixed=fixed, mode="reverse_over_reverse", batching="loop")
    got_a, got_f = hvp(tm.task_loss, point, v, x, y, fixed=fixed, mode="exact", batching="fused_mlp")
    assert rel_err(got_a + got_f, ref_a + ref_f) < TOL
    # without fixed tensors, the model's own stand in for them (as functional_call does)
    alone, none = hvp(tm.task_loss, point, v, x, y, mode="exact", batching="fused_mlp")
    assert none == [] and rel_err(alone, ref_a) < TOL


@pytest.mark.parametrize("kind", ["mse", "ce"])
def test_batched_grad_matches_vmap(kind):
    net = make_net("relu")
    tm = TaskModel(net, mse_loss if kind == "mse" else F.cross_entropy, adapt="head")
    x, y = make_data(kind, 4, 6)
    torch.manual_seed(7)
    point = [p.detach().unsqueeze(0) + 0.2 * torch.randn(4, *p.shape, dtype=F64) for p in tm.theta_adapted()]
    fixed = [p.detach() for p in tm.theta_fixed()]
    ref = batched_grad(tm.task_loss, point, fixed, x, y, wrt_fixed=True, batching="vmap")
    got = batched_grad(tm.task_loss, point, fixed, x, y, wrt_fixed=True, batching="fused_mlp")
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-14)
    assert rel_err(got[1] + got[2], ref[1] + ref[2]) < TOL


def test_low_rank_factors_behave_like_the_dense_gradients():
    torch.manual_seed(8)
    d, h = torch.randn(3, 5, 7, dtype=F64), torch.randn(3, 5, 4, dtype=F64)
    g = fused_mlp.LowRank(d, h)
    dense = torch.einsum("tno,tni->toi", d, h)
    torch.testing.assert_close(g.dense(), dense)
    assert g.shape == dense.shape
    other = torch.randn(3, 7, 4, dtype=F64)
    torch.testing.assert_close(g.task_dot(other), (dense * other).sum((1, 2)))
    g2 = fused_mlp.LowRank(torch.randn(3, 6, 7, dtype=F64), torch.randn(3, 6, 4, dtype=F64))
    torch.testing.assert_close(g.task_dot(g2), (dense * g2.dense()).sum((1, 2)))
    torch.testing.assert_close(g.sum_tasks(), dense.sum(0))
    w = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    torch.testing.assert_close(g.scale(w).dense(), dense * w.reshape(3, 1, 1))
    xi, xo = torch.randn(3, 2, 4, dtype=F64), torch.randn(3, 2, 7, dtype=F64)
    torch.testing.assert_close(g.times_transposed(xi), xi @ dense.transpose(1, 2))
    torch.testing.assert_close(g.times(xo), xo @ dense)
    base = torch.randn(7, 4, dtype=F64)
    torch.testing.assert_close(fused_mlp.ShiftedLowRank(base, g).dense(), base + dense)


def test_kept_first_step_state_is_not_used_for_another_point():
    """grad(keep_state=True) keeps its pass for the next HVP at the same point only."""
    net = make_net("tanh")
    tm = TaskModel(net, mse_loss)
    x, y = make_data("mse", 3, 6)
    theta = [p.detach() for p in net.parameters()]
    v = [torch.randn(3, *p.shape, dtype=F64) for p in theta]
    ref, _ = hvp(tm.task_loss, theta, v, x, y, shared_params=True, batching="loop")
    batched_grad(tm.task_loss, theta, [], x, y, shared_params=True, batching="fused_mlp", keep_state=True)
    x.add_(1.0)  # the data change in place: the kept pass is stale
    moved, _ = hvp(tm.task_loss, theta, v, x, y, shared_params=True, batching="loop")
    got, _ = hvp(tm.task_loss, theta, v, x, y, shared_params=True, batching="fused_mlp")
    assert rel_err(got, moved) < TOL and rel_err(got, ref) > 1e-3
    batched_grad(tm.task_loss, theta, [], x, y, shared_params=True, batching="fused_mlp", keep_state=True)
    got, _ = hvp(tm.task_loss, theta, v, x, y, shared_params=True, batching="fused_mlp")
    assert rel_err(got, moved) < TOL and tm._fused_state is None  # used once, then dropped


def test_the_data_are_not_modified():
    net = nn.Sequential(nn.ReLU(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()  # starts with an activation
    sup, qry = make_data("mse", 3, 5, widths=(3, 4, 2)), make_data("mse", 3, 5, widths=(3, 4, 2), seed=2)
    before = [t.clone() for t in sup + qry]
    params = list(net.parameters())
    got = grads_of(maml_loss(net, mse_loss, sup, qry, num_steps=2, lr=0.2), params)
    ref = grads_of(maml_loss(net, mse_loss, sup, qry, num_steps=2, lr=0.2, engine="autograd"), params)
    assert rel_err(got, ref) < TOL
    for a, b in zip(before, sup + qry):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# What the fused path does not take: the generic path runs and gives the result
# ---------------------------------------------------------------------------------------------
class CustomForward(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 2.0


UNSUPPORTED = {
    "custom forward": lambda: (CustomForward(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double(), mse_loss),
    "other module": lambda: (nn.Sequential(nn.Linear(3, 5), nn.Softplus(), nn.Linear(5, 4)).double(), mse_loss),
    "nested sequential": lambda: (nn.Sequential(nn.Sequential(nn.Linear(3, 5), nn.Tanh()), nn.Linear(5, 4)).double(),
                                  mse_loss),
    "lambda loss": lambda: (make_net("tanh"), lambda out, y: ((out - y) ** 2).mean()),
    "sum-reduced loss": lambda: (make_net("tanh"), nn.MSELoss(reduction="sum")),
    "label smoothing": lambda: (make_net("tanh"), nn.CrossEntropyLoss(label_smoothing=0.1)),
    "class weights": lambda: (make_net("tanh"), nn.CrossEntropyLoss(weight=torch.rand(4, dtype=F64) + 0.5)),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_models_and_losses_fall_back_to_the_generic_path(name, fused_path_forbidden):
    net, loss_fn = UNSUPPORTED[name]()
    tm = TaskModel(net, loss_fn)
    assert isinstance(fused_mlp.why_not(tm), str)
    kind = "ce" if isinstance(loss_fn, nn.CrossEntropyLoss) else "mse"
    sup, qry = make_data(kind, 3, 6), make_data(kind, 3, 5, seed=2)
    params = list(net.parameters())
    ref = grads_of(maml_loss(tm, support=sup, query=qry, num_steps=2, lr=0.2, engine="autograd"), params)
    got = grads_of(maml_loss(tm, support=sup, query=qry, num_steps=2, lr=0.2, batching="fused_mlp"), params)
    assert rel_err(got, ref) < TOL


def test_cavia_falls_back(fused_path_forbidden):
    torch.manual_seed(9)
    net = CaviaMLP(3, 2, (5,), 4, nn.Tanh).double()
    tm = TaskModel(net, mse_loss, adapt="context")
    assert "CAVIA" in fused_mlp.why_not(tm)
    sup, qry = make_data("mse", 3, 6), make_data("mse", 3, 5, seed=2)
    params = list(net.parameters())
    ref = grads_of(maml_loss(tm, support=sup, query=qry, num_steps=2, lr=0.2, engine="autograd"), params)
    got = grads_of(maml_loss(tm, support=sup, query=qry, num_steps=2, lr=0.2, batching="fused_mlp"), params)
    assert rel_err(got, ref) < TOL


def test_calls_it_does_not_cover_fall_back():
    """Supported model, unsupported data: ignored class labels, broadcasting MSE targets."""
    net = make_net("tanh")
    params = list(net.parameters())
    sup, qry = make_data("ce", 3, 6), make_data("ce", 3, 5, seed=2)
    qry[1][1, 2] = -100  # F.cross_entropy ignores it; the fused path does not handle ignore_index
    tm = TaskModel(net, F.cross_entropy)
    assert fused_mlp.plan_for_call(tm.task_loss, params, [], qry, False) is None
    ref = grads_of(maml_loss(tm, support=sup, query=qry, num_steps=1, lr=0.2, engine="autograd"), params)
    got = grads_of(maml_loss(tm, support=sup, query=qry, num_steps=1, lr=0.2, batching="fused_mlp"), params)
    assert rel_err(got, ref) < TOL
    net1 = make_net("tanh", widths=(3, 17, 9, 1))
    x, y = make_data("mse", 3, 6, widths=(3, 17, 9, 1))
    tm1 = TaskModel(net1, mse_loss)
    y_flat = y[..., 0]  # [T, N] against outputs [T, N, 1]: broadcasting, which the fused path refuses
    assert fused_mlp.plan_for_call(tm1.task_loss, list(net1.parameters()), [], (x, y_flat), True) is None


def test_a_hook_added_later_is_honoured():
    net = make_net("tanh")
    tm = TaskModel(net, mse_loss)
    sup, qry = make_data("mse", 3, 6), make_data("mse", 3, 5, seed=2)
    params = list(net.parameters())
    maml_loss(tm, support=sup, query=qry, num_steps=1, lr=0.2)  # plan cached
    handle = net[2].register_forward_hook(lambda m, inp, out: out * 0.5)
    try:
        assert "hook" in fused_mlp.why_not(tm)
        got = grads_of(maml_loss(tm, support=sup, query=qry, num_steps=1, lr=0.2), params)
        ref = grads_of(maml_loss(tm, support=sup, query=qry, num_steps=1, lr=0.2, engine="autograd"), params)
        assert rel_err(got, ref) < TOL
    finally:
        handle.remove()
    assert fused_mlp.why_not(tm) is None


def test_unknown_batching_is_rejected():
    net = make_net("tanh")
    sup, qry = make_data("mse", 2, 4), make_data("mse", 2, 4, seed=2)
    with pytest.raises(ValueError, match="batching must be one of"):
        maml_loss(net, mse_loss, sup, qry, batching="fused")
