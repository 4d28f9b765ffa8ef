"""cvxpy oracle for the head tests and benchmarks: QPs solved one task at a time at tight tolerance.

OSQP with eps 1e-10 and solution polishing is the oracle (the badly scaled SVM dual makes Clarabel's
default tolerances too loose); a polish that did not succeed is an error, never a silent answer.
"""
from __future__ import annotations

import numpy as np
import torch


def cvxpy_qp(Q, p, G=None, h=None, A=None, b=None):
    """Solve one QP ``min 1/2 z^T Q z + p^T z s.t. G z <= h, A z = b`` (numpy float64 arrays).

    Returns:
        ``(z, status)`` with status ``"optimal"``, ``"infeasible"`` or ``"unbounded"``.
    """
    import cvxpy as cp

    n = p.shape[0]
    z = cp.Variable(n)
    Qs = 0.5 * (Q + Q.T)
    cons = []
    if G is not None and G.shape[0]:
        cons.append(G @ z <= h)
    if A is not None and A.shape[0]:
        cons.append(A @ z == b)
    obj = 0.5 * cp.quad_form(z, cp.psd_wrap(Qs)) + p @ z
    prob = cp.Problem(cp.Minimize(obj), cons)
    prob.solve(solver=cp.OSQP, eps_abs=1e-10, eps_rel=1e-10, polishing=True, max_iter=200000, verbose=False)
    if prob.status in ("infeasible", "infeasible_inaccurate"):
        return None, "infeasible"
    if prob.status in ("unbounded", "unbounded_inaccurate"):
        return None, "unbounded"
    if prob.status != "optimal":
        raise RuntimeError(f"oracle failed: {prob.status}")
    # OSQP's status_polish: 1 succeeded, 2 not needed (no active constraint); else it failed.
    if prob.solver_stats.extra_stats.info.status_polish not in (1, 2):
        # Polishing failed: fall back on Clarabel at tight tolerances.
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-13, tol_gap_rel=1e-13, tol_feas=1e-13,
                   tol_ktratio=1e-10, max_iter=500)
        if prob.status != "optimal":
            raise RuntimeError(f"oracle: OSQP polish failed and Clarabel says {prob.status}")
    return np.asarray(z.value), "optimal"


def cvxpy_qp_batch(Q, p, G=None, h=None, A=None, b=None) -> torch.Tensor:
    """``cvxpy_qp`` over the tasks of batched torch tensors; returns ``[T, N]`` float64."""
    out = []
    for t in range(Q.shape[0]):
        args = [None if M is None else M[t].detach().double().cpu().numpy() for M in (Q, p, G, h, A, b)]
        z, status = cvxpy_qp(*args)
        if z is None:
            raise RuntimeError(f"oracle: task {t} is {status}")
        out.append(torch.from_numpy(z))
    return torch.stack(out)
