"""Benchmark of the fused batched inner update on the Omniglot conv4 parameter set.

Providers: each available fastmaml backend, and the baselines a careful user writes today with
``torch._foreach_*`` ops (the faster of two formulations is the reference for the speed-up).
Every row reports time, achieved GB/s, GB/s as a fraction of a copy measured in the same run,
and whether the provider's result matched the pure-PyTorch reference.
"""
from __future__ import annotations

import argparse

import torch

from .. import backend as B
from ..ops.multi_tensor import task_axpby, task_axpby_
from ..reference import inner_sgd_step_reference
from ._common import add_level_options, append_csv, environment, exact_float32, print_table, progress, time_call


def conv4_row_shapes(filters: int = 64, in_channels: int = 1, n_way: int = 5, feature_size: int = 1) -> list[tuple]:
    """Parameter shapes (without the task dimension) of the 4-layer conv net of MAML's Omniglot runs."""
    shapes, c_in = [], in_channels
    for _ in range(4):
        shapes += [(filters, c_in, 3, 3), (filters,), (filters,), (filters,)]  # conv w, conv b, bn w, bn b
        c_in = filters
    shapes += [(n_way, filters * feature_size), (n_way,)]
    return shapes


def _lr_for(form: str, shapes, dtype, device):
    gen = torch.Generator().manual_seed(0)
    if form == "scalar":
        return 0.4
    if form == "lslr":
        return [0.05 + 0.4 * torch.rand((), generator=gen).item() for _ in shapes]
    return [(0.05 + 0.4 * torch.rand(s, generator=gen)).to(dtype=dtype, device=device) for s in shapes]


def _inplace_baselines(form: str, theta, grads, lr):
    """In-place foreach formulations (what an optimizer step does), each a closure."""
    if form == "scalar":
        return {"foreach_add_": lambda: torch._foreach_add_(theta, grads, alpha=-lr)}
    if form == "lslr":
        lr_t = [torch.tensor(a, dtype=theta[0].dtype, device=theta[0].device) for a in lr]
        return {"foreach_addcmul_": lambda: torch._foreach_addcmul_(theta, grads, lr_t, value=-1.0)}
    return {"foreach_addcmul_": lambda: torch._foreach_addcmul_(theta, grads, lr, value=-1.0)}


def _baselines(form: str, theta, grads, lr):
    """The foreach formulations of the same update, each a closure."""
    if form == "scalar":
        return {"foreach_add": lambda: torch._foreach_add(theta, grads, alpha=-lr)}
    if form == "lslr":
        lr_t = [torch.tensor(a, dtype=theta[0].dtype, device=theta[0].device) for a in lr]
        return {
            "foreach_mul_sub": lambda: torch._foreach_sub(theta, torch._foreach_mul(grads, lr)),
            "foreach_addcmul": lambda: torch._foreach_addcmul(theta, grads, lr_t, value=-1.0),
        }
    return {
        "foreach_mul_sub": lambda: torch._foreach_sub(theta, torch._foreach_mul(grads, lr)),
        "foreach_addcmul": lambda: torch._foreach_addcmul(theta, grads, lr, value=-1.0),
    }


def _matches(out, expected, dtype) -> bool:
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    return all(torch.allclose(o, e, rtol=tol, atol=tol) for o, e in zip(out, expected))


def copy_bandwidth_gbps(numel: int, dtype, device, repeats: int) -> float:
    src = torch.randn(numel, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), device, repeats=repeats)
    return 2 * numel * src.element_size() / (t["median_ms"] * 1e-3) / 1e9


def run(tasks=(1, 8, 32, 128), forms=("scalar", "lslr", "meta_sgd"), device="cpu", dtype=torch.float32,
        repeats=20, quiet=False, level="standard") -> list[dict]:
    device = torch.device(device)
    env = {**environment(device), "level": level}
    shapes = conv4_row_shapes()
    params_per_task = sum(torch.Size(s).numel() for s in shapes)
    backends = [b for b in ("cpu", "cuda", "triton") if B.is_available(b, device) and not (b == "triton" and device.type == "cpu")]
    rows = []
    for num_tasks in progress(tasks, f"inner update {str(dtype).replace('torch.', '')}"):
        numel = num_tasks * params_per_task
        copy_gbps = copy_bandwidth_gbps(numel, dtype, device, repeats)
        gen = torch.Generator().manual_seed(num_tasks)
        theta = [torch.randn((num_tasks, *s), generator=gen).to(dtype=dtype, device=device) for s in shapes]
        grads = [torch.randn((num_tasks, *s), generator=gen).to(dtype=dtype, device=device) for s in shapes]
        for form in forms:
            lr = _lr_for(form, shapes, dtype, device)
            expected = inner_sgd_step_reference(theta, grads, lr)
            alpha_bytes = 0 if form != "meta_sgd" else params_per_task * theta[0].element_size()
            moved = 3 * numel * theta[0].element_size() + alpha_bytes  # read theta, read g, write phi
            for mode in ("out-of-place", "in-place"):
                providers = {}
                if mode == "out-of-place":
                    providers.update(_baselines(form, theta, grads, lr))
                    providers["reference"] = lambda lr=lr: inner_sgd_step_reference(theta, grads, lr)
                    for b in backends:
                        providers[f"fastmaml-{b}"] = lambda b=b, lr=lr: task_axpby(
                            theta, grads, lr, backend=b, check_finite=False)
                else:
                    # In place, the update drifts theta between repeats; its result is checked on a copy.
                    work = [t.clone() for t in theta]
                    providers.update(_inplace_baselines(form, work, grads, lr))
                    for b in backends:
                        providers[f"fastmaml-{b}"] = lambda b=b, lr=lr: task_axpby_(
                            work, grads, lr, backend=b, check_finite=False)
                form_rows = []
                for name, fn in providers.items():
                    if mode == "in-place":
                        for w, t in zip(work, theta):
                            w.copy_(t)
                    result = fn()
                    ok = _matches(work if mode == "in-place" else result, expected, dtype)
                    t = time_call(fn, device, repeats=repeats)
                    gbps = moved / (t["median_ms"] * 1e-3) / 1e9
                    form_rows.append({**env, "op": "inner_sgd_step", "mode": mode, "lr_form": form,
                                      "tasks": num_tasks, "params_per_task": params_per_task,
                                      "dtype": str(dtype).replace("torch.", ""), "provider": name, **t,
                                      "gbps": gbps, "copy_gbps": copy_gbps, "frac_of_copy": gbps / copy_gbps,
                                      "check": "ok" if ok else "FAILED"})
                best_baseline = min(r["median_ms"] for r in form_rows if r["provider"].startswith("foreach"))
                for r in form_rows:
                    r["speedup_vs_foreach"] = best_baseline / r["median_ms"] if r["check"] == "ok" else float("nan")
                rows += form_rows
    if not quiet:
        print(f"inner update, conv4 ({params_per_task} params/task), {rows[0]['device']}, torch {rows[0]['torch']}, "
              f"commit {rows[0]['commit']}")
        print("GB/s counts 3 streams (read theta, read g, write phi); 'of copy' divides by x.copy_(y) into "
              "preallocated memory measured in the same run")
        print_table(rows, [("tasks", "T", "d"), ("mode", "mode", "s"), ("lr_form", "lr form", "s"), ("provider", "provider", "s"),
                           ("median_ms", "median ms", ".3f"), ("p25_ms", "p25", ".3f"), ("p75_ms", "p75", ".3f"),
                           ("gbps", "GB/s", ".1f"), ("frac_of_copy", "of copy", ".2f"),
                           ("speedup_vs_foreach", "vs foreach", ".2f"), ("check", "check", "s")])
    return rows


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on the device (CUDA) or MemAvailable (Linux); a large number when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m fastmaml.bench.inner_update", description=__doc__)
    add_level_options(parser)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tasks", type=int, nargs="+", default=None,
                        help="task counts (default 1 8 32 128; quick: 1 32)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float64"],
                        help="default float32 (full: both)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available on this machine")
    if args.tasks is not None and any(t < 1 for t in args.tasks):
        parser.error(f"--tasks must be positive integers, got {args.tasks}")
    tasks = args.tasks or ((1, 32) if args.level == "quick" else (1, 8, 32, 128))
    dtypes = [args.dtype] if args.dtype else (["float32", "float64"] if args.level == "full" else ["float32"])
    device = torch.device(args.device)
    exact_float32(device)
    params_per_task = sum(torch.Size(s).numel() for s in conv4_row_shapes())
    for dtype in dtypes:
        # theta, g, the in-place working copy, one output and the copy-bandwidth pair: ~6 buffers
        need = 6 * max(tasks) * params_per_task * getattr(torch, dtype).itemsize
        free = available_memory_bytes(device)
        if need > free:
            parser.error(f"--tasks {max(tasks)} needs about {need / 2**30:.1f} GiB in {dtype} on {args.device}, "
                         f"only {free / 2**30:.1f} GiB is available")
    rows = []
    for dtype in dtypes:
        rows += run(tasks=tasks, device=args.device, dtype=getattr(torch, dtype),
                    repeats=10 if args.level == "quick" else 30, level=args.level)
    path = append_csv("inner_update.csv", rows)
    print(f"rows appended to {path}")
    return rows


if __name__ == "__main__":
    main()
