"""The Fusion-VAE: a conditional VAE over flat normalised adapter vectors (pure torch, no I/O).

``E([l; v]) -> (mu, logvar)``, ``D([z; v]) -> l`` (docs/design.md §2.4). Four architectures share the
interface: the reference 1-D conv stack, a chunked variant, a dense MLP, and the module-token
F-VAE (:mod:`engine.fvae.tokens`) for adapters of real 7-8 B models.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from engine.fvae.config import FVAEConfig
from engine.fvae.recon import explained_fraction, relative_error
from engine.fvae.tokens import TokenFVAE


def _channel_plan(config: FVAEConfig) -> list[int]:
    """Channels after each of the ``depth`` stride-2 layers (doubling every two layers, capped)."""
    return [min(config.max_channels, config.channels * 2 ** (i // 2)) for i in range(config.depth)]


def _norm(config: FVAEConfig, channels: int) -> nn.Module:
    """Per-sample channel normalisation (``GroupNorm`` with one group per channel), or the
    reference's ``BatchNorm1d`` (see :class:`FVAEConfig` ``norm`` for why it is not the default)."""
    if config.norm == "batch":
        return nn.BatchNorm1d(channels)
    if config.norm == "none":
        return nn.Identity()
    if config.norm == "group":
        return nn.GroupNorm(max(1, channels // 8), channels)
    return nn.GroupNorm(channels, channels)


class ConvFVAE(nn.Module):
    """Reference architecture: ``depth`` x (Conv1d stride 2 + norm + LeakyReLU), mirrored by
    ConvTranspose1d in the decoder; the condition joins at the bottleneck."""

    def __init__(self, config: FVAEConfig):
        super().__init__()
        self.config = config
        plan = _channel_plan(config)
        layers, c_in = [], 1
        for c_out in plan:
            layers += [
                nn.Conv1d(c_in, c_out, 4, stride=2, padding=1),
                _norm(config, c_out),
                nn.LeakyReLU(0.2),
            ]
            c_in = c_out
        self.encoder = nn.Sequential(*layers)
        self.bottleneck = (plan[-1], config.padded_dim // 2**config.depth)
        flat = plan[-1] * self.bottleneck[1]
        self.to_stats = nn.Linear(flat + config.cond_dim, 2 * config.latent_dim)
        self.from_latent = nn.Linear(config.latent_dim + config.cond_dim, flat)
        layers = []
        reversed_plan = plan[::-1]
        for i, c in enumerate(reversed_plan):
            c_out = reversed_plan[i + 1] if i + 1 < len(reversed_plan) else plan[0]
            layers += [
                nn.ConvTranspose1d(c, c_out, 4, stride=2, padding=1),
                _norm(config, c_out),
                nn.LeakyReLU(0.2),
            ]
        self.decoder = nn.Sequential(*layers, nn.Conv1d(plan[0], 1, 3, padding=1))

    def encode(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, N]``, ``cond [B, d]`` -> ``(mu, logvar)``, each ``[B, latent]``."""
        h = self.encoder(_pad(x, self.config.padded_dim).unsqueeze(1)).flatten(1)
        mu, logvar = self.to_stats(torch.cat([h, cond], dim=1)).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``z [B, latent]``, ``cond [B, d]`` -> ``x_hat [B, N]``."""
        h = self.from_latent(torch.cat([z, cond], dim=1)).view(-1, *self.bottleneck)
        return self.decoder(h).squeeze(1)[:, : self.config.input_dim]


class ChunkedFVAE(nn.Module):
    """Large-adapter variant: the vector is cut into fixed-size chunks; a shared MLP encodes each
    chunk with a learned slot embedding, chunk codes are mean-pooled with the condition into
    ``(mu, logvar)``; the decoder maps ``[z; v; slot embedding]`` back to each chunk. Parameters
    grow with the number of chunks only through the embeddings."""

    def __init__(self, config: FVAEConfig):
        super().__init__()
        self.config = config
        self.num_chunks = config.padded_dim // config.chunk_size
        h = config.hidden
        self.slots = nn.Embedding(self.num_chunks, h)
        self.chunk_encoder = nn.Sequential(
            nn.Linear(config.chunk_size + h, h), nn.LeakyReLU(0.2), nn.Linear(h, h)
        )
        self.to_stats = nn.Sequential(
            nn.Linear(h + config.cond_dim, h), nn.LeakyReLU(0.2), nn.Linear(h, 2 * config.latent_dim)
        )
        self.chunk_decoder = nn.Sequential(
            nn.Linear(config.latent_dim + config.cond_dim + h, h),
            nn.LeakyReLU(0.2),
            nn.Linear(h, h),
            nn.LeakyReLU(0.2),
            nn.Linear(h, config.chunk_size),
        )

    def encode(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chunks = _pad(x, self.config.padded_dim).view(x.shape[0], self.num_chunks, -1)  # [B, C, chunk]
        slots = self.slots.weight.expand(x.shape[0], -1, -1)  # [B, C, h]
        pooled = self.chunk_encoder(torch.cat([chunks, slots], dim=2)).mean(dim=1)  # [B, h]
        mu, logvar = self.to_stats(torch.cat([pooled, cond], dim=1)).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        batch = z.shape[0]
        context = torch.cat([z, cond], dim=1).unsqueeze(1).expand(-1, self.num_chunks, -1)
        slots = self.slots.weight.expand(batch, -1, -1)
        chunks = self.chunk_decoder(torch.cat([context, slots], dim=2))  # [B, C, chunk]
        return chunks.reshape(batch, -1)[:, : self.config.input_dim]


class MLPFVAE(nn.Module):
    """Dense variant (the design probe's F-VAE): ``[x; v] -> hidden -> (mu, logvar)`` and
    ``[z; v] -> hidden -> x_hat``. Every slot has its own weights, so it can represent adapters
    whose values have no local structure (per-slot normalised LoRA factors), which the shared conv
    kernels cannot; parameters grow as ``2 x N x hidden`` (the chunked variant bounds them)."""

    def __init__(self, config: FVAEConfig):
        super().__init__()
        self.config = config
        h = config.hidden
        self.encoder = nn.Sequential(nn.Linear(config.input_dim + config.cond_dim, h), nn.LeakyReLU(0.2))
        self.to_stats = nn.Linear(h + config.cond_dim, 2 * config.latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(config.latent_dim + config.cond_dim, h),
            nn.LeakyReLU(0.2),
            nn.Linear(h, config.input_dim),
        )

    def encode(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(torch.cat([x, cond], dim=1))
        mu, logvar = self.to_stats(torch.cat([h, cond], dim=1)).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z, cond], dim=1))


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(x, (0, length - x.shape[1])) if x.shape[1] < length else x


class FVAE(nn.Module):
    """Conditional VAE over flat normalised adapters.

    Example::

        model = FVAE(FVAEConfig(input_dim=layout.size, cond_dim=384))
        out = model(x, cond)                    # x [B, N], cond [B, d]
        loss = model.loss(out, x, slot_mask)    # masked reconstruction + beta * KL
    """

    def __init__(self, config: FVAEConfig):
        super().__init__()
        self.config = config
        archs = {"conv": ConvFVAE, "chunked": ChunkedFVAE, "mlp": MLPFVAE, "tokens": TokenFVAE}
        self.net = archs[config.arch](config)

    def encode(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, N]``, ``cond [B, d]`` -> ``(mu [B, latent], logvar [B, latent])``."""
        self._check(x, cond)
        return self.net.encode(x, cond)

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``z [B, latent]``, ``cond [B, d]`` -> ``x_hat [B, N]``."""
        return self.net.decode(z, cond)

    @staticmethod
    def sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """A reparameterised draw ``z = mu + eps * exp(logvar / 2)``."""
        return mu + torch.randn_like(mu) * (0.5 * logvar).exp()

    def forward(self, x: torch.Tensor, cond: torch.Tensor, sample: bool = True) -> dict[str, torch.Tensor]:
        mu, logvar = self.encode(x, cond)
        z = self.sample(mu, logvar) if sample else mu
        return {"x_hat": self.decode(z, cond), "mu": mu, "logvar": logvar, "z": z}

    def loss(
        self, out: dict[str, torch.Tensor], x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Masked reconstruction + ``kl_weight`` x KL.

        The reconstruction term is the mean squared error over present slots, or with
        ``recon_space: delta`` the mean over present (adapter, module) pairs of the module's
        relative update error (:meth:`reconstruction_measures`).

        Args:
            out: :meth:`forward`'s output.
            x: ``[B, N]`` targets.
            mask: ``[B, N]`` bool, False on absent modules' slots (and any padding); None = all.

        Returns:
            ``{"loss", "recon", "kl"}`` scalars.
        """
        if out["x_hat"].shape != x.shape:  # no silent broadcasting
            raise ValueError(f"x_hat {tuple(out['x_hat'].shape)} and x {tuple(x.shape)} differ in shape")
        slots = x.numel() if mask is None else mask.sum()
        if self.delta:
            present = self._module_mask(x, mask)
            errors, _ = self.net.delta_errors(out["x_hat"], x)
            error = (errors * present).sum()
            return self.objective(error, slots, out["mu"], out["logvar"], units=present.sum())
        # One [B, N] tensor in all, kept for backward: the difference, masked in place (subtraction
        # keeps nothing for backward), then a norm, which has no [B, N] output of its own. At 7-8 B
        # adapter sizes each [B, N] float tensor is ~0.7 GB.
        diff = out["x_hat"] - x
        if mask is not None:
            diff.masked_fill_(~mask, 0.0)
        return self.objective(torch.linalg.vector_norm(diff).square(), slots, out["mu"], out["logvar"])

    def objective(
        self,
        error: torch.Tensor,
        slots: int | torch.Tensor,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        units: int | torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """:meth:`loss` from the summed reconstruction error over the batch (for a caller that sums
        it piecewise, e.g. one module at a time): ``error`` is summed over ``units`` (the present
        slots, the default, or with ``recon_space: delta`` the present (adapter, module) pairs);
        ``slots`` (present slots) sets the KL's balance either way."""
        slots = torch.as_tensor(slots, dtype=error.dtype).clamp_min(1)
        units = slots if units is None else torch.as_tensor(units, dtype=error.dtype).clamp_min(1)
        recon = error / units
        kl = kl_divergence(mu, logvar)
        beta = self.config.kl_weight
        if self.config.recon_reduction == "sum":
            # The reference's balance (squared error summed over a sample's elements + beta KL),
            # divided through by the elements per sample so the objective keeps the per-element
            # scale the fusion loss is weighed against: beta acts per latent vs per element.
            beta = beta / (slots / mu.shape[0]).clamp_min(1.0)
        return {"loss": recon + beta * kl, "recon": recon, "kl": kl}

    @property
    def delta(self) -> bool:
        """Whether the F-VAE reconstructs updates ``dW`` (``recon_space: delta``), not factors."""
        return self.config.recon_space == "delta"

    def reconstruction_measures(
        self, x_hat: torch.Tensor, x: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """How well ``x_hat [..., N]`` reconstructs ``x [..., N]`` over the slots in ``present``:
        ``(relative error, explained fraction)``, each ``[...]``. Per slot
        (:func:`engine.fvae.recon.relative_error`, :func:`engine.fvae.recon.explained_fraction`),
        or with ``recon_space: delta`` the mean of each present module's update measures
        (:func:`engine.fvae.tokens.delta_measures`)."""
        if not self.delta:
            return relative_error(x_hat, x, present), explained_fraction(x_hat, x, present)
        shape = x.shape[:-1]
        x_hat, x, present = (
            x_hat.reshape(-1, x.shape[-1]),
            x.reshape(-1, x.shape[-1]),
            present.reshape(-1, x.shape[-1]),
        )
        modules = self._module_mask(x, present).to(x.dtype)
        errors, explained = self.net.delta_errors(x_hat, x)
        count = modules.sum(dim=1).clamp_min(1.0)
        per_adapter = ((errors * modules).sum(1) / count, (explained * modules).sum(1) / count)
        return per_adapter[0].reshape(shape), per_adapter[1].reshape(shape)

    def _module_mask(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``[B, M]`` float: the modules a ``[B, N]`` slot mask covers (a module's slots are all in
        or all out)."""
        if mask is None:
            return x.new_ones(x.shape[0], self.net.tokens.layout.num_modules)
        starts = torch.as_tensor(np.asarray(self.net.tokens.layout.offsets[:-1]), device=mask.device)
        return mask[:, starts].to(x.dtype)

    def _check(self, x: torch.Tensor, cond: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.config.input_dim:
            raise ValueError(f"x must be [B, {self.config.input_dim}], got {tuple(x.shape)}")
        if cond.shape != (x.shape[0], self.config.cond_dim):
            raise ValueError(f"cond must be [{x.shape[0]}, {self.config.cond_dim}], got {tuple(cond.shape)}")


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` summed over latent dims, averaged over the batch."""
    return (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(dim=1)).mean()
