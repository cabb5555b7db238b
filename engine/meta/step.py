"""One meta-training episode's loss (pure torch; Ray-free so it tests in milliseconds)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from engine.adapters.codec import module_factors, unflatten
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
from engine.fvae.tokens import delta_measures
from engine.meta.losses import subspace_proxy_loss, subspace_relative_error

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

    With the module-token F-VAE and the proxy loss every term is a sum over modules, and the
    episode is computed one module at a time (:func:`_episode_loss_by_module`): the same loss and
    gradients without any ``[K, N]`` tensor but the inputs, which is what lets an episode of
    8 B-class adapters fit a worker.

    Returns:
        ``{"loss", "recon", "kl", "fusion"}`` scalars (``loss`` differentiable).
    """
    if data_loss is None and model.config.arch == "tokens":
        return _episode_loss_by_module(model, normalizer, batch, layout, settings)
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


def _episode_loss_by_module(
    model: FVAE, normalizer: SlotNormalizer, batch: EpisodeBatch, layout: Layout, settings: EpisodeSettings
) -> dict[str, torch.Tensor]:
    """:func:`episode_loss` with the data-free proxy for the module-token F-VAE, one module at a time.

    The encoder and the decoder's token states (``[K, M, r, hidden]``, small) are computed once;
    each module's decoded slots, reconstruction error and proxy terms are then computed inside an
    activation checkpoint, so backward recomputes that module's heads instead of keeping every
    module's outputs: peak memory is the inputs plus one module, not several ``[K, N]`` copies.
    """
    net = model.net
    xn = normalizer.normalize(batch.x)
    mu, logvar = model.encode(xn, batch.cond)
    sampled = net.decoder_states(model.sample(mu, logvar), batch.cond)
    fusion = settings.fusion_weight > 0
    fused_states = mean_states = weights = None
    if fusion:
        z_f, v_f = fuse_latents(mu, batch.cond, combine=settings.combine, project=settings.project)
        fused_states = net.decoder_states(z_f[None], v_f[None])
        if settings.anchor:
            mean_states = net.decoder_states(mu, batch.cond)
            weights = residual_weights(None, batch.x.shape[0], settings.combine, xn)
    squared_error, proxy_sum, proxy_terms = xn.new_zeros(()), xn.new_zeros(()), 0
    for m in range(layout.num_modules):
        present = batch.mask[:, m].nonzero().flatten().tolist()
        if not present:  # no reconstruction and no proxy term reads this module
            continue
        error, proxy = checkpoint(
            _module_terms,
            net,
            normalizer,
            batch,
            xn,
            layout,
            m,
            present,
            sampled,
            fused_states,
            mean_states,
            weights,
            use_reentrant=False,
        )
        squared_error = squared_error + error
        if fusion:
            proxy_sum, proxy_terms = proxy_sum + proxy, proxy_terms + len(present)
    slots = (batch.mask.to(xn.dtype) @ torch.as_tensor(np.asarray(layout.module_sizes), dtype=xn.dtype)).sum()
    # Reconstructing updates, the error is a relative one per present (adapter, module) pair.
    units = batch.mask.sum() if model.delta else None
    terms = model.objective(squared_error, slots, mu, logvar, units=units)
    fusion_loss = proxy_sum / max(proxy_terms, 1)
    return {**terms, "loss": terms["loss"] + settings.fusion_weight * fusion_loss, "fusion": fusion_loss}


def _module_terms(
    net, normalizer, batch, xn, layout, m, present, sampled, fused_states, mean_states, weights
):
    """Module ``m``'s summed reconstruction error over the adapters that target it (``present``):
    squared error over its slots, or with ``recon_space: delta`` the relative error of its update
    (:func:`engine.fvae.tokens.delta_measures`); and the sum of its proxy terms
    (:func:`engine.meta.losses.subspace_relative_error`) for those adapters' tasks when
    ``fused_states`` is given."""
    start, end = int(layout.offsets[m]), int(layout.offsets[m + 1])
    rows = torch.tensor(present)
    reconstruction, target = net.decode_module(sampled, m)[rows], xn[rows, start:end]
    if net.delta:
        error = delta_measures(*net.tokens.rows(reconstruction, m), *net.tokens.rows(target, m))[0].sum()
    else:
        error = torch.linalg.vector_norm(reconstruction - target).square()
    if fused_states is None:
        return error, error.new_zeros(())
    mean, std = normalizer.mean[start:end].to(xn.device), normalizer.std[start:end].to(xn.device)
    spec, r = layout.modules[m], layout.r_max
    terms = [(*module_factors(torch.addcmul(mean, net.decode_module(fused_states, m)[0], std), spec, r), 1.0)]
    inputs = {t: module_factors(batch.x[t, start:end], spec, r) for t in present}
    if mean_states is not None:
        decoded = torch.addcmul(mean, net.decode_module(mean_states, m)[rows], std)
        for i, t in enumerate(present):
            terms += [(*inputs[t], weights[t]), (*module_factors(decoded[i], spec, r), -weights[t])]
    return error, sum(subspace_relative_error(terms, *inputs[t]) for t in present)
