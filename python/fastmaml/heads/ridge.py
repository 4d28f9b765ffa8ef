"""Batched ridge regression through one Cholesky factorization per task.

``ridge_solve``: ``W[t] = argmin_W ||X[t] W - Y[t]||^2 + lam[t] ||W||^2``, returned as ``[T, d, c]``.
``ridge_predict``: the query predictions ``Xq[t] W[t]`` without forming ``W`` when ``n < d``.

The form is chosen by shape: when ``n < d`` the dual (Woodbury) form
``W = X^T (X X^T + lam I)^-1 Y`` factors an ``[n, n]`` matrix, otherwise the primal form
``W = (X^T X + lam I)^-1 X^T Y`` factors a ``[d, d]`` one. Either way there is exactly one
``cholesky_ex`` per task, no explicit inverse, and the backward pass reuses the factor
(the adjoint of ``Z = K^-1 B`` is ``K^-1 gZ`` with the same factor).

Second order: every backward formula here is written with differentiable ops (the adjoint solve
calls the same autograd function with the saved factor), so ``gradgradcheck`` passes and the heads
can sit inside a MAML inner loop.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..ops.buffers import bmm_into_gradient_buffer
from ..ops.task_matmul import runs_compiled, task_matmul_nt, task_matmul_tn
from ._common import DeferredChecks, check_batched, check_finite_through, check_like, check_values, per_task_scalar

Scalar = Union[float, Tensor]
FORMS = ("auto", "dual", "primal")


# ----------------------------------------------------------------------------------------------
# SPD solve with a reusable factor
# ----------------------------------------------------------------------------------------------
def cholesky_factor(K: Tensor, name: str = "K", singular_check: Optional[Tensor] = None,
                    checks: Optional[DeferredChecks] = None) -> Tensor:
    """Lower Cholesky factor of a batch of SPD matrices; a clear error names the failing tasks.

    Args:
        K: ``[T, m, m]`` symmetric positive definite matrices (only the lower triangle is read).
        name: how the error message calls ``K``.
        singular_check: ``[T]`` bool, tasks for which a numerically singular ``K`` (pivot ratio
            below ``m * eps``) is also an error (used for ``lam == 0``).
        checks: verify positive definiteness with these deferred checks instead of now.

    Returns:
        ``L`` of shape ``[T, m, m]`` with ``K = L L^T``.

    Raises:
        ValueError: some ``K[t]`` is not positive definite.
    """
    L, info = torch.linalg.cholesky_ex(K)
    failed = info != 0
    if singular_check is not None:
        # An exactly singular K can factor "successfully" with a rounding-level pivot; for the
        # tasks in singular_check ([T] bool, lam == 0) treat pivots below m * eps as failure.
        diag = L.diagonal(dim1=-2, dim2=-1).abs()  # [T, m]
        ratio = (diag.amin(-1) / diag.amax(-1).clamp(min=torch.finfo(K.dtype).tiny)) ** 2
        failed = failed | (singular_check & (ratio < K.shape[-1] * torch.finfo(K.dtype).eps))
        info = torch.where(failed & (info == 0), torch.full_like(info, K.shape[-1]), info)

    def diagnose():
        bad = failed.nonzero().flatten().tolist()
        raise ValueError(
            f"{name} is not positive definite for tasks {bad[:10]}{'...' if len(bad) > 10 else ''} "
            f"(leading minor {int(info[bad[0]])} of {K.shape[-1]} failed); with lam = 0 this happens when "
            "the features are linearly dependent: use lam > 0"
        )

    if checks is not None:
        checks.add(~failed.any(), diagnose)
    elif bool(failed.any()):
        diagnose()
    return L


def factor_solve(B: Tensor, L: Tensor, triangular: Optional[bool] = None) -> Tensor:
    """``(L L^T)^-1 B`` for a batch of lower factors ``L`` [T, m, m] and right-hand sides [T, m, c].

    On CUDA as two batched triangular solves: cuSOLVER's batched ``potrs`` takes one right-hand
    side only, so ``torch.cholesky_solve`` with ``c > 1`` columns may loop over the batch (PyTorch's
    own measurement: 16 x [16, 16] in 158 us looped against 30 us as two triangular solves, pull
    request 175898). On the CPU, LAPACK's ``potrs``. ``triangular`` forces either form.
    """
    if triangular is None:
        triangular = B.device.type == "cuda" and B.shape[-1] > 1
    if triangular:
        return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, B, upper=False), upper=True)
    return torch.cholesky_solve(B, L)


def factor_inverse(L: Tensor, triangular: Optional[bool] = None) -> Tensor:
    """``(L L^T)^-1`` for a batch of lower factors ``L`` [..., m, m].

    On CUDA as ``L^-T L^-1`` from one batched triangular solve and one batched product:
    ``torch.cholesky_inverse`` solves with the m identity columns, which cuSOLVER's one-column
    batched ``potrs`` cannot batch (see ``factor_solve``). On the CPU, LAPACK's ``potri``.
    """
    if triangular is None:
        triangular = L.device.type == "cuda"
    if triangular:
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand(L.shape)
        Linv = torch.linalg.solve_triangular(L, eye, upper=False)
        return Linv.mT @ Linv
    return torch.cholesky_inverse(L)


class _SPDSolve(torch.autograd.Function):
    """``Z = K^-1 B`` for SPD ``K`` (lower triangle read), factor ``L`` computed once or given.

    ``K`` is treated as a general matrix in the backward (``gK = -K^-1 gZ Z^T``), which is the
    right derivative whenever ``K`` is built symmetric by the caller (as ``X X^T + lam I`` is).
    The backward calls this function again with the saved factor, so it is differentiable itself.
    """

    @staticmethod
    def forward(ctx, K, B, L, singular_check=None):  # K [T, m, m], B [T, m, c], L [T, m, m] or None
        if L is None:
            L = cholesky_factor(K, "the ridge system matrix", singular_check)
        Z = factor_solve(B, L)  # [T, m, c]
        ctx.save_for_backward(K, Z)
        ctx.L = L  # a constant of the backward: no gradient flows into the factor
        return Z

    @staticmethod
    def backward(ctx, gZ):
        K, Z = ctx.saved_tensors
        need_K, need_B = ctx.needs_input_grad[:2]
        gB = _SPDSolve.apply(K, gZ, ctx.L)  # K^-1 gZ with the forward's factor
        gK = -gB @ Z.mT if need_K else None
        return gK, (gB if need_B else None), None, None


def spd_solve(K: Tensor, B: Tensor, L: Optional[Tensor] = None, singular_check: Optional[Tensor] = None) -> Tensor:
    """Differentiable ``K^-1 B`` for a batch of SPD matrices through one Cholesky factorization.

    Args:
        K: ``[T, m, m]`` symmetric positive definite (the caller guarantees symmetry).
        B: ``[T, m, c]`` right-hand sides.
        L: optional ``[T, m, m]`` lower factor of ``K`` to reuse.
        singular_check: optional ``[T]`` bool: tasks where a numerically singular ``K`` is an error.

    Returns:
        ``[T, m, c]``; its backward reuses the factor and is differentiable again.

    Example:
        >>> K = torch.eye(3).expand(2, 3, 3) * 2
        >>> spd_solve(K, torch.ones(2, 3, 1))[0, :, 0]
        tensor([0.5000, 0.5000, 0.5000])
    """
    return _SPDSolve.apply(K, B, L, singular_check)


# ----------------------------------------------------------------------------------------------
# Gram matrices with a fused, memory-lean backward
# ----------------------------------------------------------------------------------------------
class _GramPair(torch.autograd.Function):
    """``(X X^T, Xq X^T)`` with one ``[T, n, d]`` and one ``[T, q, d]`` buffer in the backward.

    Plain autograd of the two ``bmm`` calls allocates three ``[T, n, d]`` partial gradients for ``X``
    and sums them; here ``gX = gQ^T Xq + (gG + gG^T) X`` is accumulated in place into one buffer
    (``baddbmm_``). The backward is made of differentiable ops, so second order still works.
    """

    @staticmethod
    def forward(X, Xq):  # X [T, n, d], Xq [T, q, d]
        return task_matmul_nt(X, X), task_matmul_nt(Xq, X)  # thin when n is small (1-shot)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, gG, gQ):
        X, Xq = ctx.saved_tensors
        gX = gXq = None
        if gG is not None:
            gG = gG + gG.mT  # [T, n, n]
        if ctx.needs_input_grad[0]:
            if gQ is not None:
                gX = task_matmul_tn(gQ, Xq)  # [T, n, d]
                if gG is not None:
                    gX = gX.baddbmm_(gG, X) if not torch.is_grad_enabled() else gX.baddbmm(gG, X)
            elif gG is not None:
                gX = gG @ X
        if ctx.needs_input_grad[1] and gQ is not None:
            gXq = bmm_into_gradient_buffer(gQ, X)  # [T, q, d]
        return gX, gXq


def gram_pair(X: Tensor, Xq: Tensor) -> tuple[Tensor, Tensor]:
    """``X X^T`` ``[T, n, n]`` and ``Xq X^T`` ``[T, q, n]`` with a fused backward (see ``_GramPair``)."""
    return _GramPair.apply(X, Xq)


class _RidgeLogitsFn(torch.autograd.Function):
    """``Xq W`` with ``W = X^T (X X^T + lam I)^-1 Y`` and a fused first-order backward.

    Forward: one ``[n, n]`` Cholesky per task; the ``[T, d, c]`` weights are small next to the
    features (``c <= n``) and cost ``n c d`` flops, fewer than the ``q n d`` of the query Gram
    matrix whenever ``q n > c (n + q)``. Backward (``gP`` the incoming gradient):

        gW = Xq^T gP,  gXq = gP W^T,  gY = K^-1 X gW  (same factor),  gK = -gY A^T,
        gX = A gW^T + (gK + gK^T) X = A (gW - X^T gY)^T - gY W^T,  glam = tr(gK)

    The last form never touches an ``[n, n]`` product with the features: the backward costs
    ``(2 q c + 4 n c) d`` flops where autograd spends ``(2 q c + 2 n c + 2 n^2) d`` (1250 against
    2000 per feature at 5-way 5-shot, 75 queries), and ``gX`` is one ``[T, n, d]`` buffer where
    autograd allocates three and sums them. Under ``create_graph=True`` the backward re-runs the composable formulation and
    differentiates it, so second order stays exact.
    """

    @staticmethod
    def forward(ctx, X, Y, Xq, lam, checks, singular_check, values_here=False):
        # X [T, n, d], Y [T, n, c], Xq [T, q, d], lam [T]. values_here: the features' finite
        # checks are done on K's diagonal and on P (see ridge_predict), not by a pass of their own.
        K = task_matmul_nt(X, X)  # [T, n, n], a fresh tensor: the diagonal is added in place
        if values_here:
            check_finite_through(K.diagonal(dim1=-2, dim2=-1), X, "features", "X X^T", checks)
        K.diagonal(dim1=-2, dim2=-1).add_(lam[:, None])
        L = cholesky_factor(K, "the ridge system matrix", singular_check, checks)
        A = factor_solve(Y, L)  # [T, n, c]
        Wt = task_matmul_tn(A, X)  # [T, c, d]: W^T, so that every d-long product below is written contiguously
        P = task_matmul_nt(Xq, Wt)  # [T, q, c]
        if values_here:
            check_finite_through(P, Xq, "query_features", "the logits Xq W", checks)
        checks.verify()  # the inputs' and the factorization's checks: one host synchronisation
        ctx.save_for_backward(X, Y, Xq, lam, A, Wt)
        ctx.L = L
        return P

    @staticmethod
    def backward(ctx, gP):
        X, Y, Xq, lam, A, Wt = ctx.saved_tensors
        need_X, need_Y, need_Xq, need_lam = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # double backward: differentiate the composable form
            ins = (X, Y, Xq, lam)
            wrt = [t for t, nd in zip(ins, ctx.needs_input_grad) if nd]
            P = Xq @ (X.mT @ spd_solve(_add_diag(X @ X.mT, lam), Y))
            grads = iter(torch.autograd.grad(P, wrt, gP, create_graph=True))
            return tuple(next(grads) if nd else None for nd in ctx.needs_input_grad[:4]) + (None, None, None)
        gWt = task_matmul_tn(gP, Xq)  # [T, c, d]
        gXq = bmm_into_gradient_buffer(gP, Wt) if need_Xq else None  # [T, q, d], a reused CPU block
        gX = gY = glam = None
        if need_X or need_Y or need_lam:
            gY = factor_solve(task_matmul_nt(X, gWt), ctx.L)  # K^-1 gA, [T, n, c]
            if need_X:
                # (gK + gK^T) X with gK = -gY A^T is -gY W^T - A (gY^T X): 3 n c d flops
                # instead of the n^2 d of forming it (autograd spends 2 n^2 d), and with the
                # A gW^T term it is two products into one buffer.
                gWt.sub_(task_matmul_tn(gY, X))  # (gW - X^T gY)^T, in place: [T, c, d]
                gX = bmm_into_gradient_buffer(A, gWt).baddbmm_(gY, Wt, alpha=-1)  # [T, n, d]
            if need_lam:
                glam = -(gY * A).sum((-2, -1))  # tr(gK)
        return gX, (gY if need_Y else None), gXq, glam, None, None, None


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------
def _check_ridge_inputs(features, targets, lam, queries=None, checks=None, feature_values=True):
    X = check_batched(features, "features", 3, "[T, n, d]", checks, values=feature_values)
    Y = check_batched(targets, "targets", 3, "[T, n, c]", checks)
    check_like(Y, "targets", X, "features")
    T, n, d = X.shape
    if Y.shape[:2] != (T, n):
        raise ValueError(f"targets must have shape [{T}, {n}, c] to match features [T, n, d] = {tuple(X.shape)}, "
                         f"got {tuple(Y.shape)}")
    if queries is not None:
        Xq = check_batched(queries, "query_features", 3, "[T, q, d]", checks, values=feature_values)
        check_like(Xq, "query_features", X, "features")
        if Xq.shape[0] != T or Xq.shape[2] != d:
            raise ValueError(f"query_features must have shape [{T}, q, {d}] to match features {tuple(X.shape)}, "
                             f"got {tuple(Xq.shape)}")
    lam = per_task_scalar(lam, "lam", T, X, checks=checks)
    return X, Y, lam


def _pick_form(form: str, n: int, d: int) -> str:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form == "auto":
        return "dual" if n < d else "primal"
    return form


def _singular_check(lam_spec, lam: Tensor) -> Optional[Tensor]:
    """Tasks whose system may be singular (``lam == 0``), or None when ``lam`` was given as a
    positive number: then no task can be, and the check's kernels need not run."""
    if isinstance(lam_spec, (int, float)) and not isinstance(lam_spec, bool) and lam_spec > 0:
        return None
    return lam.detach() == 0


def _add_diag(K: Tensor, lam: Tensor) -> Tensor:
    return K + torch.diag_embed(lam[:, None].expand(K.shape[:-1]))


def ridge_solve(features: Tensor, targets: Tensor, lam: Scalar, *, form: str = "auto") -> Tensor:
    """Batched ridge regression weights, one Cholesky factorization per task.

    Args:
        features: ``[T, n, d]`` support features.
        targets: ``[T, n, c]`` regression targets (one-hot labels for classification).
        lam: regularisation, a float, a ``[]`` or a ``[T]`` tensor, ``>= 0`` (``0`` only if the
            system is positive definite). Differentiable.
        form: ``"auto"`` (dual when ``n < d``), ``"dual"`` (``[n, n]`` system) or ``"primal"``
            (``[d, d]`` system).

    Returns:
        ``W`` of shape ``[T, d, c]`` minimising ``||X W - Y||^2 + lam ||W||^2``; differentiable
        w.r.t. features, targets and lam, to any order.

    Raises:
        ValueError / TypeError: wrong shapes, dtypes, non-finite values, negative lam, or a system
            that is not positive definite (lam = 0 with dependent features).

    Example:
        >>> X, Y = torch.randn(4, 5, 64), torch.randn(4, 5, 3)
        >>> ridge_solve(X, Y, 1.0).shape
        torch.Size([4, 64, 3])
    """
    lam_spec = lam
    X, Y, lam = _check_ridge_inputs(features, targets, lam)
    n, d = X.shape[1], X.shape[2]
    if _pick_form(form, n, d) == "dual":
        A = spd_solve(_add_diag(X @ X.mT, lam), Y, None, _singular_check(lam_spec, lam))  # [T, n, c]
        return X.mT @ A  # [T, d, c]
    return spd_solve(_add_diag(X.mT @ X, lam), X.mT @ Y, None, _singular_check(lam_spec, lam))  # [T, d, c]


def ridge_predict(
    features: Tensor, targets: Tensor, query_features: Tensor, lam: Scalar, *, form: str = "auto"
) -> Tensor:
    """Predictions ``Xq W`` of the ridge solution, without forming ``W`` in the dual form.

    In the dual form (``n < d``) one ``[n, n]`` Cholesky per task is all the linear algebra, and
    the queries are reached through the ``[T, d, c]`` weights ``W = X^T (X X^T + lam I)^-1 Y``
    (``(n + q) c d`` flops; the query Gram matrix ``Xq X^T`` would cost ``q n d``, more whenever
    ``n > c``), with the fused backward of ``_RidgeLogitsFn``.

    Args:
        features: ``[T, n, d]`` support features.
        targets: ``[T, n, c]`` targets.
        query_features: ``[T, q, d]``.
        lam: ``>= 0``, float or ``[]``/``[T]`` tensor, differentiable.
        form: ``"auto"``, ``"dual"`` or ``"primal"`` as in ``ridge_solve``.

    Returns:
        ``[T, q, c]`` predictions, differentiable to any order.

    Example:
        >>> X, Y, Xq = torch.randn(2, 5, 64), torch.randn(2, 5, 3), torch.randn(2, 7, 64)
        >>> ridge_predict(X, Y, Xq, 0.5).shape
        torch.Size([2, 7, 3])
    """
    checks = DeferredChecks()  # values checked with the factorization, in one host sync
    lam_spec = lam
    X, Y, lam = _check_ridge_inputs(features, targets, lam, query_features, checks, feature_values=False)
    Xq = query_features
    n, d, c = X.shape[1], X.shape[2], Y.shape[2]
    dual = _pick_form(form, n, d) == "dual"
    # In the dual form on the CPU the features' finite checks ride on products that read every
    # entry anyway (X X^T's diagonal, the logits from the compiled thin kernel): a pass over the
    # query features less (~6% of the call at T = 256, d = 1600). Elsewhere: a pass each.
    values_here = dual and runs_compiled(X, c)
    if not values_here:
        check_values(X, "features", checks)
        check_values(Xq, "query_features", checks)
    if dual:
        return _RidgeLogitsFn.apply(X, Y, Xq, lam.contiguous(), checks,
                                    _singular_check(lam_spec, lam), values_here)  # [T, q, c]
    checks.verify()
    W = spd_solve(_add_diag(X.mT @ X, lam), X.mT @ Y, None, _singular_check(lam_spec, lam))  # [T, d, c]
    return Xq @ W
