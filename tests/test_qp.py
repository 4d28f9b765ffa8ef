"""Batched QP interior point: maths (gradcheck) -> statuses -> cvxpy oracle -> bad input."""
import sys
from pathlib import Path

import pytest
import torch
pytest.importorskip("cvxpy")  # optional here (e.g. a GPU machine without it): skipped, not failed

from fastmaml.heads.qp import QPStatus, qp_solve

sys.path.insert(0, str(Path(__file__).parent))
from _heads_oracle import cvxpy_qp_batch  # noqa: E402

# Agreement with cvxpy relative to the largest entry of the solution, per input dtype.
ORACLE_RTOL = {torch.float64: 1e-6, torch.float32: 1e-4}
F64 = torch.float64


def _rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def random_qp(T, N, m, neq, seed=0, rank=None, dtype=F64):
    """Feasible, bounded random QP; ``rank < N`` gives a PSD-singular Q (a box keeps it bounded)."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(T, N, rank or N, generator=g, dtype=F64)
    Q = M @ M.mT + (0.1 * torch.eye(N, dtype=F64) if rank is None else 0)
    p = torch.randn(T, N, generator=g, dtype=F64)
    z0 = torch.randn(T, N, generator=g, dtype=F64)
    G = torch.randn(T, m, N, generator=g, dtype=F64)
    h = (G @ z0[..., None])[..., 0] + 0.1 * torch.rand(T, m, generator=g, dtype=F64)
    if rank is not None:
        eye = torch.eye(N, dtype=F64).expand(T, N, N)
        G, h = torch.cat([G, eye, -eye], 1), torch.cat([h, torch.full((T, 2 * N), 3.0, dtype=F64)], 1)
    A = torch.randn(T, neq, N, generator=g, dtype=F64)
    b = (A @ z0[..., None])[..., 0]
    return [t.to(dtype) for t in (Q, p, G, h, A, b)]


# ---------------------------------------------------------------------------------------------
# Maths
# ---------------------------------------------------------------------------------------------
def test_qp_gradcheck_all_inputs():
    # Seed 1: one strictly active constraint in task 0, none in task 1 (differentiable point).
    args = [t.requires_grad_() for t in random_qp(2, 5, 4, 2, seed=1)]

    def f(Q, p, G, h, A, b):
        return qp_solve(0.5 * (Q + Q.mT), p, G, h, A, b).z

    assert torch.autograd.gradcheck(f, args, atol=1e-6, rtol=1e-4)


def test_qp_double_backward_raises_clear_error():
    Q, p, G, h, A, b = random_qp(1, 3, 2, 1)
    p.requires_grad_()
    z = qp_solve(Q, p, G, h, A, b).z
    (gp,) = torch.autograd.grad(z.sum(), p, create_graph=True)
    with pytest.raises(RuntimeError, match="qp_solve is first-order only"):
        torch.autograd.grad(gp.sum(), p)


def test_qp_gradient_matches_finite_differences_of_cvxpy():
    Q, p, G, h, A, b = random_qp(1, 4, 3, 1, seed=2)
    p.requires_grad_()
    w = torch.tensor([[0.3, -1.0, 0.5, 2.0]], dtype=F64)
    (gp,) = torch.autograd.grad((qp_solve(Q, p, G, h, A, b).z * w).sum(), p)
    eps, fd = 1e-5, torch.zeros(4, dtype=F64)
    for k in range(4):
        dp = torch.zeros_like(p)
        dp[0, k] = eps
        hi = cvxpy_qp_batch(Q, (p + dp).detach(), G, h, A, b)
        lo = cvxpy_qp_batch(Q, (p - dp).detach(), G, h, A, b)
        fd[k] = ((hi - lo) * w).sum() / (2 * eps)
    torch.testing.assert_close(gp[0], fd, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Oracle
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_random_qps_match_cvxpy(dtype):
    Q, p, G, h, A, b = random_qp(3, 7, 5, 2, seed=3, dtype=dtype)
    r = qp_solve(Q, p, G, h, A, b)
    assert r.status_names() == ["SOLVED"] * 3 and r.z.dtype == dtype and r.z.shape == (3, 7)
    assert bool((r.iterations > 0).all()) and bool((r.primal_residual < 1e-9).all())
    assert _rel_err(r.z, cvxpy_qp_batch(Q, p, G, h, A, b)) < ORACLE_RTOL[dtype]


def test_psd_singular_q_matches_cvxpy():
    Q, p, G, h, A, b = random_qp(2, 6, 3, 1, seed=4, rank=2)
    assert float(torch.linalg.eigvalsh(Q)[:, 0].abs().max()) < 1e-12  # really singular
    r = qp_solve(Q, p, G, h, A, b)
    assert r.status_names() == ["SOLVED"] * 2
    assert _rel_err(r.z, cvxpy_qp_batch(Q, p, G, h, A, b)) < 1e-6


def test_equality_only_and_lp_match_cvxpy():
    # Equality-only with a singular Q (positive definite on the null space of A) and a redundant row.
    Q = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=F64))[None]
    A = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 2.0]]], dtype=F64)
    b = torch.tensor([[1.0, 0.5, 1.0]], dtype=F64)
    p = torch.tensor([[0.3, -0.2, 1.0]], dtype=F64)
    r = qp_solve(Q, p, A=A, b=b)
    assert r.status_names() == ["SOLVED"]
    assert _rel_err(r.z, cvxpy_qp_batch(Q, p, A=A[:, :2], b=b[:, :2])) < 1e-6
    # A linear program (Q = 0) over a triangle.
    Q0 = torch.zeros(1, 2, 2, dtype=F64)
    G = torch.tensor([[[1.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]], dtype=F64)
    h = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)
    r = qp_solve(Q0, torch.tensor([[-1.0, -2.0]], dtype=F64), G, h)
    assert r.status_names() == ["SOLVED"]
    torch.testing.assert_close(r.z, torch.tensor([[0.0, 1.0]], dtype=F64), atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------------------
# Statuses: infeasible, unbounded, iteration cap
# ---------------------------------------------------------------------------------------------
def test_infeasible_and_unbounded_tasks_are_reported_per_task():
    Q = torch.stack([torch.eye(2, dtype=F64), torch.eye(2, dtype=F64), torch.diag(torch.tensor([0.0, 1.0], dtype=F64))])
    p = torch.tensor([[-1.0, -1.0], [0.0, 0.0], [-1.0, 0.0]], dtype=F64)
    # task 0: z1 + z2 <= 1 (solvable); task 1: z1 <= -1 and -z1 <= -1 (infeasible);
    # task 2: z2 <= 1 only, objective -z1 with no curvature in z1 (unbounded).
    G = torch.tensor([[[1.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [-1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]], dtype=F64)
    h = torch.tensor([[1.0, 5.0], [-1.0, -1.0], [1.0, 1.0]], dtype=F64)
    r = qp_solve(Q, p, G, h)
    assert r.status_names() == ["SOLVED", "PRIMAL_INFEASIBLE", "DUAL_INFEASIBLE"]
    assert r.converged.tolist() == [True, False, False]
    torch.testing.assert_close(r.z[0], torch.tensor([0.5, 0.5], dtype=F64), atol=1e-9, rtol=0)
    assert bool(r.z[1:].isnan().all())  # no garbage solution for the failed tasks
    with pytest.raises(RuntimeError, match=r"tasks \[1, 2\] were not solved: \['PRIMAL_INFEASIBLE', 'DUAL_INFEASIBLE'\]"):
        qp_solve(Q, p, G, h, raise_on_failure=True)


def test_infeasible_equalities_are_reported():
    Q = torch.eye(2, dtype=F64)[None]
    A = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]], dtype=F64)
    b = torch.tensor([[1.0, 2.0]], dtype=F64)
    G, h = -torch.eye(2, dtype=F64)[None], torch.zeros(1, 2, dtype=F64)
    r = qp_solve(Q, torch.zeros(1, 2, dtype=F64), G, h, A, b)
    assert r.status_names() == ["PRIMAL_INFEASIBLE"]


def test_fixed_iteration_count():
    Q, p, G, h, A, b = random_qp(3, 6, 4, 1, seed=5)
    r = qp_solve(Q, p, G, h, A, b, max_iter=3, tol=0.0)
    assert r.iterations.tolist() == [3, 3, 3]
    assert r.status_names() == ["MAX_ITER"] * 3 and not bool(r.converged.any())
    full = qp_solve(Q, p, G, h, A, b)
    assert bool((full.iterations > 3).all()) and bool(full.converged.all())


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise():
    Q, p, G, h, A, b = random_qp(2, 4, 3, 1)
    with pytest.raises(ValueError, match=r"Q must have shape \[T, N, N\]"):
        qp_solve(Q[0], p, G, h)
    with pytest.raises(ValueError, match="Q must be square"):
        qp_solve(Q[:, :3], p, G, h)
    Qa = Q.clone()
    Qa[0, 0, 1] += 1.0
    with pytest.raises(ValueError, match="Q must be symmetric"):
        qp_solve(Qa, p, G, h)
    with pytest.raises(ValueError, match="Q must be positive semidefinite; tasks \\[1\\]"):
        qp_solve(torch.stack([Q[0], -Q[1]]), p, G, h)
    with pytest.raises(ValueError, match=r"p must have shape \[2, 4\]"):
        qp_solve(Q, p[:, :3], G, h)
    with pytest.raises(ValueError, match="G and h must be given together"):
        qp_solve(Q, p, G, None)
    with pytest.raises(ValueError, match=r"h must have shape \[2, 3\]"):
        qp_solve(Q, p, G, h[:, :2])
    with pytest.raises(ValueError, match=r"A must have shape \[2, neq, 4\]"):
        qp_solve(Q, p, G, h, A[..., :3], b)
    with pytest.raises(TypeError, match="h is torch.float32"):
        qp_solve(Q, p, G, h.float())
    hn = h.clone()
    hn[1, 2] = float("nan")
    with pytest.raises(ValueError, match="h must be finite"):
        qp_solve(Q, p, G, hn)
    with pytest.raises(ValueError, match="max_iter must be an int >= 0"):
        qp_solve(Q, p, G, h, max_iter=-1)


# ---------------------------------------------------------------------------------------------
# torch's batched CPU LU is wrong after torch.set_num_threads(k > 1) for n >= 160 (and hangs in
# float32): the KKT factorisation goes one matrix at a time there. Process-wide thread state, so
# in a fresh interpreter.
# ---------------------------------------------------------------------------------------------
_THREADED_QP = r"""
import sys, torch
torch.set_num_threads(2)
sys.path.insert(0, sys.argv[1])
from test_qp import random_qp
from fastmaml.heads.qp import lu_factor_batched, qp_solve
K = torch.randn(4, 200, 200, dtype=torch.float64)
LU, piv, info = lu_factor_batched(K)
alone = [torch.linalg.lu_factor_ex(k) for k in K]
assert all(torch.equal(LU[t], alone[t][0]) and torch.equal(piv[t], alone[t][1]) for t in range(4))
Q, p, G, h, A, b = random_qp(4, 90, 80, 5, seed=3)  # KKT matrices 175 x 175
res = qp_solve(Q, p, G, h, A, b)
assert bool(res.converged.all()), res.status
single = [qp_solve(*(t[i:i + 1] for t in (Q, p, G, h, A, b))).z for i in range(4)]
err = max(float((res.z[i] - single[i][0]).abs().max() / single[i].abs().max()) for i in range(4))
assert err < 1e-8, err
print("ok", err)
"""


def test_kkt_factorisation_is_right_after_set_num_threads():
    import subprocess
    proc = subprocess.run([sys.executable, "-c", _THREADED_QP, str(Path(__file__).parent)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
