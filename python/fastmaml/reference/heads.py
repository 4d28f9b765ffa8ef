"""Pure-PyTorch references of the few-shot heads: the plain formulas the fast paths must match.

They use plain autograd and the most direct linear algebra (``torch.linalg.solve`` on the primal
normal equations, the generic QP solver on Kronecker-built matrices); they are the specification,
not fast.
"""
from __future__ import annotations

import torch
from torch import Tensor


def ridge_solve_reference(features: Tensor, targets: Tensor, lam) -> Tensor:
    """``(X^T X + lam I)^-1 X^T Y`` by ``torch.linalg.solve``: ``[T, n, d], [T, n, c] -> [T, d, c]``."""
    X, Y = features, targets
    T, _, d = X.shape
    lam = torch.as_tensor(lam, dtype=X.dtype, device=X.device).expand(T)
    K = X.mT @ X + lam[:, None, None] * torch.eye(d, dtype=X.dtype, device=X.device)
    return torch.linalg.solve(K, X.mT @ Y)


def ridge_predict_reference(features: Tensor, targets: Tensor, query_features: Tensor, lam) -> Tensor:
    """``Xq W`` with ``W`` from ``ridge_solve_reference``: ``[T, q, c]``."""
    return query_features @ ridge_solve_reference(features, targets, lam)


def one_hot_reference(labels: Tensor, n_way: int, dtype) -> Tensor:
    """``[T, n]`` int64 -> ``[T, n, n_way]`` one-hot of ``dtype``."""
    return torch.nn.functional.one_hot(labels, n_way).to(dtype)


def r2d2_logits_reference(support, labels, query, n_way, lam, scale, bias) -> Tensor:
    """R2-D2 (Bertinetto et al. 2018): ``scale * Xq W + bias`` with ridge weights on one-hot targets."""
    Y = one_hot_reference(labels, n_way, support.dtype)
    return scale * ridge_predict_reference(support, Y, query, lam) + bias


def protonet_logits_reference(support, labels, query, n_way, scale=1.0, normalize=True) -> Tensor:
    """``-scale * ||xq - mean_k||^2 (/ d)``: ``[T, q, n_way]`` (empty classes give a zero prototype)."""
    Y = one_hot_reference(labels, n_way, support.dtype)  # [T, n, c]
    counts = Y.sum(1).clamp_min(1)  # [T, c]
    protos = (Y.mT @ support) / counts[..., None]  # [T, c, d]
    d2 = ((query[:, :, None, :] - protos[:, None, :, :]) ** 2).sum(-1)
    if normalize:
        d2 = d2 / support.shape[-1]
    return -scale * d2


def crammer_singer_qp_reference(kernel: Tensor, labels: Tensor, n_way: int, C: float, diag_reg: float = 1.0):
    """MetaOptNet's SVM-CS dual as a generic QP, in MetaOptNet's sample-major ordering.

    ``min 1/2 a^T (K (x) I_c + r I) a - y^T a  s.t.  a <= C y,  sum_k a[i, k] = 0``, with ``a`` of
    length ``n * n_way`` (index ``i * n_way + k``) and ``y`` the flattened one-hot labels.

    Returns:
        ``(Q, p, G, h, A, b)`` batched over tasks, ready for ``fastmaml.heads.qp_solve``.
    """
    T, n, _ = kernel.shape
    dt, dev = kernel.dtype, kernel.device
    I_c = torch.eye(n_way, dtype=dt, device=dev)
    Q = torch.einsum("tij,kl->tikjl", kernel, I_c).reshape(T, n * n_way, n * n_way)
    Q = Q + diag_reg * torch.eye(n * n_way, dtype=dt, device=dev)
    y = one_hot_reference(labels, n_way, dt).reshape(T, n * n_way)
    G = torch.eye(n * n_way, dtype=dt, device=dev).expand(T, -1, -1)
    h = C * y
    A = torch.kron(torch.eye(n, dtype=dt, device=dev), torch.ones(1, n_way, dtype=dt, device=dev)).expand(T, -1, -1)
    b = torch.zeros(T, n, dtype=dt, device=dev)
    return Q, -y, G, h, A, b
