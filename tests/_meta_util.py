"""Helpers shared by the meta-gradient tests."""
import torch

from fastmaml.meta.inner_loop import lslr_step_sizes, meta_sgd_step_sizes


def rel_err(got, ref):
    """||got - ref|| / ||ref|| over all tensors of the two lists."""
    a = torch.cat([t.reshape(-1) for t in got])
    b = torch.cat([t.reshape(-1) for t in ref])
    return ((a - b).norm() / b.norm()).item()


def grads_of(loss, params):
    """grad(loss, params) with zeros for the parameters the loss does not use."""
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


# fastmaml.meta.hvp's generic batchings (vmap, the autograd loop, stacked)
GENERIC_PATHS = ("over_tasks", "_loop_grad_autograd", "_loop_hvp_double_backward", "_stacked_grad", "_stacked_hvp")


def forbid(monkeypatch, module, names, message):
    """Patch ``module.<name>`` for each name to raise ``AssertionError(message)``: a test then shows
    which path did not run."""
    def boom(*args, **kwargs):
        raise AssertionError(message)

    for name in names:
        monkeypatch.setattr(module, name, boom)


def make_lr(form, tm, num_steps):
    """Step sizes of one form for the engine tests: ``(lr, its learnable tensors)``; fixed 0.3,
    a learnable scalar 0.3, or LSLR / Meta-SGD initialised at 0.2 (float64)."""
    if form == "fixed":
        return 0.3, []
    if form == "scalar":
        lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        return lr, [lr]
    if form == "lslr":
        lr = lslr_step_sizes(tm, num_steps, 0.2, dtype=torch.float64)
    else:
        lr = meta_sgd_step_sizes(tm, 0.2, dtype=torch.float64)
    return lr, list(lr.parameters())
