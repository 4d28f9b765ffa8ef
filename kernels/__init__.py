"""Triton kernels (installed as ``fastmaml.kernels``). Importing a submodule imports triton."""
