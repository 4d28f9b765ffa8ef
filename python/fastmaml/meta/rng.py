"""Replaying random numbers for the passes the engines recompute (dropout in the inner loop).

The second-order engines keep no activations: the backward recomputes each inner step's support
pass to take its HVP. A model that draws random numbers there (``nn.Dropout`` in training mode,
``F.dropout`` in its forward) would draw new masks in the recomputation, and the meta-gradient
would mix the Hessian of one network with the gradient of another. ``RngLog`` records the
generator's state before each step's support pass and puts it back before that step is
recomputed, so the recomputation draws the same numbers in the same order (as
``torch.utils.checkpoint`` does for one segment); the backward then restores the state it found,
so the training loop's own stream goes on as if nothing had been replayed.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor


class RngLog:
    """Generator states of the CPU (and of ``device`` when it is a CUDA device), one per inner step.

    Args:
        device: the device of the tensors the model runs on.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.states: list = []
        self.start = self._state()

    def _state(self) -> tuple[Tensor, Optional[Tensor]]:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set(self, state) -> None:
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)

    def mark(self) -> None:
        """Record the state before the next step's support pass."""
        self.states.append(self._state())

    def drew(self) -> bool:
        """Whether anything drew random numbers since this log was made."""
        now = self._state()
        return not all(a is None and b is None or torch.equal(a, b) for a, b in zip(self.start, now))

    def replay(self, step: int) -> None:
        """Put the generators back where they were before ``step``'s support pass."""
        self._set(self.states[step])

    @contextlib.contextmanager
    def preserved(self):
        """Restore, on exit, the states found on entry (the caller's stream is not rewound)."""
        found = self._state()
        try:
            yield self
        finally:
            self._set(found)


@contextlib.contextmanager
def replaying(log: Optional[RngLog], step: int):
    """Within the context, the generators stand where they stood before ``step``'s support pass
    (``-1``: the last step's); on exit, where they stood on entry. A no-op without a log (the
    forward pass drew nothing)."""
    if log is None:
        yield
        return
    with log.preserved():
        log.replay(step)
        yield
