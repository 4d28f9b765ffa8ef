"""The backend selector: one decision point, an environment override, clear errors."""
import subprocess
import sys

import pytest
import torch

import fastmaml
from fastmaml import backend as B


def test_auto_prefers_the_compiled_cpu_kernel_when_built():
    expected = "cpu" if fastmaml.HAS_NATIVE else "reference"
    assert B.resolve_backend(torch.device("cpu")) == expected


def test_environment_override_applies_to_auto_only(monkeypatch):
    monkeypatch.setenv(B.ENV_VAR, "reference")
    assert B.resolve_backend(torch.device("cpu")) == "reference"
    if fastmaml.HAS_NATIVE:
        assert B.resolve_backend(torch.device("cpu"), "cpu") == "cpu"  # explicit beats environment
    monkeypatch.setenv(B.ENV_VAR, "gpu-please")
    with pytest.raises(ValueError, match="FASTMAML_BACKEND must be one of"):
        B.resolve_backend(torch.device("cpu"))


def test_environment_override_reaches_the_ops(monkeypatch):
    # The reference path builds an autograd graph of plain torch ops; the native one a single node.
    x = [torch.randn(2, 3, requires_grad=True)]
    monkeypatch.setenv(B.ENV_VAR, "reference")
    out = fastmaml.task_axpby(x, x, 0.5)[0]
    assert "Sub" in type(out.grad_fn).__name__


def test_available_backends_lists_reference_everywhere():
    assert "reference" in B.available_backends("cpu")
    assert "cuda" not in B.available_backends("cpu")


def test_info_command_prints_build_and_backends():
    proc = subprocess.run([sys.executable, "-m", "fastmaml.info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "backend chosen by 'auto'" in proc.stdout
    assert "inner_sgd_step" in proc.stdout
    assert f"torch              {torch.__version__}" in proc.stdout
