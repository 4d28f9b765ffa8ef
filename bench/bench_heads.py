"""Few-shot heads (ridge / SVM) vs torch.linalg, qpth, cvxpylayers, cvxpy (see fastmaml.bench.heads)."""
from fastmaml.bench.heads import main

if __name__ == "__main__":
    main()
