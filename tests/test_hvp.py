"""Batched HVPs (fastmaml.meta.hvp) against the dense Hessian, torch.autograd.functional.hvp and symmetry."""
import pytest
import torch
import torch.nn.functional as F

from fastmaml.meta.functional import TaskModel
from fastmaml.meta.hvp import HVP_MODES, batched_grad, hvp, hvp_fd_step
from fastmaml.meta.models import MLP, Conv4, mse_loss
from fastmaml.reference.meta import hvp_reference

F64 = torch.float64


def rel_err(got, ref):
    a = torch.cat([t.reshape(-1) for t in got])
    b = torch.cat([t.reshape(-1) for t in ref])
    return ((a - b).norm() / b.norm()).item()


def problem(kind, num_tasks, adapt="all", dtype=F64, seed=0):
    torch.manual_seed(seed)
    if kind == "mlp":
        net = MLP(5, (7,), 3, torch.nn.Tanh).to(dtype)
        tm = TaskModel(net, mse_loss, adapt=adapt)
        x, y = torch.randn(num_tasks, 9, 5, dtype=dtype), torch.randn(num_tasks, 9, 3, dtype=dtype)
    else:
        net = Conv4(1, 2, 3, 16).to(dtype)  # 2 filters: the dense Hessian reference stays cheap
        tm = TaskModel(net, F.cross_entropy, adapt=adapt)
        x, y = torch.randn(num_tasks, 6, 1, 16, 16, dtype=dtype), torch.randint(0, 3, (num_tasks, 6))
    theta = [p.detach() for p in tm.theta_adapted()]
    phi = [p + 0.05 * torch.randn_like(p) for p in tm.initial_adapted(theta, num_tasks)]
    fixed = [p.detach() for p in tm.theta_fixed()]
    v = [torch.randn_like(p) for p in phi]
    return tm, phi, fixed, v, x, y


# Documented bounds (float64, smooth net): forward FD ~ sqrt(eps), central ~ sqrt(eps) step too,
# so both well under 1e-6; the ReLU conv net keeps far fewer flips at this step: 1e-5.
FD_BOUND = {"mlp": 1e-6, "conv": 1e-5}


@pytest.mark.parametrize("kind,num_tasks,adapt", [("mlp", 1, "all"), ("mlp", 3, "head"), ("conv", 3, "all"),
                                                  ("conv", 1, "head")])
def test_hvp_matches_dense_hessian(kind, num_tasks, adapt):
    tm, phi, fixed, v, x, y = problem(kind, num_tasks, adapt)
    ref_a, ref_f = hvp_reference(tm, phi, v, x, y, fixed=fixed)
    for mode, batching in [(m, "vmap") for m in HVP_MODES] + [("exact", "loop"), ("fd_central", "loop")]:
        got_a, got_f = hvp(tm.task_loss, phi, v, x, y, fixed=fixed, mode=mode, batching=batching)
        assert len(got_f) == len(fixed)
        for g, p in zip(got_a, phi):
            assert g.shape == p.shape and g.dtype == p.dtype
        tol = FD_BOUND[kind] if mode.startswith("fd") else 1e-10
        assert rel_err(got_a + got_f, ref_a + ref_f) < tol, (mode, batching)


def test_hvp_matches_autograd_functional_hvp():
    tm, phi, _, v, x, y = problem("mlp", 3)
    got, _ = hvp(tm.task_loss, phi, v, x, y, mode="exact")
    for t in range(3):
        _, ref = torch.autograd.functional.hvp(lambda *p: tm.task_loss(p, (), x[t], y[t]),
                                               tuple(p[t] for p in phi), tuple(vi[t] for vi in v))
        torch.testing.assert_close([g[t] for g in got], list(ref), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["forward_over_reverse", "reverse_over_reverse"])
def test_hvp_symmetry(mode):
    tm, phi, _, v, x, y = problem("conv", 3)
    u = [torch.randn_like(p) for p in phi]
    hv, _ = hvp(tm.task_loss, phi, v, x, y, mode=mode)
    hu, _ = hvp(tm.task_loss, phi, u, x, y, mode=mode)
    u_hv = sum((a * b).reshape(3, -1).sum(1) for a, b in zip(u, hv))
    v_hu = sum((a * b).reshape(3, -1).sum(1) for a, b in zip(v, hu))
    torch.testing.assert_close(u_hv, v_hu, rtol=1e-10, atol=1e-12)


def test_tasks_are_independent():
    tm, phi, _, v, x, y = problem("conv", 3)
    full, _ = hvp(tm.task_loss, phi, v, x, y, mode="exact")
    one, _ = hvp(tm.task_loss, [p[1:2] for p in phi], [w[1:2] for w in v], x[1:2], y[1:2], mode="exact")
    torch.testing.assert_close([f[1:2] for f in full], one, rtol=1e-12, atol=1e-13)


def test_fd_forward_reuses_saved_gradient():
    tm, phi, fixed, v, x, y = problem("mlp", 3, "head")
    _, g, gf = batched_grad(tm.task_loss, phi, fixed, x, y, wrt_fixed=True)
    r = hvp_fd_step(phi, v, scheme="forward")
    a = hvp(tm.task_loss, phi, v, x, y, fixed=fixed, mode="fd_forward", r=r)
    b = hvp(tm.task_loss, phi, v, x, y, fixed=fixed, mode="fd_forward", r=r, saved_grad=g + gf)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fd_error_model_truncation_grows_with_step():
    """Forward differences err linearly in r, central ones quadratically (smooth net, float64)."""
    tm, phi, _, v, x, y = problem("mlp", 2)
    ref, _ = hvp(tm.task_loss, phi, v, x, y, mode="exact")
    r0 = hvp_fd_step(phi, v, scheme="forward")
    errs = {}
    for mode in ("fd_forward", "fd_central"):
        errs[mode] = [rel_err(hvp(tm.task_loss, phi, v, x, y, mode=mode, r=r0 * s)[0], ref) for s in (1e4, 1e5)]
    ratio_fwd = errs["fd_forward"][1] / errs["fd_forward"][0]
    ratio_cen = errs["fd_central"][1] / errs["fd_central"][0]
    assert 5 < ratio_fwd < 20  # ~10x for 10x the step
    assert 50 < ratio_cen < 200  # ~100x


def test_float32_relu_net_fd_in_float64_is_accurate():
    """On a float32 ReLU/max-pool/BN net, FD evaluated in float64 with the sqrt(eps64) step stays accurate."""
    tm, phi, _, v, x, y = problem("conv", 2, dtype=torch.float32, seed=1)
    tm64 = TaskModel(tm.model.double(), F.cross_entropy)
    ref, _ = hvp(tm64.task_loss, [p.double() for p in phi], [w.double() for w in v], x.double(), y, mode="exact")
    tm.model.float()
    exact32, _ = hvp(tm.task_loss, phi, v, x, y, mode="exact")
    central64, _ = hvp(tm.task_loss, phi, v, x, y, mode="fd_central", fd_dtype=torch.float64)
    assert all(c.dtype == torch.float32 for c in central64)
    err_exact32 = rel_err([c.double() for c in exact32], ref)
    err_central = rel_err([c.double() for c in central64], ref)
    assert err_central < max(1e-4, 10 * err_exact32)


def test_hvp_fd_step_shape_and_scaling():
    _, phi, _, v, _, _ = problem("mlp", 3)
    r1 = hvp_fd_step(phi, v, scheme="forward")
    r2 = hvp_fd_step(phi, [2 * w for w in v], scheme="forward")
    assert r1.shape == (3,) and bool((r1 > 0).all())
    torch.testing.assert_close(r2, r1 / 2)
    zero = hvp_fd_step(phi, [torch.zeros_like(w) for w in v], scheme="central")
    assert bool(torch.isfinite(zero).all())


def test_hvp_rejects_bad_input():
    tm, phi, _, v, x, y = problem("mlp", 3)
    with pytest.raises(ValueError, match="mode"):
        hvp(tm.task_loss, phi, v, x, y, mode="newton")
    with pytest.raises(ValueError, match="leading task dimension"):
        hvp(tm.task_loss, phi, v, x[:2], y, mode="exact")
    with pytest.raises(ValueError, match="expected"):
        hvp(tm.task_loss, phi, [w[:, :1] for w in v], x, y)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("mode", HVP_MODES)
def test_shared_params_match_repeated_params(mode, batching):
    """The first inner step runs from theta shared by all tasks: same HVPs and gradients as repeating it."""
    tm, _, fixed, v, x, y = problem("conv", 3, "head")
    theta = [p.detach() for p in tm.theta_adapted()]
    rep = tm.initial_adapted(theta, 3)
    a = hvp(tm.task_loss, rep, v, x, y, fixed=fixed, mode=mode, batching=batching)
    b = hvp(tm.task_loss, theta, v, x, y, fixed=fixed, mode=mode, shared_params=True, batching=batching)
    tol = 1e-12 if "reverse" in mode else 1e-6
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    ga = batched_grad(tm.task_loss, rep, fixed, x, y, wrt_fixed=True, batching=batching)
    gb = batched_grad(tm.task_loss, theta, fixed, x, y, wrt_fixed=True, shared_params=True, batching=batching)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("mode", HVP_MODES)
def test_loop_batching_matches_vmap(mode):
    tm, phi, fixed, v, x, y = problem("conv", 3, "head")
    a = hvp(tm.task_loss, phi, v, x, y, fixed=fixed, mode=mode, batching="vmap")
    b = hvp(tm.task_loss, phi, v, x, y, fixed=fixed, mode=mode, batching="loop")
    tol = 1e-9 if "reverse" in mode else 1e-5  # FD: rounding differences amplified by 1/r
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="batching"):
        hvp(tm.task_loss, phi, v, x, y, mode=mode, batching="threads")


def test_auto_batching_choice_on_the_cpu():
    """The "auto" batching: the per-task loop for image-like samples, few tasks or large per-task
    batches (the loop runs the layer kernels and plain convs); vmap for many small non-image tasks."""
    from fastmaml.meta.hvp import resolve_batching

    images = torch.randn(64, 5, 1, 4, 4)
    assert resolve_batching("auto", (images,)) == "loop"
    assert resolve_batching("auto", (torch.randn(1000, 10, 1),)) == "vmap"
    assert resolve_batching("auto", (torch.randn(8, 10, 1),)) == "loop"  # T <= 16
    assert resolve_batching("auto", (torch.randn(100, 40, 3),)) == "loop"  # >= 32 samples per task
    assert resolve_batching("vmap", (images,)) == "vmap"  # an explicit choice is kept
