"""Triton kernel: the whole Crammer-Singer SVM interior-point solve, one program per task.

The algorithm is the one of the compiled CPU solver and the PyTorch reference (Mehrotra's
predictor-corrector on the class-major Newton system, the best iterate kept, the same stopping
and status rules), with every quantity of a task held in registers for the whole solve: no
global-memory round trips between iterations and no host synchronisation inside the loop (the
PyTorch reference on CUDA launches dozens of small kernels per iteration and reads the stopping
flags back to the host every iteration).

Linear algebra on register tiles: the ``c`` blocks ``H_k = Kr + diag(w_k)`` are inverted together
as one ``[CP, NP, NP]`` tile by the symmetric sweep operator (Gauss-Jordan without pivoting, stable
for positive definite matrices; a non-positive pivot marks the system as not factorizable), then
the Schur complement ``S = sum_k H_k^-1`` the same way; every solve is then a matrix-vector
product. Sizes are padded to powers of two: padded rows carry an identity block and are masked
out of every reduction. Tiles of ``CP * NP * NP`` elements must fit in registers: this kernel
takes ``n <= 32`` support points and ``c <= 8`` classes (MetaOptNet's 5-way 1-shot and 5-shot);
larger problems use the other backends.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_SUPPORT = 32  # n (support points) per task
MAX_WAY = 8  # c (classes)

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}

# fastmaml.heads.qp.QPStatus
_SOLVED = tl.constexpr(0)
_MAX_ITER = tl.constexpr(1)
_NUMERICAL_ERROR = tl.constexpr(4)
_INACCURATE = tl.constexpr(5)
_INF = tl.constexpr(float("inf"))
_NAN = tl.constexpr(float("nan"))
_TINY = {torch.float32: torch.finfo(torch.float32).tiny, torch.float64: torch.finfo(torch.float64).tiny}


@triton.jit
def _sweep_inverse(A, idx_i, idx_j, idx_v, n):
    """Inverse of each symmetric positive definite block of ``A`` [B, NP, NP] (sweep operator).

    ``idx_i`` [1, NP, 1] / ``idx_j`` [1, 1, NP]: row / column indices; ``idx_v`` [1, NP]. Returns
    ``(A^-1, bad)``, ``bad`` the number of non-positive (or NaN) pivots met: 0 when all are fine.
    """
    bad = n * 0
    for p in range(0, n):
        col = tl.sum(tl.where(idx_j == p, A, 0.0), axis=2)  # [B, NP]: column p (= row p)
        piv = tl.sum(tl.where(idx_v == p, col, 0.0), axis=1)  # [B]
        bad += tl.sum((~(piv > 0.0)).to(tl.int32), axis=0)
        cp = col / piv[:, None]
        upd = A - col[:, :, None] * cp[:, None, :]
        on_row = idx_i == p
        on_col = idx_j == p
        edge = tl.where(on_col, cp[:, :, None] + tl.zeros_like(A), cp[:, None, :] + tl.zeros_like(A))
        A = tl.where(on_row | on_col, tl.where(on_row & on_col, -1.0 / piv[:, None, None] + tl.zeros_like(A), edge),
                     upd)
    return -A, bad


@triton.jit
def _factor(Kr3, w, kk3, ii3, jj3, ii, c, n):
    """``(H_k^-1 [CP, NP, NP], S^-1 [1, NP, NP], bad)`` for the weights ``w`` [CP, NP]."""
    H = Kr3 + tl.where(ii3 == jj3, w[:, :, None], 0.0)
    Hinv, bad = _sweep_inverse(H, ii3, jj3, ii, n)
    S = tl.sum(tl.where(kk3 < c, Hinv, 0.0), axis=0)[None, :, :]  # [1, NP, NP]
    # Padded rows of S: c on the diagonal (the c real classes' identity blocks), no coupling.
    Sinv, bad_s = _sweep_inverse(S, ii3, jj3, ii, n)
    return Hinv, Sinv, bad + bad_s


@triton.jit
def _solve(Hinv, Sinv, Kr3, w, rz, ry, valid_k):
    """Newton system ``[H E^T; E 0] [dz; dy] = [rz; ry]``; also ``u = W dz`` (see the CPU solver)."""
    U = tl.sum(Hinv * rz[:, None, :], axis=2)  # [CP, NP]
    t = tl.sum(tl.where(valid_k, U, 0.0), axis=0) - ry  # [NP]
    dy = tl.sum(tl.sum(Sinv * t[None, None, :], axis=2), axis=0)  # [NP]
    dz = U - tl.sum(Hinv * dy[None, None, :], axis=2)
    Kdz = tl.sum(Kr3 * dz[:, None, :], axis=2)
    rows = rz - dy[None, :] - Kdz  # on active bounds (w large): u from the block rows
    u = tl.where(w > 1.0, rows, w * dz)
    return dz, dy, u


@triton.jit
def _load_task(Kr_ptr, task, n, c, NP: tl.constexpr, CP: tl.constexpr, DT: tl.constexpr):
    """Index tiles and ``Kr`` of one task, padded to ``[NP, NP]`` with an identity block.

    Returns ``(kk [CP, 1], ii [1, NP], kk3, ii3, jj3, valid_k [CP, 1], valid [CP, NP], Kr3 [1, NP, NP])``.
    """
    kk = tl.arange(0, CP)[:, None]
    ii = tl.arange(0, NP)[None, :]
    kk3 = tl.arange(0, CP)[:, None, None]
    ii3 = tl.arange(0, NP)[None, :, None]
    jj3 = tl.arange(0, NP)[None, None, :]
    valid_k = kk < c
    valid = valid_k & (ii < n)
    ri = tl.arange(0, NP)[:, None]
    rj = tl.arange(0, NP)[None, :]
    Kr = tl.load(Kr_ptr + task * n * n + ri * n + rj, mask=(ri < n) & (rj < n), other=0.0).to(DT)
    Kr = tl.where((ri == rj) & (ri >= n), 1.0, Kr)  # padded rows: identity
    return kk, ii, kk3, ii3, jj3, valid_k, valid, Kr[None, :, :]


@triton.jit
def _max_step(v, dv, valid):
    neg = valid & (dv < 0.0)
    return tl.min(tl.min(tl.where(neg, -v / tl.where(neg, dv, -1.0), _INF), axis=1), axis=0)


@triton.jit
def _svm_cs_ipm_kernel(Kr_ptr, labels_ptr, settings_ptr, z_ptr, w_ptr, status_ptr, its_ptr, pres_ptr, dres_ptr,
                       gap_ptr, n, c, max_iter,
                       NP: tl.constexpr, CP: tl.constexpr, DT: tl.constexpr, TINY: tl.constexpr):
    task = tl.program_id(0).to(tl.int64)
    C = tl.load(settings_ptr)  # C and tol in the compute dtype (a float argument would be float32)
    tol = tl.load(settings_ptr + 1)
    kk, ii, kk3, ii3, jj3, valid_k, valid, Kr3 = _load_task(Kr_ptr, task, n, c, NP, CP, DT)
    lab = tl.load(labels_ptr + task * n + tl.arange(0, NP), mask=tl.arange(0, NP) < n, other=-1)
    y1 = tl.where(valid & (lab[None, :] == kk), 1.0, 0.0).to(DT)  # one-hot, class-major
    pv = -y1
    h = C * y1
    zero = tl.sum(tl.sum(tl.zeros_like(y1), axis=1), axis=0)  # a DT scalar
    h_scale = tl.max(tl.max(tl.abs(h), axis=1), axis=0) + 1.0
    p_scale = tl.max(tl.max(tl.abs(pv), axis=1), axis=0) + 1.0
    m = zero + (n * c)

    # Start (as the CPU solver): minimise 1/2 z'Qz + p'z + 1/2 |z - h|^2 s.t. sum_k z_k = 0.
    ones = tl.where(valid, 1.0, 0.0).to(DT)
    Hinv, Sinv, bad = _factor(Kr3, ones, kk3, ii3, jj3, ii, c, n)
    z, y, _u = _solve(Hinv, Sinv, Kr3, ones, tl.where(valid, h - pv, 0.0), tl.zeros([NP], DT), valid_k)
    z = tl.where(valid, z, 0.0)
    s = h - z
    lam = -s
    smin = tl.maximum(-1.5 * tl.min(tl.min(tl.where(valid, s, _INF), axis=1), axis=0), 0.0)
    lmin = tl.maximum(-1.5 * tl.min(tl.min(tl.where(valid, lam, _INF), axis=1), axis=0), 0.0)
    s += smin
    lam += lmin
    smax = tl.max(tl.max(tl.where(valid, tl.abs(s), 0.0), axis=1), axis=0)
    lmax = tl.max(tl.max(tl.where(valid, tl.abs(lam), 0.0), axis=1), axis=0)
    s += tl.maximum(smax * 1e-8, TINY)
    lam += tl.maximum(lmax * 1e-8, TINY)
    sl = tl.sum(tl.sum(tl.where(valid, s * lam, 0.0), axis=1), axis=0)
    ssum = tl.sum(tl.sum(tl.where(valid, s, 0.0), axis=1), axis=0)
    lsum = tl.sum(tl.sum(tl.where(valid, lam, 0.0), axis=1), axis=0)
    s = tl.where(valid, s + 0.5 * sl / lsum, 1.0)
    lam = tl.where(valid, lam + 0.5 * sl / ssum, 1.0)

    status = tl.where(bad == 0, _MAX_ITER, _NUMERICAL_ERROR).to(tl.int32)
    iterations = status * 0
    stall = status * 0
    best_merit = zero + _INF
    best_z, best_lam, best_s = z, lam, s
    res_pres, res_dres, res_gap = zero, zero, zero
    it = status * 0
    go = it == 0
    while go:
        # Residuals of the KKT conditions at the current iterate.
        Qz = tl.sum(Kr3 * z[:, None, :], axis=2)
        r_d = tl.where(valid, Qz + pv + lam + y[None, :], 0.0)
        r_in = tl.where(valid, z + s - h, 0.0)
        r_eq = tl.sum(tl.where(valid, z, 0.0), axis=0)  # [NP]
        sl = tl.sum(tl.sum(tl.where(valid, s * lam, 0.0), axis=1), axis=0)
        zQz = tl.sum(tl.sum(tl.where(valid, z * Qz, 0.0), axis=1), axis=0)
        pz = tl.sum(tl.sum(pv * z, axis=1), axis=0)
        nan_count = tl.sum(tl.sum(((r_d != r_d) | (r_in != r_in)).to(tl.int32), axis=1), axis=0) \
            + tl.sum((r_eq != r_eq).to(tl.int32), axis=0)
        rin_max = tl.max(tl.max(tl.abs(r_in), axis=1), axis=0)
        rd_max = tl.max(tl.max(tl.abs(r_d), axis=1), axis=0)
        req_max = tl.max(tl.abs(r_eq), axis=0)
        mu = sl / m
        pres = tl.maximum(rin_max, req_max) / h_scale
        dres = rd_max / p_scale
        obj = 0.5 * zQz + pz
        gap = sl / tl.maximum(tl.abs(obj), 1e-8)
        merit = tl.maximum(tl.maximum(pres, dres), gap)
        finite = (nan_count == 0) & (tl.abs(pres) < _INF) & (tl.abs(dres) < _INF) & (tl.abs(gap) < _INF)
        status = tl.where((status == _MAX_ITER) & ~finite, _NUMERICAL_ERROR, status)
        run = status == _MAX_ITER
        better = run & (merit < best_merit)
        stall = tl.where(run & (merit < 0.9 * best_merit), 0, stall + 1)
        take = (it == 0) | better
        best_z = tl.where(take, z, best_z)
        best_lam = tl.where(take, lam, best_lam)
        best_s = tl.where(take, s, best_s)
        res_pres = tl.where(take, pres, res_pres)
        res_dres = tl.where(take, dres, res_dres)
        res_gap = tl.where(take, gap, res_gap)
        best_merit = tl.where(better, merit, best_merit)
        status = tl.where((tol > 0) & run & (merit <= tol), _SOLVED, status)
        # Near the solution, no 10% progress in 5 iterations: the attainable accuracy is reached.
        plateau = (tol > 0) & (status == _MAX_ITER) & (stall >= 5) & (best_merit <= 1e-6)
        status = tl.where(plateau, tl.where(best_merit <= tol, _SOLVED, _INACCURATE), status)
        go_on = (it < max_iter) & (status == _MAX_ITER)

        # Newton step (computed unconditionally; applied only when go_on).
        w = tl.where(valid, lam / s, 0.0)
        Hinv, Sinv, bad = _factor(Kr3, w, kk3, ii3, jj3, ii, c, n)
        status = tl.where(go_on & (bad != 0), _NUMERICAL_ERROR, status)
        step_ok = go_on & (bad == 0)
        ry = -r_eq
        rc = s * lam
        rz = tl.where(valid, -r_d - (w * r_in - rc / s), 0.0)
        dz, dy, u = _solve(Hinv, Sinv, Kr3, w, rz, ry, valid_k)
        dlam = u + w * r_in - rc / s
        ds = -r_in - dz
        a_aff = tl.minimum(tl.minimum(_max_step(s, ds, valid), _max_step(lam, dlam, valid)), 1.0)
        mu_aff = tl.sum(tl.sum(tl.where(valid, (s + a_aff * ds) * (lam + a_aff * dlam), 0.0), axis=1), axis=0)
        ratio = tl.minimum(tl.maximum(mu_aff / m / tl.maximum(mu, TINY), 0.0), 1.0)
        sigma = ratio * ratio * ratio
        rc = s * lam + ds * dlam - sigma * mu
        rz = tl.where(valid, -r_d - (w * r_in - rc / s), 0.0)
        dz, dy, u = _solve(Hinv, Sinv, Kr3, w, rz, ry, valid_k)
        dlam = u + w * r_in - rc / s
        ds = -r_in - dz
        alpha = tl.minimum(0.99 * tl.minimum(_max_step(s, ds, valid), _max_step(lam, dlam, valid)), 1.0)
        # A select, not a zero step: a stopped task's direction may be NaN.
        z = tl.where(step_ok & valid, z + alpha * dz, z)
        lam = tl.where(step_ok & valid, lam + alpha * dlam, lam)
        s = tl.where(step_ok & valid, s + alpha * ds, s)
        y = tl.where(step_ok & (tl.arange(0, NP) < n), y + alpha * dy, y)
        iterations += step_ok.to(tl.int32)
        it += 1
        go = step_ok

    # The barrier weights at the returned iterate, checked to give a factorizable system (the
    # backward pass factors it again).
    w = tl.where(valid, tl.maximum(best_lam, TINY) / tl.maximum(best_s, TINY), 0.0)
    Hinv, Sinv, bad = _factor(Kr3, w, kk3, ii3, jj3, ii, c, n)
    status = tl.where(bad != 0, _NUMERICAL_ERROR, status)
    out = task * c * n + kk * n + ii
    tl.store(z_ptr + out, best_z, mask=valid)
    tl.store(w_ptr + out, w, mask=valid)
    tl.store(status_ptr + task, status.to(tl.int64))
    tl.store(its_ptr + task, iterations.to(tl.int64))
    tl.store(pres_ptr + task, res_pres)
    tl.store(dres_ptr + task, res_dres)
    tl.store(gap_ptr + task, res_gap)


@triton.jit
def _svm_cs_kkt_kernel(Kr_ptr, w_ptr, rhs_ptr, out_ptr, n, c, NP: tl.constexpr, CP: tl.constexpr, DT: tl.constexpr):
    """The backward pass's adjoint system ``[H E^T; E 0] [dz; dy] = [rhs; 0]`` at the weights ``w``,
    one program per task; NaN rows where the system cannot be factored."""
    task = tl.program_id(0).to(tl.int64)
    kk, ii, kk3, ii3, jj3, valid_k, valid, Kr3 = _load_task(Kr_ptr, task, n, c, NP, CP, DT)
    at = task * c * n + kk * n + ii
    w = tl.load(w_ptr + at, mask=valid, other=0.0).to(DT)
    rhs = tl.load(rhs_ptr + at, mask=valid, other=0.0).to(DT)
    Hinv, Sinv, bad = _factor(Kr3, w, kk3, ii3, jj3, ii, c, n)
    dz, dy, u = _solve(Hinv, Sinv, Kr3, w, rhs, tl.zeros([NP], DT), valid_k)
    dz = tl.where(bad == 0, dz, _NAN)
    tl.store(out_ptr + at, dz, mask=valid)


def supports(n: int, n_way: int) -> bool:
    """Whether a task of ``n`` support points and ``n_way`` classes fits the kernel's register tiles."""
    return n <= MAX_SUPPORT and n_way <= MAX_WAY


def _tiles(n: int, n_way: int) -> tuple[int, int, int]:
    """``(NP, CP, num_warps)`` for a task of ``n`` support points and ``n_way`` classes."""
    if not supports(n, n_way):
        raise ValueError(f"the Triton SVM kernel takes n <= {MAX_SUPPORT} and n_way <= {MAX_WAY}, got n={n}, "
                         f"n_way={n_way}")
    NP = max(triton.next_power_of_2(n), 2)
    CP = max(triton.next_power_of_2(n_way), 2)
    # ~32 tile elements per thread: [8, 32, 32] float64 (5-shot) takes 255 registers with 8 warps.
    num_warps = 1 if CP * NP * NP <= 256 else (4 if CP * NP * NP <= 2048 else 8)
    return NP, CP, num_warps


_SETTINGS: dict = {}


def _settings_tensor(C: float, tol: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[C, tol]`` on the device, cached to save a host-to-device copy per call (settings are
    few; the cache is cleared if it ever grows)."""
    key = (C, tol, dtype, device)
    t = _SETTINGS.get(key)
    if t is None:
        if len(_SETTINGS) > 64:
            _SETTINGS.clear()
        t = _SETTINGS[key] = torch.tensor([C, tol], dtype=dtype, device=device)
    return t


def svm_cs_ipm(Kr: Tensor, labels: Tensor, n_way: int, C: float, max_iter: int, tol: float):
    """Solve with ``Kr = K + r I`` [T, n, n] (float32 or float64) and labels [T, n] int64.

    Returns ``(z [T, c, n] class-major, w [T, c, n] barrier weights at z, status, iterations,
    pres, dres, gap)`` like ``torch.ops.fastmaml.svm_cs_ipm``.
    """
    T, n, _ = Kr.shape
    NP, CP, num_warps = _tiles(n, n_way)
    Kr = Kr.contiguous()
    labels = labels.contiguous()
    z = Kr.new_zeros(T, n_way, n)
    w = Kr.new_zeros(T, n_way, n)
    status = labels.new_empty(T)
    its = labels.new_empty(T)
    pres, dres, gap = (Kr.new_empty(T) for _ in range(3))
    settings = _settings_tensor(float(C), float(tol), Kr.dtype, Kr.device)
    _svm_cs_ipm_kernel[(T,)](Kr, labels, settings, z, w, status, its, pres, dres, gap, n, n_way, int(max_iter),
                             NP=NP, CP=CP, DT=_TL_DTYPES[Kr.dtype], TINY=_TINY[Kr.dtype], num_warps=num_warps)
    return z, w, status, its, pres, dres, gap


def svm_cs_kkt_solve(Kr: Tensor, w: Tensor, rhs: Tensor) -> Tensor:
    """Solve the adjoint (Newton) system at the barrier weights ``w`` [T, c, n] for ``rhs`` [T, c, n],
    like ``torch.ops.fastmaml.svm_cs_kkt_solve``: ``dz`` [T, c, n], NaN rows where not factorizable."""
    T, n, _ = Kr.shape
    NP, CP, num_warps = _tiles(n, w.shape[1])
    Kr, w, rhs = Kr.contiguous(), w.to(Kr.dtype).contiguous(), rhs.to(Kr.dtype).contiguous()
    out = torch.empty_like(rhs)
    _svm_cs_kkt_kernel[(T,)](Kr, w, rhs, out, n, w.shape[1], NP=NP, CP=CP, DT=_TL_DTYPES[Kr.dtype], num_warps=num_warps)
    return out
