"""Meta-gradient engine vs the per-task autograd loop and torch.func vmap (see fastmaml.bench.meta)."""
from fastmaml.bench.meta import main

if __name__ == "__main__":
    main()
