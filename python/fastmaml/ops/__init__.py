"""Public ops with input checks, backend dispatch and autograd."""
