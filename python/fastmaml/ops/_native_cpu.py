"""What the CPU implementations of the network's layers (max-pool, relu, batch norm) can take."""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .._extension import has_native_device
from ..backend import ENV_VAR


_PLAIN = (Tensor, torch.nn.Parameter)


def plain_cpu_float(x: Tensor) -> bool:
    """A plain (no subclass but ``nn.Parameter``, no ``torch.func`` transform active) float32/float64
    CPU tensor."""
    return (type(x) in _PLAIN and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and torch._C._functorch.peek_interpreter_stack() is None)


def references_requested() -> bool:
    """``FASTMAML_BACKEND=reference``: torch's own ops everywhere, no routing."""
    return os.environ.get(ENV_VAR) == "reference"


def native_available(op: str) -> bool:
    """The compiled op ``fastmaml::<op>`` has a CPU kernel and the references are not requested."""
    return not references_requested() and has_native_device("cpu", op)
