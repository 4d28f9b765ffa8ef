"""The one place that decides which implementation runs an op.

Backends: ``"cpu"`` (compiled C++), ``"cuda"`` (compiled CUDA), ``"triton"``, ``"reference"``
(pure PyTorch, the specification). ``"auto"`` picks the fastest available for the tensors' device.
Precedence: an explicit ``backend=`` argument, else the ``FASTMAML_BACKEND`` environment variable,
else ``"auto"``.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ._extension import has_native_device

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
ENV_VAR = "FASTMAML_BACKEND"

# Preference order of "auto" per device type. On CUDA the compiled kernel goes first; Triton is
# the fallback for builds without CUDA sources.
_AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


# Ops with a Triton kernel (kernels/); the others have only compiled and reference backends.
_TRITON_OPS = frozenset({"task_axpby", "task_axpby_", "task_dot", "svm_cs_ipm"})


def is_available(backend: str, device: torch.device, op: str = "task_axpby") -> bool:
    """Whether ``backend`` can run the op ``op`` on tensors that live on ``device``."""
    if backend == "reference":
        return True
    if backend == "cpu":
        return device.type == "cpu" and has_native_device("cpu", op)
    if backend == "cuda":
        return device.type == "cuda" and has_native_device("cuda", op)
    if backend == "triton":
        # Triton compiles for GPUs; its interpreter (TRITON_INTERPRET=1) runs on CPU tensors.
        return op in _TRITON_OPS and triton_installed() and (device.type == "cuda" or triton_interpreting())
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def available_backends(device: torch.device | str = "cpu", op: str = "task_axpby") -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if is_available(b, device, op)]


def resolve_backend(device: torch.device, backend: str = "auto", op: str = "task_axpby") -> str:
    """Return the concrete backend that will run the op ``op`` on ``device``.

    Raises:
        ValueError: ``backend`` is not a known name.
        RuntimeError: ``backend`` was asked for explicitly but cannot run on ``device``.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            if is_available(candidate, device, op):
                return candidate
        return "reference"
    if not is_available(backend, device, op):
        raise RuntimeError(
            f"backend {backend!r} is not available for {op} on tensors on {device}; "
            f"available: {available_backends(device, op)}"
        )
    return backend
