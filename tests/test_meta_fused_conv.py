"""The fused conv path (fastmaml.meta.fused_conv): hand-written gradients and R-operator HVPs.

Specification: for conv / batch-norm / ReLU / 2x2 max-pool nets with a flatten and a linear head
(conv4, nn.Sequential chains of those layers, and models whose own forward applies such a chain,
learn2learn style, with global average pooling and views) with cross-entropy or MSE, per-task gradients and
HVPs (with the mixed block of fixed tensors) equal plain autograd's (float64, 1e-10 relative;
float32 to rounding), the engine's meta-gradients equal the plain-autograd reference for every
step-size form and parameter subset, and ``"auto"`` takes the path without running the generic
ones. For anything else, and when the compiled layer kernels are switched off, it steps aside.
"""
import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmaml.meta import fused_conv
from fastmaml.meta.front import maml_loss
from fastmaml.meta.functional import TaskModel
from fastmaml.meta.hvp import batched_grad, hvp
from fastmaml.meta.models import Conv4, MLP, mse_loss
from fastmaml.ops.cpu_kernels import stock_kernels

hvp_module = importlib.import_module("fastmaml.meta.hvp")

sys.path.insert(0, str(Path(__file__).parent))
from _meta_util import GENERIC_PATHS, forbid, grads_of, make_lr, rel_err  # noqa: E402

F64 = torch.float64
TOL = 1e-10

pytestmark = pytest.mark.skipif(not all(fused_conv.native_available(op) for op in fused_conv._KERNELS),
                                reason="the compiled layer kernels are not built")


def conv4(filters=6, size=16, dtype=F64, seed=0):
    torch.manual_seed(seed)
    return Conv4(1, filters, 4, size).to(dtype)


def sequential(variant: str, dtype=F64, seed=0) -> nn.Sequential:
    """Chains the fused path takes, each exercising one layer option."""
    torch.manual_seed(seed)
    if variant == "no_bias_no_affine":  # conv without bias, batch norm without weight / bias
        body = [nn.Conv2d(2, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5, affine=False), nn.ReLU(),
                nn.MaxPool2d(2)]
        head = [nn.Flatten(), nn.Linear(5 * 6 * 6, 3)]
    elif variant == "strided_two_linear":  # stride 2, no padding, pool before relu, an MLP head
        body = [nn.Conv2d(2, 4, 3, stride=2), nn.BatchNorm2d(4), nn.MaxPool2d(2), nn.ReLU(),
                nn.Conv2d(4, 5, 2, padding=1), nn.BatchNorm2d(5), nn.ReLU()]
        head = [nn.Flatten(), nn.Linear(5 * 4 * 4, 7), nn.ReLU(), nn.Linear(7, 3)]
    else:  # nested Sequential blocks, no batch norm in the second, dilation with padding="same"
        body = [nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)),
                nn.Sequential(nn.Conv2d(4, 4, 3, padding="same", dilation=2), nn.ReLU(), nn.MaxPool2d(2))]
        head = [nn.Flatten(), nn.Linear(4 * 3 * 3, 3)]
    return nn.Sequential(*body, *head).to(dtype)


class Lambda(nn.Module):
    """learn2learn's ``l2l.nn.Lambda``: a module around a function."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class ViewFlatten(nn.Module):
    """learn2learn's ``l2l.nn.Flatten``."""

    def forward(self, x):
        return x.view(x.size(0), -1)


class ConvBlock(nn.Module):
    """learn2learn's ``ConvBlock``: its own forward over conv, batch norm, ReLU and a 2x2 pool, or
    (``max_pool=False``, as in its Omniglot model) a stride-2 conv and a plain function as the pool."""

    def __init__(self, cin, cout, max_pool=True):
        super().__init__()
        self.max_pool = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=False) if max_pool else (lambda x: x)
        self.normalize = nn.BatchNorm2d(cout, affine=True)  # registered before the conv, as there
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, cout, 3, stride=1 if max_pool else 2, padding=1)

    def forward(self, x):
        x = self.conv(x)
        x = self.normalize(x)
        x = self.relu(x)
        x = self.max_pool(x)
        return x


class L2LStyleCNN(nn.Module):
    """learn2learn's ``OmniglotCNN`` layout: a view to images, conv blocks, the spatial mean, a
    view-flatten, a linear classifier, all through custom forwards. The blocks are registered
    twice (``base`` and ``features.1``), as there: one module reachable by two paths."""

    def __init__(self, channels=2, size=12, filters=5, ways=3):
        super().__init__()
        self.base = nn.Sequential(ConvBlock(channels, filters), ConvBlock(filters, filters, max_pool=False))
        self.features = nn.Sequential(Lambda(lambda x: x.view(-1, channels, size, size)), self.base,
                                      Lambda(lambda x: x.mean(dim=[2, 3])), ViewFlatten())
        self.classifier = nn.Linear(filters, ways)

    def forward(self, x):
        return self.classifier(self.features(x))


class FunctionalCNN(nn.Module):
    """torch.nn.functional steps in forward: relu, max_pool2d, x.shape[0] reshape, flatten, an
    adaptive average pool, Identity."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.skip = nn.Identity()
        self.c2 = nn.Conv2d(4, 6, 3, bias=False)
        self.fc1 = nn.Linear(6 * 4 * 4, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = self.skip(torch.relu(self.c2(x)))
        x = x.reshape(x.shape[0], -1)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def images(num_tasks, n, channels, size, classes=4, dtype=F64, seed=1, mse_out=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tasks, n, channels, size, size, generator=g, dtype=dtype)
    if mse_out is not None:
        return x, torch.randn(num_tasks, n, mse_out, generator=g, dtype=dtype)
    return x, torch.randint(0, classes, (num_tasks, n), generator=g)


def per_task_point(tm, num_tasks, dtype=F64, scale=0.1, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [p.detach() + scale * torch.randn(num_tasks, *p.shape, generator=g, dtype=dtype)
            for p in tm.theta_adapted()]


def directions(like, seed=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in like]


@pytest.fixture
def generic_paths_forbidden(monkeypatch):
    """Every generic batching (vmap, loop, stacked) raises: what passes ran fused only."""
    forbid(monkeypatch, hvp_module, GENERIC_PATHS + ("loop_last_step",),
           "the generic path ran where the fused conv path should have")


@pytest.fixture
def fused_path_forbidden(monkeypatch):
    forbid(monkeypatch, fused_conv, ("grad", "hvp"), "the fused conv path ran where it should not")


# ---------------------------------------------------------------------------------------------
# Gradients and HVPs against plain autograd
# ---------------------------------------------------------------------------------------------
MODELS = {
    "conv4": (lambda dtype: conv4(dtype=dtype), 1, 16, None, F.cross_entropy),
    "no_bias_no_affine": (lambda dtype: sequential("no_bias_no_affine", dtype), 2, 12, None, F.cross_entropy),
    "strided_two_linear": (lambda dtype: sequential("strided_two_linear", dtype), 2, 14, None, F.cross_entropy),
    "nested_dilated_mse": (lambda dtype: sequential("nested", dtype), 2, 12, 3, mse_loss),
    # forwards of their own, read by tracing (fastmaml.meta.fused_conv_trace)
    "l2l_style": (lambda dtype: _seeded(L2LStyleCNN, dtype), 2, 12, None, F.cross_entropy),
    "functional": (lambda dtype: _seeded(FunctionalCNN, dtype), 2, 12, None, F.cross_entropy),
    "global_average_pool": (lambda dtype: _seeded(lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)), dtype), 2, 12, None, F.cross_entropy),
}


def _seeded(cls, dtype, seed=0):
    torch.manual_seed(seed)
    return cls().to(dtype)


def setup(name, num_tasks=3, n=5, dtype=F64, adapt="all"):
    make, channels, size, mse_out, loss = MODELS[name]
    net = make(dtype)
    tm = TaskModel(net, loss, adapt=adapt)
    data = images(num_tasks, n, channels, size, dtype=dtype, mse_out=mse_out,
                  classes=3 if name != "conv4" else 4)
    return net, tm, data


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_equal_autograd(name):
    _, tm, (x, y) = setup(name)
    assert fused_conv.why_not(tm) is None
    phi = per_task_point(tm, 3)
    got = batched_grad(tm.task_loss, phi, [], x, y, batching="fused_conv")
    ref = batched_grad(tm.task_loss, phi, [], x, y, batching="loop")
    assert torch.allclose(got[0], ref[0], rtol=1e-12, atol=0)
    assert rel_err(got[1], ref[1]) < TOL


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("shared", [False, True])
def test_hvps_equal_double_backward(name, shared):
    _, tm, (x, y) = setup(name)
    point = tm.theta_adapted() if shared else per_task_point(tm, 3)
    v = directions(per_task_point(tm, 3))
    got, _ = hvp(tm.task_loss, point, v, x, y, mode="exact", shared_params=shared, batching="fused_conv")
    ref, _ = hvp(tm.task_loss, point, v, x, y, mode="reverse_over_reverse", shared_params=shared, batching="loop")
    assert rel_err(got, ref) < TOL
    summed, _ = hvp(tm.task_loss, point, v, x, y, shared_params=shared, batching="fused_conv", sum_tasks=True)
    assert rel_err(summed, [h.sum(0) for h in ref]) < TOL


def test_hvp_is_symmetric():
    _, tm, (x, y) = setup("conv4")
    phi = per_task_point(tm, 3)
    u, w = directions(phi, seed=5), directions(phi, seed=6)
    hu, _ = hvp(tm.task_loss, phi, u, x, y, batching="fused_conv")
    hw, _ = hvp(tm.task_loss, phi, w, x, y, batching="fused_conv")
    dot = lambda a, b: sum((p * q).flatten(1).sum(1) for p, q in zip(a, b))  # noqa: E731 (per task)
    assert torch.allclose(dot(w, hu), dot(u, hw), rtol=1e-10, atol=0)


@pytest.mark.parametrize("adapt", ["head", ["features.4.weight", "features.5.bias", "head.bias"]])
def test_subsets_give_the_mixed_block(adapt):
    _, tm, (x, y) = setup("conv4", adapt=adapt)
    fixed = [p.detach() for p in tm.theta_fixed()]
    phi = per_task_point(tm, 3)
    v = directions(phi)
    got_a, got_f = hvp(tm.task_loss, phi, v, x, y, fixed=fixed, batching="fused_conv")
    ref_a, ref_f = hvp(tm.task_loss, phi, v, x, y, fixed=fixed, mode="reverse_over_reverse", batching="loop")
    assert rel_err(got_a, ref_a) < TOL and rel_err(got_f, ref_f) < TOL
    g = batched_grad(tm.task_loss, phi, fixed, x, y, wrt_fixed=True, batching="fused_conv")
    r = batched_grad(tm.task_loss, phi, fixed, x, y, wrt_fixed=True, batching="loop")
    assert rel_err(g[1], r[1]) < TOL and rel_err(g[2], r[2]) < TOL
    # without fixed tensors passed, the model's own stand in (as functional_call does)
    alone = batched_grad(tm.task_loss, phi, [], x, y, batching="fused_conv")
    assert rel_err(alone[1], r[1]) < TOL


def test_float32_agrees_with_autograd_to_rounding():
    _, tm, (x, y) = setup("conv4", dtype=torch.float32)
    phi = per_task_point(tm, 3, dtype=torch.float32)
    v = directions(phi)
    got, _ = hvp(tm.task_loss, phi, v, x, y, batching="fused_conv")
    ref, _ = hvp(tm.task_loss, phi, v, x, y, mode="reverse_over_reverse", batching="loop")
    assert got[0].dtype == torch.float32
    assert rel_err(got, ref) < 1e-5
    g = batched_grad(tm.task_loss, phi, [], x, y, batching="fused_conv")[1]
    r = batched_grad(tm.task_loss, phi, [], x, y, batching="loop")[1]
    assert rel_err(g, r) < 1e-5


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------
ENGINE_CASES = [  # (model, K, T, step sizes, adapt, algorithm)
    ("conv4", 1, 1, "fixed", "all", "maml"),
    ("conv4", 2, 3, "lslr", "all", "maml"),
    ("conv4", 5, 3, "meta_sgd", "all", "maml"),
    ("conv4", 2, 8, "scalar", "head", "maml"),
    ("strided_two_linear", 2, 3, "lslr", ["0.weight", "8.weight", "10.bias"], "maml"),
    ("nested_dilated_mse", 2, 3, "scalar", "all", "maml"),
    ("conv4", 2, 3, "scalar", "all", "fomaml"),
    ("l2l_style", 2, 3, "lslr", "all", "maml"),
    ("functional", 2, 3, "meta_sgd", ["c2.weight", "fc1.weight", "fc2.bias"], "maml"),
]


@pytest.mark.parametrize("name,num_steps,num_tasks,lr_form,adapt,algorithm", ENGINE_CASES)
def test_meta_gradients_equal_the_autograd_reference(name, num_steps, num_tasks, lr_form, adapt, algorithm,
                                                     generic_paths_forbidden):
    net, tm, sup = setup(name, num_tasks=num_tasks, adapt=adapt)
    _, _, qry = setup(name, num_tasks=num_tasks, n=7)
    lr, lrs = make_lr(lr_form, tm, num_steps)
    params = list(net.parameters()) + lrs
    kw = dict(support=sup, query=qry, num_steps=num_steps, lr=lr, algorithm=algorithm)
    ref = grads_of(maml_loss(tm, engine="autograd", **kw), params)
    got = grads_of(maml_loss(tm, **kw), params)
    assert rel_err(got, ref) < TOL
    if lrs:
        assert rel_err(got[-len(lrs):], ref[-len(lrs):]) < TOL


def test_finite_difference_modes_use_fused_gradients(generic_paths_forbidden):
    net, tm, sup = setup("conv4")
    _, _, qry = setup("conv4", n=7)
    params = list(net.parameters())
    exact = grads_of(maml_loss(tm, support=sup, query=qry, num_steps=2, lr=0.3), params)
    fd = grads_of(maml_loss(tm, support=sup, query=qry, num_steps=2, lr=0.3, hvp_mode="fd_central"), params)
    assert rel_err(fd, exact) < 1e-5


def test_running_statistics_are_untouched():
    net, tm, sup = setup("conv4")
    _, _, qry = setup("conv4", n=7)
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    maml_loss(tm, support=sup, query=qry, num_steps=2, lr=0.3).backward()
    for k, v in before.items():
        assert torch.equal(net.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------------
# Where it steps aside
# ---------------------------------------------------------------------------------------------
def _with_hook():
    net = sequential("no_bias_no_affine")
    net[2].register_forward_hook(lambda *a: None)
    return net


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 12 * 12, 3)

    def forward(self, x):
        return self.fc((x + self.c(x)).flatten(1))


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 12 * 12, 3)

    def forward(self, x):
        h = self.c(x)
        if h.sum() > 0:  # data-dependent: the tracer cannot follow it
            h = -h
        return self.fc(h.flatten(1))


class ExtraArgument(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 12 * 12, 3)

    def forward(self, x, scale=None):
        h = self.c(x)
        return self.fc((h if scale is None else h * scale).flatten(1))


class OwnParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 2, 3, 3))
        self.fc = nn.Linear(2 * 12 * 12, 3)

    def forward(self, x):
        return self.fc(F.conv2d(x, self.w, padding=1).flatten(1))


UNSUPPORTED = {
    "residual": Residual,
    "data-dependent branch": Branching,
    "extra forward argument": ExtraArgument,
    "functional conv on a parameter": OwnParameter,
    "grouped conv": lambda: nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 10 * 10, 3)),
    "same padding, even kernel": lambda: nn.Sequential(nn.Conv2d(2, 4, 2, padding="same"), nn.Flatten(),
                                                       nn.Linear(4 * 12 * 12, 3)),
    "3x3 pool": lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.MaxPool2d(3), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)),
    "average pool": lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 25, 3)),
    "no flatten": lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU()),
    "batch norm first": lambda: nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 4, 3), nn.Flatten(),
                                              nn.Linear(4 * 10 * 10, 3)),
    "hook": _with_hook,
    "mlp": lambda: MLP(4, (5,), 3),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_models_are_named_and_left_to_the_generic_path(name, fused_path_forbidden):
    net = UNSUPPORTED[name]().double()
    tm = TaskModel(net, F.cross_entropy)
    assert isinstance(fused_conv.why_not(tm), str)
    if name not in ("mlp", "no flatten"):
        x, y = images(2, 5, 2, 12, classes=3)
        batched_grad(tm.task_loss, tm.initial_adapted(tm.theta_adapted(), 2), [], x, y, batching="auto")


def test_traced_models_say_why_they_are_not_fused():
    assert "could not be traced" in fused_conv.why_not(TaskModel(Branching().double(), F.cross_entropy))
    assert "more than the input" in fused_conv.why_not(TaskModel(ExtraArgument().double(), F.cross_entropy))
    assert "not a chain" in fused_conv.why_not(TaskModel(Residual().double(), F.cross_entropy))


def test_a_traced_model_is_traced_again_when_its_modules_change():
    net = L2LStyleCNN().double()
    assert fused_conv.plan_for(TaskModel(net, F.cross_entropy)) is not None
    net.base[0].max_pool = nn.AvgPool2d(2)
    assert "AvgPool2d" in fused_conv.why_not(TaskModel(net, F.cross_entropy))


def test_flat_data_viewed_as_images_runs_fused():
    """learn2learn's Omniglot model views flat [N, 784] rows as images first."""
    _, tm, (x, y) = setup("l2l_style")
    flat = x.flatten(2)  # [T, N, C H W]
    phi = per_task_point(tm, 3)
    got = batched_grad(tm.task_loss, phi, [], flat, y, batching="fused_conv")
    ref = batched_grad(tm.task_loss, phi, [], flat, y, batching="loop")
    assert rel_err(got[1], ref[1]) < TOL


def test_a_reshape_that_moves_the_sample_dimension_is_left_to_the_generic_path(fused_path_forbidden):
    """The plan holds; the call's shapes do not fit it (the view would mix samples): generic path."""
    torch.manual_seed(0)
    net = nn.Sequential(Lambda(lambda x: x.view(-1, 2, 6, 6)), nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                        ViewFlatten(), nn.Linear(3 * 6 * 6, 3)).double()
    tm = TaskModel(net, F.cross_entropy)
    assert fused_conv.why_not(tm) is None
    x, y = images(2, 5, 2, 12, classes=3)  # each 2x12x12 image becomes four 2x6x6 ones: 20 rows, not 5
    with pytest.raises(Exception):
        batched_grad(tm.task_loss, tm.initial_adapted(tm.theta_adapted(), 2), [], x, y, batching="auto")


def test_unknown_loss_is_not_fused():
    tm = TaskModel(conv4(), lambda out, y: F.cross_entropy(out, y))
    assert "loss" in fused_conv.why_not(tm)


@pytest.mark.parametrize("switch", ["loop", "stock_kernels", "reference_backend"])
def test_switches_leave_the_generic_path(switch, fused_path_forbidden, monkeypatch):
    net, tm, (x, y) = setup("conv4")
    phi = per_task_point(tm, 3)
    if switch == "loop":
        batched_grad(tm.task_loss, phi, [], x, y, batching="loop")
        return
    if switch == "reference_backend":
        monkeypatch.setenv("FASTMAML_BACKEND", "reference")
        batched_grad(tm.task_loss, phi, [], x, y, batching="auto")
        return
    with stock_kernels():
        batched_grad(tm.task_loss, phi, [], x, y, batching="auto")


def test_model_changes_rebuild_the_plan():
    net = sequential("no_bias_no_affine")
    tm = TaskModel(net, F.cross_entropy)
    assert fused_conv.plan_for(tm) is not None
    net[2].register_forward_hook(lambda *a: None)
    assert fused_conv.plan_for(tm) is None


# ---------------------------------------------------------------------------------------------
# gradcheck: the fused gradient is the derivative of the fused loss, the fused HVP that of the
# fused gradient (float64, shared parameters, summed over tasks)
# ---------------------------------------------------------------------------------------------
def _fused_functions(plan, x, y):
    class Loss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *params):
            losses, g, _ = fused_conv.grad(plan, params, [], x, y, shared=True)
            ctx.grads = [t.sum(0) for t in g]
            return losses.sum()

        @staticmethod
        def backward(ctx, go):
            return tuple(go * t for t in ctx.grads)

    class Grad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *params):
            ctx.params = [p.detach() for p in params]
            return tuple(t.sum(0) for t in fused_conv.grad(plan, params, [], x, y, shared=True)[1])

        @staticmethod
        def backward(ctx, *v):  # the Hessian is symmetric: its vector-Jacobian product is H v
            tasks = x.shape[0]
            directions = [t.unsqueeze(0).expand(tasks, *t.shape).contiguous() for t in v]
            return tuple(fused_conv.hvp(plan, ctx.params, [], directions, x, y, shared=True, sum_tasks=True)[0])

    return Loss.apply, Grad.apply


@pytest.mark.parametrize("name", ["strided_two_linear", "nested_dilated_mse", "l2l_style", "global_average_pool"])
def test_fused_gradient_and_hvp_pass_gradcheck(name):
    _, tm, (x, y) = setup(name, num_tasks=2, n=4)
    plan = fused_conv.plan_for(tm)
    params = [p.detach().clone().requires_grad_() for p in tm.theta_adapted()]
    loss, gradient = _fused_functions(plan, x, y)
    assert torch.autograd.gradcheck(loss, params, check_batched_grad=False)
    assert torch.autograd.gradcheck(gradient, params, check_batched_grad=False, check_undefined_grad=False)
