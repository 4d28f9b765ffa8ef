"""Few-shot classification heads under one interface.

    head(support_features [T, n, d], support_labels [T, n] int64, query_features [T, q, d], n_way)
        -> logits [T, q, n_way]

``R2D2Head`` (Bertinetto et al. 2018), ``MetaOptNetRidgeHead`` and ``SVMHead`` (Lee et al. 2019),
and ``ProtoNetHead`` (Snell et al. 2017). The ridge heads compute the query logits from Gram
matrices only (never the ``[T, d, n_way]`` weights when ``n < d``) and are differentiable to any
order; the SVM head is first order.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ._common import DeferredChecks, check_batched, check_labels, check_like, check_n_way, values_verified
from .qp import QPResult
from .ridge import ridge_predict
from .svm import svm_logits


class FewShotHead(nn.Module):
    """Base class: validates the episode and calls ``_logits``."""

    def forward(self, support_features: Tensor, support_labels: Tensor, query_features: Tensor,
                n_way: int) -> Tensor:
        checks = DeferredChecks()  # values checked in one host sync
        X = check_batched(support_features, "support_features", 3, "[T, n, d]", checks)
        Xq = check_batched(query_features, "query_features", 3, "[T, q, d]", checks)
        check_like(Xq, "query_features", X, "support_features")
        T, n, d = X.shape
        if Xq.shape[0] != T or Xq.shape[2] != d:
            raise ValueError(f"query_features must have shape [{T}, q, {d}] to match support_features "
                             f"{tuple(X.shape)}, got {tuple(Xq.shape)}")
        n_way = check_n_way(n_way)
        check_labels(support_labels, "support_labels", T, n, n_way, X.device, checks)
        checks.verify()
        with values_verified(X, Xq):  # the functional ops below need not read the features again
            return self._logits(X, support_labels, Xq, n_way)

    def _logits(self, X, labels, Xq, n_way):  # pragma: no cover - abstract
        raise NotImplementedError


def _one_hot(labels: Tensor, n_way: int, like: Tensor) -> Tensor:
    return torch.nn.functional.one_hot(labels, n_way).to(like.dtype)  # [T, n, c]


class R2D2Head(FewShotHead):
    """R2-D2: ridge regression onto one-hot targets, ``logits = scale * Xq W + bias``.

    Args:
        lam_init: initial ridge regularisation (> 0).
        learn_lambda: learn ``lam`` (kept positive as ``exp(log_lam)``); otherwise fixed.
        scale_init, bias_init: initial output scale and bias (both learned, as in the paper).

    Example:
        >>> head = R2D2Head()
        >>> X, Xq = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
        >>> head(X, torch.arange(5).repeat(2, 1), Xq, 5).shape
        torch.Size([2, 7, 5])
    """

    def __init__(self, lam_init: float = 1.0, learn_lambda: bool = True, scale_init: float = 1.0,
                 bias_init: float = 0.0):
        super().__init__()
        if not lam_init > 0 or not math.isfinite(lam_init):
            raise ValueError(f"lam_init must be finite and > 0, got {lam_init}")
        log_lam = torch.tensor(math.log(lam_init))
        if learn_lambda:
            self.log_lam = nn.Parameter(log_lam)
        else:
            self.register_buffer("log_lam", log_lam)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        self.bias = nn.Parameter(torch.tensor(float(bias_init)))

    @property
    def lam(self) -> Tensor:
        return self.log_lam.exp()

    def _logits(self, X, labels, Xq, n_way):
        dt = X.dtype
        pred = ridge_predict(X, _one_hot(labels, n_way, X), Xq, self.lam.to(dt))
        return self.scale.to(dt) * pred + self.bias.to(dt)


class MetaOptNetRidgeHead(FewShotHead):
    """MetaOptNet's ridge-regression head: fixed ``lam`` (50), learned output scale, no bias."""

    def __init__(self, lam: float = 50.0, scale_init: float = 1.0, learn_scale: bool = True):
        super().__init__()
        if not lam > 0 or not math.isfinite(lam):
            raise ValueError(f"lam must be finite and > 0, got {lam}")
        self.lam = float(lam)
        scale = torch.tensor(float(scale_init))
        self.scale = nn.Parameter(scale) if learn_scale else scale

    def _logits(self, X, labels, Xq, n_way):
        dt = X.dtype
        return self.scale.to(dt) * ridge_predict(X, _one_hot(labels, n_way, X), Xq, self.lam)


class ProtoNetHead(FewShotHead):
    """Prototypical networks: ``logits = -scale * ||xq - c_k||^2`` (``/ d`` if ``normalize``).

    Distances come from Gram matrices (``||xq||^2 - 2 xq . c_k + ||c_k||^2``). Every class needs
    at least one support example: an empty class raises ``ValueError``.
    """

    def __init__(self, scale_init: float = 1.0, learn_scale: bool = True, normalize: bool = True):
        super().__init__()
        scale = torch.tensor(float(scale_init))
        self.scale = nn.Parameter(scale) if learn_scale else scale
        self.normalize = normalize

    def _logits(self, X, labels, Xq, n_way):
        Y = _one_hot(labels, n_way, X)  # [T, n, c]
        counts = Y.sum(1)  # [T, c]
        if bool((counts == 0).any()):
            t, k = (counts == 0).nonzero()[0].tolist()
            raise ValueError(f"support_labels: class {k} has no support example in task {t}")
        protos = (Y.mT @ X) / counts[..., None]  # [T, c, d]
        d2 = (Xq * Xq).sum(-1, keepdim=True) - 2 * Xq @ protos.mT + (protos * protos).sum(-1)[:, None, :]
        if self.normalize:
            d2 = d2 / X.shape[-1]
        return -self.scale.to(X.dtype) * d2


class SVMHead(FewShotHead):
    """MetaOptNet's SVM head: Crammer-Singer dual (``C = 0.1``), ``logits = scale * Xq X^T alpha``.

    Args:
        C: box constraint. diag_reg: ``r`` added to the kernel diagonal (MetaOptNet: 1.0).
        max_iter, tol: interior-point settings (``tol=0`` runs exactly ``max_iter`` iterations).
        raise_on_failure: raise if a task fails (the dual is always feasible and bounded, so a
            failure is numerical).
        scale_init, learn_scale: output scale.

    The last solve's ``QPResult`` (status, iterations, residuals per task) is kept in
    ``self.last_result``.
    """

    def __init__(self, C: float = 0.1, diag_reg: float = 1.0, max_iter: int = 50, tol: Optional[float] = None,
                 raise_on_failure: bool = True, scale_init: float = 1.0, learn_scale: bool = True):
        super().__init__()
        self.C, self.diag_reg, self.max_iter, self.tol = C, diag_reg, max_iter, tol
        self.raise_on_failure = raise_on_failure
        scale = torch.tensor(float(scale_init))
        self.scale = nn.Parameter(scale) if learn_scale else scale
        self.last_result: Optional[QPResult] = None

    def _logits(self, X, labels, Xq, n_way):
        logits, res = svm_logits(X, labels, Xq, n_way, C=self.C, diag_reg=self.diag_reg, max_iter=self.max_iter,
                                 tol=self.tol, raise_on_failure=self.raise_on_failure)
        self.last_result = res
        return self.scale.to(X.dtype) * logits


__all__ = ["FewShotHead", "MetaOptNetRidgeHead", "ProtoNetHead", "R2D2Head", "SVMHead"]
