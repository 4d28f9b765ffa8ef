"""The Triton Crammer-Singer solver (``backend="triton"``): one program per task, on the GPU.

It runs the algorithm of the compiled CPU solver and of the PyTorch reference with the task's
matrices in registers, so in float64 it must take the same iterates: the same iteration counts
and statuses, and solutions equal to rounding. Without a GPU it runs on CPU tensors through the
Triton interpreter (slow: small problems only). Agreement with cvxpy is checked for the other
backends in test_svm_head.py; equal iterates carry it over.
"""
import pytest
import torch

from fastmaml import backend as B
from fastmaml.heads.svm import svm_crammer_singer_solve, svm_logits

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not B.is_available("triton", DEVICE, "svm_cs_ipm"),
                                reason="triton not installed (or no GPU and no interpreter)")
F64 = torch.float64
# The reference the kernel's iterates are compared with: the compiled solver where built.
REFERENCE = "cpu" if B.is_available("cpu", torch.device("cpu"), "svm_cs_ipm") else "reference"


def episode(T, n_way, shot, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, n_way * shot, d, generator=g, dtype=F64)
    labels = torch.randint(0, n_way, (T, n_way * shot), generator=g)  # unbalanced classes too
    return X @ X.mT, labels


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max())


def solve(K, labels, n_way, **kw):
    return svm_crammer_singer_solve(K.to(DEVICE), labels.to(DEVICE), n_way, backend="triton", **kw)


# (T, n_way, shot, d): padded classes and rows (3-way, n = 6), 5-way 1-shot, a singular K (d < n).
@pytest.mark.parametrize("T,n_way,shot,d", [(3, 3, 2, 16), (2, 5, 1, 64), (2, 2, 3, 2)])
def test_same_iterates_as_the_cpu_solver(T, n_way, shot, d):
    K, labels = episode(T, n_way, shot, d, seed=T + shot)
    got = solve(K, labels, n_way)
    ref = svm_crammer_singer_solve(K, labels, n_way, backend=REFERENCE)
    assert got.z.device.type == DEVICE.type
    assert got.status.tolist() == ref.status.tolist() == [0] * T
    assert got.iterations.tolist() == ref.iterations.tolist()
    assert rel_err(got.z, ref.z) < 1e-12
    torch.testing.assert_close(got.gap.cpu(), ref.gap, rtol=1e-6, atol=1e-16)


def test_fixed_iteration_count_and_settings():
    K, labels = episode(2, 3, 2, 8, seed=3)
    kw = dict(max_iter=3, tol=0.0, C=0.3, diag_reg=0.5)
    got = solve(K, labels, 3, **kw)
    ref = svm_crammer_singer_solve(K, labels, 3, backend=REFERENCE, **kw)
    assert got.status_names() == ref.status_names() == ["MAX_ITER"] * 2
    assert got.iterations.tolist() == [3, 3]
    assert rel_err(got.z, ref.z) < 1e-10


def test_float32_arithmetic():
    K, labels = episode(2, 3, 2, 16, seed=5)
    exact = svm_crammer_singer_solve(K, labels, 3, backend=REFERENCE).z
    res = solve(K.float(), labels, 3, compute_dtype=torch.float32)
    assert res.converged.all() and res.z.dtype == torch.float32
    assert rel_err(res.z, exact) < 5e-3  # the badly scaled dual in float32: about 1e-3


def test_indefinite_kernel_is_reported_not_solved():
    K, labels = episode(2, 3, 2, 8)
    K[1] -= 50.0 * torch.eye(6, dtype=F64)
    res = solve(K, labels, 3)
    assert res.status_names() == ["SOLVED", "NUMERICAL_ERROR"]
    assert torch.isfinite(res.z[0]).all() and torch.isnan(res.z[1]).all()
    # The failed task gets zero gradients, the other its own.
    Kg = K.to(DEVICE).requires_grad_()
    g, = torch.autograd.grad(svm_crammer_singer_solve(Kg, labels.to(DEVICE), 3, backend="triton").z[0].sum(), Kg)
    assert torch.isfinite(g).all() and (g[1] == 0).all() and (g[0] != 0).any()


def test_adjoint_solve_matches_a_dense_kkt_solve():
    from fastmaml.heads.svm import regularized_kernel
    from fastmaml.kernels import svm_cs

    K, _ = episode(3, 3, 2, 4, seed=6)  # d = 4 < n = 6: singular K, r = 0.1 keeps H positive definite
    K[2] -= 50.0 * torch.eye(6, dtype=F64)  # task 2: not factorizable -> NaN, not garbage
    Kr = regularized_kernel(K, 0.1)
    g = torch.Generator().manual_seed(7)
    w = torch.rand(3, 3, 6, generator=g, dtype=F64) * 10 + 1e-3
    rhs = torch.randn(3, 3, 6, generator=g, dtype=F64)
    got = svm_cs.svm_cs_kkt_solve(Kr.to(DEVICE), w.to(DEVICE), rhs.to(DEVICE)).cpu()
    for t in range(2):  # [blockdiag(Kr + diag w_k)  E^T; E 0] [dz; dy] = [rhs; 0], E = [I I I]
        H = torch.block_diag(*[Kr[t] + torch.diag(w[t, k]) for k in range(3)])
        E = torch.eye(6, dtype=F64).repeat(1, 3)
        M = torch.cat([torch.cat([H, E.mT], 1), torch.cat([E, torch.zeros(6, 6, dtype=F64)], 1)])
        dense = torch.linalg.solve(M, torch.cat([rhs[t].reshape(-1), torch.zeros(6, dtype=F64)]))[:18]
        assert rel_err(got[t].reshape(-1), dense) < 1e-10
    assert torch.isnan(got[2]).all()
    with pytest.raises(ValueError, match="the Triton SVM kernel takes n <= 32"):
        svm_cs.svm_cs_kkt_solve(torch.eye(40, dtype=F64)[None], torch.ones(1, 3, 40, dtype=F64),
                                torch.ones(1, 3, 40, dtype=F64))


def test_gradcheck_wrt_kernel():
    K, labels = episode(1, 3, 2, 5, seed=1)
    K = K.to(DEVICE).requires_grad_()
    labels = labels.to(DEVICE)

    def f(K):
        return svm_crammer_singer_solve(0.5 * (K + K.mT), labels, 3, backend="triton").z

    assert torch.autograd.gradcheck(f, (K,), atol=1e-7, rtol=1e-4, fast_mode=True)


def test_svm_logits_weights_route_matches_the_cpu_solver():
    g = torch.Generator().manual_seed(4)
    X, Xq = torch.randn(2, 6, 9, generator=g, dtype=F64), torch.randn(2, 7, 9, generator=g, dtype=F64)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 0, 0, 1]])
    ref_X, ref_Xq = X.clone().requires_grad_(), Xq.clone().requires_grad_()
    ref, _ = svm_logits(ref_X, labels, ref_Xq, 3, backend=REFERENCE)
    ref.square().sum().backward()
    X, Xq = X.to(DEVICE).requires_grad_(), Xq.to(DEVICE).requires_grad_()
    got, res = svm_logits(X, labels.to(DEVICE), Xq, 3, backend="triton")
    got.square().sum().backward()
    assert res.status_names() == ["SOLVED"] * 2
    assert rel_err(got, ref) < 1e-10
    assert rel_err(X.grad, ref_X.grad) < 1e-8 and rel_err(Xq.grad, ref_Xq.grad) < 1e-8


def test_backend_choice_by_problem_size():
    K, labels = episode(1, 5, 7, 8)  # n = 35 support points: more than the kernel's registers hold
    with pytest.raises(ValueError, match="backend 'triton' solves tasks of at most 32 support points"):
        solve(K, labels, 5)
    res = svm_crammer_singer_solve(K.to(DEVICE), labels.to(DEVICE), 5, max_iter=2, tol=0.0)  # auto falls back
    assert res.iterations.tolist() == [2]
