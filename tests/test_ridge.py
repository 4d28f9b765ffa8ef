"""Batched ridge solver: maths (gradcheck, gradgradcheck) -> reference -> cvxpy oracle -> bad input."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastmaml

pytest.importorskip("cvxpy")  # optional here (e.g. a GPU machine without it): skipped, not failed

from fastmaml.heads.ridge import ridge_predict, ridge_solve, spd_solve
from fastmaml.reference.heads import ridge_predict_reference, ridge_solve_reference

sys.path.insert(0, str(Path(__file__).parent))

# Agreement with the float64 reference, relative to the largest entry: per dtype.
RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _problem(T, n, d, c, dtype=torch.float64, seed=0, q=4):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, n, d, generator=g, dtype=torch.float64)
    Y = torch.randn(T, n, c, generator=g, dtype=torch.float64)
    Xq = torch.randn(T, q, d, generator=g, dtype=torch.float64)
    lam = torch.rand(T, generator=g, dtype=torch.float64) + 0.5
    return [t.to(dtype) for t in (X, Y, Xq, lam)]


def _rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


# ---------------------------------------------------------------------------------------------
# Maths
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["dual", "primal"])
def test_ridge_gradcheck_and_gradgradcheck(form):
    X, Y, Xq, lam = (t.requires_grad_() for t in _problem(2, 4, 6, 2))
    assert torch.autograd.gradcheck(lambda *a: ridge_solve(*a, form=form), (X, Y, lam))
    assert torch.autograd.gradgradcheck(lambda *a: ridge_solve(*a, form=form), (X, Y, lam))
    assert torch.autograd.gradcheck(lambda *a: ridge_predict(*a, form=form), (X, Y, Xq, lam))
    assert torch.autograd.gradgradcheck(lambda *a: ridge_predict(*a, form=form), (X, Y, Xq, lam))


def test_spd_solve_backward_reuses_the_factor_and_is_exact():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    K = (M @ M.mT + torch.eye(5, dtype=torch.float64)).requires_grad_()
    B = torch.randn(3, 5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    Z = spd_solve(K, B)
    torch.testing.assert_close(Z, torch.linalg.solve(K, B))
    gZ = torch.randn_like(Z)
    gK, gB = torch.autograd.grad(Z, (K, B), gZ)
    gK_ref, gB_ref = torch.autograd.grad(torch.linalg.solve(K, B), (K, B), gZ)
    torch.testing.assert_close(gB, gB_ref)
    torch.testing.assert_close(gK, gK_ref)


def test_ridge_optimality_conditions():
    # W minimises ||X W - Y||^2 + lam ||W||^2  <=>  X^T (X W - Y) + lam W = 0.
    X, Y, _, lam = _problem(3, 7, 11, 3)
    W = ridge_solve(X, Y, lam)
    grad = X.mT @ (X @ W - Y) + lam[:, None, None] * W
    assert grad.abs().max() < 1e-10


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,n,d", [(1, 5, 59), (3, 25, 97), (17, 9, 4)])
def test_ridge_matches_reference(dtype, T, n, d):
    X, Y, Xq, lam = _problem(T, n, d, 5, dtype, seed=T)
    X64, Y64, Xq64, lam64 = (t.double() for t in (X, Y, Xq, lam))
    W_ref = ridge_solve_reference(X64, Y64, lam64)
    P_ref = ridge_predict_reference(X64, Y64, Xq64, lam64)
    for form in ("auto", "dual", "primal"):
        W = ridge_solve(X, Y, lam, form=form)
        P = ridge_predict(X, Y, Xq, lam, form=form)
        assert W.dtype == dtype and W.shape == (T, d, 5) and P.shape == (T, 4, 5)
        assert _rel_err(W, W_ref) < RTOL[dtype], form
        assert _rel_err(P, P_ref) < RTOL[dtype], form


def test_scalar_and_per_task_lambda_agree():
    X, Y, _, _ = _problem(3, 4, 8, 2)
    torch.testing.assert_close(ridge_solve(X, Y, 0.7), ridge_solve(X, Y, torch.full((3,), 0.7, dtype=X.dtype)))
    torch.testing.assert_close(ridge_solve(X, Y, torch.tensor(0.7, dtype=X.dtype)), ridge_solve(X, Y, 0.7))


# ---------------------------------------------------------------------------------------------
# cvxpy oracle
# ---------------------------------------------------------------------------------------------
def _cvxpy_ridge(X, Y, lam):
    import cvxpy as cp

    W = cp.Variable((X.shape[1], Y.shape[1]))
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X @ W - Y) + lam * cp.sum_squares(W)))
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-13, tol_gap_rel=1e-13, tol_feas=1e-13, tol_ktratio=1e-10)
    assert prob.status == "optimal"
    return W.value


@pytest.mark.parametrize("case", ["random", "duplicates_and_zeros", "tiny_lambda", "huge_lambda"])
def test_ridge_matches_cvxpy(case):
    X, Y, _, lam = _problem(2, 6, 9, 3, seed=5)
    if case == "duplicates_and_zeros":
        X[:, 1] = X[:, 0]  # duplicate support point
        X[:, 2] = 0.0  # zero feature vector
    if case == "tiny_lambda":
        lam = torch.full((2,), 1e-4, dtype=X.dtype)
    if case == "huge_lambda":
        lam = torch.full((2,), 1e4, dtype=X.dtype)
    W = ridge_solve(X, Y, lam)
    for t in range(2):
        ref = torch.from_numpy(np.asarray(_cvxpy_ridge(X[t].numpy(), Y[t].numpy(), float(lam[t]))))
        assert _rel_err(W[t], ref) < 1e-6, case


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise():
    X, Y, Xq, lam = _problem(2, 4, 6, 2)
    with pytest.raises(ValueError, match=r"features must have shape \[T, n, d\]"):
        ridge_solve(X[0], Y, lam)
    with pytest.raises(ValueError, match=r"targets must have shape \[2, 4, c\]"):
        ridge_solve(X, Y[:, :3], lam)
    with pytest.raises(ValueError, match=r"query_features must have shape \[2, q, 6\]"):
        ridge_predict(X, Y, Xq[..., :5], lam)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        ridge_solve(X, Y, -1.0)
    with pytest.raises(ValueError, match=r"lam must be a scalar or have shape \[2\]"):
        ridge_solve(X, Y, torch.ones(3, dtype=X.dtype))
    with pytest.raises(TypeError, match="targets is torch.float32"):
        ridge_solve(X, Y.float(), lam)
    with pytest.raises(TypeError, match="floating point"):
        ridge_solve(X.long(), Y, lam)
    with pytest.raises(ValueError, match="form must be one of"):
        ridge_solve(X, Y, lam, form="woodbury")
    for name, bad in (("features", X.clone()), ("targets", Y.clone()), ("lam", lam.clone())):
        bad.view(-1)[1] = float("nan") if name != "targets" else float("inf")
        args = {"features": X, "targets": Y, "lam": lam, name: bad}
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            ridge_solve(args["features"], args["targets"], args["lam"])


def test_zero_lambda_with_dependent_features_reports_not_positive_definite():
    X, Y, _, _ = _problem(2, 4, 6, 2)
    X[1, 1] = X[1, 0]  # rank-deficient X X^T in task 1
    with pytest.raises(ValueError, match=r"not positive definite for tasks \[1\]"):
        ridge_solve(X, Y, 0.0, form="dual")
    ridge_solve(X[:1], Y[:1], 0.0, form="dual")  # task 0 alone is fine with lam = 0


def test_factor_solve_forms_agree():
    # The batched triangular solves (the CUDA forms) and LAPACK's potrs / potri give K^-1 B and K^-1.
    from fastmaml.heads.ridge import factor_inverse, factor_solve

    g = torch.Generator().manual_seed(11)
    M = torch.randn(4, 6, 6, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(M @ M.mT + 0.5 * torch.eye(6, dtype=torch.float64))
    B = torch.randn(4, 6, 3, generator=g, dtype=torch.float64)
    expected = torch.linalg.solve(L @ L.mT, B)
    for triangular in (True, False):
        torch.testing.assert_close(factor_solve(B, L, triangular), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(factor_inverse(L, triangular), torch.linalg.inv(L @ L.mT), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_predict_reports_non_finite_features_and_queries(dtype, bad_value):
    # On the CPU the dual form checks the features through X X^T's diagonal and the queries through
    # the logits (no pass of their own): every non-finite entry must still be found and named,
    # also where its weight is exactly zero (a feature that is 0 in every support example).
    X, Y, Xq, lam = _problem(2, 3, 8, 2, dtype=dtype)
    X[:, :, 5] = 0.0  # feature 5 gets weight exactly 0
    for name, where in (("features", (1, 2, 3)), ("query_features", (1, 0, 5)), ("query_features", (0, 3, 1))):
        Xb, Xqb = X.clone(), Xq.clone()
        (Xb if name == "features" else Xqb)[where] = bad_value
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            ridge_predict(Xb, Y, Xqb, lam)
        leaf = Xqb.clone().requires_grad_()
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            ridge_predict(Xb, Y, leaf, lam)  # with a graph to build, the same checks


@pytest.mark.skipif(not fastmaml.HAS_NATIVE, reason="the product checks ride on the compiled thin kernels")
def test_predict_reports_overflow_of_finite_features():
    X, Y, Xq, lam = _problem(2, 3, 8, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"features: X X\^T overflows torch.float32"):
        ridge_predict(X * 1e20, Y, Xq, lam)
    with pytest.raises(ValueError, match=r"query_features: the logits Xq W overflows torch.float32"):
        ridge_predict(X, Y * 1e30, Xq * 1e10, lam)  # every input finite, the logits ~1e40
