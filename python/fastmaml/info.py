"""``python -m fastmaml.info``: how fastmaml was built and which backend each op uses here."""
from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from . import backend as B
from ._extension import build_info

# The ops behind the backend selector, in the order the user meets them, each with the compiled
# op that runs it.
OPS = {"task_axpby": "task_axpby", "task_dot": "task_dot", "inner_sgd_step": "task_axpby",
       "fd_perturb": "task_axpby", "fd_combine": "task_axpby", "svm_crammer_singer_solve": "svm_cs_ipm",
       "task_matmul_nt/tn (heads)": "task_matmul_nt", "max_pool2x2 (meta engine)": "max_pool2x2",
       "relu_bitmask (meta engine)": "relu_bitmask", "batch_norm_train (meta engine)": "batch_norm_train"}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info = {
        "fastmaml": _version("fastmaml"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
        "triton": _version("triton"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        B.ENV_VAR: os.environ.get(B.ENV_VAR, ""),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "build": build_info(),
        "backends": {d: B.available_backends(d) for d in devices},
        "ops": {op: {d: B.resolve_backend(torch.device(d), op=kernel) for d in devices} for op, kernel in OPS.items()},
    }
    return info


def main() -> None:
    info = collect()
    print("fastmaml build and backends")
    for key in ("fastmaml", "python", "torch", "torch_cuda", "triton", "TRITON_INTERPRET", B.ENV_VAR, "cpu_threads", "gpu"):
        print(f"  {key:18s} {info[key]}")
    print("  build:")
    for key, value in info["build"].items():
        print(f"    {key:16s} {value}")
    print("  available backends:")
    for dev, names in info["backends"].items():
        print(f"    {dev:16s} {', '.join(names)}")
    print("  backend chosen by 'auto':")
    for op, per_dev in info["ops"].items():
        print(f"    {op:26s} " + ", ".join(f"{d}: {b}" for d, b in per_dev.items()))
    if "triton" in info["ops"].get("svm_crammer_singer_solve", {}).values():
        print("    (the Triton SVM solver takes n <= 32 support points and n_way <= 8; larger tasks: reference)")
    print("    (task_matmul: the compiled kernel for float32/float64 with <= 16 classes, else torch.bmm)")
    print("    (max_pool2x2, relu_bitmask, batch_norm_train: the engine's per-task passes route a model's 2x2")
    print("     max-pools, relus and training-mode batch norms to")
    print("     them on the CPU, fastmaml.ops.cpu_kernels; on GPUs torch's ops run)")


if __name__ == "__main__":
    main()
