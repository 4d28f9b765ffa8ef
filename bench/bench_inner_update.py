"""Fused batched inner update vs the torch._foreach baseline (see fastmaml.bench.inner_update)."""
from fastmaml.bench.inner_update import main

if __name__ == "__main__":
    main()
