"""Differentiable few-shot heads: batched ridge (R2-D2), batched QP, the MetaOptNet SVM, ProtoNet.

Public ops: ``ridge_solve``, ``ridge_predict``, ``spd_solve``, ``qp_solve`` (``QPResult``,
``QPStatus``), ``svm_crammer_singer_solve``, ``svm_logits``. Heads (``nn.Module``, one interface
``head(support_features, support_labels, query_features, n_way) -> logits``): ``R2D2Head``,
``MetaOptNetRidgeHead``, ``ProtoNetHead``, ``SVMHead``. Pure-PyTorch references live in
``fastmaml.reference.heads``. See docs/heads.md.
"""
from .classifiers import FewShotHead, MetaOptNetRidgeHead, ProtoNetHead, R2D2Head, SVMHead
from .qp import QPResult, QPStatus, qp_solve
from .ridge import ridge_predict, ridge_solve, spd_solve
from .svm import svm_crammer_singer_solve, svm_logits

__all__ = [
    "FewShotHead",
    "MetaOptNetRidgeHead",
    "ProtoNetHead",
    "QPResult",
    "QPStatus",
    "R2D2Head",
    "SVMHead",
    "qp_solve",
    "ridge_predict",
    "ridge_solve",
    "spd_solve",
    "svm_crammer_singer_solve",
    "svm_logits",
]
