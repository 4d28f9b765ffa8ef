"""Bad input to the meta-gradient engine: clear errors that name the argument (and the task)."""
import pytest
import torch
import torch.nn.functional as F

from fastmaml.meta.front import MAML, maml_loss
from fastmaml.meta.functional import NonFiniteLossError, TaskModel
from fastmaml.meta.inner_loop import adapt
from fastmaml.meta.models import MLP, CaviaMLP, mse_loss

F64 = torch.float64


def setup(num_tasks=3):
    torch.manual_seed(0)
    net = MLP(3, (5,), 2).double()
    sup = torch.randn(num_tasks, 6, 3, dtype=F64), torch.randn(num_tasks, 6, 2, dtype=F64)
    qry = torch.randn(num_tasks, 4, 3, dtype=F64), torch.randn(num_tasks, 4, 2, dtype=F64)
    return net, sup, qry


def test_mismatched_task_counts():
    net, sup, qry = setup()
    with pytest.raises(ValueError, match="support has 3 tasks but query has 2"):
        maml_loss(net, mse_loss, sup, (qry[0][:2], qry[1][:2]), num_steps=1, lr=0.1)
    with pytest.raises(ValueError, match="support x has 3 tasks but support y has 2"):
        maml_loss(net, mse_loss, (sup[0], sup[1][:2]), qry, num_steps=1, lr=0.1)


def test_data_unlike_the_parameters_or_without_samples_is_named():
    net, sup, qry = setup()
    with pytest.raises(TypeError, match="support x is torch.float32; expected torch.float64"):
        maml_loss(net, mse_loss, (sup[0].float(), sup[1]), qry, num_steps=1, lr=0.1)
    with pytest.raises(TypeError, match="query x is torch.float32"):
        maml_loss(net, mse_loss, sup, (qry[0].float(), qry[1]), num_steps=1, lr=0.1)
    with pytest.raises(ValueError, match=r"support x has shape \(3, 0, 3\): no samples per task"):
        maml_loss(net, mse_loss, (sup[0][:, :0], sup[1][:, :0]), qry, num_steps=1, lr=0.1)
    with pytest.raises(ValueError, match="query y has shape"):
        maml_loss(net, mse_loss, sup, (qry[0], qry[1][:, :0]), num_steps=1, lr=0.1)


@pytest.mark.parametrize("bad", [-1, -5])
def test_negative_steps(bad):
    net, sup, qry = setup()
    with pytest.raises(ValueError, match="num_steps must be >= 0"):
        maml_loss(net, mse_loss, sup, qry, num_steps=bad, lr=0.1)
    with pytest.raises(TypeError, match="num_steps must be an int"):
        maml_loss(net, mse_loss, sup, qry, num_steps=2.0, lr=0.1)


def test_loss_not_scalar_per_task():
    net, sup, qry = setup()
    per_sample = lambda out, y: ((out - y) ** 2).mean(1)  # noqa: E731  [N] per task
    with pytest.raises(ValueError, match="scalar per task"):
        maml_loss(net, per_sample, sup, qry, num_steps=1, lr=0.1)


def test_parameters_must_require_grad():
    net, sup, qry = setup()
    net[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="'0.weight' does not require grad"):
        maml_loss(net, mse_loss, sup, qry, num_steps=1, lr=0.1)


@pytest.mark.parametrize("algorithm", ["maml", "imaml"])
def test_non_finite_support_loss_names_the_task(algorithm):
    net, sup, qry = setup()
    sup[0][2, 1, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="inner step 0.*task 2"):
        maml_loss(net, mse_loss, sup, qry, num_steps=2, lr=0.1, algorithm=algorithm)


def test_non_finite_query_loss_names_the_task():
    net, sup, qry = setup()
    qry[1][1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="query loss.*task 1"):
        maml_loss(net, mse_loss, sup, qry, num_steps=1, lr=0.1)


def test_divergent_inner_loop_names_step_and_task():
    net, sup, qry = setup()
    sup[0][0] *= 1e30  # task 0 blows up after its first step
    with pytest.raises(NonFiniteLossError, match="task 0"):
        maml_loss(net, mse_loss, sup, qry, num_steps=3, lr=1e3)


def test_bad_settings():
    net, sup, qry = setup()
    with pytest.raises(ValueError, match="algorithm must be one of"):
        maml_loss(net, mse_loss, sup, qry, algorithm="anil")
    with pytest.raises(ValueError, match="hvp mode must be one of"):
        maml_loss(net, mse_loss, sup, qry, hvp_mode="bfgs")
    with pytest.raises(ValueError, match="reduction"):
        maml_loss(net, mse_loss, sup, qry, reduction="max")
    with pytest.raises(ValueError, match="engine='autograd' implements"):
        maml_loss(net, mse_loss, sup, qry, algorithm="reptile", engine="autograd")
    with pytest.raises(TypeError, match="query"):
        maml_loss(net, mse_loss, sup, None, algorithm="maml")
    with pytest.raises(ValueError, match="imaml_lambda"):
        maml_loss(net, mse_loss, sup, qry, algorithm="imaml", imaml_lambda=0.0)
    with pytest.raises(ValueError, match="adapt"):
        TaskModel(net, mse_loss, adapt="everything")
    with pytest.raises(ValueError, match="not parameters of the model"):
        TaskModel(net, mse_loss, adapt=["0.weight", "nope"])
    with pytest.raises(ValueError, match="context_dim"):
        TaskModel(net, mse_loss, adapt="context")
    with pytest.raises(ValueError, match="lr_form"):
        MAML(net, mse_loss, lr_form="adam")


def test_bad_step_sizes():
    net, sup, qry = setup()
    with pytest.raises(ValueError, match="one entry per adapted tensor: expected 4, got 2"):
        maml_loss(net, mse_loss, sup, qry, num_steps=1, lr=[0.1, 0.2])
    with pytest.raises(ValueError, match="one list per inner step: expected 3, got 2"):
        maml_loss(net, mse_loss, sup, qry, num_steps=3, lr=[[0.1] * 4] * 2)
    with pytest.raises(TypeError, match="float32.*expected torch.float64"):
        maml_loss(net, mse_loss, sup, qry, num_steps=1, lr=torch.tensor(0.1))
    with pytest.raises(TypeError, match="lr must be a float or a tensor"):
        maml_loss(net, mse_loss, sup, qry, num_steps=1, lr="0.1")


def test_bad_data():
    net, sup, qry = setup()
    with pytest.raises(TypeError, match="support must be a pair"):
        maml_loss(net, mse_loss, sup[0], qry)
    with pytest.raises(TypeError, match="query x must be a tensor"):
        maml_loss(net, mse_loss, sup, ([1.0], qry[1]))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        adapt(TaskModel(lambda x: x, mse_loss), sup, 1, 0.1)


def test_cavia_model_gets_context():
    torch.manual_seed(0)
    net = CaviaMLP(3, 2, (5,), 2).double()
    _, sup, qry = setup()
    loss = maml_loss(net, mse_loss, sup, qry, num_steps=2, lr=0.1, adapt="context")
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


def test_conv4_rejects_images_too_small_for_four_pools():
    from fastmaml.meta.models import Conv4

    with pytest.raises(ValueError, match="image_size must be an int >= 16"):
        Conv4(1, 8, 5, 8)


@pytest.mark.parametrize("algorithm", ["maml", "imaml"])
def test_a_non_finite_meta_gradient_from_finite_losses_is_named(algorithm, monkeypatch):
    """An overflow inside the backward recursion (simulated: one HVP entry set to inf) raises
    naming the parameter, unless check_finite=False."""
    from fastmaml.meta import imaml as imaml_module
    from fastmaml.meta import maml as maml_module
    from fastmaml.meta.maml import NonFiniteMetaGradientError

    module = maml_module if algorithm == "maml" else imaml_module
    real = module.hvp

    def overflowing(*args, **kwargs):
        hv_a, hv_f = real(*args, **kwargs)
        hv_a = [h.clone() for h in hv_a]
        hv_a[0].view(-1)[0] = float("inf")
        return hv_a, hv_f

    monkeypatch.setattr(module, "hvp", overflowing)
    net, sup, qry = setup()
    params = list(net.parameters())
    kw = dict(num_steps=2, lr=0.1, algorithm=algorithm, batching="vmap")
    with pytest.raises(NonFiniteMetaGradientError, match="meta-gradient of parameter '0.weight'"):
        torch.autograd.grad(maml_loss(net, mse_loss, sup, qry, **kw), params)
    grads = torch.autograd.grad(maml_loss(net, mse_loss, sup, qry, check_finite=False, **kw), params)
    assert not bool(torch.isfinite(grads[0]).all())
