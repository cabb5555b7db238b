"""Meta-training of the F-VAE in episodes (docs/design.md §2.5)."""
