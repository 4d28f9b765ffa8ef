"""Second-order MAML task by task (``task_by_task``): each task's inner loop and backward recursion
before the next task's.

Specification: where tasks are processed one at a time anyway (the loop batching, the fused conv
path), ``task_by_task=True`` gives the meta-gradients of the plain-autograd reference (float64,
1e-10) for every step-size form, parameter subset and task weighting, and the same as the
step-by-step order; it is taken when asked (or, by default, when the kept per-step tensors of all
tasks would pass ``TASK_BY_TASK_BYTES``), never without a gradient to compute; errors name the task
of the whole batch; and the memory kept across inner steps is one task's.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastmaml.meta import maml as maml_module
from fastmaml.meta import fused_conv
from fastmaml.meta.front import maml_loss
from fastmaml.meta.functional import TaskModel
from fastmaml.meta.models import Conv4

sys.path.insert(0, str(Path(__file__).parent))
from _meta_util import grads_of, make_lr, rel_err  # noqa: E402

F64 = torch.float64
HAVE_KERNELS = all(fused_conv.native_available(op) for op in fused_conv._KERNELS)


def conv_problem(num_tasks=3, adapt="all", seed=0):
    torch.manual_seed(seed)
    tm = TaskModel(Conv4(1, 4, 3, 16).to(F64), F.cross_entropy, adapt=adapt)
    mk = lambda n: (torch.randn(num_tasks, n, 1, 16, 16, dtype=F64), torch.randint(0, 3, (num_tasks, n)))  # noqa
    return tm, mk(6), mk(5)


@pytest.fixture
def runs(monkeypatch):
    """Counts the calls that ran task by task."""
    calls = []
    inner = maml_module._forward_task_major
    monkeypatch.setattr(maml_module, "_forward_task_major", lambda *a, **k: calls.append(a[3]) or inner(*a, **k))
    return calls


@pytest.mark.parametrize("batching", ["loop", "fused_conv"])
@pytest.mark.parametrize("lr_form,adapt", [("fixed", "all"), ("lslr", "all"), ("meta_sgd", "all"),
                                           ("scalar", "head")])
@pytest.mark.parametrize("num_steps", [1, 3])
def test_meta_gradients_equal_the_reference_and_the_step_by_step_order(batching, lr_form, adapt, num_steps, runs):
    if batching == "fused_conv" and not HAVE_KERNELS:
        pytest.skip("the compiled layer kernels are not built")
    tm, sup, qry = conv_problem(adapt=adapt)
    lr, lrs = make_lr(lr_form, tm, num_steps)
    params = list(tm.model.parameters()) + lrs
    w = torch.tensor([0.5, -2.0, 3.0], dtype=F64)  # each task's weight reaches its precomputed gradient

    def weighted(**kw):
        return grads_of((maml_loss(tm, support=sup, query=qry, num_steps=num_steps, lr=lr, reduction="none",
                                   **kw) * w).sum(), params)

    ref = weighted(engine="autograd")
    got = weighted(batching=batching, task_by_task=True)
    assert runs == [batching]
    step_by_step = weighted(batching=batching, task_by_task=False)
    assert runs == [batching]
    assert rel_err(got, ref) < 1e-10
    assert rel_err(got, step_by_step) < 1e-10
    if lrs:
        assert rel_err(got[-len(lrs):], ref[-len(lrs):]) < 1e-10


def test_kept_first_graph_and_recomputed_last_step_also_work_task_by_task(runs):
    tm, sup, qry = conv_problem()
    params = list(tm.model.parameters())
    ref = grads_of(maml_loss(tm, support=sup, query=qry, num_steps=3, lr=0.3, engine="autograd"), params)
    for kw in (dict(keep_first_graph=True), dict(reuse_last_step=False)):
        got = grads_of(maml_loss(tm, support=sup, query=qry, num_steps=3, lr=0.3, batching="loop",
                                 task_by_task=True, **kw), params)
        assert rel_err(got, ref) < 1e-10
    assert len(runs) == 2


def test_the_default_takes_it_above_the_byte_threshold(runs, monkeypatch):
    tm, sup, qry = conv_problem()
    params = list(tm.model.parameters())
    grads_of(maml_loss(tm, support=sup, query=qry, num_steps=2, lr=0.3, batching="loop"), params)
    assert runs == []  # 2 K T P of a tiny conv net: far below 256 MiB
    monkeypatch.setattr(maml_module, "TASK_BY_TASK_BYTES", 0)
    grads_of(maml_loss(tm, support=sup, query=qry, num_steps=2, lr=0.3, batching="loop"), params)
    assert runs == ["loop"]


def test_not_taken_without_a_gradient_or_where_tasks_are_batched(runs):
    tm, sup, qry = conv_problem()
    params = list(tm.model.parameters())
    with torch.no_grad():
        maml_loss(tm, support=sup, query=qry, num_steps=2, lr=0.3, batching="loop", task_by_task=True)
    for kw in (dict(batching="vmap"), dict(batching="loop", algorithm="fomaml"),
               dict(batching="loop", hvp_mode="fd_central", fd_dtype=F64)):
        grads_of(maml_loss(tm, support=sup, query=qry, num_steps=2, lr=0.3, task_by_task=True, **kw), params)
    assert runs == []


def test_a_non_finite_loss_names_the_task_of_the_batch():
    tm, sup, qry = conv_problem()
    xs = sup[0].clone()
    xs[2, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"inner step 0 \(support loss\): the loss of task 2"):
        maml_loss(tm, support=(xs, sup[1]), query=qry, num_steps=2, lr=0.3, batching="loop", task_by_task=True)
    xq = qry[0].clone()
    xq[1, 0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"query loss after the inner loop: the loss of task 1"):
        maml_loss(tm, support=sup, query=(xq, qry[1]), num_steps=2, lr=0.3, batching="loop", task_by_task=True)


def test_task_by_task_must_be_a_bool_or_none():
    tm, sup, qry = conv_problem()
    with pytest.raises(TypeError, match="task_by_task"):
        maml_loss(tm, support=sup, query=qry, num_steps=1, lr=0.3, task_by_task="yes")


def test_support_losses_are_reported_for_every_task_and_step():
    tm, sup, qry = conv_problem()
    info_a, info_b = {}, {}
    maml_loss(tm, support=sup, query=qry, num_steps=3, lr=0.3, batching="loop", task_by_task=True, info=info_a)
    maml_loss(tm, support=sup, query=qry, num_steps=3, lr=0.3, batching="loop", task_by_task=False, info=info_b)
    assert info_a["support_losses"].shape == (3, 3)
    torch.testing.assert_close(info_a["support_losses"], info_b["support_losses"], rtol=1e-12, atol=0)


_MEMORY_SCRIPT = r"""
import json, torch, torch.nn.functional as F
from fastmaml.bench.meta import _status_kb
from fastmaml.meta.front import maml_loss
from fastmaml.meta.functional import TaskModel
from fastmaml.meta.models import Conv4
torch.set_num_threads(1)
torch.manual_seed(0)
T = 16
tm = TaskModel(Conv4(1, 32, 5, 16), F.cross_entropy)
sup = (torch.randn(T, 5, 1, 16, 16), torch.arange(5).repeat(T, 1))
qry = (torch.randn(T, 5, 1, 16, 16), torch.arange(5).repeat(T, 1))
params = list(tm.model.parameters())
out = {}
for flag in (False, True):
    for i, k in enumerate((2, 10) * 3):  # the first pair warms up; then the least peak per K
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _status_kb("VmRSS")
        torch.autograd.grad(maml_loss(tm, support=sup, query=qry, num_steps=k, lr=0.4, batching="loop",
                                      task_by_task=flag), params)
        if i >= 2:
            peak = (_status_kb("VmHWM") - before) / 1024.0
            out[f"{flag}{k}"] = min(out.get(f"{flag}{k}", peak), peak)
out["P"] = sum(p.numel() for p in params)
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs procfs to reset the RSS peak")
def test_memory_kept_across_steps_is_one_tasks():
    """K = 10 over K = 2 adds 8 x 2 T P floats step by step (16 tasks: 29 MB here), one task's
    share task by task."""
    from fastmaml.bench.meta import MALLOC_ENV

    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", **MALLOC_ENV})
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    all_tasks_mb = 8 * 2 * 16 * m["P"] * 4 / 2**20
    assert m["False10"] - m["False2"] > 0.7 * all_tasks_mb, m
    assert m["True10"] - m["True2"] < 0.25 * all_tasks_mb, m
