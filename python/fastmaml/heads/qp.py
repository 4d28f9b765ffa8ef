"""Batched dense QP by a primal-dual interior point method, with implicit differentiation.

    minimise 1/2 z^T Q z + p^T z   subject to   G z <= h,   A z = b        (one problem per task)

Algorithm: infeasible-start primal-dual path following with Mehrotra's predictor-corrector, one
step length per task. The Newton system, with slacks and inequality multipliers eliminated,

    [ Q + G^T W G   A^T ] [dz]   [r_z]
    [ A              0  ] [dy] = [r_y],      W = diag(lam / s),

is factored once per iteration and used for both predictor and corrector solves. How it is
factored is the job of a *KKT structure*: the dense one here (LU of the regularised KKT matrix
``[H + dI, A^T; A, -dI]`` plus iterative refinement against the unregularised one, so a singular
PSD ``Q``, equality-only problems and redundant equalities all work), and the block structure of
the Crammer-Singer SVM in ``svm.py``.

Every task carries its own status (``QPStatus``): solved, maximum iterations, primal infeasible
(a Farkas certificate ``G^T lam + A^T y ~ 0, h^T lam + b^T y < 0`` found in the iterates), dual
infeasible / unbounded (a ray ``Q z ~ 0, A z ~ 0, G z <~ 0, p^T z < 0``) or numerical error. Tasks
stop where they converge; the others carry on. Infeasible/unbounded/failed tasks return NaN
solutions, so they cannot be used silently; ``raise_on_failure=True`` raises instead.

Backward (OptNet, Amos & Kolter 2017): at the solution the adjoint KKT system is the Newton
system above, so the gradients cost one more solve with the factorization at the final iterate.
The backward is first-order only (double backward raises a clear error).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ._common import check_batched, check_like, first_order_only


def lu_factor_batched(K: Tensor):
    """``torch.linalg.lu_factor_ex(K)`` for a batch ``[T, n, n]``, one matrix at a time where the
    batched CPU call is unreliable.

    torch 2.13's CPU batched LU goes wrong once ``torch.set_num_threads(k > 1)`` has been called
    in the process (2 cores, k = 2): every batch of 2 to 256 random float64 matrices with
    n >= 160 came out wrong (factors off by 1e4 and more, pivots of 0 with ``info`` 0, MKL
    printing "Parameter 6 was incorrect on entry to DLASWP"), and float32 batches with n >= 150
    did not return. Right, in the same state: n <= 144, one matrix at a time, a batch of one, the
    batched call on one thread (or without any set_num_threads call), batched Cholesky,
    triangular and LU solves. So above n = 128 with more than one thread each matrix is
    factored on its own (MKL still uses the threads inside each factorisation).
    """
    if K.device.type != "cpu" or K.dim() != 3 or K.shape[0] < 2 or K.shape[-1] <= 128 or torch.get_num_threads() < 2:
        return torch.linalg.lu_factor_ex(K)
    parts = [torch.linalg.lu_factor_ex(k) for k in K]
    return tuple(torch.stack([part[i] for part in parts]) for i in range(3))


class QPStatus(enum.IntEnum):
    SOLVED = 0
    MAX_ITER = 1
    PRIMAL_INFEASIBLE = 2
    DUAL_INFEASIBLE = 3  # unbounded objective
    NUMERICAL_ERROR = 4
    INACCURATE = 5  # stalled above the tolerance: usable, but check the residuals


@dataclass
class QPResult:
    """Per-task outcome of ``qp_solve``. Only ``z`` is differentiable.

    Attributes:
        z: ``[T, N]`` primal solution (NaN rows for infeasible, unbounded or failed tasks).
        lam: ``[T, m]`` inequality multipliers.  y: ``[T, neq]`` equality multipliers.
        s: ``[T, m]`` inequality slacks ``h - G z``.
        status: ``[T]`` int64 ``QPStatus`` codes.  iterations: ``[T]`` iterations each task used.
        primal_residual, dual_residual, gap: ``[T]`` relative residuals and complementarity gap
            at the returned iterate.
        converged: ``[T]`` bool, ``status == SOLVED``.
    """

    z: Tensor
    lam: Tensor
    y: Tensor
    s: Tensor
    status: Tensor
    iterations: Tensor
    primal_residual: Tensor
    dual_residual: Tensor
    gap: Tensor
    converged: Tensor

    def status_names(self) -> list[str]:
        return [QPStatus(int(v)).name for v in self.status]


def default_tol(dtype: torch.dtype) -> float:
    """Stopping tolerance on the relative residuals and gap: 1e-12 for float64, 1e-6 for float32.

    1e-12 (one or two iterations more than 1e-10) is what brings the badly scaled SVM dual to
    1e-8 of cvxpy's optimum relative to its largest entry; 1e-10 leaves up to 1.6e-6.
    """
    return 1e-12 if dtype == torch.float64 else 1e-6


# ----------------------------------------------------------------------------------------------
# KKT structure: dense
# ----------------------------------------------------------------------------------------------
class DenseKKT:
    """Dense ``Q [T, N, N]``, ``G [T, m, N]``, ``A [T, neq, N]`` (``m`` or ``neq`` may be 0)."""

    refine_steps = 3

    def __init__(self, Q: Tensor, G: Tensor, A: Tensor):
        self.Q, self.G, self.A = Q, G, A
        self.T, self.N = Q.shape[0], Q.shape[-1]
        self.m, self.neq = G.shape[1], A.shape[1]
        scale = Q.abs().amax(dim=(1, 2)) if self.N else Q.new_zeros(self.T)
        self.delta = (1e-10 * (1.0 + scale))[:, None]  # [T, 1] regularisation

    def Q_mv(self, z):
        return (self.Q @ z[..., None])[..., 0]

    def G_mv(self, z):
        return (self.G @ z[..., None])[..., 0]

    def GT_mv(self, v):
        return (self.G.mT @ v[..., None])[..., 0]

    def A_mv(self, z):
        return (self.A @ z[..., None])[..., 0]

    def AT_mv(self, y):
        return (self.A.mT @ y[..., None])[..., 0]

    def factor(self, s: Tensor, lam: Tensor):
        """Factor the Newton matrix at slacks ``s`` and multipliers ``lam`` (both ``[T, m]``).

        The reduced matrix ``Q + G^T W G`` has entries ``lam/s ~ 1e15`` along active constraint
        rows near the solution, which ruins an LU of it (residuals of 10% were measured). The
        augmented form keeps ``s/lam`` on the diagonal instead, which tends to 0 for active and
        to infinity for inactive constraints; both are harmless for a pivoted LU:

            [ Q    G^T     A^T ] [dz]   [r_z]
            [ G  -s/lam     0  ] [u ] = [ 0 ],     u = W G dz
            [ A     0       0  ] [dy]   [r_y]
        """
        T, N, m, neq = self.T, self.N, self.m, self.neq
        winv = s / lam  # [T, m]
        K = self.Q.new_zeros(T, N + m + neq, N + m + neq)
        K[:, :N, :N] = self.Q
        K[:, :N, N:N + m] = self.G.mT
        K[:, N:N + m, :N] = self.G
        K[:, N:N + m, N:N + m] = torch.diag_embed(-winv)
        K[:, :N, N + m:] = self.A.mT
        K[:, N + m:, :N] = self.A
        sign = torch.cat([K.new_ones(N), -K.new_ones(m + neq)])
        Kreg = K + torch.diag_embed(self.delta * sign)  # quasi-definite: +d primal, -d dual blocks
        LU, piv, info = lu_factor_batched(Kreg)
        bad = (info != 0) | ~torch.isfinite(LU).all(-1).all(-1)
        return (K, LU, piv), bad

    def solve(self, fac, rz: Tensor, ry: Tensor):
        """Solve ``[H A^T; A 0] [dz; dy] = [rz; ry]``; returns ``(dz, dy, u = W G dz)``.

        ``u`` comes out of the augmented system directly: forming ``W (G dz)`` afterwards
        multiplies ``lam/s ~ 1e14`` by a ``G dz`` that is pure rounding error on active rows.
        """
        K, LU, piv = fac
        N, m = self.N, self.m
        r = torch.cat([rz, rz.new_zeros(rz.shape[0], m), ry], -1)[..., None]  # [T, N + m + neq, 1]
        x = torch.linalg.lu_solve(LU, piv, r)
        for _ in range(self.refine_steps):  # refine against the unregularised matrix
            x = x + torch.linalg.lu_solve(LU, piv, r - K @ x)
        return x[:, :N, 0], x[:, N + m:, 0], x[:, N:N + m, 0]


# ----------------------------------------------------------------------------------------------
# The interior point loop, shared by every structure
# ----------------------------------------------------------------------------------------------
def _max_step(v: Tensor, dv: Tensor) -> Tensor:
    """Largest a in (0, inf] with v + a dv >= 0, per task ([T, m] -> [T])."""
    if v.shape[-1] == 0:
        return v.new_full(v.shape[:1], float("inf"))
    ratio = torch.where(dv < 0, -v / dv.clamp(max=-1e-300), float("inf"))
    return ratio.amin(-1)


def _inf_norm(v: Tensor) -> Tensor:
    return v.abs().amax(-1) if v.shape[-1] else v.new_zeros(v.shape[:1])


def interior_point(kkt, p: Tensor, h: Tensor, b: Tensor, *, max_iter: int, tol: float,
                   infeas_tol: float = 1e-8, certificates: bool = True):
    """Run Mehrotra's predictor-corrector on a KKT structure.

    Args:
        kkt: structure with ``Q_mv, G_mv, GT_mv, A_mv, AT_mv, factor(s, lam), solve(fac, rz, ry)``.
        p: ``[T, N]``; h: ``[T, m]``; b: ``[T, neq]``.
        max_iter: iteration cap. tol: stopping tolerance (``0`` runs exactly ``max_iter`` steps).
        infeas_tol: tolerance of the infeasibility and unboundedness certificates.
        certificates: look for them (structures known feasible and bounded may skip it).

    Returns:
        ``(z, lam, y, s, status, iterations, pres, dres, gap, factor)``; ``factor`` is the Newton
        factorization at the returned iterate (for the backward pass).
    """
    T, m = p.shape[0], h.shape[-1]
    dev, dt = p.device, p.dtype
    ones_m = torch.ones_like(h)
    # Start: z minimises 1/2 z^T Q z + p^T z + 1/2 ||G z - h||^2 s.t. A z = b, s = h - G z, lam = -s,
    # then moved into the interior (2 iterations fewer than a shift to 1 on MetaOptNet's SVM).
    fac, bad = kkt.factor(ones_m, ones_m)
    z, y, _ = kkt.solve(fac, -p + kkt.GT_mv(h), b)
    s = h - kkt.G_mv(z)
    lam = -s.clone()
    if m:
        # Mehrotra's heuristic (Nocedal & Wright 14.3): shift into the interior by 1.5x the most
        # negative entry, then balance the complementarity products. Scale-aware, unlike a shift to 1.
        s = s + (-1.5 * s.amin(-1, keepdim=True)).clamp(min=0)
        lam = lam + (-1.5 * lam.amin(-1, keepdim=True)).clamp(min=0)
        s = s + (s.abs().amax(-1, keepdim=True) * 1e-8).clamp(min=torch.finfo(dt).tiny)  # never exactly 0
        lam = lam + (lam.abs().amax(-1, keepdim=True) * 1e-8).clamp(min=torch.finfo(dt).tiny)
        sl = (s * lam).sum(-1, keepdim=True)
        s, lam = s + 0.5 * sl / lam.sum(-1, keepdim=True), lam + 0.5 * sl / s.sum(-1, keepdim=True)

    status = torch.full((T,), int(QPStatus.MAX_ITER), dtype=torch.int64, device=dev)
    status[bad] = int(QPStatus.NUMERICAL_ERROR)
    iterations = torch.zeros(T, dtype=torch.int64, device=dev)
    h_scale = 1.0 + torch.maximum(_inf_norm(h), _inf_norm(b))
    p_scale = 1.0 + _inf_norm(p)
    running = status == int(QPStatus.MAX_ITER)
    # The best iterate so far (by max(primal residual, dual residual, gap)) is what is returned:
    # below ~1e-12 the Newton steps lose accuracy and later iterates can be worse.
    best = None
    best_merit = torch.full((T,), float("inf"), dtype=dt, device=dev)
    stall = torch.zeros(T, dtype=torch.int64, device=dev)

    for it in range(max_iter + 1):
        Qz = kkt.Q_mv(z)
        GTl_ATy = kkt.GT_mv(lam) + kkt.AT_mv(y)
        Gz = kkt.G_mv(z)
        r_d = Qz + p + GTl_ATy
        r_in = Gz + s - h
        r_eq = kkt.A_mv(z) - b
        mu = (s * lam).sum(-1) / max(m, 1)
        pres = torch.maximum(_inf_norm(r_in), _inf_norm(r_eq)) / h_scale
        dres = _inf_norm(r_d) / p_scale
        obj = 0.5 * (z * Qz).sum(-1) + (p * z).sum(-1)
        # Relative gap: the SVM dual's objective is ~1e-2 with entries ~1e-4, so a "1 +" here
        # would turn the test into an absolute one and stop 3e-7 (relative) short of the optimum.
        gap = (s * lam).sum(-1) / obj.abs().clamp(min=1e-8)
        # merit is NaN when any iterate entry is: one check covers all of them
        merit = torch.maximum(torch.maximum(pres, dres), gap)
        finite = torch.isfinite(merit) & torch.isfinite(z).all(-1)
        MAXIT = int(QPStatus.MAX_ITER)
        status = torch.where(running & ~finite, int(QPStatus.NUMERICAL_ERROR), status)
        running = status == MAXIT

        better = running & (merit < best_merit)
        stall = torch.where(running & (merit < 0.9 * best_merit), 0, stall + 1)
        cur = (z, lam, y, s, pres, dres, gap)
        if best is None:
            best = cur
        else:
            best = tuple(torch.where(better.view(-1, *[1] * (c.dim() - 1)), c, bc) for c, bc in zip(cur, best))
        best_merit = torch.where(better, merit, best_merit)

        if tol > 0:
            status = torch.where(running & (merit <= tol), int(QPStatus.SOLVED), status)
        if certificates:
            # Primal infeasibility: lam >= 0, y with G^T lam + A^T y ~ 0 and h^T lam + b^T y < 0.
            t_p = -((h * lam).sum(-1) + (b * y).sum(-1))
            cert_p = (t_p > 0) & (_inf_norm(GTl_ATy) <= infeas_tol * t_p)
            # Unboundedness: a ray z with Q z ~ 0, A z ~ 0, G z <~ 0 and p^T z < 0.
            t_d = -(p * z).sum(-1)
            cert_d = (t_d > 0) & (_inf_norm(Qz) <= infeas_tol * t_d) & (_inf_norm(r_eq + b) <= infeas_tol * t_d)
            if m:
                cert_d &= Gz.amax(-1).clamp(min=0) <= infeas_tol * t_d
            still = status == MAXIT
            status = torch.where(still & cert_p, int(QPStatus.PRIMAL_INFEASIBLE), status)
            status = torch.where(still & cert_d & ~cert_p, int(QPStatus.DUAL_INFEASIBLE), status)
        # Near the solution (best merit <= 1e-6), no 10% progress in 5 iterations: the attainable
        # accuracy is reached. (Early iterates are not monotone in the merit; tol = 0 never stops.)
        if tol > 0:
            stalled = (status == MAXIT) & (stall >= 5) & (best_merit <= 1e-6)
            status = torch.where(stalled, torch.where(best_merit <= tol, int(QPStatus.SOLVED),
                                                      int(QPStatus.INACCURATE)), status)
        running = status == MAXIT
        if it == max_iter or not bool(running.any()):
            break

        w = lam / s
        fac, bad = kkt.factor(s, lam)
        status = torch.where(running & bad, int(QPStatus.NUMERICAL_ERROR), status)
        running = status == MAXIT

        def newton(rc):
            rz = -r_d - kkt.GT_mv(w * r_in - rc / s)
            dz, dy, u = kkt.solve(fac, rz, -r_eq)  # u = W G dz, computed without cancellation
            Gdz = kkt.G_mv(dz)
            dlam = u + w * r_in - rc / s
            ds = -r_in - Gdz
            return dz, dy, dlam, ds

        # Predictor (affine scaling), then Mehrotra's corrector with the same factorization.
        dz, dy, dlam, ds = newton(s * lam)
        if m:
            sl = torch.cat([s, lam], -1)
            a_aff = _max_step(sl, torch.cat([ds, dlam], -1)).clamp(max=1.0)[:, None]
            mu_aff = ((s + a_aff * ds) * (lam + a_aff * dlam)).sum(-1) / m
            sigma = (mu_aff / mu.clamp(min=torch.finfo(dt).tiny)).clamp(0, 1) ** 3
            rc = s * lam + ds * dlam - (sigma * mu)[:, None]
            dz, dy, dlam, ds = newton(rc)
            alpha = (0.99 * _max_step(sl, torch.cat([ds, dlam], -1))).clamp(max=1.0)
        else:
            alpha = torch.ones(T, dtype=dt, device=dev)
        alpha = torch.where(running, alpha, torch.zeros_like(alpha))[:, None]
        keep = ~running[:, None]
        z = torch.where(keep, z, z + alpha * dz)
        y = torch.where(keep, y, y + alpha * dy)
        lam = torch.where(keep, lam, lam + alpha * dlam)
        s = torch.where(keep, s, s + alpha * ds)
        iterations += running.to(torch.int64)

    # Infeasible / unbounded tasks keep their last iterate (the certificate); the others the best.
    cert = (status == int(QPStatus.PRIMAL_INFEASIBLE)) | (status == int(QPStatus.DUAL_INFEASIBLE))
    cur = (z, lam, y, s, pres, dres, gap)
    z, lam, y, s, pres, dres, gap = (
        torch.where(cert.view(-1, *[1] * (c.dim() - 1)), c, bc) for c, bc in zip(cur, best))
    # The factorization at the returned iterate, for the backward pass.
    fac, bad = kkt.factor(s.clamp(min=torch.finfo(dt).tiny), lam.clamp(min=torch.finfo(dt).tiny))
    return z, lam, y, s, status, iterations, pres, dres, gap, fac


def failed_mask(status: Tensor) -> Tensor:
    """``[T]`` bool: tasks without a usable solution (infeasible, unbounded, numerical error)."""
    return (status >= int(QPStatus.PRIMAL_INFEASIBLE)) & (status <= int(QPStatus.NUMERICAL_ERROR))


def may_have_failed(failed: Tensor) -> bool:
    """Whether code must select around the tasks flagged in ``failed``: on the CPU only when one is;
    on a GPU always, since the select costs less than the host sync that reading the flags needs."""
    return failed.device.type != "cpu" or bool(failed.any())


def mask_failed(z: Tensor, status: Tensor) -> Tensor:
    """NaN rows for the tasks without a usable solution (infeasible, unbounded, numerical error)."""
    failed = failed_mask(status)
    if not may_have_failed(failed):
        return z
    return torch.where(failed[:, None], torch.full_like(z, float("nan")), z)


def raise_if_failed(status: Tensor, op: str, allow_max_iter: bool = True) -> None:
    bad = failed_mask(status)
    if not allow_max_iter:
        bad |= status != int(QPStatus.SOLVED)
    bad = bad.nonzero().flatten().tolist()
    if bad:
        names = [QPStatus(int(status[i])).name for i in bad[:10]]
        raise RuntimeError(f"{op}: tasks {bad[:10]} were not solved: {names}")


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
class _DenseQPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Q, p, G, h, A, b, opts):
        max_iter, tol, infeas_tol = opts
        kkt = DenseKKT(Q, G, A)
        z, lam, y, s, status, its, pres, dres, gap, fac = interior_point(
            kkt, p, h, b, max_iter=max_iter, tol=tol, infeas_tol=infeas_tol)
        z = mask_failed(z, status)
        ctx.kkt, ctx.fac = kkt, fac
        ctx.save_for_backward(z, lam, y, s, status, Q, p, G, h, A, b)  # inputs: double-backward error
        ctx.mark_non_differentiable(lam, y, s, status, its, pres, dres, gap)
        return z, lam, y, s, status, its, pres, dres, gap

    @staticmethod
    @first_order_only("qp_solve")
    def backward(ctx, gz, *_):
        z, lam, y, s, status = ctx.saved_tensors[:5]
        kkt = ctx.kkt
        ok = ~failed_mask(status)[:, None]
        gz = torch.where(ok, gz, torch.zeros_like(gz))
        zz = torch.where(ok, z, torch.zeros_like(z))
        # Adjoint KKT system = the Newton system at the solution: H dz + A^T dy = -gz, A dz = 0.
        dz, dy, wGdz = kkt.solve(ctx.fac, -gz, torch.zeros_like(y))  # wGdz = D(lam) dlam = W G dz
        dz = torch.where(ok, dz, torch.zeros_like(dz))
        dy = torch.where(ok, dy, torch.zeros_like(dy))
        wGdz = torch.where(ok, wGdz, torch.zeros_like(wGdz))
        nd = ctx.needs_input_grad
        gQ = 0.5 * (dz[:, :, None] * zz[:, None, :] + zz[:, :, None] * dz[:, None, :]) if nd[0] else None
        gp = dz if nd[1] else None
        gG = (wGdz[:, :, None] * zz[:, None, :] + lam[:, :, None] * dz[:, None, :]) if nd[2] else None
        gh = -wGdz if nd[3] else None
        gA = (dy[:, :, None] * zz[:, None, :] + y[:, :, None] * dz[:, None, :]) if nd[4] else None
        gb = -dy if nd[5] else None
        return gQ, gp, gG, gh, gA, gb, None


def _check_qp_inputs(Q, p, G, h, A, b, check_convex):
    Q = check_batched(Q, "Q", 3, "[T, N, N]")
    T, N = Q.shape[0], Q.shape[1]
    if Q.shape[2] != N:
        raise ValueError(f"Q must be square [T, N, N], got {tuple(Q.shape)}")
    p = check_batched(p, "p", 2, f"[{T}, {N}]")
    check_like(p, "p", Q, "Q")
    if p.shape != (T, N):
        raise ValueError(f"p must have shape [{T}, {N}] to match Q {tuple(Q.shape)}, got {tuple(p.shape)}")
    asym = (Q - Q.mT).abs().amax() if N else Q.new_zeros(())
    if float(asym.detach()) > 100 * torch.finfo(Q.dtype).eps * (1.0 + float(Q.detach().abs().amax() if N else 0)):
        raise ValueError(f"Q must be symmetric, max |Q - Q^T| = {float(asym):.3g}")
    out = []
    for Mname, M, vname, v, rows in (("G", G, "h", h, "m"), ("A", A, "b", b, "neq")):
        if (M is None) != (v is None):
            raise ValueError(f"{Mname} and {vname} must be given together (both None for no constraint), "
                             f"got {Mname} {'None' if M is None else 'a tensor'} and {vname} "
                             f"{'None' if v is None else 'a tensor'}")
        if M is None:
            M, v = Q.new_zeros(T, 0, N), Q.new_zeros(T, 0)
        else:
            M = check_batched(M, Mname, 3, f"[{T}, {rows}, {N}]")
            check_like(M, Mname, Q, "Q")
            if M.shape[0] != T or M.shape[2] != N:
                raise ValueError(f"{Mname} must have shape [{T}, {rows}, {N}], got {tuple(M.shape)}")
            v = check_batched(v, vname, 2, f"[{T}, {M.shape[1]}]")
            check_like(v, vname, Q, "Q")
            if v.shape != M.shape[:2]:
                raise ValueError(f"{vname} must have shape {list(M.shape[:2])} to match {Mname} "
                                 f"{tuple(M.shape)}, got {tuple(v.shape)}")
        out += [M, v]
    if check_convex and N:
        ev = torch.linalg.eigvalsh(Q.detach())  # [T, N]
        floor = -1e3 * torch.finfo(Q.dtype).eps * (1.0 + ev.abs().amax(-1))
        bad = (ev[:, 0] < floor).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"Q must be positive semidefinite; tasks {bad[:10]} have eigenvalue "
                             f"{float(ev[bad[0], 0]):.3g} (pass check_convex=False to skip this check)")
    return Q, p, out[0], out[1], out[2], out[3]


def qp_solve(Q: Tensor, p: Tensor, G: Optional[Tensor] = None, h: Optional[Tensor] = None,
             A: Optional[Tensor] = None, b: Optional[Tensor] = None, *, max_iter: int = 50,
             tol: Optional[float] = None, infeas_tol: float = 1e-8, raise_on_failure: bool = False,
             check_convex: bool = True, compute_dtype: Optional[torch.dtype] = torch.float64) -> QPResult:
    """Solve a batch of convex QPs ``min 1/2 z^T Q z + p^T z s.t. G z <= h, A z = b``.

    Args:
        Q: ``[T, N, N]`` symmetric positive semidefinite (singular is fine).
        p: ``[T, N]``.
        G, h: ``[T, m, N]`` and ``[T, m]`` inequalities, or both None.
        A, b: ``[T, neq, N]`` and ``[T, neq]`` equalities, or both None (redundant rows are fine).
        max_iter: iteration cap.
        tol: stopping tolerance on the relative primal/dual residuals and the gap (default
            ``default_tol(compute dtype)``). ``tol=0`` runs exactly ``max_iter`` iterations
            (qpth's ``maxIter`` behaviour); such tasks report ``MAX_ITER``.
        infeas_tol: tolerance of the infeasibility / unboundedness certificates.
        raise_on_failure: raise ``RuntimeError`` if any task is infeasible, unbounded or failed.
        check_convex: check that ``Q`` is positive semidefinite (one ``eigvalsh`` per task).
        compute_dtype: dtype of the solver's arithmetic (float64 by default, also for float32
            inputs; ``None`` keeps the input dtype). ``z`` comes back in the input dtype.

    Returns:
        ``QPResult`` with the differentiable ``z`` ``[T, N]`` and per-task status, iterations,
        residuals and gap. The backward pass is first-order only.

    Example:
        >>> Q = torch.eye(2, dtype=torch.float64)[None]
        >>> r = qp_solve(Q, torch.tensor([[-1.0, -1.0]], dtype=torch.float64),
        ...              G=torch.tensor([[[1.0, 1.0]]], dtype=torch.float64), h=torch.ones(1, 1, dtype=torch.float64))
        >>> r.z.round(decimals=6), r.status_names()
        (tensor([[0.5000, 0.5000]], dtype=torch.float64), ['SOLVED'])
    """
    Q, p, G, h, A, b = _check_qp_inputs(Q, p, G, h, A, b, check_convex)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
    in_dtype = Q.dtype
    cdt = compute_dtype or in_dtype
    tol = default_tol(cdt) if tol is None else float(tol)
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    Q, p, G, h, A, b = (t.to(cdt) for t in (Q, p, G, h, A, b))
    z, lam, y, s, status, its, pres, dres, gap = _DenseQPFunction.apply(Q, p, G, h, A, b, (max_iter, tol, infeas_tol))
    if raise_on_failure:
        raise_if_failed(status, "qp_solve")
    return QPResult(z.to(in_dtype), lam.to(in_dtype), y.to(in_dtype), s.to(in_dtype), status, its,
                    pres, dres, gap, status == int(QPStatus.SOLVED))
