"""The MetaOptNet SVM head: the Crammer-Singer multi-class SVM dual by a structure-exploiting IPM.

The dual of MetaOptNet (Lee et al. 2019, ``MetaOptNet_SVM_CS``), for one task with kernel ``K``
``[n, n]``, one-hot labels ``Y`` ``[n, c]``, ``C`` and MetaOptNet's diagonal term ``r`` (1.0):

    min_a  1/2 sum_k a_k^T (K + r I) a_k - sum_k y_k^T a_k
    s.t.   a_k <= C y_k  (k = 1..c),     sum_k a_k = 0         (a_k in R^n: class k's column)

has ``n c`` variables. Stored class-major, the interior-point Newton matrix is

    [ blockdiag_k(K + r I + W_k)   E^T ]        E = [I_n ... I_n]   (the n equalities)
    [ E                            0   ]

so one iteration factors ``c`` independent ``[n, n]`` blocks ``H_k`` and the ``[n, n]`` Schur
complement ``S = sum_k H_k^-1`` (``(c + 1) n^3 / 3`` flops against ``(n c)^3 / 3`` for the dense
KKT matrix: 21x fewer for 5-way). Every variable has a bound, so ``W_k > 0`` and all blocks are
positive definite even for a singular ``K`` (duplicate or zero support points) and ``r = 0``.

Backends: ``"cpu"`` runs the whole solve in compiled code (``torch.ops.fastmaml.svm_cs_ipm``:
tasks in lockstep groups, one SIMD lane per task, same algorithm and iterates), ``"triton"`` runs
it on the GPU as one Triton program per task with the task's matrices in registers for the whole
solve (``kernels/svm_cs.py``; ``n <= 32`` support points and ``n_way <= 8``: MetaOptNet's 1-shot
and 5-shot), ``"reference"`` is the batched PyTorch loop below. ``"auto"`` takes the compiled
solver for CPU tensors, the Triton kernel for CUDA tensors where the task fits it, else the
reference. The backward pass factors the Newton system at the returned iterate's barrier
weights once: in PyTorch (``"reference"``), in a second Triton program per task (``"triton"``) or
in compiled code (``"cpu"``). The generic
``qp_solve`` on the Kronecker-built problem (``crammer_singer_qp_reference``) is a second
reference; the tests check all of them against cvxpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..backend import resolve_backend
from ..ops.buffers import bmm_into_gradient_buffer
from ..ops.task_matmul import runs_compiled, task_matmul_nt, task_matmul_tn
from ._common import (DeferredChecks, check_batched, check_finite_through, check_labels, check_like, check_n_way,
                      check_values, first_order_only)
from .qp import (QPResult, QPStatus, default_tol, failed_mask, interior_point, mask_failed, may_have_failed,
                 raise_if_failed)
from .ridge import factor_inverse


def regularized_kernel(K: Tensor, diag_reg: float, input_eps: float = 0.0) -> Tensor:
    """``K + r I`` with ``r = max(diag_reg, n * input_eps * max diag(K))`` per task ``[T, n, n]``.

    The floor ``n * eps(input dtype) * max diag(K)``: a float32 Gram matrix can be indefinite by
    that much, which breaks the Cholesky factorizations once the bound weights W -> 0 (r ~ 0 with
    a singular K). It is below the rounding of K itself, and MetaOptNet's r = 1 is far above it.
    """
    n = K.shape[1]
    jitter = n * input_eps * K.diagonal(dim1=-2, dim2=-1).abs().amax(-1)  # [T]
    eye = torch.eye(n, dtype=K.dtype, device=K.device)
    return K + jitter.clamp(min=diag_reg)[:, None, None] * eye


class CrammerSingerKKT:
    """KKT structure of the Crammer-Singer dual, variables class-major ``[T, c, n]`` flattened."""

    def __init__(self, K: Tensor, n_way: int, diag_reg: float, input_eps: float = 0.0):
        self.T, self.n = K.shape[0], K.shape[1]
        self.c = n_way
        self.Kr = regularized_kernel(K, diag_reg, input_eps)  # [T, n, n]
        self.N = self.m = self.n * n_way
        self.neq = self.n

    def _cn(self, z):
        return z.reshape(self.T, self.c, self.n)

    def Q_mv(self, z):
        return (self._cn(z) @ self.Kr).reshape(self.T, -1)  # Kr symmetric: (Kr a_k)^T = a_k^T Kr

    def G_mv(self, z):
        return z

    def GT_mv(self, v):
        return v

    def A_mv(self, z):
        return self._cn(z).sum(1)  # [T, n]

    def AT_mv(self, y):
        return y[:, None, :].expand(self.T, self.c, self.n).reshape(self.T, -1)

    def factor(self, s: Tensor, lam: Tensor):
        return self.factor_weights(self._cn(lam / s))

    def factor_weights(self, w: Tensor):
        """Factor the Newton matrix for the barrier weights ``w`` ``[T, c, n]``."""
        H = self.Kr[:, None] + torch.diag_embed(w)  # [T, c, n, n]
        L, info = torch.linalg.cholesky_ex(H)
        Hinv = factor_inverse(L)  # [T, c, n, n]
        Ls, info_s = torch.linalg.cholesky_ex(Hinv.sum(1))  # Schur complement [T, n, n]
        bad = (info != 0).any(-1) | (info_s != 0)
        return (w, L, Ls), bad

    def solve(self, fac, rz: Tensor, ry: Tensor):
        """Solve the Newton system; returns ``(dz, dy, u = W dz)``."""
        w, L, Ls = fac
        R = self._cn(rz)[..., None]  # [T, c, n, 1]
        U = torch.cholesky_solve(R, L)  # H_k^-1 r_k
        dy = torch.cholesky_solve((U.sum(1) - ry[..., None]), Ls)  # [T, n, 1]
        dZ = U - torch.cholesky_solve(dy[:, None].expand(-1, self.c, -1, -1), L)  # [T, c, n, 1]
        dZ = dZ[..., 0]
        # u = W dz; on active bounds (w large) from the block rows, u = r - dy - Kr dz, which
        # avoids multiplying a huge w by a rounding-level dz.
        u_rows = self._cn(rz) - dy[:, None, :, 0] - dZ @ self.Kr
        u = torch.where(w > 1.0, u_rows, w * dZ)
        return dZ.reshape(self.T, -1), dy[..., 0], u.reshape(self.T, -1)


def _register_native_fakes():
    """Shapes of the compiled ops' outputs, for torch.compile / meta tensors (opcheck checks them)."""
    from .._extension import HAS_NATIVE

    if not HAS_NATIVE:
        return

    @torch.library.register_fake("fastmaml::svm_cs_ipm")
    def _(kernel, labels, n_way, C, diag_reg, floor_eps, max_iter, tol):
        T, n = kernel.shape[0], kernel.shape[1]
        z = kernel.new_empty(T, n_way, n)
        per_task = kernel.new_empty(T)
        as_int = labels.new_empty(T)
        return z, torch.empty_like(z), as_int, torch.empty_like(as_int), per_task, torch.empty_like(per_task), \
            torch.empty_like(per_task)

    @torch.library.register_fake("fastmaml::svm_cs_kkt_solve")
    def _(kernel, diag_reg, floor_eps, weights, rhs):
        return torch.empty_like(rhs, memory_format=torch.contiguous_format)


_register_native_fakes()


# ----------------------------------------------------------------------------------------------
# The solve and its adjoint, shared by the two autograd Functions below
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Settings:
    """Validated solver settings (``input_eps``: the float32 floor of ``regularized_kernel``)."""

    n_way: int
    C: float
    diag_reg: float
    max_iter: int
    tol: float
    input_eps: float
    backend: str
    compute_dtype: torch.dtype


def _solve_forward(K: Tensor, labels: Tensor, cfg: _Settings):
    """Solve with ``K`` ``[T, n, n]`` in the compute dtype; no autograd.

    Returns ``(z [T, c n] class-major with NaN rows for failed tasks, status, iterations, pres,
    dres, gap, state)``; ``state`` is what ``_kernel_grad`` needs.
    """
    T, n, _ = K.shape
    if cfg.backend == "cpu":  # K + r I is formed inside the kernel
        z, w, status, its, pres, dres, gap = torch.ops.fastmaml.svm_cs_ipm(
            K, labels, cfg.n_way, cfg.C, cfg.diag_reg, cfg.input_eps, cfg.max_iter, cfg.tol)
        return mask_failed(z.reshape(T, -1), status), status, its, pres, dres, gap, ("cpu", w)
    if cfg.backend == "triton":
        from ..kernels import svm_cs

        Kr = regularized_kernel(K, cfg.diag_reg, cfg.input_eps)
        z, w, status, its, pres, dres, gap = svm_cs.svm_cs_ipm(Kr, labels, cfg.n_way, cfg.C, cfg.max_iter, cfg.tol)
        return mask_failed(z.reshape(T, -1), status), status, its, pres, dres, gap, ("triton", w, Kr)
    kkt = CrammerSingerKKT(K, cfg.n_way, cfg.diag_reg, cfg.input_eps)
    y_cm = torch.nn.functional.one_hot(labels, cfg.n_way).to(K.dtype).mT.reshape(T, -1)  # [T, c n]
    z, lam, y, s, status, its, pres, dres, gap, fac = interior_point(
        kkt, -y_cm, cfg.C * y_cm, K.new_zeros(T, n), max_iter=cfg.max_iter, tol=cfg.tol,
        certificates=False)  # always feasible and bounded
    return mask_failed(z, status), status, its, pres, dres, gap, ("reference", kkt, fac)


def _kernel_grad(K: Tensor, z: Tensor, status: Tensor, g_alpha: Tensor, state, cfg: _Settings) -> Tensor:
    """``dL/dK`` ``[T, n, n]`` from ``g_alpha`` ``[T, n, c]`` at the solution ``z`` (implicit function theorem)."""
    T, n, c = g_alpha.shape[0], g_alpha.shape[1], cfg.n_way
    failed = failed_mask(status)
    any_failed = may_have_failed(failed)  # failed tasks (NaN solutions) get zero gradients
    if any_failed:
        ok = ~failed
        g_alpha = torch.where(ok[:, None, None], g_alpha, torch.zeros_like(g_alpha))
        z = torch.where(ok[:, None], z, torch.zeros_like(z))
    gz = g_alpha.mT  # [T, c, n]
    # Adjoint KKT system = the Newton system at the solution (one more solve).
    if state[0] == "cpu":
        dz = torch.ops.fastmaml.svm_cs_kkt_solve(K, cfg.diag_reg, cfg.input_eps, state[1], -gz.contiguous())
        dz = dz.reshape(T, -1)
    elif state[0] == "triton":  # one more program per task: factor at the returned weights and solve
        from ..kernels import svm_cs

        w = torch.where(failed[:, None, None], torch.ones_like(state[1]), state[1]) if any_failed else state[1]
        dz = svm_cs.svm_cs_kkt_solve(state[2], w, -gz).reshape(T, -1)
    else:
        dz, _, _ = state[1].solve(state[2], -gz.reshape(T, -1), gz.new_zeros(T, n))
    if any_failed:
        dz = torch.where(ok[:, None], dz, torch.zeros_like(dz))
    dZ, Z = dz.reshape(T, c, n), z.reshape(T, c, n)
    # Q = I_c (x) (K + r I): grad_K = sum_k sym(dz_k a_k^T).
    gK = dZ.mT @ Z
    return 0.5 * (gK + gK.mT)


class _CrammerSingerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, K, labels, cfg):
        T, n, _ = K.shape
        z, status, its, pres, dres, gap, state = _solve_forward(K, labels, cfg)
        ctx.cfg, ctx.state = cfg, state
        ctx.save_for_backward(z, status, K)  # K: also the tie for the double-backward error
        ctx.mark_non_differentiable(status, its, pres, dres, gap)
        return z.reshape(T, cfg.n_way, n).mT, status, its, pres, dres, gap  # alpha [T, n, c]

    @staticmethod
    @first_order_only("svm_crammer_singer_solve")
    def backward(ctx, g_alpha, *_):
        z, status, K = ctx.saved_tensors
        return _kernel_grad(K, z, status, g_alpha, ctx.state, ctx.cfg), None, None


class _SVMWeightsLogitsFn(torch.autograd.Function):
    """``logits = Xq W`` with ``W = X^T alpha``, ``alpha`` the SVM dual of ``K = X X^T``; fused backward.

    Backward (``gP`` the incoming gradient, ``gA`` one on ``alpha`` if the caller used it):

        gW^T = gP^T Xq,  gXq = gP W^T,  g_alpha = X gW + gA,  gK = adjoint solve (g_alpha),
        gX = alpha gW^T + (gK + gK^T) X = alpha gW^T + 2 gK X      (gK is symmetric)

    ``gX`` is one ``[T, n, d]`` buffer (``alpha gW^T`` then a ``baddbmm_`` of ``2 gK X`` into it)
    where autograd allocates three ``[T, n, d]`` tensors and sums them: at 5-way 5-shot, d = 16000,
    75 queries, 50 against 68 ms for the feature products forward + backward on one thread.
    """

    @staticmethod
    def forward(ctx, X, Xq, labels, cfg, checks=None):  # X [T, n, d], Xq [T, q, d]
        # checks: given when the features' finite checks ride on X X^T's diagonal (before the
        # solve) and on the logits (after), see svm_logits.
        T, n, _ = X.shape
        K = task_matmul_nt(X, X)  # [T, n, n]
        if checks is not None:
            check_finite_through(K.diagonal(dim1=-2, dim2=-1), X, "support_features", "X X^T", checks)
            checks.verify()
        Kc = K.to(cfg.compute_dtype)
        z, status, its, pres, dres, gap, state = _solve_forward(Kc, labels, cfg)
        alpha = z.reshape(T, cfg.n_way, n).mT.to(X.dtype)  # [T, n, c]
        Wt = task_matmul_tn(alpha, X)  # [T, c, d]: in this layout every backward product is written contiguously
        ctx.cfg, ctx.state = cfg, state
        ctx.save_for_backward(X, Xq, alpha, Wt, Kc, z, status)
        ctx.mark_non_differentiable(status, its, pres, dres, gap)
        logits = task_matmul_nt(Xq, Wt)  # [T, q, c]
        if checks is not None:
            check_finite_through(logits, Xq, "query_features", "the logits Xq W", checks)
            checks.verify()
        return logits, alpha, status, its, pres, dres, gap

    @staticmethod
    @first_order_only("svm_logits")
    def backward(ctx, gP, g_alpha_out, *_):
        X, Xq, alpha, Wt, Kc, z, status = ctx.saved_tensors
        need_X, need_Xq = ctx.needs_input_grad[:2]
        gWt = task_matmul_tn(gP, Xq)  # [T, c, d]
        gXq = bmm_into_gradient_buffer(gP, Wt) if need_Xq else None  # [T, q, d], a reused CPU block
        gX = None
        if need_X:
            g_alpha = task_matmul_nt(X, gWt)  # [T, n, c]
            if g_alpha_out is not None:
                g_alpha = g_alpha + g_alpha_out
            gK = _kernel_grad(Kc, z, status, g_alpha.to(Kc.dtype), ctx.state, ctx.cfg).to(X.dtype)
            gX = bmm_into_gradient_buffer(alpha, gWt).baddbmm_(gK, X, alpha=2.0)  # [T, n, d]
        return gX, gXq, None, None, None


def _check_svm_kernel(kernel, checks: DeferredChecks) -> Tensor:
    K = check_batched(kernel, "kernel", 3, "[T, n, n]", checks)
    n = K.shape[1]
    if K.shape[2] != n:
        raise ValueError(f"kernel must be square [T, n, n], got {tuple(K.shape)}")
    if n < 1:
        raise ValueError("kernel must have at least one support point (n >= 1)")
    Kd = K.detach()
    asym, kmax = (Kd - Kd.mT).abs().amax(), Kd.abs().amax()

    def diagnose():
        raise ValueError(f"kernel must be symmetric, max |K - K^T| = {float(asym):.3g}")

    checks.add(asym <= 100 * torch.finfo(K.dtype).eps * (1.0 + kmax), diagnose)
    return K


def _settings(labels, T: int, n: int, like: Tensor, n_way, C, diag_reg, max_iter, tol, compute_dtype,
              backend, checks: Optional[DeferredChecks] = None) -> _Settings:
    """Checks everything but the kernel; ``like`` gives the input dtype and device. The labels'
    range joins ``checks`` when given."""
    n_way = check_n_way(n_way)
    check_labels(labels, "support_labels", T, n, n_way, like.device, checks)
    for name, v in (("C", C), ("diag_reg", diag_reg)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(v).__name__}")
        if not (v == v and abs(v) != float("inf")):
            raise ValueError(f"{name} must be finite, got {v}")
    if C <= 0:
        raise ValueError(f"C must be > 0, got {C}")
    if diag_reg < 0:
        raise ValueError(f"diag_reg must be >= 0, got {diag_reg}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
    cdt = compute_dtype or like.dtype
    if cdt not in (torch.float32, torch.float64):
        raise TypeError(f"compute_dtype must be torch.float32, torch.float64 or None, got {compute_dtype}")
    tol = default_tol(cdt) if tol is None else float(tol)
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    input_eps = torch.finfo(like.dtype).eps if like.dtype != cdt else 0.0
    chosen = resolve_backend(like.device, backend, op="svm_cs_ipm")
    if chosen == "triton":
        from ..kernels import svm_cs

        if not svm_cs.supports(n, n_way):
            if backend == "triton":
                raise ValueError(f"backend 'triton' solves tasks of at most {svm_cs.MAX_SUPPORT} support points "
                                 f"and {svm_cs.MAX_WAY} classes, got n={n}, n_way={n_way}; use backend='auto'")
            chosen = "reference"
    return _Settings(n_way, float(C), float(diag_reg), max_iter, tol, input_eps, chosen, cdt)


def _result(alpha, status, its, pres, dres, gap, like: Tensor) -> QPResult:
    empty = like.new_zeros(like.shape[0], 0)
    return QPResult(alpha, empty, empty, empty, status, its, pres, dres, gap, status == int(QPStatus.SOLVED))


def svm_crammer_singer_solve(kernel: Tensor, support_labels: Tensor, n_way: int, *, C: float = 0.1,
                             diag_reg: float = 1.0, max_iter: int = 50, tol: Optional[float] = None,
                             raise_on_failure: bool = False,
                             compute_dtype: Optional[torch.dtype] = torch.float64,
                             backend: str = "auto") -> QPResult:
    """Batched Crammer-Singer SVM dual (MetaOptNet's ``SVM_CS``) with the block-structured IPM.

    Args:
        kernel: ``[T, n, n]`` support kernel matrix (``X X^T``), symmetric PSD; differentiable.
        support_labels: ``[T, n]`` int64 in ``[0, n_way)``.
        n_way: number of classes ``c``.
        C: box constraint (MetaOptNet: 0.1), > 0.
        diag_reg: ``r`` added to the kernel's diagonal (MetaOptNet adds 1.0), >= 0.
        max_iter: iteration cap; tol: stopping tolerance (default ``default_tol``; 0 = fixed
            ``max_iter`` iterations).
        raise_on_failure: raise ``RuntimeError`` when a task fails.
        compute_dtype: solver arithmetic (float64 by default, also for float32 kernels). In float32
            the badly scaled dual is only solved to about 1e-3 relative to its largest entry.
        backend: ``"auto"`` (compiled ``"cpu"`` for CPU tensors; ``"triton"`` for CUDA tensors when
            ``n <= 32`` and ``n_way <= 8``; else ``"reference"``), ``"cpu"``, ``"triton"`` or
            ``"reference"`` (the batched PyTorch loop); all take the same iterates.

    Returns:
        ``QPResult`` whose ``z`` is the dual solution ``alpha`` ``[T, n, n_way]`` (sample-major, as
        MetaOptNet's ``qp_sol.reshape(T, n, n_way)``), differentiable w.r.t. ``kernel`` (first
        order). ``lam``, ``y``, ``s`` are empty (not kept).

    Example:
        >>> X = torch.randn(2, 5, 16, dtype=torch.float64)
        >>> labels = torch.arange(5).repeat(2, 1)
        >>> r = svm_crammer_singer_solve(X @ X.mT, labels, 5)
        >>> r.z.shape, r.status_names()
        (torch.Size([2, 5, 5]), ['SOLVED', 'SOLVED'])
    """
    checks = DeferredChecks()  # the kernel's and labels' values: one host sync
    K = _check_svm_kernel(kernel, checks)
    cfg = _settings(support_labels, K.shape[0], K.shape[1], K, n_way, C, diag_reg, max_iter, tol, compute_dtype,
                    backend, checks)
    checks.verify()
    alpha, status, its, pres, dres, gap = _CrammerSingerFunction.apply(K.to(cfg.compute_dtype), support_labels, cfg)
    if raise_on_failure:
        raise_if_failed(status, "svm_crammer_singer_solve")
    return _result(alpha.to(K.dtype), status, its, pres, dres, gap, K)


def svm_logits(support_features: Tensor, support_labels: Tensor, query_features: Tensor, n_way: int, *,
               C: float = 0.1, diag_reg: float = 1.0, max_iter: int = 50, tol: Optional[float] = None,
               raise_on_failure: bool = False, compute_dtype: Optional[torch.dtype] = torch.float64,
               backend: str = "auto") -> tuple[Tensor, QPResult]:
    """MetaOptNet SVM head from features: ``logits[t, j, k] = sum_i alpha[t, i, k] <xq_j, x_i>``.

    Computed as ``(Xq X^T) alpha`` when ``q n <= c (n + q)`` (1-shot), else as ``Xq (X^T alpha)``,
    whichever takes fewer flops (the feature products dominate at large ``d``); both routes have
    a fused first-order backward (one buffer per feature gradient).

    Args:
        support_features: ``[T, n, d]``. query_features: ``[T, q, d]``.
        support_labels: ``[T, n]`` int64. n_way: classes.
        C, diag_reg, max_iter, tol, raise_on_failure, compute_dtype, backend: as in
            ``svm_crammer_singer_solve``.

    Returns:
        ``(logits [T, q, n_way], QPResult)``; logits and ``QPResult.z`` are differentiable w.r.t.
        both feature sets (first order).

    Example:
        >>> X, Xq = torch.randn(2, 10, 64), torch.randn(2, 15, 64)
        >>> labels = torch.arange(5).repeat_interleave(2).repeat(2, 1)
        >>> logits, res = svm_logits(X, labels, Xq, 5)
        >>> logits.shape, res.status_names()
        (torch.Size([2, 15, 5]), ['SOLVED', 'SOLVED'])
    """
    from .ridge import gram_pair

    checks = DeferredChecks()  # the features' and labels' values: one host sync
    # On the CPU the features' finite checks ride on products computed anyway (X X^T's diagonal,
    # and Xq X^T or the logits from the compiled thin kernels; see heads._common.check_finite_through)
    # instead of a pass over each: ~9% of the call at d = 16000. Shapes are checked first.
    X = check_batched(support_features, "support_features", 3, "[T, n, d]", checks, values=False)
    Xq = check_batched(query_features, "query_features", 3, "[T, q, d]", checks, values=False)
    check_like(Xq, "query_features", X, "support_features")
    if Xq.shape[0] != X.shape[0] or Xq.shape[2] != X.shape[2]:
        raise ValueError(f"query_features must have shape [{X.shape[0]}, q, {X.shape[2]}] to match "
                         f"support_features {tuple(X.shape)}, got {tuple(Xq.shape)}")
    T, n, q = X.shape[0], X.shape[1], Xq.shape[1]
    n_way = check_n_way(n_way)
    gram_route = q * n <= n_way * (n + q)  # 1-shot: the query Gram matrix is as cheap as the weights
    values_here = runs_compiled(X, n if gram_route else n_way)
    if not values_here:
        check_values(X, "support_features", checks)
        check_values(Xq, "query_features", checks)
    kw = dict(C=C, diag_reg=diag_reg, max_iter=max_iter, tol=tol, compute_dtype=compute_dtype, backend=backend)
    if gram_route:
        checks.verify()  # shapes, and the features' values unless checked below
        K, Kq = gram_pair(X, Xq)  # [T, n, n], [T, q, n]
        if values_here:
            check_finite_through(K.diagonal(dim1=-2, dim2=-1), X, "support_features", "X X^T", checks)
            check_finite_through(Kq, Xq, "query_features", "Xq X^T", checks)
            checks.verify()
        res = svm_crammer_singer_solve(K, support_labels, n_way, raise_on_failure=raise_on_failure, **kw)
        return Kq @ res.z, res
    # Otherwise through the primal weights W = X^T alpha [T, d, c]: (n + q) c d flops instead of
    # q n d for Xq X^T (5x fewer at 5-way 5-shot), forward and backward. X X^T is symmetric by
    # construction and finite when X is (checked), so the kernel checks are not repeated.
    cfg = _settings(support_labels, T, n, X, n_way, **kw, checks=checks)
    checks.verify()
    logits, alpha, status, its, pres, dres, gap = _SVMWeightsLogitsFn.apply(X, Xq, support_labels, cfg,
                                                                            checks if values_here else None)
    if raise_on_failure:
        raise_if_failed(status, "svm_logits")
    return logits, _result(alpha, status, its, pres, dres, gap, X)
