"""MetaOptNet SVM (Crammer-Singer dual): structured solver vs the generic QP reference vs cvxpy."""
import sys
from pathlib import Path

import pytest
import torch
import fastmaml
pytest.importorskip("cvxpy")  # optional here (e.g. a GPU machine without it): skipped, not failed

from fastmaml.heads.qp import qp_solve
from fastmaml.heads.svm import svm_crammer_singer_solve, svm_logits
from fastmaml.reference.heads import crammer_singer_qp_reference

sys.path.insert(0, str(Path(__file__).parent))
from _heads_oracle import cvxpy_qp_batch  # noqa: E402

F64 = torch.float64
ORACLE_RTOL = {F64: 1e-6, torch.float32: 1e-4}
# The compiled solver and the batched PyTorch reference: every property below holds for both.
BACKENDS = [pytest.param("cpu", marks=pytest.mark.skipif(not fastmaml.HAS_NATIVE, reason="compiled module not built")),
            "reference"]


def _rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def episode(T, n_way, shot, d, seed=0, dtype=F64, q=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, n_way * shot, d, generator=g, dtype=F64).to(dtype)
    Xq = torch.randn(T, q, d, generator=g, dtype=F64).to(dtype)
    labels = torch.arange(n_way).repeat_interleave(shot).repeat(T, 1)
    perm = torch.randperm(n_way * shot, generator=g)
    return X[:, perm], labels[:, perm], Xq


def oracle_alpha(K, labels, n_way, C, diag_reg=1.0):
    T, n = labels.shape
    return cvxpy_qp_batch(*crammer_singer_qp_reference(K.double(), labels, n_way, C, diag_reg)).reshape(T, n, n_way)


# ---------------------------------------------------------------------------------------------
# Maths
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_svm_gradcheck_wrt_kernel(backend):
    X, labels, _ = episode(2, 3, 2, 8, seed=1)
    K = (X @ X.mT).requires_grad_()

    def f(K):
        return svm_crammer_singer_solve(0.5 * (K + K.mT), labels, 3, backend=backend).z

    assert torch.autograd.gradcheck(f, (K,), atol=1e-7, rtol=1e-4, fast_mode=True)


def test_svm_logits_gradcheck_wrt_features_and_double_backward_error():
    X, labels, Xq = episode(1, 3, 2, 5, seed=2)
    X, Xq = X.requires_grad_(), Xq.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: svm_logits(a, labels, b, 3)[0], (X, Xq), atol=1e-7, rtol=1e-4, fast_mode=True)
    (gX,) = torch.autograd.grad(svm_logits(X, labels, Xq, 3)[0].sum(), X, create_graph=True)
    with pytest.raises(RuntimeError, match="svm_crammer_singer_solve is first-order only"):
        torch.autograd.grad(gX.sum(), X)


@pytest.mark.parametrize("backend", BACKENDS)
def test_svm_gradient_matches_finite_differences_of_cvxpy(backend):
    X, labels, _ = episode(1, 3, 1, 4, seed=3)
    K = X @ X.mT
    w = torch.randn(1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    Kg = K.clone().requires_grad_()
    (gK,) = torch.autograd.grad((svm_crammer_singer_solve(Kg, labels, 3, C=0.5, backend=backend).z * w).sum(), Kg)
    E = torch.zeros_like(K)
    E[0, 0, 1] = E[0, 1, 0] = 1.0  # a symmetric perturbation of one off-diagonal pair
    eps = 1e-5
    fd = ((oracle_alpha(K + eps * E, labels, 3, 0.5) - oracle_alpha(K - eps * E, labels, 3, 0.5)) * w).sum() / (2 * eps)
    torch.testing.assert_close((gK * E).sum(), fd, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Reference (generic QP on the Kronecker-built problem) and oracle
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,n_way,shot,d", [(1, 5, 1, 1600), (3, 5, 5, 64), (17, 2, 3, 7)])
def test_structured_solver_matches_generic_qp_reference(T, n_way, shot, d, backend):
    X, labels, _ = episode(T, n_way, shot, d, seed=T)
    K = X @ X.mT
    fast = svm_crammer_singer_solve(K, labels, n_way, backend=backend)
    ref = qp_solve(*crammer_singer_qp_reference(K, labels, n_way, 0.1))
    assert fast.converged.all() and ref.converged.all()
    assert _rel_err(fast.z, ref.z.reshape(T, -1, n_way)) < 1e-8
    # the structured solver takes the same Newton steps, so the same number of iterations
    assert fast.iterations.tolist() == ref.iterations.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize(
    "case", ["metaoptnet_1shot_d1600", "duplicates_and_zero_features", "small_C", "large_C", "no_diag_reg_singular"]
)
def test_svm_matches_cvxpy(case, dtype, backend):
    C, diag_reg, n_way, shot, d = 0.1, 1.0, 5, 1, 1600
    if case != "metaoptnet_1shot_d1600":
        n_way, shot, d = 4, 2, 24
    X, labels, _ = episode(2, n_way, shot, d, seed=7, dtype=dtype)
    if case == "duplicates_and_zero_features":
        X[:, 1] = X[:, 0]
        X[:, 2] = 0.0
    if case == "small_C":
        C = 1e-4
    if case == "large_C":
        C = 1e3
    if case == "no_diag_reg_singular":
        X = X[..., :3].contiguous()  # rank 3 < n = 8: K is singular, and r = 0
        diag_reg = 0.0
    K = X @ X.mT
    res = svm_crammer_singer_solve(K, labels, n_way, C=C, diag_reg=diag_reg, backend=backend)
    assert res.converged.all(), res.status_names()
    assert res.z.dtype == dtype
    if case == "no_diag_reg_singular":
        # The solution is not unique in the kernel's null space; compare the decision values.
        ref = oracle_alpha(K, labels, n_way, C, diag_reg)
        assert _rel_err(K.double() @ res.z.double(), K.double() @ ref) < ORACLE_RTOL[dtype]
    else:
        assert _rel_err(res.z, oracle_alpha(K, labels, n_way, C, diag_reg)) < ORACLE_RTOL[dtype]


@pytest.mark.parametrize("shot,q", [(2, 6), (5, 15)])  # query Gram route, primal weights route
def test_svm_logits_match_metaoptnet_formula(shot, q):
    X, labels, Xq = episode(3, 5, shot, 40, seed=4, q=q)
    logits, res = svm_logits(X, labels, Xq, 5)
    n = 5 * shot
    alpha = qp_solve(*crammer_singer_qp_reference(X @ X.mT, labels, 5, 0.1)).z.reshape(3, n, 5)
    # MetaOptNet: logits[t, j, k] = sum_i alpha[t, i, k] <x_i, xq_j>
    ref = torch.einsum("tik,tid,tjd->tjk", alpha, X, Xq)
    assert logits.shape == (3, q, 5)
    assert _rel_err(logits, ref) < 1e-8


def test_svm_logits_gradcheck_primal_weights_route():
    X, labels, Xq = episode(1, 2, 3, 5, seed=5, q=6)  # q n = 36 > c (n + q) = 24
    X, Xq = X.requires_grad_(), Xq.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: svm_logits(a, labels, b, 2)[0], (X, Xq), atol=1e-7, rtol=1e-4,
                                    fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_weights_route_matches_autograd_composition(backend):
    # q n = 48 > c (n + q) = 36: logits through W = X^T alpha with the fused backward. The loss uses
    # both outputs (logits and the dual solution), as a caller may.
    X, labels, Xq = episode(3, 3, 2, 9, seed=8, q=8)
    v = torch.randn(3, 8, 3, dtype=F64)
    u = torch.randn(3, 6, 3, dtype=F64)
    Xa, Xqa = X.clone().requires_grad_(), Xq.clone().requires_grad_()
    logits, res = svm_logits(Xa, labels, Xqa, 3, backend=backend)
    ((logits * v).sum() + (res.z * u).sum()).backward()
    Xb, Xqb = X.clone().requires_grad_(), Xq.clone().requires_grad_()
    alpha = svm_crammer_singer_solve(Xb @ Xb.mT, labels, 3, backend=backend).z
    ((Xqb @ (alpha.mT @ Xb).mT * v).sum() + (alpha * u).sum()).backward()
    torch.testing.assert_close(logits, Xqb @ (alpha.mT @ Xb).mT)
    torch.testing.assert_close(Xa.grad, Xb.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(Xqa.grad, Xqb.grad, rtol=1e-9, atol=1e-12)


def test_fused_weights_route_double_backward_is_an_error():
    X, labels, Xq = episode(1, 2, 3, 5, seed=5, q=6)
    X = X.requires_grad_()
    (gX,) = torch.autograd.grad(svm_logits(X, labels, Xq, 2)[0].sum(), X, create_graph=True)
    with pytest.raises(RuntimeError, match="svm_logits is first-order only"):
        torch.autograd.grad(gX.sum(), X)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_iterations_report_not_converged(backend):
    X, labels, _ = episode(2, 5, 5, 64)
    res = svm_crammer_singer_solve(X @ X.mT, labels, 5, max_iter=3, tol=0.0, backend=backend)
    assert res.iterations.tolist() == [3, 3] and res.status_names() == ["MAX_ITER"] * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_indefinite_kernel_is_reported_not_solved(backend):
    # Task 1's "kernel" has a large negative eigenvalue: no Newton system can be factored.
    X, labels, _ = episode(2, 3, 2, 8)
    K = X @ X.mT
    K[1] -= 50.0 * torch.eye(6, dtype=F64)
    res = svm_crammer_singer_solve(K, labels, 3, backend=backend)
    assert res.status_names() == ["SOLVED", "NUMERICAL_ERROR"]
    assert torch.isfinite(res.z[0]).all() and torch.isnan(res.z[1]).all()
    with pytest.raises(RuntimeError, match=r"tasks \[1\] were not solved: \['NUMERICAL_ERROR'\]"):
        svm_crammer_singer_solve(K, labels, 3, backend=backend, raise_on_failure=True)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise():
    X, labels, Xq = episode(2, 3, 2, 8)
    K = X @ X.mT
    with pytest.raises(ValueError, match=r"support_labels must lie in \[0, n_way\) = \[0, 2\)"):
        svm_crammer_singer_solve(K, labels, 2)
    with pytest.raises(TypeError, match="support_labels must have dtype torch.int64"):
        svm_crammer_singer_solve(K, labels.int(), 3)
    with pytest.raises(ValueError, match=r"support_labels must have shape \[2, 6\]"):
        svm_crammer_singer_solve(K, labels[:, :5], 3)
    with pytest.raises(ValueError, match="C must be > 0"):
        svm_crammer_singer_solve(K, labels, 3, C=-0.1)
    with pytest.raises(ValueError, match="diag_reg must be >= 0"):
        svm_crammer_singer_solve(K, labels, 3, diag_reg=-1.0)
    Ka = K.clone()
    Ka[0, 0, 1] += 1.0
    with pytest.raises(ValueError, match="kernel must be symmetric"):
        svm_crammer_singer_solve(Ka, labels, 3)
    Kn = K.clone()
    Kn[1, 2, 2] = float("inf")
    with pytest.raises(ValueError, match="kernel must be finite"):
        svm_crammer_singer_solve(Kn, labels, 3)
    with pytest.raises(ValueError, match=r"query_features must have shape \[2, q, 8\]"):
        svm_logits(X, labels, Xq[..., :7], 3)
    with pytest.raises(ValueError, match="n_way must be >= 1"):
        svm_crammer_singer_solve(K, labels, 0)


@pytest.mark.parametrize("shot", [1, 3])  # the query-Gram route and the primal-weights route
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_svm_logits_reports_non_finite_features(shot, bad_value):
    # On the CPU the features are checked through X X^T's diagonal and Xq X^T / the logits, not by a
    # pass of their own: a bad entry must be found and named, also under a feature of weight 0.
    g = torch.Generator().manual_seed(3)
    T, n_way, q, d = 2, 3, 20, 10
    labels = torch.arange(n_way).repeat_interleave(shot).repeat(T, 1)
    assert (q * n_way * shot <= n_way * (n_way * shot + q)) == (shot == 1)  # which route is tested
    X = torch.randn(T, n_way * shot, d, generator=g, dtype=torch.float64)
    Xq = torch.randn(T, q, d, generator=g, dtype=torch.float64)
    X[:, :, 7] = 0.0  # feature 7 has weight exactly 0
    for name, where in (("support_features", (1, 0, 2)), ("query_features", (1, 13, 7)), ("query_features", (0, 0, 0))):
        Xb, Xqb = X.clone(), Xq.clone()
        (Xb if name == "support_features" else Xqb)[where] = bad_value
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            svm_logits(Xb, labels, Xqb, n_way)
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            svm_logits(Xb.requires_grad_(), labels, Xqb.requires_grad_(), n_way)
