"""task_matmul_nt / task_matmul_tn: the heads' feature products with a thin side.

Specification: equal to the reference (``a @ b^T`` and ``g^T @ a`` per task) on random inputs in
float64 and float32, for every thin width the compiled kernels cover, lengths that are not a
multiple of the vector width, odd row counts, strided inputs, and both instruction sets; what the
kernels do not cover goes to the reference.
"""
import pytest
import torch

import fastmaml
from fastmaml.ops.task_matmul import MAX_THIN, task_matmul_nt, task_matmul_tn
from fastmaml.reference.task_matmul import task_matmul_nt_reference, task_matmul_tn_reference

from conftest import TOLERANCES

native = pytest.mark.skipif(not fastmaml.HAS_NATIVE, reason="compiled module not built")
SHAPES = [(1, 1, 1), (3, 7, 37), (2, 75, 1600), (4, 5, 1603), (1, 2, 16)]  # (T, m, d)


def _rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) + 0.5  # nonzero mean: no accidental zeros


def _close(out, ref, dtype, d):
    rtol, atol = TOLERANCES[dtype]
    # the kernels sum d products in another order than BLAS: rounding grows with sqrt(d)
    scale = max(1.0, d ** 0.5)
    torch.testing.assert_close(out, ref, rtol=rtol * scale, atol=atol * scale * ref.abs().max().item())


@native
@pytest.mark.parametrize("isa", ["best", "default"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,m,d", SHAPES)
@pytest.mark.parametrize("c", [1, 2, 5, 8, MAX_THIN])
def test_products_match_reference(monkeypatch, isa, dtype, T, m, d, c):
    if isa == "default":
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    a, b, g = _rand(T, m, d, dtype=dtype, seed=1), _rand(T, c, d, dtype=dtype, seed=2), _rand(T, m, c, dtype=dtype, seed=3)
    nt = task_matmul_nt(a, b, backend="cpu")
    tn = task_matmul_tn(g, a, backend="cpu")
    assert nt.shape == (T, m, c) and tn.shape == (T, c, d)
    _close(nt, task_matmul_nt_reference(a, b), dtype, d)
    _close(tn, task_matmul_tn_reference(g, a), dtype, m)


@native
def test_strided_inputs_are_accepted():
    a = _rand(3, 40, 90, dtype=torch.float64, seed=4).mT  # [3, 90, 40], not contiguous
    b = _rand(3, 40, 5, dtype=torch.float64, seed=5).mT  # [3, 5, 40]
    g = _rand(3, 5, 90, dtype=torch.float64, seed=6).mT  # [3, 90, 5]
    torch.testing.assert_close(task_matmul_nt(a, b, backend="cpu"), a @ b.mT)
    torch.testing.assert_close(task_matmul_tn(g, a, backend="cpu"), g.mT @ a)


@native
def test_ops_pass_opcheck():
    a, b, g = _rand(2, 9, 33, dtype=torch.float64, seed=7), _rand(2, 5, 33, dtype=torch.float64, seed=8), \
        _rand(2, 9, 5, dtype=torch.float64, seed=9)
    torch.library.opcheck(torch.ops.fastmaml.task_matmul_nt.default, (a, b))
    torch.library.opcheck(torch.ops.fastmaml.task_matmul_tn.default, (g, a))


def test_what_the_kernels_do_not_cover_runs_the_reference():
    a = _rand(2, 6, 20, dtype=torch.float64, seed=10)
    wide = _rand(2, MAX_THIN + 1, 20, dtype=torch.float64, seed=11)
    torch.testing.assert_close(task_matmul_nt(a, wide), a @ wide.mT)  # too many thin rows
    half = a.to(torch.bfloat16)
    torch.testing.assert_close(task_matmul_nt(half, half[:, :3]), half @ half[:, :3].mT)  # dtype
    leaf = a.clone().requires_grad_()
    out = task_matmul_tn(_rand(2, 6, 3, dtype=torch.float64, seed=12), leaf)
    assert out.requires_grad  # the reference keeps autograd working
    with torch.no_grad():  # no graph needed: the kernel runs
        torch.testing.assert_close(task_matmul_tn(a[:, :, :3], leaf, backend="cpu"), a[:, :, :3].mT @ a)


@native
def test_explicit_cpu_backend_refuses_what_it_cannot_run():
    a = _rand(2, 6, 20, dtype=torch.float64, seed=13)
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run task_matmul_nt"):
        task_matmul_nt(a, _rand(2, MAX_THIN + 1, 20, dtype=torch.float64, seed=14), backend="cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        task_matmul_tn(a[:, :, :3], a, backend="triton")
