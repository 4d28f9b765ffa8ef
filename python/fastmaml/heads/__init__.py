"""Differentiable few-shot heads: batched ridge (R2-D2), batched QP, the MetaOptNet SVM, ProtoNet."""
from .qp import QPResult, QPStatus, qp_solve
from .ridge import ridge_predict, ridge_solve, spd_solve

__all__ = ["QPResult", "QPStatus", "qp_solve", "ridge_predict", "ridge_solve", "spd_solve"]
