"""A learn2learn-compatible ``MAML`` wrapper: the per-task API, and the way in to the batched engine.

``MAML(model, lr).clone()`` returns a learner; ``learner.adapt(loss)`` takes one differentiable SGD
step ``phi = phi - lr * grad(loss, phi)`` (with ``create_graph=True`` unless first order), and
``learner(x)`` runs the network with the learner's parameters. The learner stays differentiable
with respect to the wrapped model's parameters, so ``query_loss.backward()`` accumulates the
MAML meta-gradient into ``model``'s ``.grad``, exactly as with ``learn2learn.algorithms.MAML``.

What differs from learn2learn's implementation (not its semantics):

* The network is never copied or mutated. A learner is the shared network plus a dict of its own
  parameter tensors; it runs through ``torch.func.functional_call``. ``clone()`` therefore does
  not walk and copy the module tree, and ``adapt`` does not rewrite module attributes.
* The network runs inside ``fastmaml.ops.cpu_kernels()``: its 2x2 max-pools, relus and
  training-mode batch norms use fastmaml's CPU kernels (bit-identical max-pool and relu, faster
  max-pool, 1 bit saved per relu element; batch norm with a much faster double backward, equal up
  to the order of its channel sums, running statistics updated as torch does; the first
  convolution with a leaner double backward, bit-identical).
* The update is one plain ``p - lr * g`` per tensor, as in learn2learn. (It was one fused
  ``fastmaml.inner_sgd_step`` call with a task dimension of 1; at T = 1 the fused op's argument
  checks and custom backward cost more than they save: 0.70x the plain loop's speed on a
  1-40-40-1 MLP, 25 tasks, measured with examples/l2l_style_before_after.py.)

This API adapts one task at a time, so it cannot batch tasks; the batched engine
(``fastmaml.meta.maml_loss`` on tasks stacked by ``fastmaml.compat.stack_tasks``) can. See
``docs/dropin.md`` for the measured difference.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterator, Optional, Union

import torch
from torch import Tensor, nn

from ..meta.functional import call_with
from ..ops.cpu_kernels import cpu_kernels


__all__ = ["MAML", "MetaSGD"]


def _check_flag(value, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        expected = "a bool or None" if allow_none else "a bool"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")


def _check_lr(lr) -> Union[float, Tensor]:
    if isinstance(lr, Tensor):
        if lr.dim() != 0 or not lr.is_floating_point():
            raise ValueError(f"lr must be a float or a 0-dim floating point tensor, got a {lr.dtype} tensor of "
                             f"shape {tuple(lr.shape)}")
        return lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"lr must be a float or a 0-dim tensor, got {type(lr).__name__}")
    if not math.isfinite(float(lr)):
        raise ValueError(f"lr must be finite, got {lr}")
    return float(lr)


class MAML(nn.Module):
    """learn2learn's ``MAML`` wrapper, drop-in: same constructor, ``clone``, ``adapt`` and call.

    Args:
        model: the network whose parameters are the meta-parameters ``theta``.
        lr: the inner step size: a float, or a 0-dim tensor (a tensor that requires grad gets a
            meta-gradient, as a learnable step size).
        first_order: ``adapt`` computes the inner gradient without a graph (FOMAML): the
            meta-gradient ignores second derivatives.
        allow_unused: accept parameters that do not take part in the inner loss (they are left
            unchanged); ``None`` means ``allow_nograd``.
        allow_nograd: adapt only the parameters that require grad and leave the others
            unchanged; otherwise a parameter that does not require grad is an error.

    Example:
        >>> maml = MAML(Conv4(1, 64, 5, 28), lr=0.4)
        >>> opt = torch.optim.Adam(maml.parameters(), 1e-3)
        >>> for xs, ys, xq, yq in tasks:
        ...     learner = maml.clone()
        ...     for _ in range(5):
        ...         learner.adapt(F.cross_entropy(learner(xs), ys))
        ...     (F.cross_entropy(learner(xq), yq) / len(tasks)).backward()
        >>> opt.step()
    """

    def __init__(self, model: nn.Module, lr: Union[float, Tensor], first_order: bool = False,
                 allow_unused: Optional[bool] = None, allow_nograd: bool = False):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_flag(first_order, "first_order")
        _check_flag(allow_unused, "allow_unused", allow_none=True)
        _check_flag(allow_nograd, "allow_nograd")
        # None: this is the wrapper of the meta-parameters (the network's own parameters).
        # A dict: this is a learner; the tensors it runs the network with (non-leaf, differentiable
        # with respect to the meta-parameters).
        self._adapted: Optional[OrderedDict[str, Tensor]] = None
        self.add_module("module", model)
        self.lr = _check_lr(lr)
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused

    # -- the network with this object's parameters ------------------------------------------
    @property
    def module(self):
        """The network. On a learner: a view that runs (and lists) the learner's parameters."""
        network = self.__dict__["_modules"].get("module")
        if network is None:  # during construction: not registered yet
            raise AttributeError("module")
        if self._adapted is None:
            return network
        return _AdaptedView(network, self._adapted)

    def forward(self, *args, **kwargs):
        network = self._modules["module"]
        with cpu_kernels():  # the network's max-pools, relus, batch norms through fastmaml's kernels
            if self._adapted is None:
                return network(*args, **kwargs)
            return call_with(network, self._adapted, args, kwargs)

    def _current(self) -> OrderedDict[str, Tensor]:
        if self._adapted is not None:
            return self._adapted
        return OrderedDict(self._modules["module"].named_parameters())

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, Tensor]]:
        """On the wrapper: ``nn.Module``'s. On a learner: its own (adapted) tensors, ``module.<name>``."""
        if self._adapted is None:
            yield from super().named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)
            return
        head = f"{prefix}." if prefix else ""
        for name, t in self._adapted.items():
            yield f"{head}module.{name}", t

    # -- learn2learn's API ----------------------------------------------------------------
    def clone(self, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> "MAML":
        """A learner: a copy of this object's parameters that stays differentiable with respect to them.

        Args:
            first_order, allow_unused, allow_nograd: override this object's settings for the learner.

        Returns:
            A ``MAML`` that shares the network (never written to) and owns its parameter tensors.
        """
        for value, name in ((first_order, "first_order"), (allow_unused, "allow_unused"),
                            (allow_nograd, "allow_nograd")):
            _check_flag(value, name, allow_none=True)
        learner = type(self).__new__(type(self))
        nn.Module.__init__(learner)
        learner._adapted = None
        learner.add_module("module", self._modules["module"])
        learner.lr = self.lr
        self._share_step_sizes(learner)
        learner.first_order = self.first_order if first_order is None else first_order
        learner.allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        learner.allow_unused = self.allow_unused if allow_unused is None else allow_unused
        learner._adapted = OrderedDict((n, p.clone()) for n, p in self._current().items())
        return learner

    def adapt(self, loss: Tensor, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> None:
        """One inner step on ``loss``: ``phi = phi - lr * grad(loss, phi)``.

        Called on the wrapper itself (not a clone), the wrapper becomes a learner, as in
        learn2learn; the network's own parameters are never modified.

        Args:
            loss: a scalar computed with this learner's parameters.
            first_order, allow_unused, allow_nograd: override the settings for this step.
        """
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss must be a scalar tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
        for value, name in ((first_order, "first_order"), (allow_unused, "allow_unused"),
                            (allow_nograd, "allow_nograd")):
            _check_flag(value, name, allow_none=True)
        first_order = self.first_order if first_order is None else first_order
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        if not loss.requires_grad:
            raise ValueError("loss does not require grad: compute it from this learner's output (learner(x)), "
                             "with grad mode on")

        current = self._current()
        if allow_nograd:
            names = [n for n, p in current.items() if p.requires_grad]
        else:
            frozen = [n for n, p in current.items() if not p.requires_grad]
            if frozen:
                raise ValueError(f"parameters {frozen} do not require grad; pass allow_nograd=True to adapt only "
                                 f"the parameters that do")
            names = list(current)
        if not names:
            raise ValueError("no parameter requires grad: there is nothing to adapt")
        second_order = not first_order
        grads = torch.autograd.grad(loss, [current[n] for n in names], retain_graph=second_order,
                                    create_graph=second_order, allow_unused=True)
        unused = [n for n, g in zip(names, grads) if g is None]
        if unused and not allow_unused:
            raise ValueError(f"parameters {unused} were not used to compute loss; pass allow_unused=True to leave "
                             f"them unchanged")
        updated = OrderedDict(current)
        for n, g in zip(names, grads):
            if g is not None:
                updated[n] = current[n] - self._step_size(n) * g
        self._adapted = updated

    def _step_size(self, name: str):
        return self.lr

    def _share_step_sizes(self, learner) -> None:
        """Give a new learner this object's learnable step sizes (MAML: ``lr`` is already copied)."""


class MetaSGD(MAML):
    """learn2learn's ``MetaSGD`` wrapper, drop-in: MAML with a learnable step size per parameter
    entry (Li et al. 2017), ``phi = phi - lrs * grad(loss, phi)`` elementwise.

    Args:
        model: the network whose parameters are the meta-parameters ``theta``.
        lr: the initial value of every step size (when ``lrs`` is not given).
        first_order: ``adapt`` computes the inner gradient without a graph.
        lrs: the step sizes, one tensor per parameter of ``model`` (``named_parameters`` order)
            and of its shape; default ``nn.ParameterList`` of ``lr`` everywhere. ``parameters()``
            lists them after the network's, so one optimizer trains both.

    Example:
        >>> meta = MetaSGD(Conv4(1, 64, 5, 28), lr=0.4)
        >>> opt = torch.optim.Adam(meta.parameters(), 1e-3)      # theta and the step sizes
        >>> learner = meta.clone()
        >>> learner.adapt(F.cross_entropy(learner(xs), ys))
        >>> F.cross_entropy(learner(xq), yq).backward()
        >>> # the same meta-gradient for all tasks at once:
        >>> maml_loss(meta.module, F.cross_entropy, support, query, num_steps=1, lr=list(meta.lrs))
    """

    def __init__(self, model: nn.Module, lr: float = 1.0, first_order: bool = False, lrs=None):
        super().__init__(model, lr=lr, first_order=first_order)
        named = list(model.named_parameters())
        if lrs is None:
            lrs = nn.ParameterList([nn.Parameter(torch.ones_like(p.detach()) * self.lr) for _, p in named])
        else:
            if isinstance(lrs, Tensor) or not hasattr(lrs, "__len__"):
                raise TypeError(f"lrs must be a list of tensors (one per parameter), got {type(lrs).__name__}")
            if len(lrs) != len(named):
                raise ValueError(f"lrs has {len(lrs)} tensors; expected one per parameter of the model ({len(named)})")
            for i, ((name, p), a) in enumerate(zip(named, lrs)):
                if not isinstance(a, Tensor) or a.shape != p.shape:
                    shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
                    raise ValueError(f"lrs[{i}] has shape {shape}; expected {tuple(p.shape)}, the shape of "
                                     f"parameter {name!r}")
        self.lrs = lrs
        self._lr_index = {name: i for i, (name, _) in enumerate(named)}

    def _step_size(self, name: str):
        return self.lrs[self._lr_index[name]]

    def _share_step_sizes(self, learner) -> None:
        # the same tensors: the query loss's backward reaches them (learn2learn clones them,
        # which gives the same gradients)
        learner.lrs = self.lrs
        learner._lr_index = self._lr_index

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, Tensor]]:
        """On the wrapper: ``nn.Module``'s (the network's, then ``lrs``). On a learner: its adapted
        tensors, then the step sizes."""
        if self._adapted is None:
            yield from super().named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)
            return
        yield from super().named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)
        head = f"{prefix}." if prefix else ""
        for i, t in enumerate(self.lrs):
            yield f"{head}lrs.{i}", t


class _AdaptedView:
    """A learner's ``.module``: the shared network (or one of its submodules) run with the learner's tensors.

    Calling it runs ``functional_call`` with the learner's parameters; ``parameters()`` and
    parameter attributes (``view.weight``) are the learner's tensors; submodules (attributes or
    indexing) are views of the same kind; any other attribute is the network's own.
    """

    def __init__(self, network: nn.Module, params: OrderedDict):
        object.__setattr__(self, "_network", network)
        object.__setattr__(self, "_params", params)

    def __call__(self, *args, **kwargs):
        with cpu_kernels():
            return call_with(self._network, self._params, args, kwargs)

    def forward(self, *args, **kwargs):
        return self(*args, **kwargs)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        head = f"{prefix}." if prefix else ""
        for name, t in self._params.items():
            yield head + name, t

    def parameters(self, recurse: bool = True):
        for _, t in self.named_parameters():
            yield t

    def _sub(self, child: nn.Module):
        for name, m in self._network.named_children():
            if m is child:
                cut = name + "."
                return _AdaptedView(child, OrderedDict(
                    (k[len(cut):], v) for k, v in self._params.items() if k.startswith(cut)))
        return child

    def __getattr__(self, name):
        params = object.__getattribute__(self, "_params")
        if name in params:  # a parameter of this very module (no dot in its name)
            return params[name]
        value = getattr(self._network, name)
        return self._sub(value) if isinstance(value, nn.Module) else value

    def __getitem__(self, index):
        value = self._network[index]
        return self._sub(value) if isinstance(value, nn.Module) else value

    def __setattr__(self, name, value):
        raise AttributeError(f"a learner's module is a read-only view; cannot set {name!r} (the network is shared "
                             f"with the meta-parameters)")

    def __repr__(self):
        return f"AdaptedView({self._network!r})"
