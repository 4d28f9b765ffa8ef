"""On a GPU every public op gives what it gives on the CPU: values and gradients, float64 and float32.

The CPU paths are checked against their references elsewhere; here the CPU float64 result is the
reference for the same call on CUDA tensors. Skipped where no CUDA device is present.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmaml import backend as B
from fastmaml.heads import R2D2Head, SVMHead, qp_solve, ridge_solve, svm_crammer_singer_solve, svm_logits
from fastmaml.meta import hvp, maml_loss
from fastmaml.meta.models import MLP, Conv4, mse_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

F64, F32 = torch.float64, torch.float32
# Agreement with the CPU float64 result, relative to the largest entry.
RTOL = {F64: 1e-9, F32: 2e-4}


def rel_err(got, ref):
    got, ref = torch.as_tensor(got).double().cpu(), torch.as_tensor(ref).double().cpu()
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def assert_close(got, ref, dtype, what):
    err = rel_err(got, ref)
    assert err < RTOL[dtype], f"{what}: CUDA {dtype} differs from CPU float64 by {err:.2e} (relative)"


def episode(T, n_way, shot, q, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, n_way * shot, d, generator=g, dtype=F64)
    Xq = torch.randn(T, q, d, generator=g, dtype=F64)
    labels = torch.arange(n_way).repeat_interleave(shot).repeat(T, 1)
    perm = torch.randperm(n_way * shot, generator=g)
    return X[:, perm], labels[:, perm], Xq


def value_and_grads(fn, inputs, device, dtype):
    """``fn(*inputs)`` on ``device`` in ``dtype``, and the gradients of a fixed random projection of it."""
    xs = [t.detach().to(device=device, dtype=dtype).requires_grad_() if t.is_floating_point() else t.to(device)
          for t in inputs]
    out = fn(*xs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=F64).to(device=device, dtype=out.dtype)
    grads = torch.autograd.grad((out * w).sum(), [x for x in xs if x.is_floating_point()])
    return out.detach(), [g.detach() for g in grads]


def check_op_on_cuda(fn, inputs, what):
    ref, ref_grads = value_and_grads(fn, inputs, "cpu", F64)
    for dtype in (F64, F32):
        out, grads = value_and_grads(fn, inputs, "cuda", dtype)
        assert out.device.type == "cuda"
        assert_close(out, ref, dtype, f"{what} value")
        for i, (g, rg) in enumerate(zip(grads, ref_grads)):
            assert_close(g, rg, dtype, f"{what} gradient {i}")


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,d", [(25, 64), (10, 300)], ids=["primal", "dual"])
def test_ridge_solve_on_cuda(n, d):
    X, labels, _ = episode(4, 5, n // 5, 1, d)
    Y = F.one_hot(labels, 5).double() + 0.1
    check_op_on_cuda(lambda X, Y: ridge_solve(X, Y, 0.7), (X, Y), "ridge_solve")


def test_r2d2_head_on_cuda():
    X, labels, Xq = episode(3, 5, 2, 6, 40)
    head = R2D2Head(lam_init=0.5, scale_init=0.7, bias_init=0.1)
    check_op_on_cuda(lambda X, Xq: head.to(X)(X, labels.to(X.device), Xq, 5), (X, Xq), "R2D2Head")


@pytest.mark.parametrize("backend", ["auto", "reference"])  # the Triton kernel, the PyTorch loop
@pytest.mark.parametrize("shot", [1, 5])
def test_svm_solve_on_cuda(shot, backend):
    X, labels, _ = episode(3, 5, shot, 1, 32, seed=shot)
    K = X @ X.mT

    def solve(K, labels):
        res = svm_crammer_singer_solve(0.5 * (K + K.mT), labels, 5, backend=backend)
        assert bool((res.status == 0).all()), res.status_names()
        return res.z

    check_op_on_cuda(solve, (K, labels), "svm_crammer_singer_solve")


@pytest.mark.parametrize("shot", [1, 5], ids=["gram_route", "weights_route"])
def test_svm_logits_and_head_on_cuda(shot):
    X, labels, Xq = episode(2, 5, shot, 7, 48, seed=3)
    check_op_on_cuda(lambda X, Xq, labels: svm_logits(X, labels, Xq, 5)[0], (X, Xq, labels), "svm_logits")
    head = SVMHead(scale_init=3.0)
    check_op_on_cuda(lambda X, Xq: head.to(X)(X, labels.to(X.device), Xq, 5), (X, Xq), "SVMHead")


def test_svm_compute_dtype_float32_on_cuda():
    # Solver arithmetic in float32 (not only the inputs): looser, as documented for the badly scaled dual.
    X, labels, _ = episode(2, 5, 2, 1, 16, seed=4)
    K = X @ X.mT
    ref = svm_crammer_singer_solve(K, labels, 5).z
    got = svm_crammer_singer_solve(K.float().cuda(), labels.cuda(), 5, compute_dtype=F32).z
    assert rel_err(got, ref) < 5e-3


def test_dense_qp_on_cuda():
    g = torch.Generator().manual_seed(5)
    T, N, m = 3, 6, 4
    M = torch.randn(T, N, N, generator=g, dtype=F64)
    Q = M @ M.mT + 0.1 * torch.eye(N, dtype=F64)
    p = torch.randn(T, N, generator=g, dtype=F64)
    G = torch.randn(T, m, N, generator=g, dtype=F64)
    h = torch.rand(T, m, generator=g, dtype=F64) + 0.5
    A = torch.randn(T, 1, N, generator=g, dtype=F64)
    b = torch.randn(T, 1, generator=g, dtype=F64)
    check_op_on_cuda(lambda Q, p, G, h, A, b: qp_solve(0.5 * (Q + Q.mT), p, G, h, A, b, raise_on_failure=True).z,
                     (Q, p, G, h, A, b), "qp_solve")


# ---------------------------------------------------------------------------------------------
# Meta-gradients
# ---------------------------------------------------------------------------------------------
def meta_grads(model, loss_fn, support, query, device, dtype, **kw):
    torch.manual_seed(0)
    net = model().to(device=device, dtype=dtype)
    sup = tuple(t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in support)
    qry = tuple(t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in query)
    params = list(net.parameters())
    loss = maml_loss(net, loss_fn, sup, qry, **kw)
    return [loss.detach()] + list(torch.autograd.grad(loss, params))


def check_meta_on_cuda(model, loss_fn, support, query, what, **kw):
    ref = meta_grads(model, loss_fn, support, query, "cpu", F64, **kw)
    # Finite differences with r ~ sqrt(eps) turn the rounding differences of two devices' convs
    # (~1e-16) into ~1e-8 of the HVP (measured on an H100: 7.5e-9), as their error model says.
    f64_tol = 1e-7 if kw.get("hvp_mode", "").startswith("fd") else 1e-9
    for dtype in (F64, F32):
        got = meta_grads(model, loss_fn, support, query, "cuda", dtype, **kw)
        flat = torch.cat([t.reshape(-1).double().cpu() for t in got])
        flat_ref = torch.cat([t.reshape(-1) for t in ref])
        err = float((flat - flat_ref).norm() / flat_ref.norm())
        tol = f64_tol if dtype == F64 else 2e-3
        assert err < tol, f"{what}: CUDA {dtype} meta-gradient differs from CPU float64 by {err:.2e}"


def conv_tasks(T, n_way=3, shot=2, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, n_way * shot, 1, side, side, generator=g, dtype=F64)
    xq = torch.randn(T, n_way * 2, 1, side, side, generator=g, dtype=F64)
    ys = torch.arange(n_way).repeat_interleave(shot).repeat(T, 1)
    yq = torch.arange(n_way).repeat_interleave(2).repeat(T, 1)
    return (xs, ys), (xq, yq)


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("algorithm,hvp_mode", [("maml", "exact"), ("maml", "fd_central"), ("fomaml", "exact"),
                                                 ("imaml", "exact")])
def test_conv4_with_batch_norm_meta_gradients_on_cuda(batching, algorithm, hvp_mode):
    sup, qry = conv_tasks(3)
    kw = dict(num_steps=2, lr=0.3, algorithm=algorithm, hvp_mode=hvp_mode, batching=batching)
    if hvp_mode.startswith("fd"):
        kw["fd_dtype"] = F64
    if algorithm == "imaml":
        kw["imaml_lambda"] = 50.0  # I + H/lam positive definite on this net: CG converges
    check_meta_on_cuda(lambda: Conv4(1, 8, 3, 16), F.cross_entropy, sup, qry, f"conv4 {algorithm} {hvp_mode}", **kw)


@pytest.mark.parametrize("batching", ["fused_mlp", "vmap", "loop"])
def test_sinusoid_mlp_meta_gradients_on_cuda(batching):
    g = torch.Generator().manual_seed(2)
    sup = (torch.randn(6, 10, 1, generator=g, dtype=F64), torch.randn(6, 10, 1, generator=g, dtype=F64))
    qry = (torch.randn(6, 10, 1, generator=g, dtype=F64), torch.randn(6, 10, 1, generator=g, dtype=F64))
    check_meta_on_cuda(lambda: MLP(1, (40, 40), 1, activation=nn.Tanh), mse_loss, sup, qry, f"mlp {batching}",
                       num_steps=3, lr=0.05, batching=batching)


def test_hvp_modes_on_cuda():
    net = MLP(3, (8,), 2, activation=nn.Tanh).double()
    names = [n for n, _ in net.named_parameters()]
    base = [p.detach() for p in net.parameters()]

    def task_loss(params, fixed, x, y):
        out = torch.func.functional_call(net, dict(zip(names, params)), (x,))
        return mse_loss(out, y)

    g = torch.Generator().manual_seed(3)
    T = 4
    params = [p.expand(T, *p.shape).clone() + 0.1 * torch.randn(T, *p.shape, generator=g, dtype=F64) for p in base]
    v = [torch.randn(T, *p.shape, generator=g, dtype=F64) for p in base]
    x, y = torch.randn(T, 5, 3, generator=g, dtype=F64), torch.randn(T, 5, 2, generator=g, dtype=F64)
    ref, _ = hvp(task_loss, params, v, x, y, mode="reverse_over_reverse")
    net.cuda()
    for mode, tol in [("forward_over_reverse", 1e-10), ("reverse_over_reverse", 1e-10), ("fd_central", 1e-5)]:
        got, _ = hvp(task_loss, [p.cuda() for p in params], [t.cuda() for t in v], x.cuda(), y.cuda(), mode=mode)
        for a, b in zip(got, ref):
            assert rel_err(a, b) < tol, mode


def test_fast_backends_are_offered_on_cuda():
    assert "cuda" in B.available_backends(torch.device("cuda"))
