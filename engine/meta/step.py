"""One meta-training episode's loss (pure torch; Ray-free so it tests in milliseconds)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engine.adapters.codec import unflatten
from engine.adapters.layout import Layout
from engine.fusion.icm.latent import (
    Combine,
    anchored_terms,
    concatenate_terms,
    fuse_latents,
    residual_weights,
)
from engine.fvae.model import FVAE
from engine.fvae.normalize import SlotNormalizer
from engine.meta.losses import subspace_proxy_loss

# (fused adapter in weight space: flat [N] or per-module factors, tasks of the episode, the catalog
# ids of the fused adapters or None) -> scalar loss
DataLoss = Callable[
    [torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]], tuple[str, ...], tuple[str, ...] | None],
    torch.Tensor,
]


@dataclass
class EpisodeBatch:
    """The tensors of one episode (one adapter per task of the subset).

    Attributes:
        x: ``[K, N]`` adapters in weight space.
        mask: ``[K, M]`` bool module masks.
        cond: ``[K, d]`` task vectors.
        tasks: the K task names.
        ids: the K adapters' catalog ids (the data loss scores each task with its adapter's own
            head, when adapters carry heads), or None.
    """

    x: torch.Tensor
    mask: torch.Tensor
    cond: torch.Tensor
    tasks: tuple[str, ...]
    ids: tuple[str, ...] | None = None


@dataclass(frozen=True)
class EpisodeSettings:
    """Loss switches (each one an ablation): ``fusion_weight`` 0 trains reconstruction only;
    ``anchor`` scores the fused adapter anchored on the episode's inputs, as ``icm`` fuses
    (:func:`engine.fusion.icm.latent.anchored_factors`), instead of the decoder's absolute output."""

    fusion_weight: float = 1.0
    combine: Combine = "weighted"
    project: bool = True
    anchor: bool = True


def slot_mask(mask: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``[K, M]`` module mask -> ``[K, N]`` slot mask."""
    sizes = torch.as_tensor(np.asarray(layout.module_sizes), device=mask.device)
    return torch.repeat_interleave(mask, sizes, dim=1)


def episode_loss(
    model: FVAE,
    normalizer: SlotNormalizer,
    batch: EpisodeBatch,
    layout: Layout,
    settings: EpisodeSettings,
    data_loss: DataLoss | None = None,
) -> dict[str, torch.Tensor]:
    """Reconstruction of every adapter + beta KL + ``fusion_weight`` x fusion loss.

    The fusion loss fuses the episode's latents (:func:`engine.fusion.icm.latent.fuse_latents`), decodes
    and de-normalises the fused adapter, then scores it on every task of the subset: with
    ``data_loss`` (few-shot query loss through the frozen base model), else with the data-free
    subspace proxy.

    Returns:
        ``{"loss", "recon", "kl", "fusion"}`` scalars (``loss`` differentiable).
    """
    xn = normalizer.normalize(batch.x)
    out = model(xn, batch.cond)
    terms = model.loss(out, xn, slot_mask(batch.mask, layout))
    fusion = xn.new_zeros(())
    if settings.fusion_weight > 0:
        z_f, v_f = fuse_latents(out["mu"], batch.cond, combine=settings.combine, project=settings.project)
        fused = normalizer.denormalize(model.decode(z_f[None], v_f[None])[0])
        if settings.anchor:
            # Without the anchor the decoder can meet the data loss by emitting one adapter fitted to
            # the episodes' support examples whatever its code says (it then fuses nothing).
            decoded = normalizer.denormalize(model.decode(out["mu"], batch.cond))
            inputs = [unflatten(x, layout) for x in batch.x]
            weights = residual_weights(None, batch.x.shape[0], settings.combine, fused)
            fused = anchored_terms(fused, decoded, inputs, batch.mask, weights, layout)
        if data_loss is not None:
            if settings.anchor:  # the base model's forward applies one factor pair per module
                fused = [concatenate_terms(terms) for terms in fused]
            fusion = data_loss(fused, batch.tasks, batch.ids)
        else:
            fusion = subspace_proxy_loss(fused, batch.x, batch.mask, layout)
    return {
        "loss": terms["loss"] + settings.fusion_weight * fusion,
        "recon": terms["recon"],
        "kl": terms["kl"],
        "fusion": fusion,
    }
