"""Fusion losses for meta-training (pure torch, differentiable).

With no task examples, the data-free proxy (docs/design.md §2.5) asks the fused delta to act like each
task's own delta on that task's input subspace — the row space of ``A_t``:
``|| (dW_f - dW_t) A_t^T ||^2 / || dW_t A_t^T ||^2``, computed from factors only
(``dW A_t^T = B (A A_t^T)``), never forming ``d_out x d_in`` matrices.
"""

from __future__ import annotations

import torch

from engine.adapters.codec import unflatten
from engine.adapters.layout import Layout
from engine.fusion.icm.latent import LowRankTerm

__all__ = ["subspace_proxy_loss", "subspace_relative_error", "unflatten"]


def subspace_proxy_loss(
    fused: torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]] | list[list[LowRankTerm]],
    targets: torch.Tensor,
    masks: torch.Tensor,
    layout: Layout,
) -> torch.Tensor:
    """Mean relative error of the fused delta on each task's input subspace.

    Args:
        fused: ``[N]`` fused adapter (de-normalised, real weight space), or its per-module
            factors ``(A [r, d_in], B [d_out, r])`` of any rank, or its per-module sums of
            low-rank terms (:func:`engine.fusion.icm.latent.anchored_terms`), scored term by term so
            that no concatenated copy of the factors enters the autograd graph.
        targets: ``[K, N]`` the tasks' own adapters.
        masks: ``[K, M]`` bool, modules each task's adapter targets.
        layout: the layout of all vectors.

    Returns:
        Scalar: mean over (task, present module) of
        ``||B_f A_f A_t^T - B_t A_t A_t^T||^2 / ||B_t A_t A_t^T||^2``.
    """
    per_module = _as_terms(fused, layout)
    terms = []
    for k in range(targets.shape[0]):
        for m, (A_t, B_t) in enumerate(unflatten(targets[k], layout)):
            if not bool(masks[k, m]):
                continue
            terms.append(subspace_relative_error(per_module[m], A_t, B_t))
    if not terms:
        return targets.new_zeros(())
    return torch.stack(terms).mean()


def subspace_relative_error(fused: list[LowRankTerm], A_t: torch.Tensor, B_t: torch.Tensor) -> torch.Tensor:
    """One (task, module) term of :func:`subspace_proxy_loss`: the fused module's low-rank terms
    against the task's factors ``A_t [r, d_in]``, ``B_t [d_out, r]``; a 0-d tensor."""
    gram = A_t @ A_t.T  # [r, r]
    target = B_t @ gram  # [d_out, r]
    residual = -target
    for A_f, B_f, scale in fused:
        residual = residual + (B_f @ (A_f @ A_t.T)) * scale
    return (residual**2).sum() / (target**2).sum().clamp_min(1e-12)


def _as_terms(fused, layout: Layout) -> list[list[LowRankTerm]]:
    if isinstance(fused, torch.Tensor):
        fused = unflatten(fused, layout)
    return [[(part[0], part[1], 1.0)] if isinstance(part, tuple) else part for part in fused]
