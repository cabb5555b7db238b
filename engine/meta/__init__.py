"""Meta-training of the F-VAE in episodes (DESIGN.md §2.5)."""
