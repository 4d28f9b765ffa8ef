"""The meta-gradient engine under ``torch.autocast``.

Specification: ``maml_loss`` (recursion engine) runs in the dtype of the model's parameters with
autocast turned off inside it, says so with a warning, and gives exactly what the same call gives
outside autocast, whether the backward runs inside the autocast region or after it.
"""
import pytest
import torch
import torch.nn.functional as F

from fastmaml.meta.front import maml_loss
from fastmaml.meta.models import Conv4


def problem():
    torch.manual_seed(0)
    net = Conv4(1, 4, 3, 16)
    g = torch.Generator().manual_seed(1)
    mk = lambda n: (torch.randn(3, n, 1, 16, 16, generator=g), torch.randint(0, 3, (3, n), generator=g))  # noqa
    return net, mk(6), mk(5)


@pytest.mark.parametrize("kw", [dict(batching="auto"), dict(batching="loop"), dict(batching="vmap"),
                                dict(batching="loop", algorithm="imaml"),
                                dict(batching="loop", task_by_task=True)], ids=str)
@pytest.mark.parametrize("backward_inside", [False, True])
def test_autocast_is_turned_off_inside_and_the_result_is_unchanged(kw, backward_inside):
    net, sup, qry = problem()
    params = list(net.parameters())
    expected = torch.autograd.grad(maml_loss(net, F.cross_entropy, sup, qry, num_steps=2, lr=0.3, **kw), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(UserWarning, match="autocast is turned off"):
            loss = maml_loss(net, F.cross_entropy, sup, qry, num_steps=2, lr=0.3, **kw)
        if backward_inside:
            got = torch.autograd.grad(loss, params)
    if not backward_inside:
        got = torch.autograd.grad(loss, params)
    assert loss.dtype == torch.float32
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_the_functional_pieces_also_run_with_autocast_off():
    """``batched_grad``, ``hvp`` and ``adapt`` (for torch.func users) give what they give outside
    autocast (they failed in the fused kernels under it)."""
    from fastmaml.meta.functional import TaskModel
    from fastmaml.meta.hvp import batched_grad, hvp
    from fastmaml.meta.inner_loop import adapt

    net, (xs, ys), _ = problem()
    tm = TaskModel(net, F.cross_entropy)
    phi = tm.initial_adapted(tm.theta_adapted(), 3)
    v = [torch.randn_like(p) for p in phi]
    calls = {"grad": lambda: batched_grad(tm.task_loss, phi, [], xs, ys)[1],
             "hvp": lambda: hvp(tm.task_loss, phi, v, xs, ys, mode="exact", batching="auto")[0],
             "adapt": lambda: adapt(tm, (xs, ys), 2, 0.3)}
    for name, call in calls.items():
        expected = call()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = call()
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), name
