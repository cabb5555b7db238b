"""How well the F-VAE reconstructs adapters (pure torch): the relative squared error in normalised
space, over the slots an adapter occupies. Meta-training measures it on its training adapters;
``icm``'s familiarity gate compares an input's error with that figure."""

from __future__ import annotations

from typing import NamedTuple

import torch


def relative_error(reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``||x_hat - x||^2 / ||x||^2`` over the slots in ``mask`` (normalised space).

    Shapes: ``[..., N]`` each (a batch of adapters or one); returns ``[...]`` (0-d for one).
    """
    weight = mask.to(target.dtype)
    total = (target.pow(2) * weight).sum(dim=-1).clamp_min(1e-12)
    return ((reconstruction - target).pow(2) * weight).sum(dim=-1) / total


def explained_fraction(
    reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``cos^2(x_hat, x)`` over the slots in ``mask``: the share of ``x`` the best rescaling of the
    reconstruction explains (``1 - cos^2`` is the relative error of that rescaling). Unlike
    :func:`relative_error` it does not depend on the decoder's output scale: 0 for a reconstruction
    unrelated to ``x``, whatever its size. Shapes as :func:`relative_error`.
    """
    weight = mask.to(target.dtype)
    inner = (reconstruction * target * weight).sum(dim=-1)
    norms = (reconstruction.pow(2) * weight).sum(dim=-1) * (target.pow(2) * weight).sum(dim=-1)
    return inner.pow(2) / norms.clamp_min(1e-24)


class Reconstructions(NamedTuple):
    """How well the F-VAE reconstructs a batch of ``K`` inputs from their posterior means.

    Attributes:
        errors: ``[K]`` relative errors (:func:`relative_error`, or per-module updates).
        explained: ``[K]`` explained fractions (:func:`explained_fraction`, or per-module updates).
        mu: ``[K, latent]`` the posterior means that were decoded.
    """

    errors: torch.Tensor
    explained: torch.Tensor
    mu: torch.Tensor


def reconstruction_errors(
    model, x: torch.Tensor, cond: torch.Tensor, present: torch.Tensor
) -> Reconstructions:
    """How well the F-VAE reconstructs each input, decoding its posterior mean.

    Args:
        model: an :class:`engine.fvae.model.FVAE` (used as it is: put it in eval mode first).
        x: ``[K, N]`` normalised adapters.
        cond: ``[K, d]`` their conditions.
        present: ``[K, N]`` bool, the slots each adapter occupies.

    Returns:
        The relative error and explained fraction of ``D(mu_k, cond_k)`` against ``x_k``
        (:meth:`engine.fvae.model.FVAE.reconstruction_measures`), and the ``mu_k``.
    """
    with torch.no_grad():
        mu, _ = model.encode(x, cond)
        reconstruction = model.decode(mu, cond)
        errors, explained = model.reconstruction_measures(reconstruction, x, present)
        return Reconstructions(errors, explained, mu)
