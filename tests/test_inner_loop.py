"""The batched inner loop: step-size forms, ANIL / CAVIA subsets, batch norm with per-task statistics."""
import pytest
import torch
import torch.nn.functional as F

from fastmaml.meta.front import MAML, maml_loss
from fastmaml.meta.functional import TaskModel, batch_stats_only, head_parameter_names
from fastmaml.meta.inner_loop import adapt, lslr_step_sizes, meta_sgd_step_sizes, normalize_step_sizes
from fastmaml.meta.models import MLP, CaviaMLP, Conv4, mse_loss
from fastmaml.reference.meta import inner_loop_reference

F64 = torch.float64


def conv_task_model(adapt_spec="all", seed=0):
    torch.manual_seed(seed)
    return TaskModel(Conv4(1, 3, 3, 16).double(), F.cross_entropy, adapt=adapt_spec)


def conv_data(num_tasks, n=6):
    return torch.randn(num_tasks, n, 1, 16, 16, dtype=F64), torch.randint(0, 3, (num_tasks, n))


def step_sizes(form, tm, num_steps):
    if form == "scalar":
        return 0.3
    if form == "tensor":
        return torch.tensor(0.2, dtype=F64)
    if form == "lslr":
        return lslr_step_sizes(tm, num_steps, 0.1, dtype=F64)
    return meta_sgd_step_sizes(tm, 0.1, dtype=F64)


@pytest.mark.parametrize("form", ["scalar", "tensor", "lslr", "meta_sgd"])
@pytest.mark.parametrize("num_steps,num_tasks", [(0, 3), (1, 1), (2, 8), (5, 3)])
def test_adapt_matches_per_task_reference(form, num_steps, num_tasks):
    tm = conv_task_model()
    sup = conv_data(num_tasks)
    lr = step_sizes(form, tm, num_steps)
    got = adapt(tm, sup, num_steps, lr)
    per_step, _ = normalize_step_sizes(lr, num_steps, [p.shape for p in tm.theta_adapted()])
    ref = [p.detach() for p in inner_loop_reference(tm, sup, per_step, create_graph=False)]
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    if num_steps == 0:
        torch.testing.assert_close(got, [p.detach().expand_as(g) for p, g in zip(tm.theta_adapted(), got)])


def test_anil_adapts_only_the_head():
    tm = conv_task_model("head")
    assert tm.adapt_names == ("head.weight", "head.bias")
    assert head_parameter_names(tm.model) == ["head.weight", "head.bias"]
    phi = adapt(tm, conv_data(3), 2, 0.5)
    assert [p.shape for p in phi] == [(3, 3, 3), (3, 3)]
    assert not torch.allclose(phi[0][0], tm.model.head.weight)


def test_cavia_context_starts_at_zero_and_adapts():
    torch.manual_seed(0)
    net = CaviaMLP(2, 4, (8,), 1, torch.nn.Tanh).double()
    tm = TaskModel(net, mse_loss, adapt="context")
    sup = torch.randn(3, 10, 2, dtype=F64), torch.randn(3, 10, 1, dtype=F64)
    assert adapt(tm, sup, 0, 0.5)[0].abs().max() == 0
    ctx = adapt(tm, sup, 3, 0.5)[0]
    assert ctx.shape == (3, 4) and bool((ctx.abs().sum(1) > 0).all())
    ref = inner_loop_reference(tm, sup, [[0.5]] * 3, create_graph=False)[0]
    torch.testing.assert_close(ctx, ref.detach(), rtol=1e-10, atol=1e-12)


def test_batch_norm_uses_per_task_statistics():
    """A task's adapted parameters depend on its own data only (BN statistics are per task)."""
    tm = conv_task_model()
    xs, ys = conv_data(4)
    full = adapt(tm, (xs, ys), 2, 0.3)
    other = xs.clone()
    other[0] = 10 * torch.randn_like(other[0]) + 3  # change task 0 only
    changed = adapt(tm, (other, ys), 2, 0.3)
    torch.testing.assert_close([p[1:] for p in full], [p[1:] for p in changed], rtol=1e-12, atol=1e-13)
    assert not torch.allclose(full[0][0], changed[0][0])


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "imaml"])
def test_running_statistics_are_never_touched(algorithm):
    tm = conv_task_model()
    net = tm.model
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 1, 16, 16, dtype=F64))  # non-trivial running stats
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    loss = maml_loss(tm, support=conv_data(3), query=conv_data(3), num_steps=2, lr=0.3, algorithm=algorithm)
    loss.backward()
    adapt(tm, conv_data(2), 1, 0.3)
    after = {k: v for k, v in net.state_dict().items() if k in before}
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert net.training


def test_batch_stats_only_restores_eval_mode():
    net = Conv4(1, 3, 3, 16).double().eval()
    with batch_stats_only(net):
        assert all(m.training and not m.track_running_stats for m in net.modules()
                   if isinstance(m, torch.nn.BatchNorm2d))
    assert all((not m.training) and m.track_running_stats for m in net.modules()
               if isinstance(m, torch.nn.BatchNorm2d))


def test_normalize_step_sizes_forms():
    shapes = [(3, 2), (3,)]
    per_step, tensors = normalize_step_sizes(0.1, 2, shapes)
    assert per_step == [[0.1, 0.1], [0.1, 0.1]] and tensors == []
    a = torch.tensor(0.2)
    per_step, tensors = normalize_step_sizes([a, 0.3], 3, shapes)
    assert len(per_step) == 3 and per_step[2][0] is a and tensors == [a]
    m = [torch.full((3, 2), 0.1), torch.full((3,), 0.1)]
    per_step, tensors = normalize_step_sizes(m, 1, shapes)
    assert len(tensors) == 2
    lslr = [[torch.tensor(0.1), torch.tensor(0.2)] for _ in range(4)]
    per_step, tensors = normalize_step_sizes(lslr, 4, shapes)
    assert len(tensors) == 8 and per_step[3][1] is lslr[3][1]
    with pytest.raises(ValueError, match="one list per inner step"):
        normalize_step_sizes(lslr, 3, shapes)
    with pytest.raises(ValueError, match="one entry per adapted tensor"):
        normalize_step_sizes([0.1], 1, shapes)
    with pytest.raises(ValueError, match="parameter shape"):
        normalize_step_sizes([torch.ones(2, 3), 0.1], 1, shapes)
    with pytest.raises(ValueError, match="finite"):
        normalize_step_sizes(float("nan"), 1, shapes)


def test_maml_module_adapt_and_learnable_step_sizes():
    torch.manual_seed(0)
    net = MLP(2, (8,), 1, torch.nn.Tanh).double()
    maml = MAML(net, mse_loss, num_steps=2, lr=0.1, lr_form="lslr")
    names = [n for n, _ in maml.named_parameters()]
    assert sum(n.startswith("lr.") for n in names) == 2 * 4
    sup = torch.randn(3, 5, 2, dtype=F64), torch.randn(3, 5, 1, dtype=F64)
    phi = maml.adapt(sup)
    assert phi[0].shape == (3, 8, 2)


def test_recompute_batch_norm_stats_gives_the_exact_average_and_restores_modes():
    from fastmaml.meta import recompute_batch_norm_stats
    from fastmaml.meta.models import Conv4

    torch.manual_seed(0)
    net = Conv4(1, 4, 3, 16).double()
    net.eval()
    params_before = [p.clone() for p in net.parameters()]
    xs = torch.randn(3, 6, 1, 16, 16, dtype=torch.float64)
    recompute_batch_norm_stats(net, xs)
    bn = net.features[1]
    # the first BN sees conv(x): its running mean is the average of the three batch means
    with torch.no_grad():
        means = torch.stack([net.features[0](x).mean(dim=(0, 2, 3)) for x in xs])
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    assert int(bn.num_batches_tracked) == 3
    assert not net.training and bn.momentum == 0.1 and bn.track_running_stats
    assert all(torch.equal(a, b) for a, b in zip(params_before, net.parameters()))
    with pytest.raises(ValueError, match="batches is empty"):
        recompute_batch_norm_stats(net, [])
    with pytest.raises(TypeError, match=r"batches\[0\] must be a tensor"):
        recompute_batch_norm_stats(net, ["x"])
