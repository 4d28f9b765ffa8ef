"""Using an ``nn.Module`` functionally for a batch of tasks.

``TaskModel`` turns a module and a loss into the per-task function ``L(adapted, fixed, x, y)`` that
the rest of ``fastmaml.meta`` differentiates, batched over tasks with ``torch.func.vmap``:

* ``adapted``: the tensors the inner loop changes, one ``[T, ...]`` stack per tensor (inside the
  vmapped function: one task's slice);
* ``fixed``: the meta-parameters the inner loop does not touch (ANIL's body, all of CAVIA's
  network), shared by the tasks (not batched);
* ``x, y``: one task's data (the caller stacks tasks as ``[T, N, ...]``).

Batch norm: every ``_BatchNorm`` module is run with the statistics of the batch it sees (per task,
per call), as MAML implementations do, and its running statistics are neither read nor written:
``batch_stats_only`` switches ``track_running_stats`` off for the duration of the call and restores
it, so a meta-training step never corrupts the buffers (``test_inner_loop`` checks this).

Composition rule (see ``docs/meta.md``): gradients are always ``vmap(grad(task_loss))``, never
``grad(vmap(task_loss))``; the latter gives wrong second-order gradients through batch norm on
torch 2.x CPU builds.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

AdaptSpec = Union[str, Sequence[str], Callable[[str], bool]]


@contextlib.contextmanager
def batch_stats_only(model: nn.Module):
    """Run every batch-norm layer of ``model`` on batch statistics, leaving running stats untouched.

    Inside the context, ``_BatchNorm`` modules are in training mode with ``track_running_stats``
    off: they normalize with the statistics of the current (per-task) batch and never update
    ``running_mean``, ``running_var`` or ``num_batches_tracked``. Both flags are restored on exit.

    Example:
        >>> net = Conv4(1, 8, 5, 28)
        >>> with batch_stats_only(net):
        ...     out = net(torch.randn(5, 1, 28, 28))
    """
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.training, m.track_running_stats))
            m.training = True
            m.track_running_stats = False
    try:
        yield model
    finally:
        for m, training, track in saved:
            m.training = training
            m.track_running_stats = track


@torch.no_grad()
def recompute_batch_norm_stats(model: nn.Module, batches) -> nn.Module:
    """Set every batch-norm layer's running statistics to the exact average over ``batches``.

    The meta-learning engine never touches running statistics (``batch_stats_only``); a model meant
    for evaluation with ``model.eval()`` needs them. This resets them and runs ``model`` in training
    mode with ``momentum=None`` (a cumulative average) over the given inputs, then restores each
    layer's mode and momentum. Parameters are not changed.

    Args:
        model: the network (its forward takes one input tensor).
        batches: an iterable of input tensors ``[N, ...]`` (for example each task's support and
            query images, or a ``[T, N, ...]`` tensor, which is iterated over its tasks).

    Returns:
        ``model``.

    Example:
        >>> recompute_batch_norm_stats(net, xq)   # xq: [T, 75, 1, 28, 28], one batch per task
        >>> net.eval()
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return model
    if isinstance(batches, Tensor):
        if batches.dim() < 2:
            raise ValueError(f"batches as one tensor must be [T, N, ...], got shape {tuple(batches.shape)}")
        batches = list(batches)
    saved = [(m, m.training, m.momentum, m.track_running_stats) for m in layers]
    seen = 0
    try:
        for m in layers:
            if m.running_mean is None:
                raise ValueError(f"batch-norm layer {m} has no running statistics (track_running_stats=False "
                                 "at construction)")
            m.reset_running_stats()
            m.train()
            m.momentum = None
            m.track_running_stats = True
        for i, x in enumerate(batches):
            if not isinstance(x, Tensor):
                raise TypeError(f"batches[{i}] must be a tensor, got {type(x).__name__}")
            model(x)
            seen += 1
    finally:
        for m, training, momentum, track in saved:
            m.train(training)
            m.momentum = momentum
            m.track_running_stats = track
    if seen == 0:
        raise ValueError("batches is empty: no statistics to compute")
    return model


def autocast_active() -> bool:
    """Whether ``torch.autocast`` is on for the CPU or CUDA in this thread."""
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


def without_autocast(fn):
    """Run ``fn`` with autocast off (CPU and CUDA): the engine's passes, fused kernels and HVP
    recursion run in the parameters' dtype (under autocast they met bfloat16 / float16 activations
    against float32 weights and failed in the kernels)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not autocast_active():  # (the usual case: one thread-local flag read per call)
            return fn(*args, **kwargs)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)
    return wrapper


def tensor_slots(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """``{name: paths}``: for each parameter and buffer (named as ``named_parameters()`` /
    ``named_buffers()`` name it), one path to every distinct module attribute that holds it.

    A module reachable by two paths (learn2learn's ``OmniglotCNN`` holds its conv blocks as
    ``base`` and as ``features.1``) is one slot with two names; the same tensor assigned to two
    modules (tied weights) is two slots. ``call_with`` swaps each slot exactly once.
    """
    by_tensor: dict[int, dict[tuple[int, str], str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for table in (module._parameters, module._buffers):
            for attr, tensor in table.items():
                if tensor is not None:
                    by_tensor.setdefault(id(tensor), {}).setdefault((id(module), attr),
                                                                     f"{path}.{attr}" if path else attr)
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {name: tuple(by_tensor[id(t)].values()) for name, t in named}


def call_with(model: nn.Module, tensors: Mapping[str, Tensor], args: tuple, kwargs: Optional[dict] = None,
              slots: Optional[Mapping[str, Sequence[str]]] = None):
    """``model(*args, **kwargs)`` with ``tensors`` (``{name: tensor}``, names as ``tensor_slots``
    gives them) in place of the module's own, which are restored afterwards.

    ``torch.func.functional_call`` (torch 2.13) does not restore a module reachable by two paths:
    it swaps the shared slot once per path and puts the *new* tensor back the second time, so the
    model keeps the last call's tensors (wrong gradients, or tensors escaping a ``vmap``). Here
    every slot is named once and swapped once.

    Args:
        slots: ``tensor_slots(model)``, when the caller keeps it (computed here otherwise).
    """
    if slots is None:
        slots = tensor_slots(model)
    expanded = {}
    for name, tensor in tensors.items():
        for path in slots.get(name, (name,)):
            expanded[path] = tensor
    return functional_call(model, expanded, args, kwargs, tie_weights=False)


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters of the last submodule (in registration order) that has any: ANIL's head."""
    owners = [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not owners:
        raise ValueError("the model has no parameters: ANIL needs a head")
    last = owners[-1]
    prefix = f"{last}." if last else ""
    return [f"{prefix}{n}" for n, _ in model.get_submodule(last).named_parameters(recurse=False)]


class TaskModel:
    """A module and a loss, seen as the per-task function ``L(adapted, fixed, x, y)``.

    Args:
        model: the network. Its parameters are the meta-parameters ``theta``; it is only called
            functionally (``torch.func.functional_call``), its parameters are never modified.
        loss_fn: ``loss_fn(output, target) -> scalar`` for one task (e.g. ``F.cross_entropy``).
        adapt: what the inner loop adapts. ``"all"`` (MAML), ``"head"`` (ANIL: the last submodule
            with parameters), ``"context"`` (CAVIA: a per-task context vector, zero at the start of
            every task, passed as the second argument of ``model.forward``), a list of parameter
            names, or a predicate on parameter names.
        context_dim: size of CAVIA's context (default ``model.context_dim``).

    Example:
        >>> tm = TaskModel(MLP(1, (40, 40), 1), F.mse_loss, adapt="head")
        >>> tm.adapt_names
        ('2.weight', '2.bias')
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], adapt: AdaptSpec = "all",
                 context_dim: Optional[int] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        named = dict(model.named_parameters())
        for name, p in named.items():
            if not p.requires_grad:
                raise ValueError(
                    f"parameter {name!r} does not require grad: meta-gradients need every parameter of the "
                    f"model to require grad (pass a model whose frozen parts are buffers or constants)")
        self.context = adapt == "context"
        if self.context:
            dim = context_dim if context_dim is not None else getattr(model, "context_dim", None)
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
                raise ValueError(f"adapt='context' needs a positive int context_dim (or model.context_dim), got {dim!r}")
            self.context_dim = dim
            self.adapt_names: tuple[str, ...] = ("context",)
            self.fixed_names: tuple[str, ...] = tuple(named)
        else:
            if adapt == "all":
                chosen = list(named)
            elif adapt == "head":
                chosen = head_parameter_names(model)
            elif isinstance(adapt, str):
                raise ValueError(f"adapt must be 'all', 'head', 'context', a list of names or a predicate, got {adapt!r}")
            elif callable(adapt):
                chosen = [n for n in named if adapt(n)]
            else:
                chosen = list(adapt)
                unknown = [n for n in chosen if n not in named]
                if unknown:
                    raise ValueError(f"adapt names {unknown} are not parameters of the model; known: {list(named)}")
            if not chosen:
                raise ValueError("adapt selects no parameter: the inner loop would have nothing to adapt")
            chosen_set = set(chosen)
            self.adapt_names = tuple(n for n in named if n in chosen_set)
            self.fixed_names = tuple(n for n in named if n not in chosen_set)
        self.buffers = dict(model.named_buffers())
        self.slots = tensor_slots(model)
        self.has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())

    # -- parameters ---------------------------------------------------------------------------
    def theta_adapted(self) -> list[Tensor]:
        """The meta-parameters the inner loop starts from (empty for CAVIA: its context starts at 0)."""
        if self.context:
            return []
        named = dict(self.model.named_parameters())
        return [named[n] for n in self.adapt_names]

    def theta_fixed(self) -> list[Tensor]:
        named = dict(self.model.named_parameters())
        return [named[n] for n in self.fixed_names]

    def initial_adapted(self, theta_adapted: Sequence[Tensor], num_tasks: int) -> list[Tensor]:
        """``phi_0``: ``theta`` repeated for every task, ``[T, ...]`` (CAVIA: zeros ``[T, context_dim]``)."""
        if self.context:
            like = next(self.model.parameters())
            return [like.new_zeros(num_tasks, self.context_dim)]
        return [t.detach().unsqueeze(0).expand(num_tasks, *t.shape).contiguous() for t in theta_adapted]

    def shared_start(self, theta_adapted: Sequence[Tensor]) -> list[Tensor]:
        """``phi_0`` without the task dimension (every task starts there): ``theta`` or CAVIA's zero context."""
        if self.context:
            like = next(self.model.parameters())
            return [like.new_zeros(self.context_dim)]
        return [t.detach() for t in theta_adapted]

    # -- the per-task function ----------------------------------------------------------------
    def forward(self, adapted: Sequence[Tensor], fixed: Sequence[Tensor], x: Tensor) -> Tensor:
        """The model's output for one task (call inside ``vmap`` for a batch of tasks).

        Batch-norm layers use this task's batch statistics and leave the running stats untouched.
        """
        if self.has_batch_norm:
            with batch_stats_only(self.model):
                return self._forward(adapted, fixed, x)
        return self._forward(adapted, fixed, x)

    def _forward(self, adapted, fixed, x):
        if self.context:
            tensors = dict(zip(self.fixed_names, fixed))
            tensors.update(self.buffers)
            return call_with(self.model, tensors, (x, adapted[0]), slots=self.slots)
        tensors = dict(zip(self.adapt_names, adapted))
        tensors.update(zip(self.fixed_names, fixed))
        tensors.update(self.buffers)
        return call_with(self.model, tensors, (x,), slots=self.slots)

    def task_loss(self, adapted: Sequence[Tensor], fixed: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
        """``L(adapted, fixed, x, y)`` for one task: a scalar."""
        loss = self.loss_fn(self.forward(adapted, fixed, x), y)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar per task, got {shape} (use reduction='mean' or 'sum')")
        return loss


def check_task_data(support: Sequence[Tensor], query: Optional[Sequence[Tensor]]) -> int:
    """Check ``(x, y)`` pairs stacked as ``[T, N, ...]``; returns T."""
    def pair(batch, name):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"{name} must be a pair (x, y) of tensors [T, N, ...], got {type(batch).__name__}")
        x, y = batch
        for part, t in (("x", x), ("y", y)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} {part} must be a tensor [T, N, ...], got {type(t).__name__}")
            if t.dim() < 1:
                raise ValueError(f"{name} {part} must have a leading task dimension [T, ...], got a 0-dim tensor")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{name} x has {x.shape[0]} tasks but {name} y has {y.shape[0]}: expected the same T")
        if x.shape[0] < 1:
            raise ValueError(f"{name} has T = 0 tasks; expected at least one")
        return x.shape[0]

    num_tasks = pair(support, "support")
    if query is not None:
        tq = pair(query, "query")
        if tq != num_tasks:
            raise ValueError(
                f"support has {num_tasks} tasks but query has {tq}: support and query must stack the same "
                f"tasks [T, N, ...]")
    return num_tasks


class NonFiniteLossError(ValueError, FloatingPointError):
    """A task's loss became NaN or infinite (the message names the task and the step)."""


# The index of the first task of the losses being checked, in the caller's numbering (an engine
# that runs one task's slice at a time names the task of the whole batch).
_FIRST_TASK = contextvars.ContextVar("fastmaml_first_task", default=0)


@contextlib.contextmanager
def numbering_tasks_from(first: int):
    """Within the context, ``check_losses_finite`` names task ``first + t`` for the ``t``-th loss."""
    token = _FIRST_TASK.set(first)
    try:
        yield
    finally:
        _FIRST_TASK.reset(token)


def check_losses_finite(losses: Tensor, what: str) -> None:
    """Raise naming the first task whose loss is NaN or infinite."""
    bad = ~torch.isfinite(losses.detach())
    if bool(bad.any()):
        t = int(bad.nonzero()[0, 0])
        raise NonFiniteLossError(
            f"{what}: the loss of task {t + _FIRST_TASK.get()} is {losses[t].item()} (non-finite); check that task's "
            f"data and the step sizes")
