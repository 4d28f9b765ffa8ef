"""Shared test setup: which backends run here, tolerances by dtype, random task tensors."""
import os

import torch

# Triton kernels run on CPU tensors through the interpreter where no GPU is present. This must
# be decided before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastmaml  # noqa: E402
from fastmaml import backend as B  # noqa: E402
from fastmaml.bench._common import exact_float32  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# float32 tests mean IEEE float32: cuDNN convolutions default to TF32 (10-bit products).
exact_float32(torch.device("cuda"))
FAST_BACKENDS = ("cpu", "cuda", "triton")

# Agreement of fast backends with the reference: (rtol, atol) per dtype.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def backend_params(device: str):
    """pytest params for every fast backend on ``device``; unavailable ones are skipped, never dropped."""
    params = []
    for name in FAST_BACKENDS:
        ok = B.is_available(name, torch.device(device))
        marks = () if ok else pytest.mark.skip(reason=f"backend {name!r} not available on {device}")
        params.append(pytest.param(device, name, id=f"{device}-{name}", marks=marks))
    return params


ALL_BACKEND_PARAMS = [p for d in DEVICES for p in backend_params(d)]


def make_task_tensors(num_tasks, row_shapes, dtype, device, seed=0, requires_grad=False):
    """Random ``[T, *row_shape]`` tensors (never zeros, never all-equal)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in row_shapes:
        t = torch.randn((num_tasks, *shape), generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        out.append(t.requires_grad_(requires_grad))
    return out


@pytest.fixture(params=["best", "default"])
def instruction_set(request, monkeypatch):
    """Runs a test with the compiled CPU kernels' best instruction set (AVX2 + FMA where the CPU
    has it) and with the portable copy (``ATEN_CPU_CAPABILITY=default``, read on every call)."""
    if request.param == "default":
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    return request.param


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    # Tests pick backends explicitly; a developer's FASTMAML_BACKEND must not leak in.
    monkeypatch.delenv(B.ENV_VAR, raising=False)
