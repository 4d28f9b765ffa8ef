"""task_axpby and task_dot: the fused multi-tensor ops under the inner update, FD-HVP and CG.

Specification order: registration -> maths (gradcheck, gradgradcheck) -> agreement with the
pure-PyTorch reference on every backend.
"""
import subprocess
import sys

import pytest
import torch

import fastmaml
from fastmaml import backend as B
from fastmaml.reference import task_axpby_reference, task_dot_reference

from conftest import ALL_BACKEND_PARAMS, TOLERANCES, make_task_tensors

# Odd row shapes: 59 and 97 elements per row, a 3-d conv-like weight, a single element.
ROW_SHAPES = [(59,), (97,), (4, 3, 3), (1,)]


def _alpha(kind, rows, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if kind == "scalar":
        return 0.37
    if kind == "per_tensor":
        return [torch.rand((), generator=gen, dtype=torch.float64).to(dtype=dtype, device=device) + 0.1 for _ in rows]
    if kind == "per_element":
        return [torch.rand(r, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device) + 0.1 for r in rows]
    raise AssertionError(kind)


def _scale(num_tasks, dtype, device, seed):
    return (torch.rand(num_tasks, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5).to(
        dtype=dtype, device=device
    )


def _ref_alpha(alpha, rows, dtype, device):
    if isinstance(alpha, float):
        return [torch.tensor(alpha, dtype=dtype, device=device)] * len(rows)
    return alpha


# --- registration ------------------------------------------------------------------------------
@pytest.mark.skipif(not fastmaml.HAS_NATIVE, reason="compiled module not built")
def test_native_ops_pass_opcheck():
    x = make_task_tensors(3, ROW_SHAPES, torch.float64, "cpu", seed=0, requires_grad=True)
    y = make_task_tensors(3, ROW_SHAPES, torch.float64, "cpu", seed=1, requires_grad=True)
    alpha = [torch.tensor(0.3, dtype=torch.float64, requires_grad=True) for _ in x]
    s = torch.rand(3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.fastmaml.task_axpby.default, (x, y, alpha, s, s))
    torch.library.opcheck(torch.ops.fastmaml.task_axpby.default, (x, y, alpha, None, None))
    torch.library.opcheck(torch.ops.fastmaml.task_dot.default, (x, y))


@pytest.mark.skipif(not B.is_available("triton", torch.device("cpu")) and not torch.cuda.is_available(),
                    reason="triton not available")
def test_triton_ops_pass_opcheck():
    from fastmaml.ops.multi_tensor import _get_triton_ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    axpby, dot, axpby_ = _get_triton_ops()
    x = make_task_tensors(3, [(5,), (2, 3)], torch.float64, device, seed=0, requires_grad=True)
    y = make_task_tensors(3, [(5,), (2, 3)], torch.float64, device, seed=1, requires_grad=True)
    alpha = [torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True) for _ in x]
    s = torch.rand(3, dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(axpby, (x, y, alpha, s, s))
    torch.library.opcheck(dot, (x, y))
    plain = [t.detach().clone() for t in x]
    torch.library.opcheck(axpby_, (plain, [t.detach() for t in y], [a.detach() for a in alpha], None, None))


# --- agreement with the reference ----------------------------------------------------------------
@pytest.mark.parametrize("device,backend", ALL_BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_tasks", [1, 3, 17])
@pytest.mark.parametrize("alpha_kind", ["scalar", "per_tensor", "per_element"])
@pytest.mark.parametrize("scaled", [False, True])
def test_task_axpby_matches_reference(device, backend, dtype, num_tasks, alpha_kind, scaled):
    x = make_task_tensors(num_tasks, ROW_SHAPES, dtype, device, seed=num_tasks)
    y = make_task_tensors(num_tasks, ROW_SHAPES, dtype, device, seed=num_tasks + 100)
    alpha = _alpha(alpha_kind, ROW_SHAPES, dtype, device)
    xs = _scale(num_tasks, dtype, device, 5) if scaled else None
    ys = _scale(num_tasks, dtype, device, 6) if scaled else None
    out = fastmaml.task_axpby(x, y, alpha, xs, ys, backend=backend)
    expected = task_axpby_reference(x, y, _ref_alpha(alpha, ROW_SHAPES, dtype, device), xs, ys)
    rtol, atol = TOLERANCES[dtype]
    assert len(out) == len(x)
    for o, e, xi in zip(out, expected, x):
        assert o.shape == xi.shape and o.dtype == dtype
        torch.testing.assert_close(o, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device,backend", ALL_BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_task_axpby_half_precision_within_twice_reference_error(device, backend, dtype):
    # flash-attention's rule: the kernel's error is at most 2x that of the reference computed in
    # the same precision, both measured against a float64 computation.
    x64 = make_task_tensors(5, ROW_SHAPES, torch.float64, device, seed=3)
    y64 = make_task_tensors(5, ROW_SHAPES, torch.float64, device, seed=4)
    a64 = _alpha("per_element", ROW_SHAPES, torch.float64, device)
    exact = task_axpby_reference(x64, y64, a64)
    low = lambda ts: [t.to(dtype) for t in ts]  # noqa: E731
    fast = fastmaml.task_axpby(low(x64), low(y64), low(a64), backend=backend)
    ref = task_axpby_reference(low(x64), low(y64), low(a64))
    for f, r, e in zip(fast, ref, exact):
        err_fast = (f.double() - e).abs().max().item()
        err_ref = (r.double() - e).abs().max().item()
        assert err_fast <= 2 * err_ref + 1e-6


@pytest.mark.parametrize("device,backend", ALL_BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_tasks", [1, 3, 17])
def test_task_dot_matches_reference(device, backend, dtype, num_tasks):
    a = make_task_tensors(num_tasks, ROW_SHAPES, dtype, device, seed=7)
    b = make_task_tensors(num_tasks, ROW_SHAPES, dtype, device, seed=8)
    out = fastmaml.task_dot(a, b, backend=backend)
    expected = task_dot_reference([t.double() for t in a], [t.double() for t in b]).to(dtype)
    assert out.shape == (num_tasks,) and out.dtype == dtype
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol * 100)


@pytest.mark.parametrize("device,backend", ALL_BACKEND_PARAMS)
def test_task_dot_is_deterministic(device, backend):
    a = make_task_tensors(4, [(40000,), (3,)], torch.float32, device, seed=9)
    first = fastmaml.task_dot(a, a, backend=backend)
    for _ in range(3):
        assert torch.equal(fastmaml.task_dot(a, a, backend=backend), first)


def test_large_rows_cross_chunk_boundaries():
    # Rows longer than one work chunk (16384) and one GPU block (2048): every boundary is exercised.
    a = make_task_tensors(2, [(16384 * 2 + 5,), (2049,)], torch.float64, "cpu", seed=10)
    b = make_task_tensors(2, [(16384 * 2 + 5,), (2049,)], torch.float64, "cpu", seed=11)
    alpha = [torch.rand(16384 * 2 + 5, dtype=torch.float64), torch.rand(2049, dtype=torch.float64)]
    s = torch.tensor([0.5, 2.0], dtype=torch.float64)
    for out, exp in zip(fastmaml.task_axpby(a, b, alpha, s, s), task_axpby_reference(a, b, alpha, s, s)):
        torch.testing.assert_close(out, exp, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(fastmaml.task_dot(a, b), task_dot_reference(a, b), rtol=1e-12, atol=1e-10)


def test_non_contiguous_inputs_are_accepted():
    base = make_task_tensors(3, [(8, 6)], torch.float64, "cpu", seed=12)[0]
    x = [base.transpose(1, 2)]  # [3, 6, 8] non-contiguous
    y = [torch.randn(3, 6, 8, dtype=torch.float64)]
    out = fastmaml.task_axpby(x, y, 0.5)
    torch.testing.assert_close(out[0], x[0] - 0.5 * y[0])


# --- maths: first and second derivatives ---------------------------------------------------------
@pytest.mark.parametrize("device,backend", ALL_BACKEND_PARAMS)
@pytest.mark.parametrize("alpha_kind", ["per_tensor", "per_element"])
def test_task_axpby_gradcheck_and_gradgradcheck(device, backend, alpha_kind):
    rows = [(5,), (2, 3)]
    x = make_task_tensors(3, rows, torch.float64, device, seed=20, requires_grad=True)
    y = make_task_tensors(3, rows, torch.float64, device, seed=21, requires_grad=True)
    alpha = [a.requires_grad_() for a in _alpha(alpha_kind, rows, torch.float64, device)]
    xs = _scale(3, torch.float64, device, 22).requires_grad_()
    ys = _scale(3, torch.float64, device, 23).requires_grad_()

    def f(x0, x1, y0, y1, a0, a1, s, t):
        return tuple(fastmaml.task_axpby([x0, x1], [y0, y1], [a0, a1], s, t, backend=backend))

    inputs = (*x, *y, *alpha, xs, ys)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("device,backend", ALL_BACKEND_PARAMS)
def test_task_dot_gradcheck_and_gradgradcheck(device, backend):
    rows = [(5,), (2, 3)]
    a = make_task_tensors(3, rows, torch.float64, device, seed=30, requires_grad=True)
    b = make_task_tensors(3, rows, torch.float64, device, seed=31, requires_grad=True)

    def f(a0, a1, b0, b1):
        return fastmaml.task_dot([a0, a1], [b0, b1], backend=backend)

    assert torch.autograd.gradcheck(f, (*a, *b))
    assert torch.autograd.gradgradcheck(f, (*a, *b))


# --- bad input -----------------------------------------------------------------------------------
def test_rejects_mismatched_list_lengths():
    x = make_task_tensors(2, [(3,), (4,)], torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"len\(x\) = 2, len\(y\) = 1"):
        fastmaml.task_axpby(x, x[:1], 0.1)
    with pytest.raises(ValueError, match="alpha must have one entry per tensor: expected 2, got 3"):
        fastmaml.task_axpby(x, x, [0.1, 0.2, 0.3])


def test_rejects_wrong_leading_task_dimension():
    x = [torch.randn(3, 4), torch.randn(2, 4)]
    with pytest.raises(ValueError, match=r"x\[1\] has shape \(2, 4\); expected a leading task dimension of 3"):
        fastmaml.task_axpby(x, x, 0.1)
    with pytest.raises(ValueError, match="0-dim"):
        fastmaml.task_axpby([torch.tensor(1.0)], [torch.tensor(1.0)], 0.1)


def test_rejects_shape_dtype_and_device_mismatch_between_lists():
    x = [torch.randn(3, 4)]
    with pytest.raises(ValueError, match=r"y\[0\] has shape \(3, 5\), expected \(3, 4\)"):
        fastmaml.task_axpby(x, [torch.randn(3, 5)], 0.1)
    with pytest.raises(TypeError, match=r"y\[0\] is torch.float64 on cpu, expected torch.float32 on cpu"):
        fastmaml.task_axpby(x, [torch.randn(3, 4, dtype=torch.float64)], 0.1)
    with pytest.raises(TypeError, match=r"x\[1\] has dtype torch.float64"):
        fastmaml.task_axpby([torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64)], x * 2, 0.1)


def test_rejects_integer_tensors_and_non_lists():
    with pytest.raises(TypeError, match="floating point"):
        fastmaml.task_axpby([torch.ones(2, 3, dtype=torch.int64)], [torch.ones(2, 3, dtype=torch.int64)], 1.0)
    with pytest.raises(TypeError, match="list or tuple of tensors"):
        fastmaml.task_axpby(torch.randn(2, 3), [torch.randn(2, 3)], 1.0)
    with pytest.raises(ValueError, match="at least one tensor"):
        fastmaml.task_dot([], [])


def test_rejects_step_size_of_wrong_shape_dtype_or_value():
    x = [torch.randn(3, 4, 5)]
    with pytest.raises(ValueError, match=r"alpha\[0\] has shape \(4,\); expected a scalar or .* \(4, 5\)"):
        fastmaml.task_axpby(x, x, [torch.rand(4)])
    with pytest.raises(TypeError, match=r"alpha\[0\] is torch.float64"):
        fastmaml.task_axpby(x, x, [torch.rand(4, 5, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"alpha must be finite, got nan"):
        fastmaml.task_axpby(x, x, float("nan"))
    with pytest.raises(ValueError, match=r"alpha\[1\] must be finite, got inf"):
        fastmaml.task_axpby(x + x, x + x, [0.1, float("inf")])
    with pytest.raises(ValueError, match=r"alpha\[0\] must be finite"):
        fastmaml.task_axpby(x, x, [torch.tensor([[1.0] * 5] * 3 + [[float("inf")] * 5])])
    with pytest.raises(TypeError, match=r"alpha\[0\] must be a float or a tensor, got str"):
        fastmaml.task_axpby(x, x, ["0.1"])


def test_rejects_task_scales_of_wrong_shape():
    x = [torch.randn(3, 4)]
    with pytest.raises(ValueError, match=r"y_scale must have shape \[3\] \(one value per task\), got \(4,\)"):
        fastmaml.task_axpby(x, x, 0.1, y_scale=torch.ones(4))


def test_unknown_or_unavailable_backend_is_an_error():
    x = [torch.randn(3, 4)]
    with pytest.raises(ValueError, match="backend must be one of"):
        fastmaml.task_axpby(x, x, 0.1, backend="fortran")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available for task_axpby on tensors on cpu"):
        fastmaml.task_axpby(x, x, 0.1, backend="cuda")


_DIRECT_CALL = """
import faulthandler, torch, fastmaml
faulthandler.enable()
x = [torch.randn(3, 4)]
try:
    torch.ops.fastmaml.task_axpby(x, x, [torch.ones(3)], None, None)
except RuntimeError as e:
    print("RuntimeError:", e)
"""


@pytest.mark.skipif(not fastmaml.HAS_NATIVE, reason="compiled module not built")
def test_native_op_checks_guard_direct_calls():
    # In a child process: an exception thrown inside the compiled op must reach Python as a
    # RuntimeError, and if it ever takes the interpreter down instead (as once seen on a CUDA
    # build), the failure shows the child's traceback rather than a lost test worker.
    child = subprocess.run([sys.executable, "-c", _DIRECT_CALL], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, f"the child died (exit {child.returncode}):\n{child.stderr[-4000:]}"
    assert "RuntimeError:" in child.stdout and "expected 1 or 4" in child.stdout, child.stdout + child.stderr


# --- the in-place variant ------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", ALL_BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha_kind", ["scalar", "per_tensor", "per_element"])
def test_task_axpby_inplace_matches_reference(device, backend, dtype, alpha_kind):
    x = make_task_tensors(3, ROW_SHAPES, dtype, device, seed=40)
    y = make_task_tensors(3, ROW_SHAPES, dtype, device, seed=41)
    alpha = _alpha(alpha_kind, ROW_SHAPES, dtype, device)
    ys = _scale(3, dtype, device, 42)
    expected = task_axpby_reference(x, y, _ref_alpha(alpha, ROW_SHAPES, dtype, device), None, ys)
    storages = [t.data_ptr() for t in x]
    returned = fastmaml.task_axpby_(x, y, alpha, y_scale=ys, backend=backend)
    assert [t.data_ptr() for t in returned] == storages  # same memory, no copy
    rtol, atol = TOLERANCES[dtype]
    for xi, e in zip(x, expected):
        torch.testing.assert_close(xi, e, rtol=rtol, atol=atol)


@pytest.mark.skipif(not fastmaml.HAS_NATIVE, reason="compiled module not built")
def test_inplace_op_passes_opcheck():
    x = make_task_tensors(3, ROW_SHAPES, torch.float64, "cpu", seed=43)
    y = make_task_tensors(3, ROW_SHAPES, torch.float64, "cpu", seed=44)
    alpha = [torch.tensor(0.3, dtype=torch.float64) for _ in x]
    torch.library.opcheck(torch.ops.fastmaml.task_axpby_.default, (x, y, alpha, None, None))


def test_inplace_refuses_tensors_that_autograd_needs():
    leaf = torch.randn(3, 4, requires_grad=True)
    plain = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"x\[0\] requires grad: the in-place update would overwrite"):
        fastmaml.task_axpby_([leaf], [plain], 0.1)
    with pytest.raises(ValueError, match=r"y\[0\] requires grad"):
        fastmaml.task_axpby_([plain.clone()], [leaf], 0.1)
    with pytest.raises(ValueError, match=r"alpha\[0\] requires grad"):
        fastmaml.task_axpby_([plain.clone()], [plain], [torch.tensor(0.1, requires_grad=True)])
    before = plain.clone()
    with pytest.raises(ValueError):
        fastmaml.inner_sgd_step_([plain], [leaf], 0.1)
    assert torch.equal(plain, before)  # refused before anything was written


def test_inplace_under_no_grad_updates_leaves_and_bumps_versions():
    theta = torch.randn(3, 4, requires_grad=True)
    hidden = theta * 2  # a graph that saved nothing of theta's value...
    loss = (theta ** 2).sum()  # ...and one that saved theta itself
    with torch.no_grad():
        fastmaml.inner_sgd_step_([theta], [torch.ones(3, 4)], 0.5)
    assert theta.requires_grad and theta._version > 0
    hidden.sum().backward()  # fine: its backward does not read theta
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # loud, never silently wrong


def test_inplace_refuses_non_contiguous_or_overlapping_tensors():
    base = torch.randn(3, 8)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"x\[0\] must be contiguous"):
            fastmaml.task_axpby_([base[:, ::2]], [torch.randn(3, 4)], 0.1)
        wide = torch.randn(3, 8)
        with pytest.raises(ValueError, match=r"y\[0\] overlaps x\[0\]"):
            fastmaml.task_axpby_([wide[1:]], [wide[:2]], 0.1)


def test_rejects_mixed_devices():
    # The meta device stands in for a second device on machines without a GPU.
    x = [torch.randn(3, 4), torch.empty(3, 4, device="meta")]
    with pytest.raises(ValueError, match=r"x\[1\] is on meta, expected cpu like x\[0\]"):
        fastmaml.task_axpby(x, x, 0.1)
    with pytest.raises(TypeError, match=r"y\[0\] is torch.float32 on meta, expected torch.float32 on cpu"):
        fastmaml.task_axpby([torch.randn(3, 4)], [torch.empty(3, 4, device="meta")], 0.1)
    with pytest.raises(TypeError, match=r"alpha\[0\] is torch.float32 on meta"):
        fastmaml.task_axpby([torch.randn(3, 4)], [torch.randn(3, 4)], [torch.empty((), device="meta")])


@pytest.mark.skipif(not fastmaml.HAS_NATIVE, reason="compiled module not built")
def test_compiled_argument_prechecks_find_what_the_python_checks_find():
    # The front end's one-pass compiled pre-checks: -1 when the Python checks would pass, else the
    # first index they would complain about (they then run and name it).
    from fastmaml._extension import _C

    x = [torch.randn(3, 4), torch.randn(3, 2, 2)]
    assert _C.first_mismatched_pair(x, [t.clone() for t in x]) == -1
    assert _C.first_mismatched_pair(x, [x[0], torch.randn(3, 4)]) == 1  # shape
    assert _C.first_mismatched_pair(x, [x[0], x[1].double()]) == 1  # dtype
    assert _C.first_mismatched_pair(x, [x[0].to("meta"), x[1]]) == 0  # device
    assert _C.first_mismatched_pair([x[0], torch.randn(2, 4)], [x[0], torch.randn(2, 4)]) == 1  # tasks
    buf = torch.randn(2, 20)
    assert _C.first_unsafe_inplace_pair([buf[:, :10]], [buf[:, 10:]]) == 0  # x not contiguous
    flat = torch.randn(40)
    assert _C.first_unsafe_inplace_pair([flat[:20].view(2, 10)], [flat[10:30].view(2, 10)]) == 0  # overlap
    assert _C.first_unsafe_inplace_pair([flat[:20].view(2, 10)], [flat[20:].view(2, 10)]) == -1
    assert _C.first_unsafe_inplace_pair([flat[:20].view(2, 10)], [flat[:20].view(2, 10)]) == -1  # same memory
