"""The finite-difference guard: an FD HVP that crossed a ReLU / max-pool kink is reported.

Specification: a task whose ``||H u|| / ||u||`` exceeds ``FD_OUTLIER_RATIO`` times the median of
the other HVPs of the call (this step's other tasks, earlier accepted HVPs) is flagged; nothing is
flagged without two other values; tasks with a zero direction are ignored; the engine recomputes
a flagged task's HVP exactly, warns naming the step and task and lists them in
``info["fd_suspect"]`` (the first step's HVPs too, checked before the engine sums them over the
tasks); exact modes are not guarded, and an ordinary FD run is not flagged.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastmaml.meta.maml as engine
from fastmaml.meta import maml_loss
from fastmaml.meta.fd_guard import FD_OUTLIER_RATIO, FDGuard
from fastmaml.meta.models import MLP


def _per_task(ratios):
    """hv, u with ||hv_t|| / ||u_t|| = ratios[t] (u_t of norm 1 spread over two tensors)."""
    u = [torch.full((len(ratios), 3), 0.5), torch.full((len(ratios), 1), 0.5)]
    scale = torch.tensor(ratios, dtype=torch.float32)
    return [x * scale.view(-1, 1) for x in u], u


def test_flags_a_task_far_above_the_others():
    guard = FDGuard()
    assert guard.check(*_per_task([1.0, 2.0, 3.0 * FD_OUTLIER_RATIO])) == [2]
    assert guard.check(*_per_task([1.5, 2.5 * FD_OUTLIER_RATIO])) == [1]  # against the accepted history
    assert sorted(guard.accepted) == [1.0, 1.5, 2.0]


def test_needs_two_other_values_and_ignores_zero_directions():
    assert FDGuard().check(*_per_task([1.0, 1e6])) == []  # one other value: no reference
    hv, u = _per_task([1.0, 2.0, 1e6])
    u = [x.clone() for x in u]
    for x in u:
        x[0] = 0.0
    assert FDGuard().check(hv, u) == []  # task 0 has no direction: one reference left


def _mlp_tasks(seed=0, tasks=4):
    torch.manual_seed(seed)
    net = MLP(2, (16,), 1, activation=torch.nn.Tanh)  # smooth: no kink for the ordinary run to cross
    xs, xq = torch.randn(tasks, 10, 2), torch.randn(tasks, 10, 2)
    return net, (xs, xs.sum(-1, keepdim=True).sin()), (xq, xq.sum(-1, keepdim=True).sin())


# The backward takes the steps last to first: HVP call 1 is inner step 2, call 3 is step 0 (at the
# shared theta, where the engine sums the tasks' HVPs: the guard checks them before the sum).
@pytest.mark.parametrize("call, step", [(1, 2), (3, 0)])
def test_the_engine_recomputes_warns_and_reports_a_flagged_task(monkeypatch, call, step):
    net, support, query = _mlp_tasks()
    real_hvp, calls = engine.hvp, []

    def corrupted(*args, **kwargs):  # what a crossed kink does to one task's HVP
        hv_a, hv_f = real_hvp(*args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            hv_a = [h.clone() for h in hv_a]
            for h in hv_a:
                h[1] *= 1e4
        return hv_a, hv_f

    def meta_grad(**kw):
        loss = maml_loss(net, F.mse_loss, support, query, num_steps=3, lr=0.1, batching="loop", **kw)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(net.parameters()))])

    clean = meta_grad(hvp_mode="fd_central", fd_dtype=torch.float64)
    monkeypatch.setattr(engine, "hvp", corrupted)
    info = {}
    with pytest.warns(RuntimeWarning, match=rf"inner step {step} of task\(s\) \[1\].*recomputed exactly"):
        repaired = meta_grad(hvp_mode="fd_central", fd_dtype=torch.float64, info=info)
    assert len(calls) == 4 and info["fd_suspect"] == [(step, 1)]  # 3 steps + the exact redo
    # the flagged HVP was redone exactly: the meta-gradient is the clean one, up to the FD error
    assert float((repaired - clean).norm() / clean.norm()) < 1e-5


def test_ordinary_runs_are_not_flagged():
    net, support, query = _mlp_tasks(seed=1)
    for mode in ("fd_central", "fd_forward", "exact"):
        info = {}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss = maml_loss(net, F.mse_loss, support, query, num_steps=3, lr=0.1, hvp_mode=mode,
                             fd_dtype=torch.float64, batching="loop", info=info)
            torch.autograd.grad(loss, list(net.parameters()))
        assert "fd_suspect" not in info
