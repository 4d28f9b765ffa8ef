"""The compiled Crammer-Singer solver (``backend="cpu"``) against the batched PyTorch reference.

The compiled kernel runs the reference's algorithm with the tasks in lockstep groups, one SIMD
lane per task, compiled once per instruction set (ATEN_CPU_CAPABILITY picks a narrower one). In
float64 it must take the same iterates: the same iteration counts and statuses, and solutions equal
to rounding. Agreement with cvxpy and gradcheck are in test_svm_head.py for both backends.
"""
import pytest
import torch

import fastmaml
from fastmaml.heads.svm import regularized_kernel, svm_crammer_singer_solve

pytestmark = pytest.mark.skipif(not fastmaml.HAS_NATIVE, reason="compiled module not built")

F64 = torch.float64
CAPABILITIES = ["default", "avx2"]  # "avx2" on a CPU without it runs the baseline build


def episode(T, n_way, shot, d, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, n_way * shot, d, generator=g, dtype=F64).to(dtype)
    labels = torch.randint(0, n_way, (T, n_way * shot), generator=g)  # unbalanced classes too
    return X @ X.mT, labels


def _rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("T,n_way,shot,d", [(1, 5, 1, 64), (3, 5, 3, 20), (17, 2, 4, 7), (9, 4, 2, 3)])
def test_same_iterates_as_the_reference(T, n_way, shot, d, capability, monkeypatch):
    # T = 3, 9, 17 leave padding lanes in the last group; d = 3 < n makes K singular.
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    K, labels = episode(T, n_way, shot, d, seed=T + shot)
    native = svm_crammer_singer_solve(K, labels, n_way, backend="cpu")
    ref = svm_crammer_singer_solve(K, labels, n_way, backend="reference")
    assert native.status.tolist() == ref.status.tolist() == [0] * T
    assert native.iterations.tolist() == ref.iterations.tolist()
    assert _rel_err(native.z, ref.z) < 1e-12
    torch.testing.assert_close(native.primal_residual, ref.primal_residual, rtol=1e-6, atol=1e-16)
    torch.testing.assert_close(native.gap, ref.gap, rtol=1e-6, atol=1e-16)


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_fixed_iteration_count_matches_reference(capability, monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    K, labels = episode(5, 5, 2, 16, seed=3)
    kw = dict(max_iter=4, tol=0.0, C=0.3, diag_reg=0.5)
    native = svm_crammer_singer_solve(K, labels, 5, backend="cpu", **kw)
    ref = svm_crammer_singer_solve(K, labels, 5, backend="reference", **kw)
    assert native.status_names() == ref.status_names() == ["MAX_ITER"] * 5
    assert _rel_err(native.z, ref.z) < 1e-10


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_float32_arithmetic_solves_to_its_documented_accuracy(capability, monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    K, labels = episode(6, 5, 3, 32, seed=5)
    exact = svm_crammer_singer_solve(K, labels, 5, backend="reference").z
    for backend in ("cpu", "reference"):
        res = svm_crammer_singer_solve(K.float(), labels, 5, compute_dtype=torch.float32, backend=backend)
        assert res.converged.all() and res.z.dtype == torch.float32
        assert _rel_err(res.z, exact) < 5e-3, backend  # the badly scaled dual in float32: about 1e-3


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-3)])
@pytest.mark.parametrize("diag_reg,floor_eps", [(0.1, 0.0), (0.0, 1e-3)])  # r from diag_reg, from the floor
def test_kkt_solve_matches_dense_solve(dtype, tol, diag_reg, floor_eps, capability, monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    T, c, n = 7, 3, 5
    K, _ = episode(T, c, 2, 4, seed=11)  # n = 6 > rank 4
    n = K.shape[1]
    Kr = regularized_kernel(K, diag_reg, floor_eps)
    g = torch.Generator().manual_seed(1)
    w = torch.rand(T, c, n, generator=g, dtype=F64) * 10.0 ** torch.randint(-3, 4, (T, c, n), generator=g)
    rhs = torch.randn(T, c, n, generator=g, dtype=F64)
    dz = torch.ops.fastmaml.svm_cs_kkt_solve(K.to(dtype), diag_reg, floor_eps, w.to(dtype), rhs.to(dtype))
    # Dense KKT matrix [blockdiag_k(Kr + diag w_k), E^T; E, 0] with E = [I ... I].
    N = c * n
    M = torch.zeros(T, N + n, N + n, dtype=F64)
    for k in range(c):
        M[:, k * n:(k + 1) * n, k * n:(k + 1) * n] = Kr + torch.diag_embed(w[:, k])
        M[:, k * n:(k + 1) * n, N:] = torch.eye(n, dtype=F64)
        M[:, N:, k * n:(k + 1) * n] = torch.eye(n, dtype=F64)
    ref = torch.linalg.solve(M, torch.cat([rhs.reshape(T, N), torch.zeros(T, n, dtype=F64)], -1))[:, :N]
    assert dz.dtype == dtype
    assert _rel_err(dz.reshape(T, N), ref) < tol


def test_kkt_solve_of_an_indefinite_system_is_nan_not_garbage():
    K, _ = episode(3, 2, 2, 8, seed=2)
    K[1] -= 100.0 * torch.eye(4, dtype=F64)
    w = torch.ones(3, 2, 4, dtype=F64)
    dz = torch.ops.fastmaml.svm_cs_kkt_solve(K, 1.0, 0.0, w, torch.randn(3, 2, 4, dtype=F64))
    assert torch.isfinite(dz[[0, 2]]).all() and torch.isnan(dz[1]).all()


def test_ops_pass_opcheck():
    K, labels = episode(3, 3, 2, 8, seed=4)
    torch.library.opcheck(torch.ops.fastmaml.svm_cs_ipm.default, (K, labels, 3, 0.1, 1.0, 0.0, 30, 1e-12))
    w = torch.rand(3, 3, 6, dtype=F64) + 0.1
    torch.library.opcheck(torch.ops.fastmaml.svm_cs_kkt_solve.default, (K, 1.0, 1e-7, w, torch.randn(3, 3, 6, dtype=F64)))


def test_direct_calls_check_their_inputs():
    K, labels = episode(2, 3, 2, 8)
    op = torch.ops.fastmaml.svm_cs_ipm
    with pytest.raises(RuntimeError, match=r"kernel must have shape \[T, n, n\]"):
        op(K[:, :, :5], labels, 3, 0.1, 1.0, 0.0, 10, 1e-12)
    with pytest.raises(RuntimeError, match=r"labels must be int64 of shape \[2, 6\]"):
        op(K, labels.int(), 3, 0.1, 1.0, 0.0, 10, 1e-12)
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 2\)"):
        op(K, labels, 2, 0.1, 1.0, 0.0, 10, 1e-12)
    with pytest.raises(RuntimeError, match="C must be finite and > 0"):
        op(K, labels, 3, 0.0, 1.0, 0.0, 10, 1e-12)
    with pytest.raises(RuntimeError, match="diag_reg must be finite and >= 0"):
        op(K, labels, 3, 0.1, -1.0, 0.0, 10, 1e-12)
    with pytest.raises(RuntimeError, match="weights must have shape"):
        torch.ops.fastmaml.svm_cs_kkt_solve(K, 1.0, 0.0, torch.ones(2, 3, 5, dtype=F64), torch.ones(2, 3, 5, dtype=F64))


def test_backend_choice():
    K, labels = episode(2, 3, 2, 8)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available for svm_cs_ipm"):
        svm_crammer_singer_solve(K, labels, 3, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        svm_crammer_singer_solve(K, labels, 3, backend="fortran")
