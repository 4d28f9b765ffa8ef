"""inner_sgd_step and the finite-difference HVP arithmetic, on every backend, against the reference."""
import pytest
import torch

import fastmaml
from fastmaml.reference import (
    fd_combine_reference,
    fd_perturb_reference,
    fd_step_size_reference,
    inner_sgd_step_reference,
)

from conftest import ALL_BACKEND_PARAMS, TOLERANCES, make_task_tensors

ROW_SHAPES = [(59,), (97,), (8, 1, 3, 3), (8,)]  # odd rows, a conv weight and its bias


def _step_sizes(kind, dtype, device, requires_grad=False):
    gen = torch.Generator().manual_seed(42)
    if kind == "scalar":
        return 0.4
    if kind == "lslr":  # MAML++: one learnable scalar per tensor (for this inner step)
        vals = [torch.rand((), generator=gen, dtype=torch.float64) + 0.05 for _ in ROW_SHAPES]
    else:  # Meta-SGD: one learnable step size per parameter element
        vals = [torch.rand(r, generator=gen, dtype=torch.float64) + 0.05 for r in ROW_SHAPES]
    return [v.to(dtype=dtype, device=device).requires_grad_(requires_grad) for v in vals]


@pytest.mark.parametrize("device,backend", ALL_BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_tasks", [1, 3, 17])
@pytest.mark.parametrize("lr_kind", ["scalar", "lslr", "meta_sgd"])
def test_inner_sgd_step_matches_reference(device, backend, dtype, num_tasks, lr_kind):
    theta = make_task_tensors(num_tasks, ROW_SHAPES, dtype, device, seed=1)
    grads = make_task_tensors(num_tasks, ROW_SHAPES, dtype, device, seed=2)
    lr = _step_sizes(lr_kind, dtype, device)
    out = fastmaml.inner_sgd_step(theta, grads, lr, backend=backend)
    expected = inner_sgd_step_reference(theta, grads, lr)
    rtol, atol = TOLERANCES[dtype]
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device,backend", ALL_BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_clipping_is_per_task(device, backend, dtype):
    theta = make_task_tensors(5, ROW_SHAPES, dtype, device, seed=3)
    grads = make_task_tensors(5, ROW_SHAPES, dtype, device, seed=4)
    # Shrink tasks 0 and 2 so that only the others are clipped.
    for g in grads:
        g.data[0] *= 1e-3
        g.data[2] *= 1e-3
    max_norm = 2.0
    out = fastmaml.inner_sgd_step(theta, grads, 0.5, max_grad_norm=max_norm, backend=backend)
    expected = inner_sgd_step_reference(theta, grads, 0.5, max_grad_norm=max_norm)
    rtol, atol = TOLERANCES[dtype]
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e, rtol=rtol, atol=atol)
    # The effective step of each task has norm min(||g_t||, max_norm) * lr.
    step = torch.stack([((t - o).reshape(5, -1) ** 2).sum(1) for t, o in zip(theta, out)]).sum(0).sqrt()
    g_norm = torch.stack([(g.reshape(5, -1) ** 2).sum(1) for g in grads]).sum(0).sqrt()
    torch.testing.assert_close(step, 0.5 * g_norm.clamp(max=max_norm), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device,backend", ALL_BACKEND_PARAMS)
@pytest.mark.parametrize("lr_kind", ["lslr", "meta_sgd"])
@pytest.mark.parametrize("clip", [None, 1.5])
def test_inner_sgd_step_second_order(device, backend, lr_kind, clip):
    rows = [(4,), (2, 3)]
    theta = make_task_tensors(3, rows, torch.float64, device, seed=5, requires_grad=True)
    grads = make_task_tensors(3, rows, torch.float64, device, seed=6, requires_grad=True)
    gen = torch.Generator().manual_seed(7)
    if lr_kind == "lslr":
        lr = [torch.rand((), generator=gen, dtype=torch.float64).to(device).requires_grad_() for _ in rows]
    else:
        lr = [torch.rand(r, generator=gen, dtype=torch.float64).to(device).requires_grad_() for r in rows]

    def step(t0, t1, g0, g1, a0, a1):
        return tuple(fastmaml.inner_sgd_step([t0, t1], [g0, g1], [a0, a1], max_grad_norm=clip, backend=backend))

    inputs = (*theta, *grads, *lr)
    assert torch.autograd.gradcheck(step, inputs)
    assert torch.autograd.gradgradcheck(step, inputs)


def test_maml_meta_gradient_through_fused_step_matches_autograd():
    # One MAML inner step on a quadratic-plus-quartic loss: the meta-gradient through the fused
    # update (create_graph) equals the one through the reference update.
    torch.manual_seed(0)
    theta0 = torch.randn(3, 6, dtype=torch.float64)
    targets = torch.randn(3, 6, dtype=torch.float64)

    def meta_grad(update):
        theta = theta0.clone().requires_grad_()
        loss = ((theta - targets) ** 4).sum()
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        (phi,) = update([theta], [g], 0.05)
        query = ((phi + targets) ** 2).sum()
        return torch.autograd.grad(query, theta)[0]

    fused = meta_grad(lambda p, g, lr: fastmaml.inner_sgd_step(p, g, lr))
    ref = meta_grad(lambda p, g, lr: inner_sgd_step_reference(p, g, lr))
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", ALL_BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_fd_arithmetic_matches_reference(device, backend, dtype, scheme):
    x = make_task_tensors(3, ROW_SHAPES, dtype, device, seed=8)
    v = make_task_tensors(3, ROW_SHAPES, dtype, device, seed=9)
    r = fastmaml.fd_step_size(x, v, scheme=scheme, backend=backend)
    torch.testing.assert_close(r, fd_step_size_reference(x, v, scheme), rtol=1e-5, atol=0)
    rtol, atol = TOLERANCES[dtype]
    for sign in (1.0, -1.0):
        out = fastmaml.fd_perturb(x, v, r, sign=sign, backend=backend)
        for o, e in zip(out, fd_perturb_reference(x, v, r, sign)):
            torch.testing.assert_close(o, e, rtol=rtol, atol=atol)
    gp = make_task_tensors(3, ROW_SHAPES, dtype, device, seed=10)
    gb = make_task_tensors(3, ROW_SHAPES, dtype, device, seed=11)
    out = fastmaml.fd_combine(gp, gb, r, scheme=scheme, backend=backend)
    for o, e in zip(out, fd_combine_reference(gp, gb, r, scheme)):
        torch.testing.assert_close(o, e, rtol=rtol * 10, atol=atol)


@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_fd_hvp_of_a_quartic_is_accurate(scheme):
    # L(x) = sum_t sum(c_t * x^4) per task; H_t = diag(12 c_t x^2), so Hv is known exactly.
    torch.manual_seed(1)
    c = torch.rand(4, 1, dtype=torch.float64) + 0.5
    x = [torch.randn(4, 30, dtype=torch.float64)]
    v = [torch.randn(4, 30, dtype=torch.float64)]
    grad = lambda p: [4 * c * p[0] ** 3]  # noqa: E731
    r = fastmaml.fd_step_size(x, v, scheme=scheme)
    g_plus = grad(fastmaml.fd_perturb(x, v, r, sign=1.0))
    g_base = grad(fastmaml.fd_perturb(x, v, r, sign=-1.0)) if scheme == "central" else grad(x)
    hv = fastmaml.fd_combine(g_plus, g_base, r, scheme=scheme)[0]
    exact = 12 * c * x[0] ** 2 * v[0]
    rel = ((hv - exact).norm(dim=1) / exact.norm(dim=1)).max().item()
    assert rel < (1e-7 if scheme == "forward" else 1e-9), rel


def test_inner_sgd_step_bad_input():
    theta = [torch.randn(3, 4)]
    with pytest.raises(ValueError, match=r"len\(params\) = 1, len\(grads\) = 2"):
        fastmaml.inner_sgd_step(theta, theta * 2, 0.1)
    with pytest.raises(ValueError, match="max_grad_norm must be a positive finite float, got -1.0"):
        fastmaml.inner_sgd_step(theta, theta, 0.1, max_grad_norm=-1.0)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(3, 5\), expected \(3, 4\)"):
        fastmaml.inner_sgd_step(theta, [torch.randn(3, 5)], 0.1)
    with pytest.raises(ValueError, match=r"lr|alpha\[0\] must be finite"):
        fastmaml.inner_sgd_step(theta, theta, float("inf"))


def test_fd_bad_input():
    x = [torch.randn(3, 4)]
    r = torch.ones(3)
    with pytest.raises(ValueError, match="scheme must be one of"):
        fastmaml.fd_step_size(x, x, scheme="backward")
    with pytest.raises(ValueError, match=r"r must have shape \[3\]"):
        fastmaml.fd_perturb(x, x, torch.ones(2))
    with pytest.raises(ValueError, match="sign must be"):
        fastmaml.fd_perturb(x, x, r, sign=2.0)
    with pytest.raises(ValueError, match="r must be finite and nonzero"):
        fastmaml.fd_combine(x, x, torch.tensor([1.0, 0.0, 1.0]))


def test_step_after_inference_mode_still_differentiates():
    # Python step sizes become cached constants: one made under inference_mode must not poison
    # later differentiable calls.
    theta = [torch.randn(2, 3, dtype=torch.float64)]
    with torch.inference_mode():
        fastmaml.inner_sgd_step(theta, theta, 0.123)
    t = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    (phi,) = fastmaml.inner_sgd_step([t], [g], 0.123)
    phi.sum().backward()
    torch.testing.assert_close(g.grad, torch.full_like(g, -0.123))
    torch.testing.assert_close(t.grad, torch.ones_like(t))


def test_inplace_step_errors_name_the_callers_arguments():
    params = [torch.randn(3, 4, requires_grad=True)]
    grads = [torch.randn(3, 4)]
    with pytest.raises(ValueError, match=r"params\[0\] requires grad"):
        fastmaml.inner_sgd_step_(params, grads, 0.1)
    with pytest.raises(ValueError, match=r"lr requires grad"):
        fastmaml.inner_sgd_step_([torch.randn(3, 4)], grads, torch.tensor(0.1, requires_grad=True))
    wide = torch.randn(3, 8)
    with torch.no_grad(), pytest.raises(ValueError, match=r"grads\[0\] overlaps params\[0\]"):
        fastmaml.inner_sgd_step_([wide[1:]], [wide[:2]], 0.1)
