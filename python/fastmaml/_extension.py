"""Loads the compiled module ``fastmaml._C`` (which registers ``torch.ops.fastmaml.*``)."""
import functools
import os

import torch  # noqa: F401  (must precede the compiled module)

try:
    from . import _C  # type: ignore[attr-defined]

    HAS_NATIVE = True
    LOAD_ERROR = None
except ImportError as exc:  # a source checkout without a build, or a broken build
    _C = None
    HAS_NATIVE = False
    LOAD_ERROR = str(exc)
    if os.environ.get("FASTMAML_REQUIRE_NATIVE") == "1":
        raise ImportError(
            "FASTMAML_REQUIRE_NATIVE=1 but the compiled module fastmaml._C failed to load: " + LOAD_ERROR
        ) from exc


def build_info() -> dict:
    """How the compiled module was built (empty-handed if it is not built)."""
    if _C is None:
        return {"native": False, "load_error": LOAD_ERROR}
    info = dict(_C.build_info())
    info["native"] = True
    return info


@functools.lru_cache(maxsize=None)
def has_native_device(device_type: str, op: str = "task_axpby") -> bool:
    """Whether the compiled op ``fastmaml::<op>`` has a kernel registered for this device type."""
    if _C is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmaml::{op}", key)
