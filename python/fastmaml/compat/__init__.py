"""Drop-in paths for existing MAML code (learn2learn-style and torch.func-style)."""
