"""Fusion in latent space (docs/design.md §2.6), pure torch.

The paper adjusts the *orientation* of the task vectors to balance conflicting directions, then
lets the F-VAE reconstruct one LoRA. This project's default: unit-normalise the task vectors,
project out pairwise conflicting components (PCGrad-style: for each pair with negative cosine,
remove from one the component along the other), combine with weights ``alpha`` and decode
``D([z_f; v_f])`` with ``z_f = sum alpha_t mu_t``. ``mean``, ``sum`` and ``slerp`` are ablations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch.nn import functional as F

from engine.adapters.codec import unflatten
from engine.adapters.layout import Layout

Combine = Literal["weighted", "mean", "sum", "slerp"]


def project_conflicts(vectors: torch.Tensor) -> torch.Tensor:
    """PCGrad-style orientation adjustment.

    Args:
        vectors: ``[K, d]`` task vectors.

    Returns:
        ``[K, d]``: each vector with, for every other vector it conflicts with (cosine < 0), the
        component along that (original) vector removed. Order-independent: every projection uses
        the original vectors.
    """
    out = vectors.clone()
    norms_sq = (vectors**2).sum(dim=1).clamp_min(1e-12)
    for i in range(vectors.shape[0]):
        for j in range(vectors.shape[0]):
            if i == j:
                continue
            dot = vectors[i] @ vectors[j]
            if dot < 0:
                out[i] = out[i] - dot / norms_sq[j] * vectors[j]
    return out


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between ``a`` and ``b`` (``[d]``), magnitude linearly interpolated."""
    na, nb = a.norm().clamp_min(1e-12), b.norm().clamp_min(1e-12)
    cos = ((a / na) @ (b / nb)).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-4:
        return (1 - t) * a + t * b
    direction = (torch.sin((1 - t) * omega) * a / na + torch.sin(t * omega) * b / nb) / torch.sin(omega)
    return direction * ((1 - t) * na + t * nb)


def fuse_latents(
    mu: torch.Tensor,
    cond: torch.Tensor,
    alpha: torch.Tensor | None = None,
    combine: Combine = "weighted",
    project: bool = True,
    normalise: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-task latents and task vectors into one ``(z_f, v_f)``.

    Args:
        mu: ``[K, latent]`` posterior means of the tasks' adapters.
        cond: ``[K, d]`` task vectors.
        alpha: ``[K]`` weights (default uniform ``1/K``); used by ``weighted``.
        combine: ``weighted`` (``sum alpha_t x_t``), ``mean``, ``sum``, or ``slerp`` (pairwise
            spherical chain, equal weights).
        project: remove pairwise conflicting components of the task vectors first.
        normalise: unit-normalise the task vectors (their mean norm is restored after combining).

    Returns:
        ``(z_f [latent], v_f [d])``; differentiable in ``mu``, ``cond`` and ``alpha``.
    """
    k = mu.shape[0]
    if alpha is None:
        alpha = torch.full((k,), 1.0 / k, dtype=mu.dtype, device=mu.device)
    scale = cond.norm(dim=1).mean()
    v = F.normalize(cond, dim=1) if normalise else cond
    if project and k > 1:
        v = project_conflicts(v)
    if combine == "weighted":
        z_f, v_f = alpha @ mu, alpha @ v
    elif combine == "mean":
        z_f, v_f = mu.mean(0), v.mean(0)
    elif combine == "sum":
        z_f, v_f = mu.sum(0), v.sum(0)
    elif combine == "slerp":
        z_f, v_f = mu[0], v[0]
        for i in range(1, k):
            z_f, v_f = slerp(z_f, mu[i], 1.0 / (i + 1)), slerp(v_f, v[i], 1.0 / (i + 1))
    else:
        raise ValueError(f"combine must be weighted, mean, sum or slerp, got {combine!r}")
    if normalise:
        v_f = F.normalize(v_f, dim=0) * scale
    return z_f, v_f


def residual_weights(
    alpha: torch.Tensor | None, k: int, combine: Combine, like: torch.Tensor
) -> torch.Tensor:
    """The weight of each input's reconstruction residual in :func:`anchored_factors`: the weight
    its latent got in the fused code (``weighted``: ``alpha``; ``sum``: 1; ``mean``/``slerp``: ``1/K``)."""
    if combine == "weighted" and alpha is not None:
        return alpha
    value = 1.0 if combine == "sum" else 1.0 / k
    return torch.full((k,), value, dtype=like.dtype, device=like.device)


# One term ``scale * B @ A`` of a low-rank sum: ``(A [r, d_in], B [d_out, r], scale)``.
LowRankTerm = tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]


def anchored_terms(
    fused: torch.Tensor,
    decoded: torch.Tensor,
    inputs: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]],
    masks: torch.Tensor,
    weights: torch.Tensor,
    layout: Layout,
    displacement: float | torch.Tensor = 1.0,
) -> list[list[LowRankTerm]]:
    """Decode the fused code *relative to the inputs*: per module, the delta
    ``g (D(z_f) - sum_t w_t D(mu_t)) + sum_t w_t dW_t`` as a sum of low-rank terms, ``g`` the
    ``displacement`` scale (1 by default).

    The decoder's reconstruction error of each input is added back, so what the fused adapter
    takes from the F-VAE is the *displacement* the latent arithmetic makes, never the decoder's
    absolute output: fusing one adapter returns it exactly, a decoder that ignores its code (a
    collapsed posterior) yields ``sum_t w_t dW_t`` (task arithmetic) plus a ``(1 - sum w)``
    multiple of its constant instead of that constant, and in meta-training the fusion loss can
    no longer be met by a decoder that memorises one adapter for the episodes' support examples
    whatever the inputs are.

    The terms are views of the arguments' tensors, never copies: a loss that scores them term by
    term (:func:`engine.meta.losses.subspace_proxy_loss`) keeps the ``1 + 2K`` factor copies of
    :func:`anchored_factors` out of the autograd graph, which at 8 B-class layouts is the
    largest tensor of a training step.

    Args:
        fused: ``[N]`` decoded, de-normalised fused adapter ``D(z_f, v_f)``.
        decoded: ``[K, N]`` decoded, de-normalised inputs ``D(mu_t, v_t)``.
        inputs: per input, its exact per-module factors ``(A [r, d_in], B [d_out, r])`` in layout
            order (any ranks; e.g. :func:`engine.adapters.codec.unflatten` of its canonical vector).
        masks: ``[K, M]`` bool: the modules each input targets (elsewhere it adds no residual).
        weights: ``[K]`` each residual's weight (:func:`residual_weights`).
        layout: the layout of ``fused`` and ``decoded``.
        displacement: ``g``, a float or a 0-d tensor (differentiable), applied to the terms'
            scales: a decoded vector holds both factors of each module, so scaling the vector
            would scale its update by ``g**2``.

    Returns:
        Per layout module, its terms ``(A, B, scale)``; differentiable in every argument's tensors.
    """
    fused_f = unflatten(fused, layout)
    decoded_f = [unflatten(decoded[t], layout) for t in range(decoded.shape[0])]
    terms = []
    for m, (A, B) in enumerate(fused_f):
        module_terms: list[LowRankTerm] = [(A, B, displacement)]
        for t, own in enumerate(inputs):
            if not bool(masks[t, m]):
                continue
            A_t, B_t = own[m]
            A_d, B_d = decoded_f[t][m]
            module_terms += [
                (A_t.to(A.dtype), B_t.to(B.dtype), weights[t]),
                (A_d, B_d, -weights[t] * displacement),
            ]
        terms.append(module_terms)
    return terms


def concatenate_terms(terms: Sequence[LowRankTerm]) -> tuple[torch.Tensor, torch.Tensor]:
    """A sum of low-rank terms as one factor pair ``(A, B)`` (ranks concatenated, scales on ``B``)."""
    scaled = [B if isinstance(scale, float) and scale == 1.0 else B * scale for _, B, scale in terms]
    return torch.cat([A for A, _, _ in terms]), torch.cat(scaled, dim=1)


def anchored_factors(
    fused: torch.Tensor,
    decoded: torch.Tensor,
    inputs: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]],
    masks: torch.Tensor,
    weights: torch.Tensor,
    layout: Layout,
    displacement: float | torch.Tensor = 1.0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`anchored_terms` as exact low-rank factors per module ``(A, B)``, ranks concatenated
    (the form a LoRA adapter stores and a forward pass applies)."""
    terms = anchored_terms(fused, decoded, inputs, masks, weights, layout, displacement)
    return [concatenate_terms(t) for t in terms]


def familiarity(errors: torch.Tensor, reference: float) -> torch.Tensor:
    """How much the F-VAE knows each input, from its reconstruction error: ``errors [K]`` relative
    squared errors (:func:`engine.fvae.recon.relative_error`), ``reference`` the error it reached on its training
    adapters. 1 at or below ``reference``, falling linearly to 0 at an error of 1 (the error of
    reconstructing nothing, what it gets on adapters of tasks it never saw). Returns ``[K]``."""
    span = max(1.0 - reference, 1e-6)
    falling = ((1.0 - errors) / span).clamp(0.0, 1.0)
    return torch.where(errors <= reference, torch.ones_like(errors), falling)
