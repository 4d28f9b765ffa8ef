"""A guard for finite-difference HVPs: flags a task whose HVP is an outlier by orders of magnitude.

On ReLU / max-pool nets a finite difference that carries one unit across its kink returns
``jump / r`` instead of ``H u``: with float64 steps of ~1e-8 that is thousands of times the norm of
every other HVP of the call (workload B, data seed 0: ``||H u|| / ||u||`` of 9150 for one task
against 1.3-12.7 for every other task and step), and the meta-gradient of that task is wrong by
that much. Such a flip cannot be told from the differences themselves without one more gradient
evaluation, but it stands out against the curvature of the other HVPs of the same backward pass.
The guard keeps ``||H u_t|| / ||u_t||`` of every HVP it has accepted and flags a task whose ratio
exceeds ``FD_OUTLIER_RATIO`` times the median of the others (this step's other tasks and all
earlier HVPs; nothing is flagged before two other values exist); the engine then recomputes that
task's HVP exactly and warns.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .fused_mlp import dense

# Legitimate curvature varies by about 10x between tasks and steps on the measured workloads; a
# crossed kink gives about 1000x.
FD_OUTLIER_RATIO = 100.0


class FDGuard:
    def __init__(self):
        self.accepted: list[float] = []

    def check(self, hv: list[Tensor], u: list) -> list[int]:
        """The tasks whose HVP ``hv[t]`` (per-task tensors ``[T, ...]``) is an outlier for ``u[t]``."""
        num = sum(h.double().flatten(1).pow(2).sum(1) for h in hv).sqrt()
        den = sum(dense(x).double().flatten(1).pow(2).sum(1) for x in u).sqrt()
        live = den > 0  # a task whose direction is 0 (zero loss weight) says nothing
        ratio = torch.where(live, num / den.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(num))
        values = ratio.tolist()
        flagged = []
        for t, value in enumerate(values):
            if not bool(live[t]):
                continue
            others = self.accepted + [v for s, v in enumerate(values) if s != t and bool(live[s])]
            if len(others) >= 2 and not value <= FD_OUTLIER_RATIO * float(torch.tensor(others).median()):
                flagged.append(t)
        self.accepted += [v for t, v in enumerate(values) if bool(live[t]) and t not in flagged]
        return flagged
