"""Reconstruction measures the familiarity gate reads (pure torch)."""

from __future__ import annotations

import pytest
import torch

from engine.fvae.recon import explained_fraction, relative_error


def _orthogonal_to(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A vector per row of ``x`` orthogonal to it, of the same norm."""
    y = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    y -= (y * x).sum(1, keepdim=True) / x.pow(2).sum(1, keepdim=True) * x
    return y * x.norm(dim=1, keepdim=True) / y.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_explained_fraction_ignores_the_decoders_scale_where_the_relative_error_does_not(scale):
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    everywhere = torch.ones_like(x, dtype=torch.bool)
    unrelated = _orthogonal_to(x, 1)
    torch.testing.assert_close(explained_fraction(scale * x, x, everywhere), torch.ones(3))
    torch.testing.assert_close(
        explained_fraction(scale * unrelated, x, everywhere), torch.zeros(3), atol=1e-6, rtol=0
    )
    # An unrelated reconstruction's relative error is 1 + scale^2: above 1 for a loud decoder.
    torch.testing.assert_close(
        relative_error(scale * unrelated, x, everywhere), torch.full((3,), 1 + scale**2)
    )
    # Slots outside an adapter's mask do not count.
    half = everywhere.clone()
    half[:, 32:] = False
    noisy = torch.where(half, scale * x, torch.full_like(x, 100.0))
    torch.testing.assert_close(explained_fraction(noisy, x, half), torch.ones(3))
