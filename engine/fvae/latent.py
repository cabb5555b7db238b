"""Fusion in latent space (DESIGN.md §2.6), pure torch.

The paper adjusts the *orientation* of the task vectors to balance conflicting directions, then
lets the F-VAE reconstruct one LoRA. This project's default: unit-normalise the task vectors,
project out pairwise conflicting components (PCGrad-style: for each pair with negative cosine,
remove from one the component along the other), combine with weights ``alpha`` and decode
``D([z_f; v_f])`` with ``z_f = sum alpha_t mu_t``. ``mean``, ``sum`` and ``slerp`` are ablations.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn import functional as F

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
